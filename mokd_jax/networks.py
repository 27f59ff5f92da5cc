"""The networks of a run, built in one place for the trainer, the benchmark and the tests.

`build_networks` turns a config (model names, compute dtype, projector section, seed) and
the data's class count and image size into the teacher, the student and the student's
`TapProjectors`: one subspace projector per tap of `projector.taps` (`mokd_jax.taps`).
"""

from typing import NamedTuple

import ml_collections
from flax import linen as nn

from mokd_jax import models
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
