"""How the trainer drives an aggregator: the one place that says it, per method.

A method is not only a formula: it also decides what the training step must compute for
it. `AggregatorSpec` states that once, beside the method's factory in the registry
(`mokd_jax.aggregation`), and the trainer reads it instead of guessing from the state:

- `drive`: what the step pulls back through the network.
  PER_OBJECTIVE: the K unit rows of the loss vector, giving the per-objective gradients J
  (leaves [K, ...]); the conflict diagnostics need exactly these.
  WEIGHTED_ROW: one row `backward_weights(state, losses)` ([K] weights), giving one
  gradient (leaves [1, ...]): one backward pass per step (famo, mokd_amortized).
  REPRESENTATION: the objectives are combined at the student's representation (its first
  tap: a classifier's pooled features, a RetinaNet's C5) by
  `combine_representation(state, gradients)`, before the encoder's backward pass; the
  parameters after the representation get the plain sum (graddrop).
- `whole_transform`: the factory returns a whole Optax transform (own momenta, one
  backward, ...) rather than a Gram-space `Weighting` or a `Buffered` method; such a
  method has no per-objective problem to split and runs with granularity 'global' only.
- `owns_momentum`: the method keeps its own momentum buffers and weight decay (dot); the
  trainer follows it with plain SGD on the learning-rate schedule and requires
  `optimizer=sgd`.
- `from_optimizer`: hyperparameters the trainer fills in from the optimizer's section of
  the config (dot's `weight_decay` is the student's), so configs do not list them twice.

The state functions take the method's own state, which is plain data (a NamedTuple whose
first field is `weights`); `find_state` finds it in any Optax chain.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PER_OBJECTIVE = "per_objective"
WEIGHTED_ROW = "weighted_row"
REPRESENTATION = "representation"
DRIVES = (PER_OBJECTIVE, WEIGHTED_ROW, REPRESENTATION)


@dataclasses.dataclass(frozen=True)
class AggregatorSpec:
    """One registered method: its factory and how the trainer drives it (module docstring).

    factory: `(num_objectives, **hparams) -> Weighting | Buffered`, or, for a whole
      transform, `(num_objectives, shared, **hparams) -> optax transform`.
    """

    factory: Callable[..., Any]
    drive: str = PER_OBJECTIVE
    whole_transform: bool = False
    owns_momentum: bool = False
    from_optimizer: tuple[str, ...] = ()
    backward_weights: Callable[[Any, jax.Array], jax.Array] | None = None
    combine_representation: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]] | None = None

    def __post_init__(self):
        if self.drive not in DRIVES:
            raise ValueError(f"drive={self.drive!r} is not one of {DRIVES}")
        if (self.drive == WEIGHTED_ROW) != (self.backward_weights is not None):
            raise ValueError("backward_weights is required by, and only by, drive=weighted_row")
        if (self.drive == REPRESENTATION) != (self.combine_representation is not None):
            raise ValueError(
                "combine_representation is required by, and only by, drive=representation"
            )


def backward_rows(spec: AggregatorSpec, state: Any, losses: jax.Array) -> jax.Array:
    """The cotangents to pull the loss vector back with, [R, K]: one weighted row for
    WEIGHTED_ROW, else the identity (R = K per-objective gradients; what a representation
    method's rows are at the representation itself)."""
    if spec.drive == WEIGHTED_ROW:
        return spec.backward_weights(state, losses)[None, :]
    return jnp.eye(losses.shape[0], dtype=losses.dtype)


def _is_aggregator_state(node: Any) -> bool:
    fields = getattr(type(node), "_fields", ())
    return isinstance(node, tuple) and bool(fields) and fields[0] == "weights"


def find_state(opt_state: Any) -> Any:
    """The aggregator's own state inside an Optax state, wherever the aggregator sits in the
    chain: the first (in chain order) NamedTuple whose first field is `weights`. Optax's own
    states have no such field; an aggregator's nested per-leaf states are not searched."""
    if _is_aggregator_state(opt_state):
        return opt_state
    if isinstance(opt_state, dict):
        children = opt_state.values()
    elif isinstance(opt_state, tuple | list):
        children = opt_state
    else:
        return None
    return next((found for c in children if (found := find_state(c)) is not None), None)


def weights(opt_state: Any) -> jax.Array:
    """The aggregator's `weights` ([K], the raw coefficients of the last update) from an
    Optax state that contains an aggregator."""
    state = find_state(opt_state)
    if state is None:
        raise ValueError("the optimizer state holds no aggregator state")
    return state.weights
