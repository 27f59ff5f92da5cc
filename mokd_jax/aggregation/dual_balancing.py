"""DB-MTL, dual-balancing multi-task learning (Lin et al., 2023): `db_mtl`.

It balances twice. The loss scales: it works on the gradients of log(L_k + eps), i.e.
g_k / (L_k + eps), which do not change when a loss is multiplied by a positive constant.
The gradient magnitudes: it keeps a moving average h_k of each log-gradient and rescales
every h_k to the length of the longest one,

    h_k <- g_k/(L_k+eps) + beta_t (h_k - g_k/(L_k+eps)),   beta_t = beta / t**beta_sigma,
    d = sum_k (max_j ||h_j|| / ||h_k||) h_k,

with t = 1, 2, ... the update count. h lives in parameter space (one [K, *shape] buffer
per shared leaf), so DB-MTL is a `Buffered` method, not a Gram weighting; the Gram matrix
of the buffers still gives their norms, overflow-safe. Defaults are LibMTL's: beta 0.9,
beta_sigma 0 (a constant beta_t = beta); buffers start at zero, without bias correction,
as there (the first h is (1 - beta) times the log-gradient; the rescaling keeps only
relative lengths, so the direction is not affected).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mokd_jax.aggregation.gram import gram_matrix, inverse_losses, safe_divide
from mokd_jax.aggregation.transform import Buffered, weighted_sum, zero_weights
from mokd_jax.checks import check_range


class DBMTLState(NamedTuple):
    """weights: float32 [K], the coefficients on the current raw gradients,
      alpha_k (1 - beta_t) / (L_k + eps) with alpha_k = max_j ||h_j|| / ||h_k||. The update
      is sum_k weights_k grad L_k plus the momentum term beta_t sum_k alpha_k h_k(previous),
      so on the first update (zero buffers) it is exactly sum_k weights_k grad L_k.
    count: int32, the number of updates so far.
    buffers: float32 [K, *shape] per shared leaf, the moving averages h_k."""

    weights: jax.Array
    count: jax.Array
    buffers: tuple[jax.Array, ...]


def _length_balance(buffers: tuple[jax.Array, ...]) -> jax.Array:
    """alpha_k = max_j ||h_j|| / ||h_k||; 0 for a zero h_k (it adds nothing either way).
    In the normalised Gram matrix the longest h has length 1, so alpha_k = 1 / ||h_k||."""
    gram, _ = gram_matrix(buffers)
    lengths = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    return safe_divide(1.0, lengths, 0.0, floor=0.0)


def db_mtl(num_objectives: int, beta: float = 0.9, beta_sigma: float = 0.0) -> Buffered:
    """DB-MTL with beta in [0, 1) [0.9] and beta_sigma >= 0 [0]: beta_t = beta / t**sigma.

    beta = 0 uses the current log-gradients only; beta_sigma > 0 lets the average forget
    its zero start and, later, the past ever faster.
    """
    check_range("aggregator.beta", beta, 0.0, 1.0, open_high=True)
    check_range("aggregator.beta_sigma", beta_sigma, 0.0, math.inf, open_high=True)

    def init(leaves: list[Any]) -> DBMTLState:
        buffers = tuple(
            jnp.zeros((num_objectives, *leaf.shape), jnp.promote_types(leaf.dtype, jnp.float32))
            for leaf in leaves
        )
        return DBMTLState(zero_weights(num_objectives), jnp.zeros((), jnp.int32), buffers)

    def update(
        leaves: list[jax.Array], losses: jax.Array, state: DBMTLState
    ) -> tuple[list[jax.Array], DBMTLState]:
        count = state.count + 1
        rate = beta / count.astype(jnp.float32) ** beta_sigma
        factors = inverse_losses(losses)

        def average(leaf: jax.Array, buffer: jax.Array) -> jax.Array:
            per_row = jnp.expand_dims(factors, tuple(range(1, leaf.ndim)))
            log_gradient = leaf.astype(buffer.dtype) * per_row
            return log_gradient + rate * (buffer - log_gradient)

        buffers = tuple(
            average(leaf, buffer) for leaf, buffer in zip(leaves, state.buffers, strict=True)
        )
        alpha = _length_balance(buffers)
        combined = [
            weighted_sum(alpha, buffer).astype(leaf.dtype)
            for leaf, buffer in zip(leaves, buffers, strict=True)
        ]
        weights = alpha * (1.0 - rate) * factors
        return combined, DBMTLState(weights, count, buffers)

    return Buffered(init, update)
