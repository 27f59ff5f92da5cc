"""The training state and how it is created (pure: no I/O, jittable).

The teacher's state holds its parameters; the student's holds the student's and its
projector's (`params = {'student': ..., 'projector': ...}`), both differentiated, with the
projector's fixed teacher lift in `constants`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `params` are the differentiated variables; for the
    student they are {'student': ..., 'projector': ...}. `constants` holds non-trainable
    variables (the projector's fixed teacher lift)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    constants: Any
    opt_state: optax.OptState


def init_model(model, image_shape: tuple[int, ...], key: jax.Array) -> dict:
    """A model's variables ({'params', 'batch_stats'}) for images of `image_shape`."""
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_teacher_state(model, image_shape, tx, key) -> TrainState:
    variables = init_model(model, image_shape, key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        constants={},
        opt_state=tx.init(variables["params"]),
    )


def create_student_state(student, projector, image_shape, teacher_width, tx, key) -> TrainState:
    student_key, projector_key = jax.random.split(key)
    variables = init_model(student, image_shape, student_key)
    projector_variables = projector.init(
        projector_key, jnp.zeros((1, student.feature_width)), jnp.zeros((1, teacher_width))
    )
    params = {"student": variables["params"], "projector": projector_variables["params"]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        constants=projector_variables["constants"],
        opt_state=tx.init(params),
    )


def shared_mask(params: Mapping[str, Any]) -> dict:
    """The student's parameters take part in the aggregation; the projector's do not."""
    return {
        "student": jax.tree.map(lambda _: True, params["student"]),
        "projector": jax.tree.map(lambda _: False, params["projector"]),
    }
