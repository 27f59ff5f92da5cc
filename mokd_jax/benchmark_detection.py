"""The benchmark's detection task (`mokd-benchmark --task=detection`): the RetinaNet
distillation step of `mokd_jax.detection` (teacher and student RetinaNets, the projectors
of the pyramid levels P3-P7, the detection loss vector), timed on synthetic images with
padded boxes, in two modes:

  kd    the summed loss with ONE backward (`steps.summed_distill_step`), then the plain
        optimizer: the baseline;
  mokd  the trainer's step with the `mokd` aggregator: K = 2 rows pulled back.

Both train what the trainer trains (`trainable_parameters`). The modes are timed in
interleaved rounds (`measurement.interleaved_mode_rows`): a step takes tens of seconds on a
CPU, long enough for a shared machine's load to change between modes timed one after the
other. The JSON has the classification
benchmark's shape: per mode the step time, images/s, the allocator's peak and the compiled
step's memory plan, then the FLOP floor of the two RetinaNets' forward passes, the ratio
mokd / kd against its goal (<= 1.05 R) and MoKD's extra memory in gradient copies. There is
no aggregation-alone figure (the aggregation is the classification benchmark's, on other
shapes) and no PyTorch peer.
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mokd_jax import config_helpers, normalization, optimizers, steps
from mokd_jax import state as state_lib
from mokd_jax.benchmark_report import config_section, extra_memory, log
from mokd_jax.config_checks import check_config
from mokd_jax.detection import retinanet
from mokd_jax.detection.anchors import retinanet_anchors
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.steps import detection_student_functions, example_pyramid
from mokd_jax.measurement import interleaved_mode_rows, models_flop_floor, tree_bytes
from mokd_jax.networks import build_detection_networks, build_retinanet
from mokd_jax.state import TrainState

DETECTION_MODES: dict[str, dict[str, Any]] = {
    "kd": {"aggregator": "sum"},
    "mokd": {"aggregator": "mokd"},
}
"""Config overrides per mode; `kd` also uses its own step (`detection_step`)."""

BOXES_PER_IMAGE = 20
"""Box rows per synthetic image, the last quarter of them padding (`box_mask` False), as a
real batch pads each image's boxes to the batch's most."""


def detection_config(
    base: ml_collections.ConfigDict, fpn_width: int, head_depth: int
) -> ml_collections.ConfigDict:
    """`base` (its teacher and student backbones, batch size, dtype) with the RetinaNet
    fields (`config_helpers.add_detection_fields`) and both detectors' FPN width and head
    depth."""
    config = base.copy_and_resolve_references()
    config.unlock()  # `with_overrides` locks its copies; the detection fields are new ones
    config.task = "detection"
    config_helpers.add_detection_fields(config, base.teacher.model, base.student.model)
    for role in ("teacher", "student"):
        config[role].fpn_width = fpn_width
        config[role].head_depth = head_depth
    return config


def synthetic_detection_batch(
    batch_size: int, image_size: int, num_classes: int, seed: int = 0
) -> DetectionBatch:
    """Random uint8 images filling the padded size, each with BOXES_PER_IMAGE box rows
    (random boxes of 1/16 to 1/2 of the side, random classes), the last quarter padding."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, BOXES_PER_IMAGE)
    corners = rng.uniform(0, image_size / 2, (*shape, 2))
    sides = rng.uniform(image_size / 16, image_size / 2, (*shape, 2))
    real = np.arange(BOXES_PER_IMAGE) < BOXES_PER_IMAGE - BOXES_PER_IMAGE // 4
    return DetectionBatch(
        images=rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
        boxes=np.concatenate([corners, corners + sides], -1).astype(np.float32),
        labels=rng.integers(0, num_classes, shape, dtype=np.int32),
        box_mask=np.broadcast_to(real, shape).copy(),
        image_ids=np.arange(batch_size, dtype=np.int64),
        scales=np.ones(batch_size, np.float32),
        image_sizes=np.full((batch_size, 2), image_size, np.int32),
        example_mask=np.ones(batch_size, bool),
    )


