"""The phases of a detection run: teacher, distillation, summary (`train_and_evaluate`).

`mokd_jax.train.train_and_evaluate` hands a config with `task='detection'` to this module,
which follows the classification run step for step and reuses its machinery (checkpoint
managers, `loop.run_phase` with its preemption and resume, `train.PhaseEvaluation`,
`train.BestStudent`); what differs is the data, the networks and the evaluation:

1. The teacher: a RetinaNet restored from `teacher.checkpoint_dir` or WORKDIR/teacher, or
   trained in WORKDIR/teacher with RetinaNet's loss (`detection.steps.detection_teacher_step`)
   and exported there.
2. The student: MoKD distillation through the trainer's own step
   (`steps.make_distill_step` with the detection task), the best student by AP kept in
   WORKDIR/student_best, the last exported to WORKDIR/student, and its detections on the
   evaluation split written to WORKDIR/detections_val.json (COCO results).
3. WORKDIR/summary.json: each network's COCO box AP (`COCO_KEYS`), the student's at the
   last step and at its best.

Both optimizers leave the stem, the first backbone stage and every backbone BatchNorm of
their detector as they are (`retinanet.trainable_mask`, torchvision's default of three
trainable backbone layers); the student's aggregator still sees every gradient, and the
optimizer after it zeroes the frozen ones' updates (`optimizers.only_trainable`).

Evaluation (`CocoEvaluator`) runs the jitted `detection.steps.detect` over the evaluation
split and scores the detections with pycocotools on the host. It feeds whole batches to
the compiled program, replicated: a single-process run; the host-side scoring would have to
gather every process's detections first on several hosts.
"""

import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from mokd_jax import checkpoint, normalization, parallel
from mokd_jax.detection import coco_eval, retinanet
from mokd_jax.detection import dataset as detection_dataset
from mokd_jax.detection.anchors import retinanet_anchors
from mokd_jax.detection.backbone_weights import start_from_backbone
from mokd_jax.detection.steps import (
    detect,
    detection_student_functions,
    detection_teacher_step,
    example_pyramid,
)
from mokd_jax.detection.transforms import Geometry
from mokd_jax.errors import invalid
from mokd_jax.identities import (
    check_teacher_identity,
    data_fingerprint,
    dataset_inputs,
    exported_identity,
    shape_mismatch,
    student_fingerprint,
)
from mokd_jax.loop import Evaluation, format_metrics, initial_state, phase_writer, run_phase
from mokd_jax.networks import DetectionNetworks, build_detection_networks, build_retinanet
from mokd_jax.optimizers import make_optimizer, only_trainable, student_optimizer
from mokd_jax.state import create_student_state, create_teacher_state
from mokd_jax.steps import make_distill_step
from mokd_jax.train import (
    BestStudent,
    PhaseEvaluation,
    evaluation_interval,
    open_phase_manager,
    run_summary,
    student_variables,
    teacher_variables,
    write_summary,
)

COCO_KEYS = tuple(f"test_{name}" for name in coco_eval.METRIC_NAMES)
BEST_KEYS = ("step", *COCO_KEYS)
RESULTS_FILE = "detections_val.json"


def dataset_geometry(config: ml_collections.ConfigDict, name: str) -> Geometry:
    """The dataset's default geometry (`detection.dataset.DEFAULT_GEOMETRIES`), with images
    resized to `image_size` (both sides' bounds) when the config sets it (not 0), and
    training images' shorter sides drawn from `augment.train_min_sizes`."""
    default = detection_dataset.DEFAULT_GEOMETRIES[name]
    sizes = (config.image_size,) * 2 if config.image_size else (default.min_size, default.max_size)
    return Geometry(*sizes, default.max_boxes, tuple(config.augment.train_min_sizes))


def load_dataset(config: ml_collections.ConfigDict) -> detection_dataset.DetectionDataset:
    """The config's detection dataset (`detection.dataset.load`)."""
    return detection_dataset.load(
        config.dataset, config.data_dir, dataset_geometry(config, config.dataset)
    )


def teacher_class_count(config: ml_collections.ConfigDict, dataset) -> int:
    """The teacher's classes: `teacher.num_classes`, 0 meaning the dataset's."""
    return config.teacher.num_classes or dataset.num_classes


def detector_identity(
    config: ml_collections.ConfigDict, role: str, num_classes: int, inputs
) -> dict:
    """What an exported RetinaNet is saved with: the classification identity (backbone,
    classes, input statistics) and what shapes its detector (task, variant, widths)."""
    section = config[role]
    return {
        **exported_identity(section.model, num_classes, inputs),
        "task": "detection",
        "variant": section.variant,
        "fpn_width": section.fpn_width,
        "head_depth": section.head_depth,
    }


