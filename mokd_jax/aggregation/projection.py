"""The projection family: `pcgrad` (Yu et al., 2020) and `gradvac` (Wang et al., 2021).

Both edit the gradients themselves, but every edit adds a multiple of an original g_j, so
each modified gradient stays a linear combination g'_k = sum_i C_ki g_i of the originals.
Tracking the K x K coefficient matrix C instead of the vectors needs only the Gram matrix:
<g'_k, g_j> = (C G)_kj and ||g'_k||^2 = (C G C^T)_kk. The update is d = sum_k g'_k, i.e.
weights = column sums of C.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mokd_jax.aggregation.gram import combination_norm, dot, safe_divide
from mokd_jax.aggregation.transform import Weighting, zero_weights
from mokd_jax.checks import check_int, check_range


class PCGradState(NamedTuple):
    """weights: float32 [K], raw coefficients of the last update (zeros before the first).
    key: uint32 PRNG key data for the projection orders, advanced every update; raw key
      data rather than a typed key so that checkpoints hold plain arrays."""

    weights: jax.Array
    key: jax.Array


class GradVacState(NamedTuple):
    """weights, key: as in PCGradState.
    targets: float32 [K, K], phi_kj, the moving average of cos(g'_k, g_j) that GradVac
      raises the similarity of the pair to; 0 at the start, diagonal unused."""

    weights: jax.Array
    key: jax.Array
    targets: jax.Array


def _initial_key(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def visiting_orders(key_data: jax.Array, num_objectives: int) -> tuple[jax.Array, jax.Array]:
    """(orders, next key data): a fresh random permutation of the objectives per objective,
    row k being the order in which objective k visits the others."""
    key, step_key = jax.random.split(jax.random.wrap_key_data(key_data))
    orders = jax.vmap(lambda k: jax.random.permutation(k, num_objectives))(
        jax.random.split(step_key, num_objectives)
    )
    return orders, jax.random.key_data(key)


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
        return PCGradState(zero_weights(num_objectives), _initial_key(seed))

    def weigh(
        gram: jax.Array, scale: jax.Array, losses: jax.Array, state: PCGradState
    ) -> PCGradState:
        del scale, losses
        orders, key = visiting_orders(state.key, num_objectives)
        return PCGradState(projection_coefficients(gram, orders).sum(0), key)

    return Weighting(init, weigh)


def _sine(cosine: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(1.0 - cosine**2, 0.0))


def vaccine_coefficients(
    gram: jax.Array, orders: jax.Array, targets: jax.Array, beta: float
) -> tuple[jax.Array, jax.Array]:
    """The coefficient matrix C of the GradVac-modified gradients, and the new targets.

    Args:
      gram: [K, K] Gram matrix of the original gradients (any positive multiple).
      orders: int [K, K], as in `projection_coefficients`.
      targets: [K, K] similarity targets phi_kj.
      beta: the targets' moving-average rate.

    For each k, starting from g'_k = g_k, for each other j in order: rho = cos(g'_k, g_j);
    if rho < phi_kj, add the multiple of the ORIGINAL g_j that brings the cosine up to
    exactly phi_kj:

        g'_k += g_j ||g'_k|| (phi sqrt(1 - rho^2) - rho sqrt(1 - phi^2))
                / (||g_j|| sqrt(1 - phi^2)),

    then phi_kj <- (1 - beta) phi_kj + beta rho. The average moves on every visit, fired or
    not, as the paper's moving average of the observed similarity and TorchJD do; LibMTL
    moves it only when the rule fires, which lets a target fall but never rise. A zero g'_k
    or g_j has cosine 0; a target of exactly 1 (reached after many identical gradients) or a
    zero g_j adds nothing, where the formula would divide by zero.
    """
    num_objectives = gram.shape[0]
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    rows, target_rows = [], []
    for k in range(num_objectives):
        row, target_row = jax.nn.one_hot(k, num_objectives), targets[k]
        for j in orders[k]:
            # j is traced: selecting by a one-hot vector keeps it to dot products, with no
            # gather or scatter (which vmap, for granularity 'per_layer', would batch).
            pick = jax.nn.one_hot(j, num_objectives)
            other = j != k
            length = combination_norm(gram, row)
            norm_j, phi = dot(norms, pick), dot(target_row, pick)
            rho = jnp.clip(
                safe_divide(dot(row, dot(gram, pick)), length * norm_j, 0.0, floor=0.0), -1.0, 1.0
            )
            step = safe_divide(
                length * (phi * _sine(rho) - rho * _sine(phi)), norm_j * _sine(phi), 0.0, floor=0.0
            )
            row = row + jnp.where(other & (rho < phi), step, 0.0) * pick
            target_row = target_row + jnp.where(other, beta * (rho - phi), 0.0) * pick
        rows.append(row)
        target_rows.append(target_row)
    return jnp.stack(rows), jnp.stack(target_rows)


def gradvac(num_objectives: int, beta: float = 0.5, seed: int = 0) -> Weighting:
    """Gradient Vaccine: like PCGrad, but raises each pair's cosine to a moving target
    instead of only removing conflict (see `vaccine_coefficients`).

    beta in [0, 1]: the rate of the targets' moving average [0.5, as in LibMTL and
    TorchJD]; beta = 0 keeps every target at 0, i.e. only conflicting pairs are corrected,
    to orthogonal. The visiting order comes from the key in the state, as in `pcgrad`.
    Parameter groups are the aggregator's `granularity`: 'global' is LibMTL's default
    'whole_model', 'per_layer' its 'all_matrix' (one target matrix per shared leaf).
    """
    check_range("aggregator.beta", beta, 0.0, 1.0)
    check_int("aggregator.seed", seed, 0)

    def init() -> GradVacState:
        targets = jnp.zeros((num_objectives, num_objectives), jnp.float32)
        return GradVacState(zero_weights(num_objectives), _initial_key(seed), targets)

    def weigh(
        gram: jax.Array, scale: jax.Array, losses: jax.Array, state: GradVacState
    ) -> GradVacState:
        del scale, losses
        orders, key = visiting_orders(state.key, num_objectives)
        coefficients, targets = vaccine_coefficients(gram, orders, state.targets, beta)
        return GradVacState(coefficients.sum(0), key, targets)

    return Weighting(init, weigh)