def trainable_parameters(student: retinanet.RetinaNet) -> Callable[[dict], dict]:
    """The trainer's trainable parameters of a detection student (its last three backbone
    stages, FPN and heads: `retinanet.trainable_mask`; every projector), as
    `detection.phases.student_trainable` gives them; not imported from there, because
    importing the trainer's phases imports TensorFlow, which the benchmark does not need."""
    return lambda params: {
        "student": retinanet.trainable_mask(student, params["student"]),
        "projector": jax.tree.map(lambda _: True, params["projector"]),
    }


def detection_step(
    mode: str, config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple
) -> tuple[Callable, Callable[[jax.Array], TrainState]]:
    """(step function, state creator from a key) of a detection mode, as
    `detection.phases.distill_student` builds the trainer's: `kd` the summed loss with one
    backward and the plain optimizer, `mokd` the trainer's step with its aggregator."""
    inputs = normalization.IMAGENET
    nets = build_detection_networks(config, num_classes, teacher_input=inputs, student_input=inputs)
    trainable = trainable_parameters(nets.student)
    task = functools.partial(
        detection_student_functions, anchors=retinanet_anchors(image_shape[:2])
    )
    if mode == "kd":
        tx = optimizers.only_trainable(optimizers.make_optimizer(config.student), trainable)
        step = functools.partial(
            steps.summed_distill_step, networks=nets, tx=tx, distill=config.distill, task=task
        )
    else:
        tx = optimizers.student_optimizer(config, trainable)
        step = steps.make_distill_step(config, nets, tx, task=task, trainable=trainable)
    create = functools.partial(
        state_lib.create_student_state, nets, image_shape, tx, example_features=example_pyramid
    )
    return step, create


def measure_detection(
    base: ml_collections.ConfigDict,
    image_size: int,
    steps: int,
    mode_names: Sequence[str],
    fpn_width: int,
    head_depth: int,
) -> dict[str, Any]:
    """Times the detection modes on one synthetic batch; returns the JSON-ready results
    (module docstring)."""
    config = detection_config(base, fpn_width, head_depth)
    image_shape = (image_size, image_size, 3)
    teacher = build_retinanet(config, "teacher", config.num_classes)
    student = build_retinanet(config, "student", config.num_classes)
    key = jax.random.key(config.seed)
    teacher_variables = jax.jit(functools.partial(state_lib.init_model, teacher, image_shape))(key)
    student_params = jax.eval_shape(
        functools.partial(state_lib.init_model, student, image_shape), key
    )["params"]
    batch = synthetic_detection_batch(
        config.batch_size, image_size, config.num_classes, config.seed
    )

    runs = {}
    for mode in mode_names:
        mode_config = config_helpers.with_overrides(config, DETECTION_MODES[mode])
        check_config(mode_config)
        log(f"[detection {mode}] building")
        step, create = detection_step(mode, mode_config, config.num_classes, image_shape)
        state = jax.jit(create)(jax.random.key(config.seed + 1))
        runs[mode] = (step, state, (teacher_variables,), (batch,))
    modes = interleaved_mode_rows(runs, steps, lambda line: log(f"[detection] {line}"))
    for mode, row in modes.items():
        log(f"[detection {mode}] {row['step_time_s']:.4f} s/step (median)")

    log("FLOPs of the forward passes")
    floor = models_flop_floor(teacher, student, image_shape, config.batch_size)
    section = config_section(config, image_size, steps, like_peer=False)
    section.update(task="detection", fpn_width=fpn_width, head_depth=head_depth)
    return {
        "jax": jax.__version__,
        "devices": [str(device) for device in jax.devices()],
        "config": section,
        "modes": modes,
        "flop_floor_ratio": floor,
        "ratios": detection_ratios(modes, floor),
        "memory": extra_memory(
            modes, tree_bytes(student_params), baseline="kd", extra_objectives={"mokd": 1}
        ),
    }


def detection_ratios(modes: Mapping[str, Mapping[str, Any]], floor: float) -> dict[str, Any]:
    """mokd / kd (when both ran) and its goal, <= 1.05 R, as classification's
    `mokd_over_kd_1bwd`: `kd` here is the one-backward baseline."""
    result: dict[str, Any] = {"goal_mokd": f"mokd_over_kd <= 1.05 R = {1.05 * floor:.4f}"}
    if "mokd" in modes and "kd" in modes:
        ratio = modes["mokd"]["step_time_s"] / modes["kd"]["step_time_s"]
        result["mokd_over_kd"] = ratio
        result["goal_mokd_met"] = ratio <= 1.05 * floor
    return result