class CocoEvaluator:
    """A network's COCO box AP on the evaluation split: `evaluator(variables)` -> {test_ap,
    test_ap50, ...} (`COCO_KEYS`), keeping that pass's COCO results in `results` (the
    student's are written out at the end). `detect` is jitted once, here."""

    def __init__(self, model, inputs, dataset, batch_size: int):
        anchors = retinanet_anchors(dataset.image_shape[:2])
        self.step = jax.jit(functools.partial(detect, model=model, inputs=inputs, anchors=anchors))
        self.dataset, self.batch_size = dataset, batch_size
        self.results: list[dict] = []

    def __call__(self, variables: Mapping[str, Any]) -> dict[str, float]:
        accumulator = coco_eval.CocoAccumulator(
            self.dataset.ground_truth(), self.dataset.category_ids
        )
        for batch in self.dataset.eval_batches(self.batch_size):
            accumulator.add(jax.device_get(self.step(variables, batch)), batch)
        metrics, self.results = accumulator.evaluate()
        return {f"test_{name}": value for name, value in metrics.items()}


def teacher_trainable(model) -> Callable[[dict], dict]:
    """The teacher's parameters that train (`retinanet.trainable_mask`)."""
    return functools.partial(retinanet.trainable_mask, model)


def student_trainable(networks: DetectionNetworks) -> Callable[[dict], dict]:
    """The student's parameters that train (`retinanet.trainable_mask`) and every
    projector's."""

    def trainable(params: dict) -> dict:
        return {
            "student": retinanet.trainable_mask(networks.student, params["student"]),
            "projector": jax.tree.map(lambda _: True, params["projector"]),
        }

    return trainable


def train_teacher(config, workdir, dataset, mesh, model, inputs) -> tuple[dict, dict[str, float]]:
    """Phase 1: RetinaNet's loss on the teacher, evaluated on the way
    (`train.evaluation_interval`); returns its variables and its AP at the last step."""
    tx = only_trainable(make_optimizer(config.teacher), teacher_trainable(model))
    create = functools.partial(create_teacher_state, model, dataset.image_shape, tx)
    fingerprint = {
        **data_fingerprint(config, dataset),
        "teacher": config.teacher.to_dict(),
        "teacher_input": inputs._asdict(),
    }
    manager = open_phase_manager(config, workdir, "teacher")
    state, shardings = initial_state(
        create, config.seed, manager, fingerprint, mesh, config.mesh.fsdp_min_size, "teacher"
    )
    state = start_from_backbone(config, "teacher", inputs, state, shardings, tx)
    step = functools.partial(
        detection_teacher_step,
        model=model,
        tx=tx,
        inputs=inputs,
        anchors=retinanet_anchors(dataset.image_shape[:2]),
        box_loss=config.teacher.box_loss,
    )
    step_fn = parallel.compiled_step(step, shardings, mesh, batch_arguments=1)
    evaluation = PhaseEvaluation(
        CocoEvaluator(model, inputs, dataset, config.eval_batch_size), teacher_variables
    )
    state, _ = run_phase(
        "teacher",
        state,
        step_fn,
        training_batches(config, dataset, int(state.step), mesh),
        config.teacher.num_train_steps,
        manager,
        fingerprint,
        phase_writer(workdir, "teacher"),
        config.log_every_steps,
        Evaluation(evaluation_interval(config, "teacher"), evaluation.evaluate),
    )
    manager.close()
    metrics = evaluation.at_step(config.teacher.num_train_steps, state)
    return teacher_variables(state), metrics


def training_batches(config, dataset, start_step: int, mesh):
    """The global training batches from `start_step`, each as the one-argument tuple
    (DetectionBatch,) that `loop.run_phase` passes to a detection step."""
    batches = parallel.device_batches(dataset, config.batch_size, config.seed, start_step, mesh)
    return ((batch,) for batch in batches)


def restore_teacher(config, directory: str, saved: Mapping[str, Any], dataset, mesh, model):
    """A saved RetinaNet teacher checked against the run (identity, then every variable's
    shape) and placed on the mesh; returns (variables, input statistics)."""
    inputs = check_teacher_identity(saved, config, teacher_class_count(config, dataset), directory)
    variables = checkpoint.load_variables(directory)
    mismatch = shape_mismatch(variables, model, dataset.image_shape)
    if mismatch is not None:
        raise invalid(
            "teacher.checkpoint_dir",
            directory,
            f"variables of the configured {config.teacher.model} RetinaNet; {mismatch}",
        )
    normalization.check_channels(
        f"{directory}: {normalization.IDENTITY_FIELD}", inputs, dataset.image_shape[-1]
    )
    return parallel.place_variables(variables, mesh, config.mesh.fsdp_min_size), inputs


