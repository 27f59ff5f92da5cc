"""Gradient aggregators: Optax transforms that turn K per-objective gradients into one update.

Usage, with J the per-objective gradients (leaves [K, *param.shape]) and losses [K]:

    tx = optax.chain(aggregation.get("mokd"), optax.sgd(0.1, momentum=0.9))
    updates, opt_state = tx.update(J, opt_state, params, losses=losses)

Most methods are Gram-space weightings (see `gram`); a few keep per-parameter buffers
(`transform.Buffered`); a few change the step itself and are whole transforms. The
formulas are in docs/aggregators.md. A new method is one factory
`(num_objectives, **hparams) -> Weighting | Buffered` plus one `AggregatorSpec` line in
`_REGISTRY`, which also says how the trainer drives it (`contract`); `granularity`
('global' or 'per_layer') then works for it with no further code.
"""

import inspect
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
from mokd_jax.aggregation.contract import (
    DRIVES,
    PER_OBJECTIVE,
    REPRESENTATION,
    WEIGHTED_ROW,
    AggregatorSpec,
    backward_rows,
    find_state,
    weights,
)
from mokd_jax.aggregation.gram import conflict_diagnostics, gram_matrix, min_norm_weights
from mokd_jax.aggregation.transform import Shared, aggregate
from mokd_jax.checks import check_int
from mokd_jax.errors import invalid

_REGISTRY: dict[str, AggregatorSpec] = {
    "sum": AggregatorSpec(linear.weighted),
    "weighted": AggregatorSpec(linear.weighted),
    "mean": AggregatorSpec(linear.mean),
    "mgda": AggregatorSpec(min_norm.mgda),
    "pcgrad": AggregatorSpec(projection.pcgrad),
    "gradvac": AggregatorSpec(projection.gradvac),
    "db_mtl": AggregatorSpec(dual_balancing.db_mtl),
    "cagrad": AggregatorSpec(constrained.cagrad),
    "nash_mtl": AggregatorSpec(constrained.nash_mtl),
    "upgrad": AggregatorSpec(constrained.upgrad),
    "imtl_g": AggregatorSpec(balanced.imtl_g),
    "aligned_mtl": AggregatorSpec(balanced.aligned_mtl),
    "mokd": AggregatorSpec(min_norm.mokd),
    "dot": AggregatorSpec(
        dot.dot, whole_transform=True, owns_momentum=True, from_optimizer=("weight_decay",)
    ),
    "famo": AggregatorSpec(
        amortized.famo,
        drive=WEIGHTED_ROW,
        whole_transform=True,
        backward_weights=amortized.famo_weights,
    ),
    "mokd_amortized": AggregatorSpec(
        amortized.mokd_amortized,
        drive=WEIGHTED_ROW,
        whole_transform=True,
        backward_weights=amortized.mokd_amortized_weights,
    ),
    "graddrop": AggregatorSpec(
        graddrop.graddrop,
        drive=REPRESENTATION,
        whole_transform=True,
        combine_representation=graddrop.combine_representation,
    ),
}
"""Every method: its factory and how the trainer drives it (`contract.AggregatorSpec`)."""

NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Every accepted aggregator name (aliases included)."""


def spec(name: str) -> AggregatorSpec:
    """The registry entry of method `name`; InputError for an unknown name."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise invalid("aggregator", name, f"one of {', '.join(NAMES)}")
    return entry


def _accepted_hyperparameters(name: str) -> dict[str, Any]:
    return {
        key: parameter.default
        for key, parameter in inspect.signature(spec(name).factory).parameters.items()
        if key not in ("num_objectives", "shared")
    }


def default_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of method `name` that a config sets, with their defaults, read
    off its factory, so that configs list exactly what `get` accepts without repeating the
    defaults. Those the trainer takes from the optimizer (`from_optimizer`) are left out."""
    return {
        key: value
        for key, value in _accepted_hyperparameters(name).items()
        if key not in spec(name).from_optimizer
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
        and state; `init` then needs params). Whole transforms
        (`AggregatorSpec.whole_transform`) have no per-objective problem to split and
        accept 'global' only.
      **hparams: the method's hyperparameters (see its factory's docstring).

    Returns:
      A transform whose state is a NamedTuple with `weights` (float32 [K]: the raw
      coefficients of the last update, zeros before the first; with 'per_layer' their mean
      over the shared leaves) and whose
      `update(updates, state, params=None, *, losses)` returns the combined update.

    Raises:
      InputError: unknown name, unknown hyperparameter or invalid value.
    """
    entry = spec(name)
    check_int("aggregator.num_objectives", num_objectives, 2)
    accepted = list(_accepted_hyperparameters(name))
    for key, value in hparams.items():
        if key not in accepted:
            allowed = ", ".join(accepted) or "none"
            raise invalid(f"aggregator.{key}", value, f"a hyperparameter of {name}: {allowed}")
    if entry.whole_transform:
        if granularity != "global":
            raise invalid("aggregator.granularity", granularity, f"'global' for {name}")
        return entry.factory(num_objectives, shared, **hparams)
    return aggregate(entry.factory(num_objectives, **hparams), num_objectives, shared, granularity)


__all__ = [
    "DRIVES",
    "NAMES",
    "PER_OBJECTIVE",
    "REPRESENTATION",
    "WEIGHTED_ROW",
    "AggregatorSpec",
    "backward_rows",
    "conflict_diagnostics",
    "default_hyperparameters",
    "find_state",
    "get",
    "gram_matrix",
    "min_norm_weights",
    "spec",
    "weights",
]
