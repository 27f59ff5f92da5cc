"""Our `mokd` aggregator's weights for K = 2 in closed form, in torch: what the benchmark's
PyTorch peer (`mokd_jax.torch_peer.mokd_step`) combines its two per-objective gradients
with. Equal to `mokd_jax.aggregation.min_norm.mokd`'s raw weights
(tests/test_torch_peer_weights.py).
"""

import torch

from mokd_jax.aggregation.gram import EPS

VANISHING = 1e-5
"""As in `aggregation.min_norm`: a combination shorter than this, relative to its longest
term, counts as zero, and the weights fall back to uniform."""


def nonzero(divisor: torch.Tensor) -> torch.Tensor:
    """`divisor`, 1 where it is 0: for normalising by a maximum that may be 0."""
    return torch.where(divisor == 0, 1.0, divisor)


def combination_norm(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """||sum_k w_k g_k|| from the Gram matrix of the g_k; the weights are divided by their
    largest magnitude first, so that 1 / (L + eps) factors cannot overflow the square."""
    peak = torch.max(torch.abs(weights))
    unit = weights / nonzero(peak)
    return peak * torch.sqrt(torch.clamp(unit @ gram @ unit, min=0.0))


def length_and_usable(
    gram: torch.Tensor, coefficients: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(||sum_k c_k g_k||, whether it is longer than VANISHING times its longest term)."""
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram), min=0.0))
    length = combination_norm(gram, coefficients)
    return length, length > VANISHING * torch.max(torch.abs(coefficients) * norms)


def two_objective_min_norm(gram: torch.Tensor) -> torch.Tensor:
    """The min-norm point of the segment between two gradients, as simplex weights: the
    closed form w_1 = <g_2 - g_1, g_2> / ||g_1 - g_2||^2, clamped to [0, 1], on the Gram
    matrix normalised to largest diagonal 1; (0.5, 0.5) when the gradients (nearly)
    coincide, where every point of the segment is the same. Both weights come straight from
    the Gram matrix (not w_2 = 1 - w_1), so that a weight far below float32's resolution
    near 1 keeps its digits."""
    gram = gram / nonzero(torch.max(torch.diagonal(gram)))
    spread = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
    pulls = torch.stack([gram[1, 1] - gram[0, 1], gram[0, 0] - gram[0, 1]])
    usable = spread > EPS
    weights = pulls / torch.where(usable, spread, 1.0)
    return torch.clamp(torch.where(usable, weights, 0.5), 0.0, 1.0)


def mokd_coefficients(
    gram: torch.Tensor, losses: torch.Tensor, max_norm: float | None
) -> torch.Tensor:
    """c with d = c_1 g_1 + c_2 g_2, our `mokd` aggregator for K = 2 on the raw Gram matrix
    of the task and distillation gradients: min-norm weights pi of the log-loss gradients
    g_k / (L_k + eps), uniform where their combination vanishes (one gradient zero, or the
    two cancelling), rescaled so that ||d|| = ||g_1 + g_2|| (`sum_norm`; d = 0 where even
    the uniform combination vanishes), then clipped to `max_norm` (None: no clip). The
    factors are divided by their largest one before they rescale the Gram matrix, so that
    it stays within float32."""
    factors = 1.0 / (torch.clamp(losses, min=0.0) + EPS)
    unit = factors / torch.max(factors)
    pi = two_objective_min_norm(unit[:, None] * gram * unit[None, :])
    _, usable = length_and_usable(gram, pi * factors)
    coefficients = torch.where(usable, pi, 0.5) * factors
    length, usable = length_and_usable(gram, coefficients)
    plain = combination_norm(gram, torch.ones_like(coefficients))
    coefficients = coefficients * torch.where(usable, plain / torch.where(usable, length, 1.0), 0.0)
    if max_norm is None:
        return coefficients
    return coefficients * (max_norm / torch.clamp(combination_norm(gram, coefficients), max_norm))
