"""The phases of a run: teacher, distillation, evaluation (`train_and_evaluate`).

`train_and_evaluate(config, workdir)` runs the phases: (1) train the teacher with
cross-entropy, or restore it, and evaluate it once; (2) distill the student, evaluating it
on the way and keeping the best in WORKDIR/student_best; (3) write WORKDIR/summary.json
from those evaluations (the last step's and the best student's; nothing is evaluated
again). Both training phases checkpoint periodically and resume from the workdir. The
steps are `mokd_jax.steps`, the loop `mokd_jax.loop`, the networks
`mokd_jax.networks.build_networks`.
"""

import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from mokd_jax import checkpoint, data, normalization, parallel, plots
from mokd_jax.config_checks import check_config
from mokd_jax.errors import invalid
from mokd_jax.evaluation import Counts, at_chance, make_evaluator
from mokd_jax.identities import (
    check_teacher_fits,
    check_teacher_identity,
    data_fingerprint,
    dataset_inputs,
    dataset_model,
    exported_identity,
    student_fingerprint,
)
from mokd_jax.loop import Evaluation, format_metrics, initial_state, phase_writer, run_phase
from mokd_jax.networks import build_networks
from mokd_jax.optimizers import make_optimizer, student_optimizer
from mokd_jax.state import TrainState, create_student_state, create_teacher_state
from mokd_jax.steps import batch_mixer, make_distill_step, teacher_step


def open_phase_manager(config: ml_collections.ConfigDict, workdir: str, phase: str):
    return checkpoint.open_manager(
        os.path.join(workdir, "checkpoints", phase),
        config.checkpoint_every_steps,
        config.max_checkpoints_to_keep,
    )


