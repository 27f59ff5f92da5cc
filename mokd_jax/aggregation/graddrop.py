"""GradDrop (Chen et al., 2020): sign-consistent dropout of gradients at a representation.

GradDrop does not combine parameter gradients: it works on the gradients of the K
objectives with respect to a shared representation (here the student's first tap: a
classifier's pooled features, where the classifier and the projector branch off, or a
RetinaNet's C5, the backbone's last output) and keeps, per feature, only the
gradients of one sign, chosen at random with the probability of that sign's "purity":

    P = 1/2 (1 + sum_k g_k / sum_k |g_k|),   U ~ Uniform(0, 1) per feature,
    mask_k = [P > U][g_k > 0] + [P < U][g_k < 0],
    d = sum_k (leak + (1 - leak) mask_k) g_k.

As in the paper's Algorithm 1, g_k is first summed over the batch ("batch-separated"
representations), so a feature's mask is shared by the examples; d keeps the per-example
gradients. The trainer pulls d back through the encoder (one more backward) and sums the
objectives' gradients for the parameters after the representation. The transform itself
then only hands the resulting gradient on and advances its PRNG key.

Each step splits the state's key in two (`step_keys`): one half draws this step's U, the
other is carried to the next step, so no key is ever used for a draw and carried on.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mokd_jax.aggregation.gram import EPS
from mokd_jax.aggregation.transform import zero_weights
from mokd_jax.checks import check_int, check_range


class GradDropState(NamedTuple):
    """weights: float32 [K], the mean kept fraction of each objective's representation
    gradient in the last step; key: uint32 PRNG key data for U; leak: float32, the
    fraction of every gradient that always passes."""

    weights: jax.Array
    key: jax.Array
    leak: jax.Array


def step_keys(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The state's key data -> (this step's key for U, the key carried to the next step):
    the two halves of one split, never the same key."""
    draw, carried = jax.random.split(jax.random.wrap_key_data(key_data))
    return draw, carried


def combine_representation(
    state: GradDropState, gradients: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The GradDrop combination of representation gradients [K, B, ...] -> ([B, ...], the
    kept fraction per objective [K]), with the U drawn from `state`'s key."""
    key, _ = step_keys(state.key)
    summed = gradients.sum(axis=1)  # over the batch
    purity = 0.5 * (1.0 + summed.sum(0) / (jnp.abs(summed).sum(0) + EPS))
    uniform = jax.random.uniform(key, purity.shape, purity.dtype)
    positive = (purity > uniform) & (summed > 0)
    negative = (purity < uniform) & (summed < 0)
    keep = state.leak + (1.0 - state.leak) * (positive | negative).astype(gradients.dtype)
    combined = jnp.sum(keep[:, None] * gradients, axis=0)
    return combined, keep.reshape(keep.shape[0], -1).mean(-1)


def graddrop(
    num_objectives: int, shared: Any = None, seed: int = 0, leak: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """GradDrop with [leak 0]: the transform that goes with `combine_representation`."""
    del shared  # the combination happened at the representation
    check_int("aggregator.seed", seed, 0)
    check_range("aggregator.leak", leak, 0.0, 1.0)

    def init_fn(params):
        del params
        key = jax.random.key_data(jax.random.key(seed))
        return GradDropState(zero_weights(num_objectives), key, jnp.asarray(leak, jnp.float32))

    def update_fn(updates, state, params=None, *, losses=None, kept=None, **extra):
        del params, losses, extra
        gradient = jax.tree.map(lambda leaf: leaf[0], updates)
        _, carried = step_keys(state.key)
        weights = state.weights if kept is None else kept.astype(jnp.float32)
        return gradient, GradDropState(weights, jax.random.key_data(carried), state.leak)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
