"""mokd_jax.networks: one function builds teacher, student and projectors from a config."""

import jax
import jax.numpy as jnp
import optax
import pytest

from configs import default
from mokd_jax import networks, normalization, state

INPUTS = dict(teacher_input=normalization.IMAGENET, student_input=normalization.UNIT)


@pytest.mark.parametrize("multiplier", [1, 3])
def test_each_taps_projector_is_a_multiple_of_its_teacher_taps_width(multiplier):
    """Digits: cnn_large (stages 32, 64, 96) teaches cnn_small (16, 32, 48); the multi-scale
    taps are the pooled features and the pooled second stage."""
    config = default.get_config()
    config.projector.width_multiplier = multiplier
    nets = networks.build_networks(config, 10, 8, **INPUTS)
    assert (nets.taps, nets.projector.seed) == ("multi_scale", config.seed)
    params = state.create_student_state(nets, (8, 8, 1), optax.sgd(0.1), jax.random.key(0)).params
    kernels = {
        name: tap["lift_student"]["kernel"].shape for name, tap in params["projector"].items()
    }
    assert kernels == {"tap0": (48, multiplier * 96), "tap1": (32, multiplier * 64)}


def test_the_pooled_tap_set_is_one_projector():
    config = default.get_config()
    config.projector.taps = "pooled"
    nets = networks.build_networks(config, 10, 8, **INPUTS)
    params = state.create_student_state(nets, (8, 8, 1), optax.sgd(0.1), jax.random.key(0)).params
    assert list(params["projector"]) == ["tap0"]


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
