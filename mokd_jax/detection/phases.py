"""The phases of a detection run: teacher, distillation, summary (`train_and_evaluate`).

`mokd_jax.train.train_and_evaluate` hands a config with `task='detection'` to this module,
which follows the classification run step for step and runs its phases through the same
`mokd_jax.phase_runner` (checkpoints, preemption and resume, evaluations on the way, the
best student's export); what differs is the data, the networks and the evaluation:

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
trainable backbone layers). The student's aggregator weighs the objectives on the
trainable parameters' gradients alone, and the optimizer after it zeroes the frozen ones'
updates (`optimizers.only_trainable`), so their gradients are never computed.

Evaluation (`detection.evaluation.CocoEvaluator`) runs the jitted `detection.steps.detect`
over the evaluation split, each process feeding its rows of every batch, and scores the
gathered detections with pycocotools on the host: every process gets the same AP, and
process 0 alone writes the summary and the results.
"""

import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from mokd_jax import checkpoint, normalization, parallel, train
from mokd_jax.detection import coco_eval, retinanet
from mokd_jax.detection import dataset as detection_dataset
from mokd_jax.detection.anchors import retinanet_anchors
from mokd_jax.detection.backbone_weights import start_from_backbone
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.evaluation import COCO_KEYS, CocoEvaluator
from mokd_jax.detection.steps import (
    detection_student_functions,
    detection_teacher_step,
    example_pyramid,
)
from mokd_jax.detection.transforms import Geometry
from mokd_jax.errors import invalid
from mokd_jax.identities import (
    check_teacher_identity,
    dataset_inputs,
    exported_identity,
    shape_mismatch,
    student_fingerprint,
)
from mokd_jax.loop import format_metrics
from mokd_jax.networks import DetectionNetworks, build_detection_networks, build_retinanet
from mokd_jax.optimizers import make_optimizer, only_trainable, student_optimizer
from mokd_jax.phase_runner import BestStudent, Phase, PhaseEvaluation, train_phase
from mokd_jax.state import create_student_state, create_teacher_state
from mokd_jax.steps import make_distill_step
from mokd_jax.train import (
    run_summary,
    student_variables,
    teacher_fingerprint,
    teacher_variables,
    write_summary,
)

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
        config.dataset,
        config.data_dir,
        dataset_geometry(config, config.dataset),
        shapes_images=tuple(config.shapes_images),
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
    (`phase_runner.evaluation_interval`); returns its variables and its AP at the last
    step."""
    tx = only_trainable(make_optimizer(config.teacher), teacher_trainable(model))
    step = functools.partial(
        detection_teacher_step,
        model=model,
        tx=tx,
        inputs=inputs,
        anchors=retinanet_anchors(dataset.image_shape[:2]),
        box_loss=config.teacher.box_loss,
    )
    evaluator = CocoEvaluator(model, inputs, dataset, config.eval_batch_size, mesh)
    phase = Phase(
        name="teacher",
        seed=config.seed,
        fingerprint=teacher_fingerprint(config, dataset, inputs),
        create=functools.partial(create_teacher_state, model, dataset.image_shape, tx),
        step=step,
        batches=training_batches(config, dataset, mesh),
        evaluation=PhaseEvaluation(evaluator, teacher_variables),
        batch_arguments=1,
        prepare=functools.partial(start_from_backbone, config, "teacher", inputs, tx=tx),
    )
    variables, metrics, _ = train_phase(config, workdir, mesh, phase)
    return variables, metrics


def training_batches(config, dataset, mesh) -> Callable[[int], Iterator[tuple[DetectionBatch]]]:
    """The global training batches from a start step, each as the one-argument tuple
    (DetectionBatch,) that `loop.run_phase` passes to a detection step."""
    device_batches = train.training_batches(config, dataset, mesh)
    return lambda start_step: ((batch,) for batch in device_batches(start_step))


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
        evaluator = CocoEvaluator(model, inputs, dataset, config.eval_batch_size, mesh)
        metrics = evaluator(variables)
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
    best = BestStudent(
        os.path.join(workdir, "student_best"),
        detector_identity(config, "student", dataset.num_classes, student_input),
        BEST_KEYS,
        metric="test_ap",
    )
    evaluator = CocoEvaluator(
        networks.student, student_input, dataset, config.eval_batch_size, mesh
    )
    trainable = student_trainable(networks)
    tx = student_optimizer(config, trainable)
    task = functools.partial(
        detection_student_functions, anchors=retinanet_anchors(dataset.image_shape[:2])
    )
    phase = Phase(
        name="student",
        seed=config.seed + 1,
        fingerprint=student_fingerprint(config, dataset, teacher_input),
        create=functools.partial(
            create_student_state,
            networks,
            dataset.image_shape,
            tx,
            example_features=example_pyramid,
        ),
        step=make_distill_step(config, networks, tx, task=task, trainable=trainable),
        batches=training_batches(config, dataset, mesh),
        evaluation=PhaseEvaluation(evaluator, student_variables, best.keep),
        constants=(teacher_vars,),
        batch_arguments=1,
        prepare=functools.partial(start_from_backbone, config, "student", student_input, tx=tx),
    )
    variables, metrics, means = train_phase(config, workdir, mesh, phase)
    return variables, metrics, best.best, means, evaluator.results


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
