"""The projection family: `pcgrad` (Yu et al., 2020).

PCGrad edits the gradients themselves, but every edit subtracts a multiple of an original
g_j, so each modified gradient stays a linear combination g'_k = sum_i C_ki g_i of the
originals. Tracking the K x K coefficient matrix C instead of the vectors needs only the
Gram matrix: <g'_k, g_j> = (C G)_kj. The update is d = sum_k g'_k, i.e. weights = column
sums of C.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mokd_jax.aggregation.gram import dot, safe_divide
from mokd_jax.aggregation.transform import Weighting, check_int, zero_weights


class PCGradState(NamedTuple):
    """weights: float32 [K], raw coefficients of the last update (zeros before the first).
    key: uint32 PRNG key data for the projection orders, advanced every update; raw key
      data rather than a typed key so that checkpoints hold plain arrays."""

    weights: jax.Array
    key: jax.Array


def projection_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """The coefficient matrix C of the PCGrad-modified gradients.

    Args:
      gram: [K, K] Gram matrix of the original gradients (any positive multiple).
      orders: int [K, K]; row k is the order in which objective k visits the others (the
        entry equal to k is skipped).

    For each k, starting from g'_k = g_k: whenever <g'_k, g_j> < 0, subtract the projection
    on the ORIGINAL g_j, <g'_k, g_j> / ||g_j||^2 g_j. A zero g_j is never projected on (its
    overlap is 0); a merely short one is, however short. K is static, so the loops unroll.
    """
    num_objectives = gram.shape[0]
    rows = []
    for k in range(num_objectives):
        row = jax.nn.one_hot(k, num_objectives)
        for j in orders[k]:
            overlap = dot(row, gram[:, j])
            step = jnp.where(
                (j != k) & (overlap < 0), safe_divide(overlap, gram[j, j], 0.0, floor=0.0), 0.0
            )
            row = row - step * jax.nn.one_hot(j, num_objectives)
        rows.append(row)
    return jnp.stack(rows)


def pcgrad(num_objectives: int, seed: int = 0) -> Weighting:
    """PCGrad with a fresh random projection order per objective and step.

    The order comes from the key in the state (initialised from `seed`), so a run is
    deterministic and a resumed run continues the same sequence of orders.
    """
    check_int("aggregator.seed", seed, 0)

    def init() -> PCGradState:
        key_data = jax.random.key_data(jax.random.key(seed))
        return PCGradState(zero_weights(num_objectives), key_data)

    def weigh(
        gram: jax.Array, scale: jax.Array, losses: jax.Array, state: PCGradState
    ) -> PCGradState:
        del scale, losses
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        orders = jax.vmap(lambda k: jax.random.permutation(k, num_objectives))(
            jax.random.split(step_key, num_objectives)
        )
        coefficients = projection_coefficients(gram, orders)
        return PCGradState(coefficients.sum(0), jax.random.key_data(key))

    return Weighting(init, weigh)
