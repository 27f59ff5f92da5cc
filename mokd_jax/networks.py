"""The networks of a run, built in one place for the trainer, the benchmark and the tests.

`build_networks` turns a config (model names, compute dtype, projector section, seed) and
the data's class count and image size into the teacher, the student and the student's
`TapProjectors`: one subspace projector per tap of `projector.taps` (`mokd_jax.taps`).
`build_detection_networks` does the same for RetinaNet detection: two RetinaNets and one
projector per pyramid level (the config's detection fields:
`config_helpers.add_detection_fields`).
"""

from typing import NamedTuple

import ml_collections
from flax import linen as nn

from mokd_jax import models
from mokd_jax.checks import check_choice, check_int
from mokd_jax.detection.losses import BOX_LOSSES
from mokd_jax.detection.objectives import check_teacher_classes
from mokd_jax.detection.retinanet import BACKBONES, VARIANTS, RetinaNet
from mokd_jax.normalization import Normalization
from mokd_jax.subspace import TapProjectors


class Networks(NamedTuple):
    """The modules of a distillation, the tap set the projectors compare, and each
    network's input statistics (teacher and student may have been trained on differently
    normalised inputs)."""

    teacher: nn.Module
    student: nn.Module
    projector: TapProjectors
    taps: str
    teacher_input: Normalization
    student_input: Normalization


def build_model(
    config: ml_collections.ConfigDict, role: str, num_classes: int, image_size: int
) -> nn.Module:
    """The teacher's or student's module (`role`), computing in `config.dtype`."""
    return models.get(
        config[role].model, num_classes=num_classes, dtype=config.dtype, image_size=image_size
    )


def build_projector(config: ml_collections.ConfigDict) -> TapProjectors:
    """The projectors of the taps, each into a subspace `projector.width_multiplier` times
    its teacher tap's width (the widths are read when the state is initialised)."""
    return TapProjectors(
        width_multiplier=config.projector.width_multiplier,
        orthogonal=config.projector.orthogonal,
        seed=config.seed,
    )


def build_networks(
    config: ml_collections.ConfigDict,
    num_classes: int,
    image_size: int,
    *,
    teacher_input: Normalization,
    student_input: Normalization,
) -> Networks:
    """Teacher, student and projector for images of side `image_size`, each network fed
    through its own input statistics."""
    teacher = build_model(config, "teacher", num_classes, image_size)
    student = build_model(config, "student", num_classes, image_size)
    projector = build_projector(config)
    return Networks(
        teacher, student, projector, config.projector.taps, teacher_input, student_input
    )


class DetectionNetworks(NamedTuple):
    """The modules of a detection distillation (`mokd_jax.detection.steps`): two
    RetinaNets, the projectors of the pyramid levels P3-P7 (`tap0` .. `tap4`), each
    network's input statistics, the teacher's logit column of each of the student's classes
    (None: the same classes in the same order; `detection.objectives`) and the student's
    box loss (`detection.losses.BOX_LOSSES`)."""

    teacher: RetinaNet
    student: RetinaNet
    projector: TapProjectors
    teacher_input: Normalization
    student_input: Normalization
    teacher_classes: tuple[int, ...] | None
    box_loss: str


def build_retinanet(config: ml_collections.ConfigDict, role: str, num_classes: int) -> RetinaNet:
    """The teacher's or student's (`role`) RetinaNet: backbone `ROLE.model`, variant
    `ROLE.variant`, FPN and head width `ROLE.fpn_width`, head depth `ROLE.head_depth`,
    computing in `config.dtype`."""
    section = config[role]
    check_choice(f"{role}.model", section.model, BACKBONES)
    check_choice(f"{role}.variant", section.variant, VARIANTS)
    check_int(f"{role}.fpn_width", section.fpn_width, 1)
    check_int(f"{role}.head_depth", section.head_depth, 0)
    return RetinaNet(
        section.model,
        num_classes,
        variant=section.variant,
        width=section.fpn_width,
        head_depth=section.head_depth,
        dtype=config.dtype,
    )


def build_detection_networks(
    config: ml_collections.ConfigDict,
    num_classes: int,
    *,
    teacher_input: Normalization,
    student_input: Normalization,
) -> DetectionNetworks:
    """Teacher, student and projectors of a detection distillation for a dataset of
    `num_classes` classes: the student detects those; the teacher has
    `teacher.num_classes` (0: the same), and `distill.teacher_classes` (empty: the same
    classes in the same order) names its column of each of the student's classes."""
    check_int("teacher.num_classes", config.teacher.num_classes, 0)
    check_choice("student.box_loss", config.student.box_loss, BOX_LOSSES)
    teacher_count = config.teacher.num_classes or num_classes
    teacher_classes = tuple(config.distill.teacher_classes)
    check_teacher_classes("distill.teacher_classes", teacher_classes, num_classes, teacher_count)
    return DetectionNetworks(
        build_retinanet(config, "teacher", teacher_count),
        build_retinanet(config, "student", num_classes),
        build_projector(config),
        teacher_input,
        student_input,
        teacher_classes or None,
        config.student.box_loss,
    )
