"""Turns a Gram-space weighting into an Optax transform, and checks hyperparameters.

A method only says how to get K raw coefficients from the normalised Gram matrix (and the
losses, and its own state); this module does the rest once for all of them: it picks the
shared leaves, builds the Gram matrix, applies the coefficients to the shared leaves and sums
the non-shared ones, so that every method chains with any Optax optimizer the same way.
"""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mokd_jax.aggregation.gram import Mask, expand_mask, gram_matrix
from mokd_jax.errors import invalid

Shared = Mask | Callable[[optax.Params], Mask] | None
"""Which leaves are aggregated: None (all), a (prefix) pytree of Python bools, or a callable
params -> such a pytree."""


class WeightsState(NamedTuple):
    """State of the stateless methods.

    weights: float32 [K], the raw coefficients of the last update (the shared part of the
      update is sum_k weights_k grad L_k); zeros before the first update.
    """

    weights: jax.Array


class Weighting(NamedTuple):
    """A method, in Gram space.

    init: () -> its initial state, a NamedTuple with a `weights` field (zeros).
    weigh: (gram, scale, losses, state) -> new state, whose `weights` are the raw
      coefficients of the update. `gram` is normalised (largest diagonal 1), the true Gram
      matrix is scale**2 * gram; `losses` is float32 [K].
    """

    init: Callable[[], Any]
    weigh: Callable[[jax.Array, jax.Array, jax.Array, Any], Any]


def zero_weights(num_objectives: int) -> jax.Array:
    """The `weights` every state starts with: nothing has been applied yet."""
    return jnp.zeros((num_objectives,), jnp.float32)


def stateless(
    num_objectives: int, weights_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
) -> Weighting:
    """A Weighting whose weights depend on the current (gram, scale, losses) only."""
    return Weighting(
        init=lambda: WeightsState(zero_weights(num_objectives)),
        weigh=lambda gram, scale, losses, state: WeightsState(weights_fn(gram, scale, losses)),
    )


def combine(updates: Any, weights: jax.Array, mask: Any) -> Any:
    """sum_k w_k g_k on the shared leaves, the plain sum over k on the others.

    A non-shared leaf (e.g. a projector only the distillation objective touches) has only its
    own objective's gradient in its K rows, so the sum hands that gradient on unchanged.
    """

    def leaf(shared: bool, stacked: jax.Array) -> jax.Array:
        if not shared:
            return stacked.sum(0)
        compute = jnp.promote_types(stacked.dtype, jnp.float32)
        combined = jnp.einsum(
            "k,k...->...",
            weights.astype(compute),
            stacked.astype(compute),
            precision=jax.lax.Precision.HIGHEST,
        )
        return combined.astype(stacked.dtype)

    return jax.tree.map(leaf, mask, updates)


def _check_objective_axis(updates: Any, losses: jax.Array, num_objectives: int) -> None:
    """Static shape check: every leaf and the losses carry the K of the config."""
    leading = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(updates)}
    if leading != {num_objectives} or losses.shape != (num_objectives,):
        raise invalid(
            "aggregator.num_objectives",
            num_objectives,
            f"the leading axis of every gradient leaf (got {sorted(leading, key=str)}) and "
            f"the length of losses (got shape {losses.shape})",
        )


def aggregate(
    weighting: Weighting, num_objectives: int, shared: Shared = None
) -> optax.GradientTransformationExtraArgs:
    """The Optax transform that combines K stacked gradients with `weighting`.

    `update(updates, state, params=None, *, losses, **extra)` takes leaves of shape
    [K, *param.shape] and the float [K] losses (required by every method, so that a trainer
    calls them all alike; other extra args, meant for later transforms in a chain, are
    ignored) and returns the update without the K axis.
    """

    def init_fn(params: optax.Params) -> Any:
        del params
        return weighting.init()

    def update_fn(
        updates: optax.Updates,
        state: Any,
        params: optax.Params | None = None,
        *,
        losses: jax.Array | None = None,
        **extra: Any,
    ) -> tuple[optax.Updates, Any]:
        del extra
        if losses is None:
            raise TypeError("aggregator update needs losses=<float [K] objective values>")
        losses = jnp.asarray(losses, jnp.float32)
        _check_objective_axis(updates, losses, num_objectives)
        if callable(shared):
            if params is None:
                raise TypeError("aggregator with a callable `shared` needs params in update")
            mask = expand_mask(shared(params), updates)
        else:
            mask = expand_mask(shared, updates)
        gram, scale = gram_matrix(updates, mask)
        new_state = weighting.weigh(gram, scale, losses, state)
        return combine(updates, new_state.weights, mask), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
    """Raises InputError unless `value` is one of `choices`."""
    if value not in choices:
        raise invalid(field, value, f"one of {', '.join(choices)}")


def check_int(field: str, value: Any, minimum: int) -> None:
    """Raises InputError unless `value` is an integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise invalid(field, value, f"an integer >= {minimum}")


def check_positive(field: str, value: Any) -> None:
    """Raises InputError unless `value` is a finite real number > 0."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value > 0):
        raise invalid(field, value, "a finite number > 0")