def obtain_teacher(config, workdir, dataset, mesh) -> tuple[dict, Any, dict[str, float]]:
    """(the teacher's variables on the mesh, its input statistics, its AP): restored from
    `teacher.checkpoint_dir` or WORKDIR/teacher, or trained in WORKDIR/teacher and exported
    there, as `train.obtain_teacher` does for classification."""
    model = build_retinanet(config, "teacher", teacher_class_count(config, dataset))
    directory = config.teacher.checkpoint_dir or os.path.join(workdir, "teacher")
    saved = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
    if saved is not None:
        variables, inputs = restore_teacher(config, directory, saved, dataset, mesh, model)
        metrics = CocoEvaluator(model, inputs, dataset, config.eval_batch_size)(variables)
        logging.info("teacher restored from %s: %s", directory, format_metrics(metrics))
        return variables, inputs, metrics
    if config.teacher.checkpoint_dir:
        raise invalid(
            "teacher.checkpoint_dir", directory, "a directory holding a teacher checkpoint"
        )
    inputs = dataset_inputs(config, "teacher", dataset)
    variables, metrics = train_teacher(config, workdir, dataset, mesh, model, inputs)
    identity = detector_identity(config, "teacher", teacher_class_count(config, dataset), inputs)
    checkpoint.export_variables(directory, variables, identity, config.teacher.num_train_steps)
    return variables, inputs, metrics


def distill_student(config, workdir, dataset, teacher_vars, teacher_input, mesh):
    """Phase 2: MoKD distillation of the student RetinaNet, evaluated on the way with the
    best AP kept in WORKDIR/student_best. Returns (student variables, its AP at the last
    step, the best as {step, COCO_KEYS...}, the diagnostics' means, the last evaluation's
    COCO results)."""
    student_input = dataset_inputs(config, "student", dataset)
    networks = build_detection_networks(
        config, dataset.num_classes, teacher_input=teacher_input, student_input=student_input
    )
    tx = student_optimizer(config, student_trainable(networks))
    create = functools.partial(
        create_student_state,
        networks,
        dataset.image_shape,
        tx,
        example_features=example_pyramid,
    )
    fingerprint = student_fingerprint(config, dataset, teacher_input)
    manager = open_phase_manager(config, workdir, "student")
    state, shardings = initial_state(
        create, config.seed + 1, manager, fingerprint, mesh, config.mesh.fsdp_min_size, "student"
    )
    state = start_from_backbone(config, "student", student_input, state, shardings, tx)
    task = functools.partial(
        detection_student_functions, anchors=retinanet_anchors(dataset.image_shape[:2])
    )
    step_fn = parallel.compiled_step(
        make_distill_step(config, networks, tx, task=task),
        shardings,
        mesh,
        extra_shardings=(parallel.variables_sharding(teacher_vars),),
        batch_arguments=1,
    )
    best = BestStudent(
        os.path.join(workdir, "student_best"),
        detector_identity(config, "student", dataset.num_classes, student_input),
        keys=BEST_KEYS,
        metric="test_ap",
    )
    evaluator = CocoEvaluator(networks.student, student_input, dataset, config.eval_batch_size)
    evaluation = PhaseEvaluation(evaluator, student_variables, best.keep)
    state, means = run_phase(
        "student",
        state,
        lambda s, batch: step_fn(s, teacher_vars, batch),
        training_batches(config, dataset, int(state.step), mesh),
        config.student.num_train_steps,
        manager,
        fingerprint,
        phase_writer(workdir, "student"),
        config.log_every_steps,
        Evaluation(evaluation_interval(config, "student"), evaluation.evaluate),
    )
    manager.close()
    metrics = evaluation.at_step(config.student.num_train_steps, state)
    return student_variables(state), metrics, best.best, means, evaluator.results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the detection phases and writes WORKDIR/summary.json and
    WORKDIR/detections_val.json; returns the summary (the config already checked by
    `train.train_and_evaluate`)."""
    start = time.time()
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size("batch_size", config.batch_size, mesh)
    parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
    dataset = load_dataset(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    student_input = dataset_inputs(config, "student", dataset)  # checked before any training
    teacher_vars, teacher_input, teacher_metrics = obtain_teacher(config, workdir, dataset, mesh)
    student, student_metrics, best, diagnostics, results = distill_student(
        config, workdir, dataset, teacher_vars, teacher_input, mesh
    )
    checkpoint.export_variables(
        os.path.join(workdir, "student"),
        student,
        detector_identity(config, "student", dataset.num_classes, student_input),
        config.student.num_train_steps,
    )
    summary = {
        "task": "detection",
        **run_summary(
            config,
            dataset.name,
            mesh.size,
            (teacher_vars, teacher_metrics),
            (student, student_metrics),
            best,
            diagnostics,
            time.time() - start,
        ),
    }
    if jax.process_index() == 0:
        coco_eval.write_results(os.path.join(workdir, RESULTS_FILE), results)
        write_summary(config, workdir, dataset.name, summary)
    return summary