def evaluation_interval(config: ml_collections.ConfigDict, role: str) -> int:
    """How often the teacher's or student's (`role`) phase evaluates its network:
    `eval_every_steps` when set; automatically (0), once per epoch where the phase's recipe
    is epoch-based (`steps_per_epoch`, which `config_helpers.set_phase` records: the TFDS
    configs), else `EVALUATIONS_PER_RUN` times per run (digits and npz: their configs count
    steps, not epochs, and an epoch is a few steps, so evaluating every epoch would cost
    more than training)."""
    section = config[role]
    if config.eval_every_steps:
        return config.eval_every_steps
    if section.steps_per_epoch:
        return section.steps_per_epoch
    return max(1, section.num_train_steps // EVALUATIONS_PER_RUN)


EVALUATIONS_PER_RUN = 4


def network_evaluator(
    config, role: str, dataset, mesh, inputs: normalization.Normalization
) -> Callable[[dict], Counts]:
    """The teacher's or student's evaluator (`evaluation.make_evaluator`: compiled once),
    fed through its `inputs` statistics."""
    model = dataset_model(config, role, dataset)
    return make_evaluator(model, dataset, config.eval_batch_size, mesh, inputs)


def teacher_variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def student_variables(state: TrainState) -> dict:
    """The student's variables in the distillation state (without the projector)."""
    return {"params": state.params["student"], "batch_stats": state.batch_stats}


class PhaseEvaluation:
    """Evaluates a phase's network (`evaluate(step, state)`, what `loop.Evaluation` runs)
    and keeps the latest result, so the summary reuses the evaluation of the last step
    instead of evaluating the network again; `keep(step, variables, metrics)`, when given,
    sees every result (the best student's export). `evaluator(variables)` gives the
    metrics (classification's accuracies, `accuracies_of`; detection's COCO AP)."""

    def __init__(
        self,
        evaluator: Callable[[dict], dict[str, float]],
        variables_of: Callable[[TrainState], dict],
        keep: Callable[[int, dict, dict], None] | None = None,
    ):
        self.evaluator, self.variables_of, self.keep = evaluator, variables_of, keep
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def evaluate(self, step: int, state: TrainState) -> dict[str, float]:
        variables = self.variables_of(state)
        self.step, self.metrics = step, self.evaluator(variables)
        if self.keep is not None:
            self.keep(step, variables, self.metrics)
        return self.metrics

    def at_step(self, step: int, state: TrainState) -> dict[str, float]:
        """The metrics at `step`: the latest result when it is that step's (the loop
        evaluated it), else evaluated now (a resumed phase with no step left to run)."""
        return self.metrics if self.step == step else self.evaluate(step, state)


def accuracies_of(evaluator: Callable[[dict], Counts]) -> Callable[[dict], dict[str, float]]:
    """A classification evaluator's counts as the accuracies `PhaseEvaluation` reports."""
    return lambda variables: evaluator(variables).accuracies()


def train_teacher(config, workdir, dataset, mesh, evaluator) -> tuple[dict, dict[str, float]]:
    """Phase 1: cross-entropy training of the teacher, evaluated on the way
    (`evaluation_interval`); returns its variables and its accuracy at the last step."""
    model = dataset_model(config, "teacher", dataset)
    tx = make_optimizer(config.teacher)
    create = functools.partial(create_teacher_state, model, dataset.image_shape, tx)
    inputs = dataset_inputs(config, "teacher", dataset)
    fingerprint = {
        **data_fingerprint(config, dataset),
        "teacher": config.teacher.to_dict(),
        "teacher_input": inputs._asdict(),
    }
    manager = open_phase_manager(config, workdir, "teacher")
    state, shardings = initial_state(
        create, config.seed, manager, fingerprint, mesh, config.mesh.fsdp_min_size, "teacher"
    )
    mix = batch_mixer(config, dataset.num_classes, config.seed)
    step_fn = parallel.compiled_step(
        functools.partial(teacher_step, model=model, tx=tx, inputs=inputs, mix=mix),
        shardings,
        mesh,
    )
    evaluation = PhaseEvaluation(accuracies_of(evaluator), teacher_variables)
    state, _ = run_phase(
        "teacher",
        state,
        step_fn,
        parallel.device_batches(dataset, config.batch_size, config.seed, int(state.step), mesh),
        config.teacher.num_train_steps,
        manager,
        fingerprint,
        phase_writer(workdir, "teacher"),
        config.log_every_steps,
        Evaluation(evaluation_interval(config, "teacher"), evaluation.evaluate),
    )
    manager.close()
    accuracy = evaluation.at_step(config.teacher.num_train_steps, state)
    return teacher_variables(state), accuracy


def check_restored_teacher(counts: Counts, num_classes: int, directory: str) -> None:
    """Logs the restored teacher's accuracy, and a warning when it is at chance level
    (`evaluation.at_chance`): distilling from it would teach the student nothing."""
    logging.info("teacher restored from %s: %s", directory, format_metrics(counts.accuracies()))
    if at_chance(counts, num_classes):
        logging.warning(
            "the teacher restored from %s is at chance level: top-1 %.2f%% on %d test "
            "examples of %d classes (chance %.2f%%). Likely causes: a wrong input "
            "normalisation (the statistics in its identity are not those it was trained "
            "with), a wrong checkpoint (another model or an untrained one), or a wrong "
            "dataset (not the one it was trained on, or other class order).",
            directory,
            100 * counts.top1 / counts.examples,
            counts.examples,
            num_classes,
            100 / num_classes,
        )


def obtain_teacher(
    config, workdir, dataset, mesh
) -> tuple[dict, normalization.Normalization, dict[str, float]]:
    """(the teacher's variables on the mesh, the input statistics it is fed with, its test
    accuracy): restored from `teacher.checkpoint_dir` or WORKDIR/teacher with the
    statistics saved there, or trained in WORKDIR/teacher with `dataset_inputs` and
    exported with them. It is evaluated once, right after it is trained or restored (a
    restored one at chance level gets a warning, `check_restored_teacher`)."""
    directory = config.teacher.checkpoint_dir or os.path.join(workdir, "teacher")
    saved_identity = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
    if saved_identity is not None:
        inputs = check_teacher_identity(saved_identity, config, dataset.num_classes, directory)
        logging.info("teacher: restored from %s", directory)
        variables = checkpoint.load_variables(directory)
        check_teacher_fits(variables, config, dataset, directory)
        normalization.check_channels(
            f"{directory}: {normalization.IDENTITY_FIELD}", inputs, dataset.image_shape[-1]
        )
        variables = parallel.place_variables(variables, mesh, config.mesh.fsdp_min_size)
        counts = network_evaluator(config, "teacher", dataset, mesh, inputs)(variables)
        check_restored_teacher(counts, dataset.num_classes, directory)
        return variables, inputs, counts.accuracies()
    if config.teacher.checkpoint_dir:
        raise invalid(
            "teacher.checkpoint_dir", directory, "a directory holding a teacher checkpoint"
        )
    inputs = dataset_inputs(config, "teacher", dataset)
    evaluator = network_evaluator(config, "teacher", dataset, mesh, inputs)
    variables, accuracy = train_teacher(config, workdir, dataset, mesh, evaluator)
    identity = exported_identity(config.teacher.model, dataset.num_classes, inputs)
    checkpoint.export_variables(directory, variables, identity, config.teacher.num_train_steps)
    return variables, inputs, accuracy


BEST_KEYS = ("step", "test_accuracy", "test_top5_accuracy")


class BestStudent:
    """The student with the best `metric` so far (classification's top-1, detection's AP),
    exported to `directory` (WORKDIR/student_best) with its step and the `keys` of its
    evaluation in its identity.

    The identity is also the memory: a resumed run reads the best so far from it, so a
    preemption forgets nothing. Only a strictly better metric replaces it (the earliest of
    equals is kept), so a resumed run, which evaluates the steps after its checkpoint
    again with bitwise the same states, exports nothing new until it passes the best, and
    ends with the same best as an uninterrupted run.
    """

    def __init__(
        self,
        directory: str,
        identity: Mapping[str, Any],
        keys: tuple[str, ...] = BEST_KEYS,
        metric: str = "test_accuracy",
    ):
        self.directory, self.identity, self.metric = directory, dict(identity), metric
        saved = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
        self.best = None if saved is None else {key: saved[key] for key in keys}

    def keep(self, step: int, variables: dict, accuracy: Mapping[str, float]) -> None:
        """Exports `variables` when their `metric` beats the best so far."""
        if self.best is not None and accuracy[self.metric] <= self.best[self.metric]:
            return
        self.best = {"step": step, **accuracy}
        checkpoint.export_variables(self.directory, variables, {**self.identity, **self.best}, step)
        logging.info("student: best so far at step %d, exported to %s", step, self.directory)


def distill_student(config, workdir, dataset, teacher_variables, teacher_input, mesh):
    """Phase 2: MoKD distillation of the student, the teacher fed with `teacher_input` and
    the student with its own `dataset_inputs`, evaluated on the way
    (`evaluation_interval`) with the best kept in WORKDIR/student_best (`BestStudent`).

    Returns (student variables, its accuracy at the last step, the best as {step,
    test_accuracy, test_top5_accuracy}, the diagnostics' means).
    """
    student_input = dataset_inputs(config, "student", dataset)
    networks = build_networks(
        config,
        dataset.num_classes,
        dataset.image_shape[0],
        teacher_input=teacher_input,
        student_input=student_input,
    )
    tx = student_optimizer(config)
    create = functools.partial(create_student_state, networks, dataset.image_shape, tx)
    fingerprint = student_fingerprint(config, dataset, teacher_input)
    manager = open_phase_manager(config, workdir, "student")
    state, shardings = initial_state(
        create, config.seed + 1, manager, fingerprint, mesh, config.mesh.fsdp_min_size, "student"
    )
    mix = batch_mixer(config, dataset.num_classes, config.seed + 1)
    step_fn = parallel.compiled_step(
        make_distill_step(config, networks, tx, mix),
        shardings,
        mesh,
        extra_shardings=(parallel.variables_sharding(teacher_variables),),
    )
    best = BestStudent(
        os.path.join(workdir, "student_best"),
        exported_identity(config.student.model, dataset.num_classes, student_input),
    )
    evaluation = PhaseEvaluation(
        accuracies_of(network_evaluator(config, "student", dataset, mesh, student_input)),
        student_variables,
        best.keep,
    )
    state, means = run_phase(
        "student",
        state,
        lambda s, x, y: step_fn(s, teacher_variables, x, y),
        parallel.device_batches(dataset, config.batch_size, config.seed, int(state.step), mesh),
        config.student.num_train_steps,
        manager,
        fingerprint,
        phase_writer(workdir, "student"),
        config.log_every_steps,
        Evaluation(evaluation_interval(config, "student"), evaluation.evaluate),
    )
    manager.close()
    accuracy = evaluation.at_step(config.student.num_train_steps, state)
    return student_variables(state), accuracy, best.best, means


def parameter_count(variables: Mapping[str, Any]) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def load_dataset(config: ml_collections.ConfigDict):
    """The config's dataset (`mokd_jax.data.load` with its data fields)."""
    return data.load(
        config.dataset,
        config.data_dir,
        config.num_classes,
        image_size=config.image_size,
        recipe=config.recipe,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the three phases and writes WORKDIR/summary.json; returns the summary. A
    detection config (`task='detection'`) runs `mokd_jax.detection.phases` instead."""
    start = time.time()
    check_config(config)
    if config.task == "detection":
        # Imported here: the detection phases build on this module's helpers.
        from mokd_jax.detection import phases

        return phases.train_and_evaluate(config, workdir)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size("batch_size", config.batch_size, mesh)
    parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
    dataset = load_dataset(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    student_input = dataset_inputs(config, "student", dataset)  # checked before any training
    teacher_variables, teacher_input, teacher_accuracy = obtain_teacher(
        config, workdir, dataset, mesh
    )
    student, student_accuracy, best, diagnostics = distill_student(
        config, workdir, dataset, teacher_variables, teacher_input, mesh
    )
    checkpoint.export_variables(
        os.path.join(workdir, "student"),
        student,
        exported_identity(config.student.model, dataset.num_classes, student_input),
        config.student.num_train_steps,
    )
    summary = run_summary(
        config,
        dataset.name,
        mesh.size,
        (teacher_variables, teacher_accuracy),
        (student, student_accuracy),
        best,
        diagnostics,
        time.time() - start,
    )
    if jax.process_index() == 0:
        write_summary(config, workdir, dataset.name, summary)
    return summary


def run_summary(
    config: ml_collections.ConfigDict,
    dataset_name: str,
    devices: int,
    teacher: tuple[Mapping[str, Any], Mapping[str, float]],
    student: tuple[Mapping[str, Any], Mapping[str, float]],
    best: Mapping[str, float],
    diagnostics: Mapping[str, float],
    wall_time_s: float,
) -> dict:
    """summary.json's content: the method, the data, and for the teacher and the student
    (each given as (variables, evaluation metrics)) the model, its parameter count and its
    metrics (accuracies, or COCO AP for detection); the student's step and best too."""
    (teacher_vars, teacher_metrics), (student_vars, student_metrics) = teacher, student
    return {
        "method": config.aggregator,
        "dataset": dataset_name,
        "devices": devices,
        "teacher": {
            "model": config.teacher.model,
            "parameters": parameter_count(teacher_vars),
            **teacher_metrics,
        },
        "student": {
            "model": config.student.model,
            "parameters": parameter_count(student_vars),
            "step": config.student.num_train_steps,
            **student_metrics,
            "best": best,
        },
        "training_diagnostics": diagnostics,
        "wall_time_s": wall_time_s,
    }


def write_summary(
    config: ml_collections.ConfigDict, workdir: str, dataset_name: str, summary: Mapping
) -> None:
    """WORKDIR/diagnostics.png (the student's logged diagnostics) and WORKDIR/summary.json;
    process 0's job."""
    plots.plot_diagnostics(
        os.path.join(workdir, "tensorboard", "student"),
        os.path.join(workdir, "diagnostics.png"),
        title=f"{config.aggregator} on {dataset_name}: student {config.student.model}",
    )
    epath.Path(workdir, "summary.json").write_text(json.dumps(summary, indent=2))
