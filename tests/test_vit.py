"""mokd_jax.models.vit: the attention softmax's backward rule, and what it saves for a step
that pulls one forward pass back once per objective."""

import jax
import jax.numpy as jnp
import numpy as np
from pullback_memory import pullback_peaks

from mokd_jax import models
from mokd_jax.measurement import tree_bytes
from mokd_jax.models import vit
from mokd_jax.state import init_model


def test_attention_softmax_matches_jax_softmax_in_value_and_gradient():
    rng = np.random.default_rng(0)
    # Large logits, one row constant: the max subtraction and the uniform case.
    logits = jnp.asarray(30.0 * rng.standard_normal((2, 3, 5, 7)), jnp.float32)
    logits = logits.at[0, 0, 0].set(4.0)
    cotangent = jnp.asarray(rng.standard_normal(logits.shape), jnp.float32)

    ours, pull_ours = jax.vjp(vit.attention_softmax, logits)
    reference, pull_reference = jax.vjp(lambda x: jax.nn.softmax(x, axis=-1), logits)

    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pull_ours(cotangent)[0], pull_reference(cotangent)[0], atol=1e-6)
    # Adding a constant to a row does not change the softmax: its gradient sums to 0.
    np.testing.assert_allclose(jnp.sum(pull_ours(cotangent)[0], axis=-1), 0.0, atol=1e-6)


def _two_objective_peaks(model, image_size: int) -> tuple[int, int, int]:
    """(planned peak of one pullback of the summed objectives, of two pullbacks, one per
    objective, as the trainer's `steps.row_gradients` takes them; the parameters' bytes)."""
    variables = init_model(model, (image_size, image_size, 3), jax.random.key(0))
    images = jnp.ones((8, image_size, image_size, 3))

    def objectives(params):
        logits = model.apply({**variables, "params": params}, images)
        return jnp.stack([jnp.sum(logits**2), jnp.sum(logits)]), None

    params = variables["params"]
    return (*pullback_peaks(objectives, params), tree_bytes(params))


def test_two_pullbacks_keep_no_more_attention_maps_than_one(monkeypatch):
    """A second pullback of the same forward pass adds its stacked gradient row (about two
    parameter copies of output in all), not attention-sized buffers. With jax.nn.softmax,
    XLA kept one more [B, heads, N, N] buffer per block for the backward passes: two
    pullbacks planned 14.5 parameter copies over one here, against 2.0 with the rule."""
    model = models.get("vit_tiny", 10, image_size=64).clone(depth=8, embed_dim=24, patch_size=8)
    one, two, copy = _two_objective_peaks(model, 64)
    assert two - one <= 4 * copy

    monkeypatch.setattr(vit, "attention_softmax", lambda x: jax.nn.softmax(x, axis=-1))
    one, two, copy = _two_objective_peaks(model, 64)
    assert two - one > 8 * copy
