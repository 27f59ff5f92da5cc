"""The balanced family: `imtl_g` (Liu et al., 2021) and `aligned_mtl` (Senushkin et al., 2023).

Both balance the objectives in closed form from the eigendecomposition of the K x K Gram
matrix: IMTL-G makes the projections of d on the unit gradients equal, Aligned-MTL makes
the singular values of the (aligned) gradient matrix equal. Both results are unchanged when
every gradient is multiplied by the same number, so the normalised Gram matrix is all they
need.
"""

import jax
import jax.numpy as jnp

from mokd_jax.aggregation.gram import dot, safe_divide
from mokd_jax.aggregation.transform import Weighting, stateless
from mokd_jax.checks import check_choice

_RANK_TOLERANCE = 1e-6
"""Eigenvalues below this fraction of the largest count as zero. The float32 Gram matrix of
exactly dependent gradients shows round-off eigenvalues of 4e-8 to 3e-7 of the largest
(measured here, K = 3, 1e4 to 1e7 parameters); the usual rank tolerance K * float32 eps
(3.6e-7 for K = 3, as in numpy, torch and the Aligned-MTL code) sits right at that noise."""


def _spectrum(gram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(eigenvalues ascending, eigenvectors as columns, which eigenvalues count as nonzero)."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    return eigenvalues, eigenvectors, eigenvalues > _RANK_TOLERANCE * eigenvalues[-1]


def _spectral_matrix(eigenvectors: jax.Array, values: jax.Array) -> jax.Array:
    """V diag(values) V^T."""
    return dot(eigenvectors * values[None, :], eigenvectors.T)


def _inverse_powers(eigenvalues: jax.Array, kept: jax.Array, power: float) -> jax.Array:
    """eigenvalue ** -power on the kept eigenvalues, 0 on the others (a pseudo-inverse)."""
    return jnp.where(kept, jnp.where(kept, eigenvalues, 1.0) ** -power, 0.0)


def imtl_g(num_objectives: int) -> Weighting:
    """IMTL-G: d with the same projection on every unit gradient g_k / ||g_k||.

    <d, g_k> / ||g_k|| = (G w)_k / sqrt(G_kk) is the same for every k when w is proportional
    to pinv(G) sqrt(diag(G)); w is then normalised to sum 1. Multiplying one gradient by
    c > 0 multiplies its row and column of G by c and its sqrt(G_kk) by c, so its weight is
    divided by c and the direction of d does not move: dominance is neutralised.

    Computed as diag(1 / ||g_k||) pinv(C) 1, with C the Gram matrix of the unit gradients:
    the same when G is invertible, but C does not inherit G's conditioning from the spread
    of gradient norms (cond(G) grows with the square of the norm ratio; in float32 a ratio of
    1e3 would already leave nothing of G's smallest eigenvalue). A gradient shorter than EPS
    of the longest counts as zero and gets weight 0. When the sum vanishes (two exactly
    opposite gradients, where only d = 0 has equal projections) the weights are 0.
    """

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        del scale, losses
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        inverse_norms = safe_divide(1.0, norms, 0.0)
        unit_gram = inverse_norms[:, None] * gram * inverse_norms[None, :]
        eigenvalues, eigenvectors, kept = _spectrum(unit_gram)
        pseudo_inverse = _spectral_matrix(eigenvectors, _inverse_powers(eigenvalues, kept, 1.0))
        direction = inverse_norms * jnp.sum(pseudo_inverse, axis=1)
        total = jnp.sum(direction)
        # Normalised to sum 1 whatever the sign of the sum (safe_divide wants it positive).
        return safe_divide(jnp.sign(total) * direction, jnp.abs(total), 0.0)

    return stateless(num_objectives, weights)


_SCALE_MODES = ("min", "median", "rmse")


def alignment_matrix(gram: jax.Array, scale_mode: str = "min") -> jax.Array:
    """B = sqrt(lambda_scale) V diag(lambda^-1/2) V^T over the nonzero eigenvalues of G.

    The aligned gradients B J have Gram matrix B G B = lambda_scale V V^T: every nonzero
    singular value equals sqrt(lambda_scale), so no direction (and no objective) dominates.
    lambda_scale is, among the nonzero eigenvalues, the smallest ('min'), the lower median
    ('median', as torch.median) or the mean ('rmse': sqrt of it is the root mean square of
    the singular values). B does not change when G is multiplied by a positive number.
    Zero when G is.
    """
    eigenvalues, eigenvectors, kept = _spectrum(gram)
    rank = jnp.sum(kept)
    first_kept = jnp.minimum(gram.shape[0] - rank, gram.shape[0] - 1)  # eigh sorts ascending
    if scale_mode == "min":
        target = eigenvalues[first_kept]
    elif scale_mode == "median":
        target = eigenvalues[first_kept + jnp.maximum(rank - 1, 0) // 2]
    else:
        target = jnp.sum(jnp.where(kept, eigenvalues, 0.0)) / jnp.maximum(rank, 1)
    values = jnp.sqrt(jnp.maximum(target, 0.0)) * _inverse_powers(eigenvalues, kept, 0.5)
    return _spectral_matrix(eigenvectors, values)


def aligned_mtl(num_objectives: int, scale_mode: str = "min") -> Weighting:
    """Aligned-MTL: the mean of the aligned gradients, w = B (1/K) (`alignment_matrix`).

    When every gradient is zero (rank 0) the weights are 1/K (and d = 0).
    """
    check_choice("aggregator.scale_mode", scale_mode, _SCALE_MODES)
    uniform = jnp.full((num_objectives,), 1.0 / num_objectives, jnp.float32)

    def weights(gram: jax.Array, scale: jax.Array, losses: jax.Array) -> jax.Array:
        del scale, losses
        aligned = dot(alignment_matrix(gram, scale_mode), uniform)
        return jnp.where(jnp.any(jnp.diagonal(gram) > 0), aligned, uniform)

    return stateless(num_objectives, weights)
