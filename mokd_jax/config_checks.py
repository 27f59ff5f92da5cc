"""Validation of a whole run configuration, before anything is built or written.

Every check raises the one-line InputError of `mokd_jax.checks`: the field, its value and
what is allowed. The aggregator's name and hyperparameters are checked by building it.
"""

import ml_collections

from mokd_jax import aggregation, models, normalization
from mokd_jax.checks import check_choice, check_int, check_nonnegative, check_positive, check_range
from mokd_jax.errors import invalid
from mokd_jax.objectives import LOGIT_LOSSES, OBJECTIVES
from mokd_jax.optimizers import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_MASKS, make_aggregator
from mokd_jax.taps import TAP_SETS

TASKS = ("classification", "detection")


def check_schedule(name: str, section: ml_collections.ConfigDict) -> None:
    """The section's schedule name, and step boundaries strictly inside the run."""
    check_choice(f"{name}.schedule", section.schedule, SCHEDULES)
    boundaries = list(section.decay_boundaries)
    if section.schedule == "step" and (
        boundaries != sorted(set(boundaries))
        or not all(0 < b < section.num_train_steps for b in boundaries)
    ):
        raise invalid(
            f"{name}.decay_boundaries",
            tuple(boundaries),
            f"increasing steps between 0 and {name}.num_train_steps={section.num_train_steps}",
        )


def check_phase(name: str, section: ml_collections.ConfigDict) -> None:
    """A teacher or student section: model, length, rate, optimizer, schedule and input
    statistics."""
    check_choice(f"{name}.model", section.model, models.NAMES)
    check_int(f"{name}.num_train_steps", section.num_train_steps, 1)
    check_int(f"{name}.steps_per_epoch", section.steps_per_epoch, 0)
    check_positive(f"{name}.learning_rate", section.learning_rate)
    check_choice(f"{name}.optimizer", section.optimizer, OPTIMIZERS)
    check_choice(f"{name}.weight_decay_mask", section.weight_decay_mask, WEIGHT_DECAY_MASKS)
    check_schedule(name, section)
    normalization.parse(f"{name}.input_normalization", section.input_normalization)


def check_projector(section: ml_collections.ConfigDict) -> None:
    """The projector section: its taps, its width and the removed init-only option."""
    if "orthogonal_init" in section:
        raise invalid(
            "projector.orthogonal_init",
            section.orthogonal_init,
            "no longer a field: projector.orthogonal=True keeps the student lifts orthogonal "
            "throughout training",
        )
    check_choice("projector.taps", section.taps, TAP_SETS)
    check_int("projector.width_multiplier", section.width_multiplier, 1)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises InputError for a numeric or named field outside what is allowed."""
    check_choice("task", config.task, TASKS)
    for field in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps"):
        check_int(field, config[field], 1)
    check_int("eval_every_steps", config.eval_every_steps, 0)
    for section in ("teacher", "student"):
        check_phase(section, config[section])
    for field in ("mixup_alpha", "cutmix_alpha"):
        check_nonnegative(f"augment.{field}", config.augment[field])
    check_range("augment.label_smoothing", config.augment.label_smoothing, 0, 1, open_high=True)
    check_range("augment.random_erasing", config.augment.random_erasing, 0, 1)
    check_choice("dtype", config.dtype, models.DTYPES)
    check_int("mesh.fsdp_min_size", config.mesh.fsdp_min_size, 0)
    check_choice("distill.objectives", config.distill.objectives, tuple(OBJECTIVES))
    check_choice("distill.logit_loss", config.distill.logit_loss, LOGIT_LOSSES)
    check_positive("distill.temperature", config.distill.temperature)
    for field in ("task_weight", "logit_weight", "feature_weight"):
        check_nonnegative(f"distill.{field}", config.distill[field])
    check_projector(config.projector)
    spec = aggregation.spec(config.aggregator)
    if spec.owns_momentum and config.student.optimizer != "sgd":
        raise invalid(
            "student.optimizer",
            config.student.optimizer,
            f"sgd with aggregator={config.aggregator} (it keeps its own momenta)",
        )
    make_aggregator(config)  # checks the aggregator's hyperparameters
    if config.task == "detection":
        check_shapes_images(config.shapes_images)


def check_shapes_images(value) -> None:
    """`shapes_images`: empty (the shapes set's own counts) or (training images, evaluation
    images), each at least 1."""
    if not isinstance(value, tuple | list) or len(value) not in (0, 2):
        raise invalid("shapes_images", value, "() or (training images, evaluation images)")
    for count in value:
        check_int("shapes_images", count, 1)
