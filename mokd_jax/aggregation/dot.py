"""DOT, the distillation-oriented trainer (Zhao et al. 2023): separate momenta.

SGD with one momentum buffer per objective: the task buffer uses momentum mu - delta, the
distillation buffer mu + delta, so the distillation gradient accumulates more and the task
gradient less than in plain SGD, which is DOT's way of letting the distillation loss be
optimised further. Weight decay joins the task buffer, as in the reference code.

    buf_task <- (mu - delta) buf_task + (g_task + wd theta)
    buf_kd   <- (mu + delta) buf_kd   + g_kd
    update    = buf_task + buf_kd           (then -lr by the plain SGD after it)

Parameters outside the shared mask (the projector) have one buffer with momentum mu (the
mean of the two) on the sum of their rows. Buffers start at the first gradient. The
transform replaces SGD's own momentum and weight decay: chain it with `optax.sgd(lr)`
(no momentum), which the trainer does for `aggregator=dot`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mokd_jax.aggregation.gram import expand_mask
from mokd_jax.checks import check_positive
from mokd_jax.errors import invalid


class DotState(NamedTuple):
    """weights: (1, 1), both momenta are summed; task_momentum / distill_momentum: the two
    buffers (params-shaped; the distillation buffer is unused on non-shared leaves)."""

    weights: jax.Array
    task_momentum: Any
    distill_momentum: Any
    started: jax.Array


def dot(
    num_objectives: int,
    shared: Any = None,
    momentum: float = 0.9,
    delta: float = 0.075,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """DOT with [mu 0.9, delta 0.075 (CIFAR); 0.09 for ImageNet]; K must be 2."""
    if num_objectives != 2:
        raise invalid("aggregator.num_objectives", num_objectives, "2 for dot (task, distill)")
    check_positive("aggregator.momentum", momentum)
    if not 0 <= delta < min(momentum, 1 - momentum):
        raise invalid("aggregator.delta", delta, f"0 <= delta < {min(momentum, 1 - momentum):g}")
    if weight_decay < 0:
        raise invalid("aggregator.weight_decay", weight_decay, "a number >= 0")

    def init_fn(params):
        def zeros():  # two separate buffers: the train step donates (and reuses) each
            return jax.tree.map(jnp.zeros_like, params)

        return DotState(jnp.ones((2,), jnp.float32), zeros(), zeros(), jnp.zeros((), bool))

    def accumulate(buffer, gradient, coefficient, started):
        return jnp.where(started, coefficient * buffer + gradient, gradient)

    def update_fn(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise TypeError("dot needs params (for weight decay) in update")
        mask = expand_mask(shared(params) if callable(shared) else shared, params)

        def task_buffer(flag, stacked, param, buffer):
            gradient = stacked[0] + weight_decay * param
            if not flag:
                return accumulate(buffer, gradient + stacked[1], momentum, state.started)
            return accumulate(buffer, gradient, momentum - delta, state.started)

        def distill_buffer(flag, stacked, buffer):
            if not flag:
                return buffer
            return accumulate(buffer, stacked[1], momentum + delta, state.started)

        task = jax.tree.map(task_buffer, mask, updates, params, state.task_momentum)
        distill = jax.tree.map(distill_buffer, mask, updates, state.distill_momentum)
        update = jax.tree.map(lambda flag, t, d: t + d if flag else t, mask, task, distill)
        return update, DotState(state.weights, task, distill, jnp.ones((), bool))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
