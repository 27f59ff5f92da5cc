"""One-backward methods: `famo` and `mokd_amortized`.

These never form the K per-objective gradients. Each step, the trainer asks the state for
the weights of the loss vector (`famo_weights` / `mokd_amortized_weights` of the state and the
losses: the registry's `backward_weights`), pulls that one row back
through the network (one backward pass) and hands the resulting gradient (leading axis 1)
to `update`, which then learns the weights from how the log-losses moved (FAMO's rule, Liu
et al. 2023):

    z = softmax(xi);  delta_k = log L_k(before) - log L_k(after);
    xi <- Adam(xi, gradient = J_softmax(xi)^T delta)   [lr 0.025, L2 weight decay 1e-3]

Descending on that gradient lowers the weight of objectives that improved most, so all
log-losses fall at a similar rate. "Before/after" are the losses of consecutive steps, the
ones the forward passes compute anyway: FAMO's reference code spends one more forward pass
on the same batch after the update, which is the whole cost this variant exists to avoid;
the price is that delta also carries the batch-to-batch noise, which Adam's averaging
absorbs.

Parameters outside the shared mask (the projector) receive the gradient of the weighted
scalar, i.e. their objective's gradient times its weight, as in FAMO itself: without K
backward passes there is no unweighted per-objective gradient to give them.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mokd_jax.aggregation.gram import EPS, expand_mask, gram_matrix
from mokd_jax.aggregation.transform import zero_weights
from mokd_jax.checks import check_positive
from mokd_jax.errors import invalid


def _log_losses(losses: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(losses, 0.0) + EPS)


class AmortizedState(NamedTuple):
    """weights: raw coefficients of the last update; logits: xi; logits_optimizer: Adam's
    state for xi; previous_log_losses / has_previous: the last step's log-losses."""

    weights: jax.Array
    logits: jax.Array
    logits_optimizer: Any
    previous_log_losses: jax.Array
    has_previous: jax.Array


BackwardWeights = Callable[[AmortizedState, jax.Array], jax.Array]
"""(state, losses [K]) -> the weights [K] of the one row pulled back this step."""


def famo_weights(state: AmortizedState, losses: jax.Array) -> jax.Array:
    """FAMO: the gradient of sum_k z_k log L_k / c, c = sum_k z_k / L_k (detached)."""
    z = jax.nn.softmax(state.logits)
    inverse = 1.0 / (jnp.maximum(losses, 0.0) + EPS)
    return z * inverse / jnp.sum(z * inverse)


def mokd_amortized_weights(state: AmortizedState, losses: jax.Array) -> jax.Array:
    """MoKD's step 4 on FAMO's weights: the log-loss gradient sum_k z_k grad log L_k,
    rescaled by sum_k z_k L_k (`mokd`'s 'loss' rescale: 'mean_norm' would need the K
    gradients that this method never forms)."""
    z = jax.nn.softmax(state.logits)
    clamped = jnp.maximum(losses, 0.0)
    return z / (clamped + EPS) * jnp.sum(z * clamped)


def _amortized(
    backward_weights: BackwardWeights,
    num_objectives: int,
    shared: Any,
    learning_rate: float,
    weight_decay: float,
    max_norm: float | None,
) -> optax.GradientTransformationExtraArgs:
    check_positive("aggregator.learning_rate", learning_rate)
    if weight_decay < 0:
        raise invalid("aggregator.weight_decay", weight_decay, "a number >= 0")
    if max_norm is not None:
        check_positive("aggregator.max_norm", max_norm)
    logits_optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay), optax.adam(learning_rate)
    )

    def init_fn(params):
        del params
        logits = jnp.zeros((num_objectives,), jnp.float32)
        return AmortizedState(
            weights=zero_weights(num_objectives),
            logits=logits,
            logits_optimizer=logits_optimizer.init(logits),
            previous_log_losses=jnp.zeros((num_objectives,), jnp.float32),
            has_previous=jnp.zeros((), bool),
        )

    def update_fn(updates, state, params=None, *, losses=None, **extra):
        del extra
        if losses is None:
            raise TypeError("aggregator update needs losses=<float [K] objective values>")
        losses = jnp.asarray(losses, jnp.float32)
        weights = backward_weights(state, losses)
        gradient = jax.tree.map(lambda leaf: leaf[0], updates)
        mask = expand_mask(shared(params) if callable(shared) else shared, updates)
        factor = 1.0
        if max_norm is not None:
            gram, scale = gram_matrix(updates, mask)
            norm = scale * jnp.sqrt(gram[0, 0])
            factor = max_norm / jnp.maximum(norm, max_norm)
            gradient = jax.tree.map(
                lambda flag, leaf: leaf * factor.astype(leaf.dtype) if flag else leaf,
                mask,
                gradient,
            )
        log_losses = _log_losses(losses)
        _, softmax_pullback = jax.vjp(jax.nn.softmax, state.logits)
        (logits_gradient,) = softmax_pullback(state.previous_log_losses - log_losses)
        step, optimizer_state = logits_optimizer.update(
            logits_gradient, state.logits_optimizer, state.logits
        )
        learned = jax.tree.map(
            lambda new, old: jnp.where(state.has_previous, new, old),
            (state.logits + step, optimizer_state),
            (state.logits, state.logits_optimizer),
        )
        new_state = AmortizedState(
            weights=weights * factor,
            logits=learned[0],
            logits_optimizer=learned[1],
            previous_log_losses=log_losses,
            has_previous=jnp.ones((), bool),
        )
        return gradient, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def famo(
    num_objectives: int,
    shared: Any = None,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-3,
) -> optax.GradientTransformationExtraArgs:
    """FAMO (docs/aggregators.md): one backward per step, weights learned from the log-losses."""
    return _amortized(famo_weights, num_objectives, shared, learning_rate, weight_decay, None)


def mokd_amortized(
    num_objectives: int,
    shared: Any = None,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-3,
    max_norm: float | None = 10.0,
) -> optax.GradientTransformationExtraArgs:
    """MoKD at the cost of one backward (docs/method.md, "The amortized variant"): FAMO's
    weight learning on log-losses, rescaled by the weighted loss and clipped at `max_norm`
    like `mokd`."""
    return _amortized(
        mokd_amortized_weights, num_objectives, shared, learning_rate, weight_decay, max_norm
    )
