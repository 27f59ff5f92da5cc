"""The training state and how it is created (pure: no I/O, jittable).

The teacher's state holds its parameters; the student's holds the student's and its
projectors' (`params = {'student': ..., 'projector': {'tap0': ..., ...}}`), both
differentiated, with each projector's fixed teacher lift in `constants`
(`{'tap0': {'teacher_lift': ...}, ...}`).
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mokd_jax.networks import Networks
from mokd_jax.taps import example_taps


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `params` are the differentiated variables; for the
    student they are {'student': ..., 'projector': ...}. `constants` holds non-trainable
    variables (the projectors' fixed teacher lifts)."""

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


def create_student_state(
    networks: Networks, image_shape, tx, key, example_features: Callable | None = None
) -> TrainState:
    """The student's variables and its projectors', whose widths are read from both
    networks' features on images of `image_shape` (traced, not computed):
    `example_features(model, image_shape)`, by default the taps of the networks' tap set
    (`taps.example_taps`); detection passes its pyramid's
    (`mokd_jax.detection.steps.example_pyramid`)."""
    if example_features is None:
        example_features = functools.partial(example_taps, tap_set=networks.taps)
    student_key, projector_key = jax.random.split(key)
    variables = init_model(networks.student, image_shape, student_key)
    projector_variables = networks.projector.init(
        projector_key,
        example_features(networks.student, image_shape),
        example_features(networks.teacher, image_shape),
    )
    params = {"student": variables["params"], "projector": projector_variables["params"]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        constants=projector_variables["constants"],
        opt_state=tx.init(params),
    )


def shared_mask(params: Mapping[str, Any], trainable: Callable[[Any], Any] | None = None) -> dict:
    """The student's parameters take part in the aggregation; the projectors' do not.

    With `trainable` (params -> a pytree of bools of their structure: a detector's frozen
    backbone parts are False), only the student's trainable parameters do. A frozen
    parameter has no say in the objectives' weights, which balance the gradients of what
    actually moves; its rows are summed like a projector's, and the optimizer's
    `only_trainable` then zeroes them, so XLA drops their part of every pullback (the
    backward pass through a RetinaNet's frozen stem and first stage, and the activations it
    would keep alive).
    """
    mask = {
        "student": jax.tree.map(lambda _: True, params["student"]),
        "projector": jax.tree.map(lambda _: False, params["projector"]),
    }
    if trainable is None:
        return mask
    return jax.tree.map(lambda shared, trains: shared and trains, mask, trainable(params))
