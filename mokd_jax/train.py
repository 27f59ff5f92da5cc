"""The phases of a run: teacher, distillation, evaluation (`train_and_evaluate`).

`train_and_evaluate(config, workdir)` runs the phases: (1) train the teacher with
cross-entropy, or restore it, and evaluate it once; (2) distill the student, evaluating it
on the way and keeping the best in WORKDIR/student_best; (3) write WORKDIR/summary.json
from those evaluations (the last step's and the best student's; nothing is evaluated
again). Both training phases run through `mokd_jax.phase_runner` (checkpoints, resume,
evaluations on the way), which detection's phases share. The steps are `mokd_jax.steps`,
the networks `mokd_jax.networks.build_networks`.
"""

import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
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
from mokd_jax.loop import format_metrics
from mokd_jax.networks import build_networks
from mokd_jax.optimizers import make_optimizer, student_optimizer
from mokd_jax.phase_runner import BestStudent, Phase, PhaseEvaluation, train_phase
from mokd_jax.state import TrainState, create_student_state, create_teacher_state
from mokd_jax.steps import batch_mixer, make_distill_step, teacher_step


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


def accuracies_of(evaluator: Callable[[dict], Counts]) -> Callable[[dict], dict[str, float]]:
    """A classification evaluator's counts as the accuracies `PhaseEvaluation` reports."""
    return lambda variables: evaluator(variables).accuracies()


def teacher_fingerprint(config, dataset, inputs: normalization.Normalization) -> dict:
    """What a teacher's checkpoint is checked against before it is resumed: the data, the
    teacher's section and the input statistics it is fed with (both tasks)."""
    return {
        **data_fingerprint(config, dataset),
        "teacher": config.teacher.to_dict(),
        "teacher_input": inputs._asdict(),
    }


def training_batches(config, dataset, mesh) -> Callable[[int], Iterator[tuple]]:
    """A phase's global training batches from a start step (`parallel.device_batches`);
    both phases read the data in the order `config.seed` gives."""
    return functools.partial(
        parallel.device_batches, dataset, config.batch_size, config.seed, mesh=mesh
    )


def train_teacher(config, workdir, dataset, mesh, evaluator) -> tuple[dict, dict[str, float]]:
    """Phase 1: cross-entropy training of the teacher, evaluated on the way
    (`phase_runner.evaluation_interval`); returns its variables and its accuracy at the
    last step."""
    model = dataset_model(config, "teacher", dataset)
    tx = make_optimizer(config.teacher)
    inputs = dataset_inputs(config, "teacher", dataset)
    mix = batch_mixer(config, dataset.num_classes, config.seed)
    phase = Phase(
        name="teacher",
        seed=config.seed,
        fingerprint=teacher_fingerprint(config, dataset, inputs),
        create=functools.partial(create_teacher_state, model, dataset.image_shape, tx),
        step=functools.partial(teacher_step, model=model, tx=tx, inputs=inputs, mix=mix),
        batches=training_batches(config, dataset, mesh),
        evaluation=PhaseEvaluation(accuracies_of(evaluator), teacher_variables),
    )
    variables, accuracy, _ = train_phase(config, workdir, mesh, phase)
    return variables, accuracy


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


def distill_student(config, workdir, dataset, teacher_variables, teacher_input, mesh):
    """Phase 2: MoKD distillation of the student, the teacher fed with `teacher_input` and
    the student with its own `dataset_inputs`, evaluated on the way
    (`phase_runner.evaluation_interval`) with the best kept in WORKDIR/student_best (`BestStudent`).

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
    best = BestStudent(
        os.path.join(workdir, "student_best"),
        exported_identity(config.student.model, dataset.num_classes, student_input),
        BEST_KEYS,
        metric="test_accuracy",
    )
    evaluator = network_evaluator(config, "student", dataset, mesh, student_input)
    tx = student_optimizer(config)
    phase = Phase(
        name="student",
        seed=config.seed + 1,
        fingerprint=student_fingerprint(config, dataset, teacher_input),
        create=functools.partial(create_student_state, networks, dataset.image_shape, tx),
        step=make_distill_step(
            config, networks, tx, batch_mixer(config, dataset.num_classes, config.seed + 1)
        ),
        batches=training_batches(config, dataset, mesh),
        evaluation=PhaseEvaluation(accuracies_of(evaluator), student_variables, best.keep),
        constants=(teacher_variables,),
    )
    variables, accuracy, means = train_phase(config, workdir, mesh, phase)
    return variables, accuracy, best.best, means


def parameter_count(variables: Mapping[str, Any]) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


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
    dataset = data.load_configured(config)
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
