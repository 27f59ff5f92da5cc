import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mokd_jax.models.pooling import max_pool

CASES = [
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # a ResNet's stem
    ((2, 2), (2, 2), ((0, 0), (0, 0))),  # VGG
    ((3, 2), (1, 2), ((1, 0), (0, 1))),  # overlapping rows, uneven padding
]


def tied_map(shape, seed=0):
    """ReLU'd noise (ties at zero) with a constant block (ties at a positive value), as a
    flat region of an image gives after a convolution, BN and ReLU."""
    x = np.maximum(np.random.default_rng(seed).standard_normal(shape), 0).astype(np.float32)
    x[:, 2:7, 3:8, :] = 1.5
    return jnp.asarray(x)


def torch_pool(x, cotangent, window, strides, padding):
    """(torch's pooled map, its gradient for `cotangent`), NHWC; torch pads symmetrically,
    so uneven padding is an explicit -inf pad first."""
    (top, bottom), (left, right) = padding
    source = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).requires_grad_()
    padded = torch.nn.functional.pad(source, (left, right, top, bottom), value=-float("inf"))
    pooled = torch.nn.functional.max_pool2d(padded, window, strides)
    pooled.backward(torch.tensor(np.asarray(cotangent)).permute(0, 3, 1, 2))
    return (
        pooled.detach().permute(0, 2, 3, 1).numpy(),
        source.grad.permute(0, 2, 3, 1).numpy(),
    )


@pytest.mark.parametrize("window,strides,padding", CASES)
def test_values_and_gradient_are_torchs_with_ties(window, strides, padding):
    x = tied_map((2, 11, 12, 3))
    pooled, vjp = jax.vjp(lambda x: max_pool(x, window, strides, padding), x)
    cotangent = jax.random.normal(jax.random.key(1), pooled.shape)
    torch_pooled, torch_gradient = torch_pool(x, cotangent, window, strides, padding)
    np.testing.assert_array_equal(pooled, torch_pooled)
    # Each input's gradient sums the cotangents of the windows whose first maximum it is;
    # only the order of those sums may differ from torch's.
    np.testing.assert_allclose(vjp(cotangent)[0], torch_gradient, rtol=0, atol=1e-6)


def test_each_cotangent_goes_to_one_input_only():
    """A tied window passes its whole cotangent to one input (the first maximum), never a
    share to each: the gradient of a constant map is each window's count at its corner."""
    x = jnp.ones((1, 4, 4, 1))
    gradient = jax.grad(lambda x: max_pool(x, (2, 2), (2, 2)).sum())(x)[0, ..., 0]
    expected = np.zeros((4, 4), np.float32)
    expected[::2, ::2] = 1
    np.testing.assert_array_equal(gradient, expected)


def test_matches_flax_in_value_and_gradient_under_jit():
    x = tied_map((2, 9, 9, 4), seed=3)
    args = ((3, 3), (2, 2), ((1, 1), (1, 1)))

    def loss(pool, x):
        return (pool(x) ** 2).sum()

    ours = jax.jit(jax.value_and_grad(lambda x: loss(lambda y: max_pool(y, *args), x)))(x)
    theirs = jax.value_and_grad(
        lambda x: loss(lambda y: nn.max_pool(y, args[0], strides=args[1], padding=args[2]), x)
    )(x)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-5)


def test_a_nan_is_the_maximum_and_takes_the_gradient():
    x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(jnp.nan)
    pooled, vjp = jax.vjp(lambda x: max_pool(x, (2, 2), (2, 2)), x)
    assert np.isnan(pooled).all()
    np.testing.assert_array_equal(vjp(jnp.ones_like(pooled))[0][0, ..., 0], [[0, 0], [1, 0]])
