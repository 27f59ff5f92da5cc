"""mokd_jax.config_checks: every bad field is refused in one line that names the field and
its value, before anything is built."""

import pytest

from configs import default
from mokd_jax.config_checks import check_config
from mokd_jax.errors import InputError

BAD_FIELDS = [
    ("batch_size", 0),
    ("eval_batch_size", -4),
    ("log_every_steps", 0),
    ("checkpoint_every_steps", 0),
    ("teacher.num_train_steps", 0),
    ("student.learning_rate", -0.1),
    ("student.optimizer", "lion"),
    ("teacher.schedule", "linear"),
    ("teacher.model", "nope"),
    ("student.model", "resnet9000"),
    ("augment.mixup_alpha", -1.0),
    ("augment.label_smoothing", 1.0),
    ("dtype", "float16"),
    ("mesh.fsdp_min_size", -1),
    ("distill.objectives", "both"),
    ("distill.logit_loss", "mse"),
    ("distill.temperature", 0.0),
    ("distill.task_weight", -0.1),
    ("projector.width_multiplier", 0),
    ("projector.taps", "stage3"),
    ("projector.orthogonal_init", True),  # replaced by projector.orthogonal
    ("aggregator", "nope"),
    ("granularity", "per_block"),
    ("aggregation.mokd.max_norm", -1.0),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS)
def test_bad_field_is_named_with_its_value(field, value):
    config = default.get_config("smoke")
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(InputError) as error:
        check_config(config)
    message = str(error.value)
    assert "\n" not in message and "is not allowed" in message
    name = field.rpartition(".")[2] if field.startswith("aggregation.") else field
    assert f"{name}={value!r}" in message


def test_the_default_and_smoke_configs_pass():
    check_config(default.get_config())
    check_config(default.get_config("smoke"))


def test_a_method_that_owns_its_momenta_requires_sgd():
    config = default.get_config("smoke")
    config.aggregator = "dot"
    with pytest.raises(InputError, match="student.optimizer='adamw'.*sgd"):
        check_config(config)
    config.student.optimizer = "sgd"
    check_config(config)


def test_step_schedule_with_boundaries_outside_the_run_is_refused():
    config = default.get_config("smoke")
    config.student.schedule, config.student.decay_boundaries = "step", (10, 30)
    with pytest.raises(InputError, match=r"student.decay_boundaries=\(10, 30\)"):
        check_config(config)


@pytest.mark.parametrize("value", [(8,), (8, 0), (8, 40, 2), ("8", "40")])
def test_detection_shapes_image_counts_are_checked(value):
    from configs import detection

    config = detection.get_config("smoke")
    check_config(config)
    config.shapes_images = value
    with pytest.raises(InputError, match="shapes_images="):
        check_config(config)
