"""mokd_jax.models.stored: an identity whose value and cotangent XLA:CPU stores instead of
recomputing them inside the fusions that read them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax import models
from mokd_jax.models import regnet as regnet_module
from mokd_jax.models import stored
from mokd_jax.models import vit as vit_module
from mokd_jax.state import init_model


def test_value_and_gradient_are_the_identitys():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
    weights = jnp.arange(15.0).reshape(3, 5)
    value, gradient = jax.jit(
        jax.value_and_grad(lambda x: jnp.sum(stored.stored_whole(x * 2.0) * weights))
    )(x)
    np.testing.assert_array_equal(gradient, 2.0 * weights)
    assert value == pytest.approx(float(jnp.sum(x * 2.0 * weights)), rel=1e-6)


def test_nan_and_empty_inputs_pass_unchanged():
    x = jnp.array([jnp.nan, 1.0, -jnp.inf])
    np.testing.assert_array_equal(jax.jit(stored.stored_whole)(x), x)
    assert jax.jit(stored.stored_whole)(jnp.zeros((0, 3))).shape == (0, 3)
    gradient = jax.jit(jax.grad(lambda x: jnp.sum(stored.stored_whole(x) * x)))(x)
    np.testing.assert_array_equal(gradient, 2.0 * x)  # NaN where x is NaN, as without it


def widest_fusion(text: str) -> int:
    """The most operands any fusion of a compiled program reads."""
    counts = [
        line.split(" fusion(", 1)[1].split("), kind", 1)[0].count("%")
        for line in text.splitlines()
        if re.match(r"\s*%\S+ = .* fusion\(", line)
    ]
    return max(counts)


def vit(depth: int):
    return models.get("vit_tiny", 10, image_size=32).clone(depth=depth, embed_dim=12)


def regnet(depth: int):
    """A narrow RegNetY whose third stage has `depth` blocks."""
    return models.get("regnety_160", 10).clone(
        widths=(8, 16, 24, 32), depths=(1, 1, depth, 1), group_width=8, stem_width=8
    )


def gradient_program(model) -> str:
    variables = init_model(model, (32, 32, 3), jax.random.key(0))
    images = jnp.ones((2, 32, 32, 3))

    def loss(params):
        outputs, _ = model.apply(
            {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(outputs)

    return jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()


@pytest.mark.parametrize(("build", "module"), [(vit, vit_module), (regnet, regnet_module)])
def test_the_backward_pass_reads_the_residual_stream_instead_of_recomputing_it(
    build, module, monkeypatch
):
    """On CPU, without the stored stream and cotangent, the copies feeding the weight
    gradients recompute the residual stream's cotangent from every later block, so the
    widest fusion grows with the depth; with them it stays the same."""
    with_stored = [widest_fusion(gradient_program(build(depth))) for depth in (4, 8)]
    assert with_stored[0] == with_stored[1]
    monkeypatch.setattr(module, "stored_whole", lambda x: x)
    plain = [widest_fusion(gradient_program(build(depth))) for depth in (4, 8)]
    assert plain[1] > plain[0] > with_stored[0]
