"""Turns an aggregation method into an Optax transform, and checks hyperparameters.

Most methods are Gram-space weightings (`Weighting`): they only say how to get K raw
coefficients from the normalised Gram matrix (and the losses, and their own state). A few
need the gradients themselves because they keep per-parameter buffers (`Buffered`). This
module does the rest once for all of them: it picks the shared leaves, splits them into
problems (`granularity`), hands each problem its Gram matrix or its leaves, and sums the
non-shared leaves, so that every method chains with any Optax optimizer the same way.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mokd_jax.aggregation.gram import Mask, expand_mask, gram_matrix
from mokd_jax.checks import check_choice
from mokd_jax.errors import invalid

Shared = Mask | Callable[[optax.Params], Mask] | None
"""Which leaves are aggregated: None (all), a (prefix) pytree of Python bools, or a callable
params -> such a pytree."""

GRANULARITIES = ("global", "per_layer")
"""'global': the shared leaves form ONE vector per objective (one Gram matrix, one weight
vector, one state). 'per_layer': every shared leaf is its own problem, with its own Gram
matrix, weights and state (LibMTL's 'all_matrix' parameter groups, for every method)."""


class WeightsState(NamedTuple):
    """State of the stateless methods.

    weights: float32 [K], the raw coefficients of the last update (the shared part of the
      update is sum_k weights_k grad L_k); zeros before the first update.
    """

    weights: jax.Array


class LayerwiseState(NamedTuple):
    """State of a method run with granularity 'per_layer'.

    weights: float32 [K], the mean over the shared leaves of their own `weights`: one number
      per objective for logging. Every leaf has its own coefficients, so the update is no
      longer sum_k weights_k grad L_k.
    leaves: the method's own state for every shared leaf, in jax.tree.leaves order. For a
      Weighting, one state whose arrays carry a leading leaf axis (so `leaves.weights` are
      the per-leaf coefficients, [L, K]); for a Buffered method, a tuple of L states.
    """

    weights: jax.Array
    leaves: Any


class Weighting(NamedTuple):
    """A method, in Gram space.

    init: () -> its initial state, a NamedTuple with a `weights` field (zeros).
    weigh: (gram, scale, losses, state) -> new state, whose `weights` are the raw
      coefficients of the update. `gram` is normalised (largest diagonal 1), the true Gram
      matrix is scale**2 * gram; `losses` is float32 [K].
    """

    init: Callable[[], Any]
    weigh: Callable[[jax.Array, jax.Array, jax.Array, Any], Any]


class Buffered(NamedTuple):
    """A method that needs the gradients themselves, not only their Gram matrix: it keeps
    per-parameter buffers (e.g. a moving average of every objective's gradient) and builds
    the update from them.

    init: (shared parameter leaves, or anything with their shape and dtype) -> its initial
      state, a NamedTuple with a `weights` field (zeros).
    update: (shared gradient leaves [K, *shape], losses float32 [K], state) -> (the update
      of those leaves without the K axis, in the same order; new state). The update need
      not be a combination of the current gradients alone: the method's docstring says
      what its `weights` report.
    """

    init: Callable[[list[Any]], Any]
    update: Callable[[list[jax.Array], jax.Array, Any], tuple[list[jax.Array], Any]]


Method = Weighting | Buffered
"""What a registry factory returns."""


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


def weighted_sum(weights: jax.Array, stacked: jax.Array) -> jax.Array:
    """sum_k w_k stacked[k], computed in (at least) full float32, in stacked's dtype.

    Written as K scaled rows added elementwise: one loop over the leaf that XLA fuses (in the
    train step, with the optimizer after it). As an einsum the same sum became a matrix-
    vector product with a scratch copy, twice as slow on CPU; concatenating the leaves
    first would add a copy of J and of the result.
    """
    compute = jnp.promote_types(stacked.dtype, jnp.float32)
    weights = weights.astype(compute)
    rows = [weights[k] * stacked[k].astype(compute) for k in range(stacked.shape[0])]
    return sum(rows[1:], rows[0]).astype(stacked.dtype)


def objective_sum(stacked: jax.Array) -> jax.Array:
    """sum_k stacked[k] (a non-shared leaf's update), like `weighted_sum` with unit
    weights: `stacked.sum(0)` is a separate reduction over the leading axis that XLA's CPU
    backend ran about 20x slower than this elementwise loop."""
    return weighted_sum(jnp.ones((stacked.shape[0],), jnp.float32), stacked)


def _mean_weights(states: Sequence[Any]) -> jax.Array:
    return jnp.mean(jnp.stack([state.weights for state in states]), axis=0)


def _joint(weighting: Weighting) -> Buffered:
    """All shared leaves as ONE vector per objective: one Gram matrix, one weight vector."""

    def update(leaves: list[jax.Array], losses: jax.Array, state: Any) -> tuple[list, Any]:
        gram, scale = gram_matrix(leaves)
        state = weighting.weigh(gram, scale, losses, state)
        return [weighted_sum(state.weights, leaf) for leaf in leaves], state

    return Buffered(init=lambda leaves: weighting.init(), update=update)


def _weighting_per_leaf(weighting: Weighting) -> Buffered:
    """Every shared leaf with its own Gram matrix, weights and state.

    The leaves differ in size but their Gram matrices are all K x K, so they are stacked and
    the weighting is vmapped over them: traced and compiled once, not once per leaf. Every
    leaf starts from the same initial state, so leaf l behaves exactly like the global
    method run on leaf l alone (a seeded method draws the same random orders for every
    leaf, as LibMTL's parameter groups do).
    """

    def init(leaves: list[Any]) -> LayerwiseState:
        state = weighting.init()
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(leaves), *x.shape)), state)
        return LayerwiseState(state.weights, stacked)

    def update(
        leaves: list[jax.Array], losses: jax.Array, state: LayerwiseState
    ) -> tuple[list, LayerwiseState]:
        grams, scales = zip(*(gram_matrix(leaf) for leaf in leaves), strict=True)
        states = jax.vmap(weighting.weigh, in_axes=(0, 0, None, 0))(
            jnp.stack(grams), jnp.stack(scales), losses, state.leaves
        )
        combined = [weighted_sum(w, leaf) for w, leaf in zip(states.weights, leaves, strict=True)]
        return combined, LayerwiseState(jnp.mean(states.weights, axis=0), states)

    return Buffered(init, update)


