"""The min-norm family: `mgda` and `mokd` (the project default).

Both rescale each objective's gradient by a positive per-objective factor f_k, find the
min-norm point of the convex hull of the f_k g_k (`min_norm_weights`) and return
d = sum_k pi_k f_k g_k. A per-objective factor is a diagonal rescaling of the Gram matrix,
so all of it happens on K x K numbers. The weights reported (state.weights) are the raw
coefficients pi_k f_k (times any later rescaling), so that d = sum_k weights_k grad L_k.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mokd_jax.aggregation.gram import (
    EPS,
    clip_weights,
    combination_norm,
    dot,
    inverse_losses,
    min_norm_weights,
    nonzero,
    safe_divide,
)
from mokd_jax.aggregation.transform import Weighting, stateless
from mokd_jax.checks import check_choice, check_int, check_positive

_VANISHING = 1e-5
"""A combination sum_k c_k g_k shorter than this, relative to its longest term, counts as
zero: what is left is the round-off of the cancellation, not a direction."""


def _length_and_floor(gram: jax.Array, coefficients: jax.Array) -> tuple[jax.Array, jax.Array]:
    """||sum_k c_k g_k|| and the length at or below which it counts as zero."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    longest_term = jnp.max(jnp.abs(coefficients) * norms)
    return combination_norm(gram, coefficients), _VANISHING * longest_term


def _inverse_norms(gram: jax.Array, scale: jax.Array) -> jax.Array:
    """1 / ||g_k|| in raw units; a gradient below EPS of the longest counts as EPS long."""
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), EPS**2))
    return 1.0 / (nonzero(scale) * norms)


def scaled_min_norm(gram: jax.Array, factors: jax.Array, iterations: int) -> jax.Array:
    """Min-norm simplex weights pi for the gradients f_k g_k (f > 0), from the Gram of g.

    The factors are first divided by their largest one: it does not move pi and keeps the
    rescaled Gram matrix within float32 range for any factor magnitudes.
    """
    unit = factors / nonzero(jnp.max(factors))
    return min_norm_weights(unit[:, None] * gram * unit[None, :], iterations)


_NORMALIZATIONS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "none": lambda gram, scale, losses: jnp.ones_like(losses),
    "l2": lambda gram, scale, losses: _inverse_norms(gram, scale),
    "loss": lambda gram, scale, losses: inverse_losses(losses),
    "loss+": lambda gram, scale, losses: inverse_losses(losses) * _inverse_norms(gram, scale),
}


def mgda(num_objectives: int, normalization: str = "none", iterations: int = 100) -> Weighting:
    """MGDA: the min-norm point of the convex hull of the (pre-normalised) gradients.

    normalization: 'none' (g_k), 'l2' (g_k / ||g_k||), 'loss' (g_k / L_k) or 'loss+'
    (g_k / (L_k ||g_k||)). The update is built from the normalised gradients, as in LibMTL
    (without its extra factor K), so that 'l2' makes the direction independent of each
    objective's gradient scale; Sener & Koltun's original code instead applies pi to the raw
    gradients, which 'none' covers when no normalisation is wanted.
    """
    check_choice("aggregator.normalization", normalization, tuple(_NORMALIZATIONS))
    check_int("aggregator.iterations", iterations, 1)
    normalizer = _NORMALIZATIONS[normalization]

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        factors = normalizer(gram, scale, losses)
        return scaled_min_norm(gram, factors, iterations) * factors

    return stateless(num_objectives, weights)


_RESCALES = ("sum_norm", "mean_norm", "loss", "none")


def _rescale_factor(
    rescale: str, gram: jax.Array, coefficients: jax.Array, pi: jax.Array, losses: jax.Array
) -> jax.Array:
    """The scalar multiplying d = J^T coefficients; see `mokd` for the choices."""
    if rescale in ("sum_norm", "mean_norm"):
        share = 1.0 if rescale == "sum_norm" else 1.0 / coefficients.shape[0]
        plain = jnp.full_like(coefficients, share)
        length, floor = _length_and_floor(gram, coefficients)
        return safe_divide(combination_norm(gram, plain), length, 0.0, floor=floor)
    if rescale == "loss":
        return dot(pi, jnp.maximum(losses, 0.0))
    return jnp.ones((), jnp.float32)


