"""The constrained family: `cagrad`, `nash_mtl` and `upgrad`.

Each solves a small optimisation problem over the K weights, stated on the Gram matrix
alone, with a solver whose work is fixed at trace time (no data-dependent loop), so that it
jits to one program and runs the same on every device:

- cagrad: a convex non-smooth problem on the simplex, by pairwise exact line search;
- nash_mtl: the Nash bargaining equations, as a strictly convex minimisation, by damped
  Newton steps;
- upgrad: K box-constrained quadratic programs, exactly, by checking every active set.

All three are invariant to a common rescaling of the gradients except for nash_mtl's final
clip, so they work on the normalised Gram matrix and use `scale` only to clip.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mokd_jax.aggregation.gram import (
    EPS,
    clip_weights,
    combination_norm,
    dot,
    pair_move,
    safe_divide,
)
from mokd_jax.aggregation.transform import Weighting, stateless
from mokd_jax.checks import check_int, check_positive, check_range
from mokd_jax.errors import invalid

# ---------------------------------------------------------------- cagrad


def _pair_line_minima(
    linear: jax.Array, radius: jax.Array, q0: jax.Array, q1: jax.Array, q2: jax.Array
) -> jax.Array:
    """argmin over real s of phi(s) = linear s + radius sqrt(q0 + 2 q1 s + q2 s^2), elementwise.

    The square root is the length of g_w + s (g_t - g_a), so phi is convex and its slope tends
    to linear -/+ radius sqrt(q2) as s -> -/+ inf. When radius sqrt(q2) <= |linear| phi is
    monotone and the minimum is at -inf or +inf (returned as -1 or +inf, for the caller's
    clip to [0, room]). Otherwise, with y = q1 + q2 s and D = q0 q2 - q1^2 >= 0 (Cauchy-
    Schwarz), phi'(s) = 0 reads radius y = -linear sqrt(y^2 + D), solved for y in closed form.
    """
    far_slope2 = radius**2 * q2
    interior = far_slope2 > linear**2
    spread = jnp.maximum(q0 * q2 - q1**2, 0.0)
    y = -linear * jnp.sqrt(spread / jnp.where(interior, far_slope2 - linear**2, 1.0))
    stationary = (y - q1) / jnp.where(interior, q2, 1.0)
    monotone = jnp.where(linear < 0, jnp.inf, -1.0)
    return jnp.where(interior, stationary, monotone)


def cagrad_simplex_weights(gram: jax.Array, radius: jax.Array, iterations: int) -> jax.Array:
    """w on the simplex minimising <g_w, g_0> + radius ||g_w||, g_w = J^T w, g_0 the mean.

    Pairwise exact line search, as in `min_norm_weights`: each step moves weight from one
    objective a to another t, w + s (e_t - e_a) with 0 <= s <= w_a, and of the K^2 pairs
    takes the one whose exact line search lowers the objective most. Along a pair the
    objective is linear plus the length of an affine path, whose minimiser has a closed form
    (`_pair_line_minima`), so every step is exact; for K = 2 the first step is the answer.
    The objective is not smooth where g_w = 0: a step that lands exactly there may stall
    short of the optimum (the way out may need two pairs at once). That needs 0 in the
    convex hull of the gradients (a zero gradient, or gradients that cancel out), and d
    then falls back to g_0 (see `cagrad`).
    """
    num_objectives = gram.shape[0]
    uniform = jnp.full((num_objectives,), 1.0 / num_objectives, gram.dtype)
    pull = dot(gram, uniform)
    linear = pull[:, None] - pull[None, :]  # [t, a]
    norms2 = jnp.diagonal(gram)
    curvature = jnp.maximum(norms2[:, None] + norms2[None, :] - 2.0 * gram, 0.0)

    def best_pair_step(_: int, weights: jax.Array) -> jax.Array:
        combined = dot(gram, weights)
        q0 = jnp.maximum(dot(weights, combined), 0.0)
        q1 = combined[:, None] - combined[None, :]
        room = jnp.broadcast_to(weights[None, :], gram.shape)
        step = jnp.clip(_pair_line_minima(linear, radius, q0, q1, curvature), 0.0, room)
        # phi(s) - phi(0), with the difference of square roots rationalised (no cancellation).
        moved2 = jnp.maximum(q0 + step * (2.0 * q1 + step * curvature), 0.0)
        length_change = safe_divide(
            step * (2.0 * q1 + step * curvature), jnp.sqrt(moved2) + jnp.sqrt(q0), 0.0, floor=0.0
        )
        gain = -(linear * step + radius * length_change)
        towards, away = jnp.unravel_index(jnp.argmax(gain), gram.shape)
        moved = pair_move(towards, away, weights)
        return weights + step[towards, away] * moved

    return jax.lax.fori_loop(0, iterations, best_pair_step, uniform)


def cagrad(
    num_objectives: int, alpha: float = 0.5, rescale: bool = True, iterations: int = 100
) -> Weighting:
    """CAGrad (Liu et al., 2021): the mean gradient, bent towards the worst-off objective.

    g_0 = mean_k g_k, c = alpha ||g_0||, w = argmin over the simplex of <g_w, g_0> + c ||g_w||
    (`cagrad_simplex_weights`), d = g_0 + (c / ||g_w||) g_w, divided by 1 + alpha^2 when
    `rescale` (so that alpha does not also change the step size). alpha = 0 is the mean.
    Where g_w vanishes (0 is the best point of the hull) d = g_0, as in the authors' code,
    whose eps in c / (||g_w|| + eps) has the same effect.

    The problem and c / ||g_w|| are unchanged when every gradient is multiplied by the same
    number, so the weights come from the normalised Gram matrix and need no `scale`.
    """
    check_range("aggregator.alpha", alpha, 0.0, math.inf, open_high=True)
    if not isinstance(rescale, bool):
        raise invalid("aggregator.rescale", rescale, "True or False")
    check_int("aggregator.iterations", iterations, 1)
    uniform = jnp.full((num_objectives,), 1.0 / num_objectives, jnp.float32)
    shrink = 1.0 + alpha**2 if rescale else 1.0

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        del scale, losses
        radius = alpha * combination_norm(gram, uniform)
        simplex = cagrad_simplex_weights(gram, radius, iterations)
        bend = safe_divide(radius, combination_norm(gram, simplex), 0.0)
        return (uniform + bend * simplex) / shrink

    return stateless(num_objectives, weights)


# ---------------------------------------------------------------- nash_mtl


def _solve_identity_shifted(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    """(matrix + I)^-1 rhs for a symmetric positive semi-definite `matrix`.

    Through matrix's eigendecomposition, its eigenvalues clamped at 0: the system then stays
    positive definite even when matrix's entries are so large that adding 1 to them is lost
    to float32 round-off and an LU solve would meet a singular matrix.
    """
    eigenvalues, eigenvectors = jnp.linalg.eigh(matrix)
    inverse = 1.0 / (jnp.maximum(eigenvalues, 0.0) + 1.0)
    return dot(eigenvectors, inverse * dot(rhs, eigenvectors))


def nash_weights(gram: jax.Array, iterations: int) -> jax.Array:
    """w > 0 with (G w)_k = 1 / w_k for every k, for G = gram / ||gram||_F.

    These are the stationarity conditions of F(w) = w^T G w / 2 - sum_k log w_k, which is
    strictly convex on w > 0, so the solution is F's unique minimiser (when F is bounded
    below, i.e. no non-negative combination of the gradients vanishes). The paper reaches it
    by a sequence of convex programs; here each step is a damped Newton step on F, which is
    self-concordant: the step Newton / (1 + decrement) never leaves w > 0 and converges
    quadratically once close. The Newton system is solved for the relative step
    y_k = dw_k / w_k, where its matrix is diag(w) G diag(w) + I: conditioned well whatever
    the spread of gradient norms.

    The start is exact for orthogonal gradients, w_k = 1 / ||g_k||, rescaled to the best
    point of its ray (w^T G w = K). When F has no minimiser (a zero gradient, or gradients
    that cancel exactly) the weights of the degenerate combination grow by at most a factor
    2 a step, which leaves d (and its norm clip) finite.
    """
    num_objectives = gram.shape[0]
    gram = safe_divide(gram, jnp.sqrt(jnp.sum(gram**2)), 0.0, floor=0.0)
    start = 1.0 / jnp.sqrt(jnp.maximum(jnp.diagonal(gram), EPS))
    spread = dot(start, dot(gram, start))
    start = start * jnp.sqrt(num_objectives / jnp.maximum(spread, EPS))

    def newton_step(_: int, weights: jax.Array) -> jax.Array:
        residual = weights * dot(gram, weights) - 1.0  # diag(w) grad F
        scaled_hessian = weights[:, None] * gram * weights[None, :]
        relative_step = -_solve_identity_shifted(scaled_hessian, residual)
        decrement = jnp.sqrt(jnp.maximum(-dot(residual, relative_step), 0.0))
        return weights * (1.0 + relative_step / (1.0 + decrement))

    return jax.lax.fori_loop(0, iterations, newton_step, start)


def nash_mtl(num_objectives: int, max_norm: float | None = 1.0, iterations: int = 20) -> Weighting:
    """Nash-MTL (Navon et al., 2022): the Nash bargaining solution, clipped.

    w solves (G w)_k = 1 / w_k with G normalised by its Frobenius norm (`nash_weights`), so
    that <d, g_k> w_k is the same for every k: each objective's share of the progress is
    inversely proportional to its weight. d = sum_k w_k g_k, then clipped to global norm
    `max_norm` (None: no clip) in raw units, as the authors' code does after the backward.
    """
    if max_norm is not None:
        check_positive("aggregator.max_norm", max_norm)
    check_int("aggregator.iterations", iterations, 1)

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        del losses
        nash = nash_weights(gram, iterations)
        return nash if max_norm is None else clip_weights(gram, scale, nash, max_norm)

    return stateless(num_objectives, weights)


# ---------------------------------------------------------------- upgrad

_UPGRAD_REGULARIZATION = 1e-4
"""Added to the trace-normalised Gram matrix (as in TorchJD) so that every projection is a
strictly convex problem, even for linearly dependent gradients."""

_UPGRAD_MAX_OBJECTIVES = 12
"""The exact solver checks 2^K active sets; beyond this K that stops being cheap."""


def _active_set_masks(num_objectives: int) -> np.ndarray:
    """bool [2^K, K]: every subset of the objectives, as the free (unconstrained) ones."""
    return np.array(list(itertools.product((False, True), repeat=num_objectives)))


def box_projections(matrix: jax.Array, lower: jax.Array) -> jax.Array:
    """For each row u of `lower`, argmin_v v^T A v subject to v >= u, for A positive definite.

    Exact: a KKT point fixes v_i = u_i on some active set S and solves A v = 0 on the free
    rows, with multipliers (A v)_S >= 0 and v >= u. Every one of the 2^K active sets is
    solved (one K x K system per set, shared by all the rows of `lower`) and the candidate
    that violates the KKT conditions least is kept: the unique solution violates them only
    by round-off. No iteration count to tune, and no accuracy lost to A's conditioning
    beyond that of a linear solve.

    Args:
      matrix: A, float [K, K], positive definite.
      lower: float [R, K], one lower bound per problem.

    Returns:
      float [R, K], one solution per row of `lower`.
    """
    free = jnp.asarray(_active_set_masks(matrix.shape[0]))  # [S, K]
    both_free = free[:, :, None] & free[:, None, :]
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    systems = jnp.where(both_free, matrix, eye)  # [S, K, K]
    fixed = jnp.where(free[:, None, :], 0.0, lower[None, :, :])  # [S, R, K]: v on S, else 0
    # x @ A is A x for every vector x in the batch, A being symmetric.
    right = jnp.where(free[:, None, :], -dot(fixed, matrix), fixed)
    candidates = jnp.linalg.solve(systems[:, None], right[..., None])[..., 0]  # [S, R, K]
    below = jnp.max(lower[None] - candidates, axis=-1)
    multipliers = dot(candidates, matrix)
    negative = jnp.max(jnp.where(free[:, None, :], 0.0, -multipliers), axis=-1)
    best = jnp.argmin(jnp.maximum(below, negative), axis=0)  # [R]
    return jnp.take_along_axis(candidates, best[None, :, None], axis=0)[0]


def upgrad(num_objectives: int) -> Weighting:
    """UPGrad (Quinton & Rey, 2024): the mean of the gradients projected onto the dual cone.

    G' = G / tr(G) + 1e-4 I; for each k, v_k = argmin_v v^T G' v subject to v >= e_k / K
    (`box_projections`); w = sum_k v_k. In gradient space v_k is the projection of g_k / K
    onto the dual cone {x: <x, g_j> >= 0 for all j}, so <d, g_j> >= 0 for every j up to the
    regularisation: no objective gets worse to first order. G / tr(G) does not change when
    every gradient is multiplied by the same number, so neither do the weights.

    Raises InputError for K > 12: the exact solver's cost doubles with every objective.
    """
    if num_objectives > _UPGRAD_MAX_OBJECTIVES:
        raise invalid(
            "aggregator.num_objectives",
            num_objectives,
            f"at most {_UPGRAD_MAX_OBJECTIVES} for upgrad (its exact solver checks 2^K cases)",
        )
    identity = jnp.eye(num_objectives, dtype=jnp.float32)

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        del scale, losses
        normalised = safe_divide(gram, jnp.trace(gram), 0.0, floor=0.0)
        regularised = normalised + _UPGRAD_REGULARIZATION * identity
        return box_projections(regularised, identity / num_objectives).sum(0)

    return stateless(num_objectives, weights)