def _buffered_per_leaf(method: Buffered) -> Buffered:
    """Every shared leaf with its own buffers and state. Buffers differ in shape from leaf
    to leaf, so this one is a loop over the leaves at trace time."""

    def init(leaves: list[Any]) -> LayerwiseState:
        states = tuple(method.init([leaf]) for leaf in leaves)
        return LayerwiseState(_mean_weights(states), states)

    def update(
        leaves: list[jax.Array], losses: jax.Array, state: LayerwiseState
    ) -> tuple[list, LayerwiseState]:
        results = [
            method.update([leaf], losses, leaf_state)
            for leaf, leaf_state in zip(leaves, state.leaves, strict=True)
        ]
        states = tuple(leaf_state for _, leaf_state in results)
        combined = [leaf_update for (leaf_update,), _ in results]
        return combined, LayerwiseState(_mean_weights(states), states)

    return Buffered(init, update)


def _shared_flags(shared: Shared, tree: Any, params: optax.Params | None) -> list[bool]:
    """One flag per leaf of `tree` (jax.tree.leaves order): is it aggregated?"""
    if callable(shared):
        if params is None:
            raise TypeError("aggregator with a callable `shared` needs params")
        shared = shared(params)
    flags = jax.tree.leaves(expand_mask(shared, tree))
    if not any(flags):
        raise invalid("aggregator.shared", shared, "a mask that selects at least one leaf")
    return flags


def _select(flags: list[bool], leaves: list[Any]) -> list[Any]:
    return [leaf for flag, leaf in zip(flags, leaves, strict=True) if flag]


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
    method: Method, num_objectives: int, shared: Shared = None, granularity: str = "global"
) -> optax.GradientTransformationExtraArgs:
    """The Optax transform that combines K stacked gradients with `method`.

    `update(updates, state, params=None, *, losses, **extra)` takes leaves of shape
    [K, *param.shape] and the float [K] losses (required by every method, so that a trainer
    calls them all alike; other extra args, meant for later transforms in a chain, are
    ignored) and returns the update without the K axis.

    `init(params)` needs the parameters (as any Optax transform with per-parameter state)
    for a Buffered method and for granularity 'per_layer' (one state per shared leaf); a
    global Weighting also accepts `init(None)`.
    """
    check_choice("aggregator.granularity", granularity, GRANULARITIES)
    per_leaf = granularity == "per_layer"
    if isinstance(method, Weighting):
        problem = _weighting_per_leaf(method) if per_leaf else _joint(method)
    else:
        problem = _buffered_per_leaf(method) if per_leaf else method
    needs_params = per_leaf or isinstance(method, Buffered)

    def init_fn(params: optax.Params | None) -> Any:
        if params is None:
            if needs_params:
                raise TypeError(
                    "aggregator init needs params: its state holds per-parameter buffers or "
                    f"one state per shared leaf (granularity={granularity!r})"
                )
            return problem.init([])
        return problem.init(_select(_shared_flags(shared, params, params), jax.tree.leaves(params)))

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
        flags = _shared_flags(shared, updates, params)
        stacked, treedef = jax.tree.flatten(updates)
        combined, new_state = problem.update(_select(flags, stacked), losses, state)
        pending = iter(combined)
        out = [
            next(pending) if flag else objective_sum(leaf)
            for flag, leaf in zip(flags, stacked, strict=True)
        ]
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
