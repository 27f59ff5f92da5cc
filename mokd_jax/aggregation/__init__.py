"""Gradient aggregators: Optax transforms that turn K per-objective gradients into one update.

Usage, with J the per-objective gradients (leaves [K, *param.shape]) and losses [K]:

    tx = optax.chain(aggregation.get("mokd"), optax.sgd(0.1, momentum=0.9))
    updates, opt_state = tx.update(J, opt_state, params, losses=losses)

Every method is a Gram-space weighting (see `gram`); the formulas are in
shared/AGGREGATORS.md. A new method is one factory `(num_objectives, **hparams) ->
Weighting` plus one entry in `_REGISTRY`.
"""

import inspect
from collections.abc import Callable
from typing import Any

import optax

from mokd_jax.aggregation import linear, min_norm, projection
from mokd_jax.aggregation.gram import conflict_diagnostics, gram_matrix, min_norm_weights
from mokd_jax.aggregation.transform import Shared, Weighting, aggregate, check_int
from mokd_jax.errors import invalid

_REGISTRY: dict[str, Callable[..., Weighting]] = {
    "sum": linear.weighted,
    "weighted": linear.weighted,
    "mean": linear.mean,
    "mgda": min_norm.mgda,
    "pcgrad": projection.pcgrad,
    "mokd": min_norm.mokd,
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every accepted aggregator name (aliases included)."""


def get(
    name: str, *, num_objectives: int = 2, shared: Shared = None, **hparams: Any
) -> optax.GradientTransformationExtraArgs:
    """The aggregator `name` as an Optax transform.

    Args:
      name: one of NAMES.
      num_objectives: K, the leading axis of the stacked gradients and the length of losses.
      shared: which leaves are aggregated: None (all), a (prefix) pytree of Python bools, or
        a callable params -> such a pytree (then `update` needs params). Non-shared leaves
        get the plain sum of their K rows, i.e. their own objective's gradient.
      **hparams: the method's hyperparameters (see its factory's docstring).

    Returns:
      A transform whose state is a NamedTuple with `weights` (float32 [K]: the raw
      coefficients of the last update, zeros before the first) and whose
      `update(updates, state, params=None, *, losses)` returns the combined update.

    Raises:
      InputError: unknown name, unknown hyperparameter or invalid value.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise invalid("aggregator", name, f"one of {', '.join(NAMES)}")
    check_int("aggregator.num_objectives", num_objectives, 2)
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_objectives"]
    for key, value in hparams.items():
        if key not in accepted:
            allowed = ", ".join(accepted) or "none"
            raise invalid(f"aggregator.{key}", value, f"a hyperparameter of {name}: {allowed}")
    return aggregate(factory(num_objectives, **hparams), num_objectives, shared)


__all__ = [
    "NAMES",
    "conflict_diagnostics",
    "get",
    "gram_matrix",
    "min_norm_weights",
]
