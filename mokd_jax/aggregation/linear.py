"""Fixed linear combinations: `sum` / `weighted` (the plain KD recipe) and `mean`.

They ignore the Gram matrix and the losses; they are here so that the baseline recipe goes
through exactly the same code path (shared mask, logging of weights) as the adaptive methods.
"""

import math
import numbers
from collections.abc import Sequence

import jax.numpy as jnp

from mokd_jax.aggregation.transform import Weighting, stateless
from mokd_jax.errors import invalid


def _fixed(coefficients: tuple[float, ...]) -> Weighting:
    """A weighting that always returns `coefficients`."""
    return stateless(
        len(coefficients), lambda gram, scale, losses: jnp.asarray(coefficients, jnp.float32)
    )


def weighted(num_objectives: int, weights: Sequence[float] | None = None) -> Weighting:
    """d = sum_k c_k g_k with fixed loss weights c (default all ones: the plain sum)."""
    if weights is None:
        return _fixed((1.0,) * num_objectives)
    values = tuple(weights) if isinstance(weights, Sequence) else ()
    usable = len(values) == num_objectives and all(
        isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
        for c in values
    )
    if not usable:
        raise invalid("aggregator.weights", weights, f"{num_objectives} finite numbers >= 0")
    return _fixed(tuple(float(c) for c in values))


def mean(num_objectives: int) -> Weighting:
    """d = (1/K) sum_k g_k."""
    return _fixed((1.0 / num_objectives,) * num_objectives)
