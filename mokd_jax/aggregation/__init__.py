"""Gradient aggregators: Optax transforms that turn K per-objective gradients into one update.

Usage, with J the per-objective gradients (leaves [K, *param.shape]) and losses [K]:

    tx = optax.chain(aggregation.get("mokd"), optax.sgd(0.1, momentum=0.9))
    updates, opt_state = tx.update(J, opt_state, params, losses=losses)

Most methods are Gram-space weightings (see `gram`); a few keep per-parameter buffers
(`transform.Buffered`). The formulas are in shared/AGGREGATORS.md. A new method is one
factory `(num_objectives, **hparams) -> Weighting | Buffered` plus one entry in `_REGISTRY`;
`granularity` ('global' or 'per_layer') then works for it with no further code.
"""

import inspect
from collections.abc import Callable
from typing import Any

import optax

from mokd_jax.aggregation import (
    amortized,
    balanced,
    constrained,
    dot,
    dual_balancing,
    graddrop,
    linear,
    min_norm,
    projection,
)
from mokd_jax.aggregation.amortized import backward_rows
from mokd_jax.aggregation.gram import conflict_diagnostics, gram_matrix, min_norm_weights
from mokd_jax.aggregation.transform import Method, Shared, aggregate
from mokd_jax.checks import check_int
from mokd_jax.errors import invalid

_REGISTRY: dict[str, Callable[..., Method]] = {
    "sum": linear.weighted,
    "weighted": linear.weighted,
    "mean": linear.mean,
    "mgda": min_norm.mgda,
    "pcgrad": projection.pcgrad,
    "gradvac": projection.gradvac,
    "db_mtl": dual_balancing.db_mtl,
    "cagrad": constrained.cagrad,
    "nash_mtl": constrained.nash_mtl,
    "upgrad": constrained.upgrad,
    "imtl_g": balanced.imtl_g,
    "aligned_mtl": balanced.aligned_mtl,
    "mokd": min_norm.mokd,
}

_TRANSFORMS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "dot": dot.dot,
    "famo": amortized.famo,
    "graddrop": graddrop.graddrop,
    "mokd_amortized": amortized.mokd_amortized,
}
"""Methods that change the step itself (their own momenta, one backward), so they are whole
transforms, `(num_objectives, shared, **hparams) -> transform`, not Gram weightings."""

NAMES: tuple[str, ...] = (*_REGISTRY, *_TRANSFORMS)
"""Every accepted aggregator name (aliases included)."""

WHOLE_TRANSFORMS: tuple[str, ...] = tuple(_TRANSFORMS)
"""The methods that are whole transforms rather than Gram weightings (global only)."""

ONE_BACKWARD: tuple[str, ...] = ("famo", "mokd_amortized")
"""Methods that take ONE gradient, of the loss vector pulled back with the row
`backward_rows(state, losses)`, instead of the K per-objective gradients; parameters outside
the shared mask then get their objective's gradient times its weight."""

REPRESENTATION: tuple[str, ...] = ("graddrop",)
"""Methods that combine the objectives' gradients at the student's representation (its
pooled features) with `state.combine_representation`, before the encoder's backward pass;
the parameters after the representation get the plain sum of the objectives' gradients."""


def default_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of method `name` and their defaults, read off its factory, so
    that configs list exactly what `get` accepts without repeating the defaults."""
    factory = _REGISTRY.get(name) or _TRANSFORMS.get(name)
    if factory is None:
        raise invalid("aggregator", name, f"one of {', '.join(NAMES)}")
    return {
        key: parameter.default
        for key, parameter in inspect.signature(factory).parameters.items()
        if key not in ("num_objectives", "shared")
    }


def get(
    name: str,
    *,
    num_objectives: int = 2,
    shared: Shared = None,
    granularity: str = "global",
    **hparams: Any,
) -> optax.GradientTransformationExtraArgs:
    """The aggregator `name` as an Optax transform.

    Args:
      name: one of NAMES.
      num_objectives: K, the leading axis of the stacked gradients and the length of losses.
      shared: which leaves are aggregated: None (all), a (prefix) pytree of Python bools, or
        a callable params -> such a pytree (then `update` needs params). Non-shared leaves
        get the plain sum of their K rows, i.e. their own objective's gradient.
      granularity: 'global' (the shared leaves form one vector: one Gram matrix, one weight
        vector) or 'per_layer' (every shared leaf is its own problem, with its own weights
        and state; `init` then needs params). The whole transforms (_TRANSFORMS) have no
        per-objective problem to split and accept 'global' only.
      **hparams: the method's hyperparameters (see its factory's docstring).

    Returns:
      A transform whose state is a NamedTuple with `weights` (float32 [K]: the raw
      coefficients of the last update, zeros before the first; with 'per_layer' their mean
      over the shared leaves) and whose
      `update(updates, state, params=None, *, losses)` returns the combined update.

    Raises:
      InputError: unknown name, unknown hyperparameter or invalid value.
    """
    factory = _REGISTRY.get(name) or _TRANSFORMS.get(name)
    if factory is None:
        raise invalid("aggregator", name, f"one of {', '.join(NAMES)}")
    check_int("aggregator.num_objectives", num_objectives, 2)
    accepted = list(default_hyperparameters(name))
    for key, value in hparams.items():
        if key not in accepted:
            allowed = ", ".join(accepted) or "none"
            raise invalid(f"aggregator.{key}", value, f"a hyperparameter of {name}: {allowed}")
    if name in _TRANSFORMS:
        if granularity != "global":
            raise invalid("aggregator.granularity", granularity, f"'global' for {name}")
        return factory(num_objectives, shared, **hparams)
    return aggregate(factory(num_objectives, **hparams), num_objectives, shared, granularity)


__all__ = [
    "NAMES",
    "ONE_BACKWARD",
    "REPRESENTATION",
    "WHOLE_TRANSFORMS",
    "backward_rows",
    "conflict_diagnostics",
    "default_hyperparameters",
    "get",
    "gram_matrix",
    "min_norm_weights",
]