def mokd(
    num_objectives: int,
    rescale: str = "sum_norm",
    max_norm: float | None = 10.0,
    iterations: int = 100,
) -> Weighting:
    """MoKD: MGDA on log-loss gradients, rescaled, clipped (docs/method.md, "The mokd aggregator").

    1. Dominance: h_k = grad log L_k = g_k / (L_k + eps). Multiplying a loss by c > 0
       multiplies g_k and L_k by c, so h_k, and with it the direction of d, is unchanged.
    2. Conflict: pi = min-norm simplex weights of the h_k; d = sum_k pi_k h_k. When
       0 < pi_1 < 1 (K = 2), <d, h_1> = <d, h_2> = ||d||^2 >= 0: to first order no objective
       gets worse and both log-losses fall at the same rate.
    3. Scale (the paper leaves it open), `rescale`:
       - 'sum_norm' (default): ||d|| = ||sum_k g_k||, the norm of the plain recipe's update.
         The objective weights of a recipe (KD's CE 0.1 / KD 0.9) are inside the losses
         (`objectives.loss_vector`) and the plain recipe sums them, so sum_k g_k is exactly
         the update the KD baseline takes: a learning rate (and weight decay) tuned for it
         carries over, and the step still shrinks as the raw gradients do. This ties the
         magnitude (not the direction) back to the raw loss scales.
       - 'mean_norm': ||d|| = ||(1/K) sum_k g_k||, the mean gradient's norm: 1/K of the
         plain recipe's step, so it needs K times its learning rate to match it.
       - 'loss': d * sum_k pi_k L_k, i.e. sum_k pi_k (L_bar / L_k) g_k with
         L_bar = sum_k pi_k L_k: the natural scale of a gradient of the losses themselves.
       - 'none': the log-gradient step as is; its norm ~ 1/L grows as the losses fall, so
         it needs its own learning rate.
    4. Clip d to global norm `max_norm` (None: no clip), a guard against the rare step where
       a small loss makes a log-gradient huge. The clip covers d, the shared part only:
       non-shared leaves get their own objective's raw gradient, untouched.

    Under `granularity='per_layer'` every step above runs on each shared leaf alone: each
    leaf's d gets the norm of that leaf's plain update (so the whole update has the plain
    update's global norm too), and the clip at `max_norm` is per leaf, not global.

    Edge case (docs/method.md: fall back to the mean): when the min-norm point vanishes, because
    one gradient is exactly zero or the gradients exactly cancel, pi falls back to uniform,
    i.e. d is along the mean of the log-gradients. Plain MGDA returns d = 0 there, so a
    distillation loss still weighted 0 during a warm-up (zero loss, zero gradient) would
    stop all training. If that mean vanishes as well, d = 0.

    state.weights are the raw coefficients pi_k * factor / (L_k + eps), clip included, so
    d = sum_k weights_k grad L_k holds exactly.
    """
    check_choice("aggregator.rescale", rescale, _RESCALES)
    if max_norm is not None:
        check_positive("aggregator.max_norm", max_norm)
    check_int("aggregator.iterations", iterations, 1)

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        factors = inverse_losses(losses)
        pi = scaled_min_norm(gram, factors, iterations)
        length, floor = _length_and_floor(gram, pi * factors)
        pi = jnp.where(length > floor, pi, 1.0 / num_objectives)
        coefficients = pi * factors
        rescaled = coefficients * _rescale_factor(rescale, gram, coefficients, pi, losses)
        return rescaled if max_norm is None else clip_weights(gram, scale, rescaled, max_norm)

    return stateless(num_objectives, weights)
