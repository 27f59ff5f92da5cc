"""mokd_jax.networks: one function builds teacher, student and projector from a config."""

import jax.numpy as jnp
import pytest

from configs import default
from mokd_jax import networks, normalization

INPUTS = dict(teacher_input=normalization.IMAGENET, student_input=normalization.UNIT)


@pytest.mark.parametrize("multiplier", [1, 3])
def test_projector_width_is_a_multiple_of_the_teachers_feature_width(multiplier):
    config = default.get_config()
    config.projector.width_multiplier = multiplier
    nets = networks.build_networks(config, 10, 8, **INPUTS)
    assert nets.projector.width == multiplier * nets.teacher.feature_width
    assert nets.projector.seed == config.seed


def test_models_follow_the_config_names_classes_and_dtype():
    config = default.get_config()
    config.teacher.model, config.student.model, config.dtype = "resnet20", "cnn_small", "bfloat16"
    nets = networks.build_networks(config, 7, 32, **INPUTS)
    assert type(nets.teacher).__name__ != type(nets.student).__name__
    for model in (nets.teacher, nets.student):
        assert model.num_classes == 7
        assert jnp.dtype(model.dtype) == jnp.bfloat16


def test_the_image_size_reaches_models_that_need_it():
    config = default.get_config()
    config.teacher.model, config.student.model = "deit_tiny", "deit_tiny"
    nets = networks.build_networks(config, 10, 32, **INPUTS)
    assert nets.student.image_size == 32


def test_each_network_keeps_its_own_input_statistics():
    nets = networks.build_networks(default.get_config(), 10, 8, **INPUTS)
    assert (nets.teacher_input, nets.student_input) == (normalization.IMAGENET, normalization.UNIT)
