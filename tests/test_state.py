"""mokd_jax.state: what the teacher's and the student's training states hold."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import default
from mokd_jax import networks, normalization, state


def small_networks():
    return networks.build_networks(
        default.get_config(),
        10,
        8,
        teacher_input=normalization.UNIT,
        student_input=normalization.UNIT,
    )


def test_teacher_state_starts_at_step_zero_with_its_variables_and_optimizer():
    nets = small_networks()
    tx = optax.sgd(0.1, momentum=0.9)
    teacher_state = state.create_teacher_state(nets.teacher, (8, 8, 1), tx, jax.random.key(0))
    variables = state.init_model(nets.teacher, (8, 8, 1), jax.random.key(0))
    assert int(teacher_state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, teacher_state.params, variables["params"])
    assert jax.tree.structure(teacher_state.opt_state) == jax.tree.structure(
        tx.init(variables["params"])
    )
    assert teacher_state.constants == {}


def test_student_state_holds_student_and_projector_params_and_the_fixed_lifts():
    nets = small_networks()
    student_state = state.create_student_state(nets, (8, 8, 1), optax.adam(1e-3), jax.random.key(0))
    assert set(student_state.params) == {"student", "projector"}
    variables = state.init_model(nets.student, (8, 8, 1), jax.random.key(0))
    assert jax.tree.structure(student_state.params["student"]) == jax.tree.structure(
        variables["params"]
    )
    # One fixed lift per tap of the default multi-scale set, from its teacher tap's width
    # (cnn_large: pooled 96, second stage 64) into twice that.
    lifts = {name: tap["teacher_lift"].shape for name, tap in student_state.constants.items()}
    assert lifts == {"tap0": (96, 192), "tap1": (64, 128)}
    assert jax.tree.leaves(student_state.batch_stats)  # cnn_small has BatchNorm


def test_shared_mask_aggregates_the_student_and_not_the_projector():
    params = {"student": {"a": jnp.ones(2), "b": {"c": jnp.ones(1)}}, "projector": {"p": 0}}
    mask = state.shared_mask(params)
    assert jax.tree.leaves(mask["student"]) == [True, True]
    assert jax.tree.leaves(mask["projector"]) == [False]


def test_shared_mask_leaves_out_the_frozen_student_parameters():
    params = {"student": {"a": jnp.ones(2), "b": {"c": jnp.ones(1)}}, "projector": {"p": 0}}

    def trainable(params):
        return {"student": {"a": False, "b": {"c": True}}, "projector": {"p": True}}

    mask = state.shared_mask(params, trainable)
    assert mask == {"student": {"a": False, "b": {"c": True}}, "projector": {"p": False}}
