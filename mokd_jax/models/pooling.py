"""Max pooling with torch's semantics and a cheap gradient.

`flax.linen.max_pool` is `lax.reduce_window(max)`, whose gradient XLA:CPU lowers to a
variadic reduce-window that carries an int32 iota per window dimension to find each
window's argmax, followed by a scatter into a zero map. On a ResNet-18's stem (112 px
images, batch 16) that gradient took about 90 ms of a 570 ms distillation step on 2 cores,
more than the stem's convolution.

`max_pool` here computes the same values as the window's maximum over its taps (one strided
slice of the padded input per window position) and defines its gradient directly: each
output's cotangent goes to the first tap, in row-major window order, that holds the
maximum, which is what torch's `max_pool2d` does (it scans the window in that order and
keeps the first maximum; a NaN counts as the maximum). Every tap's share is placed back with an
interior-padded `lax.pad`, so the gradient is a handful of elementwise loops that XLA fuses,
with no scatter and no index maps. Ties matter in practice: flat regions of real images give
equal activations in neighbouring positions, and splitting the cotangent between them (as the
derivative of a chain of `maximum`s would) is not what the PyTorch models do.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pair = tuple[int, int]


def max_pool(
    x: jax.Array,
    window: Pair,
    strides: Pair,
    padding: Sequence[Pair] = ((0, 0), (0, 0)),
) -> jax.Array:
    """torch's `MaxPool2d(window, strides, padding)` on an NHWC map: the padding is -inf
    (never a window's maximum), and the output has floor((H + pads - window) / stride) + 1
    rows, as torch's (and flax's 'VALID' after explicit padding)."""
    return _max_pool(x, tuple(window), tuple(strides), tuple(map(tuple, padding)))


def _padded(x: jax.Array, padding: tuple[Pair, Pair]) -> jax.Array:
    return jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)


def _output_size(size: int, window: int, stride: int) -> int:
    return (size - window) // stride + 1


def _taps(padded: jax.Array, window: Pair, strides: Pair) -> list[tuple[Pair, jax.Array]]:
    """((row, column) of the tap in the window, the tap's value at every output position),
    in row-major window order."""
    batch, height, width, channels = padded.shape
    rows = _output_size(height, window[0], strides[0])
    columns = _output_size(width, window[1], strides[1])
    taps = []
    for row in range(window[0]):
        for column in range(window[1]):
            start = (0, row, column, 0)
            limit = (
                batch,
                row + (rows - 1) * strides[0] + 1,
                column + (columns - 1) * strides[1] + 1,
                channels,
            )
            taps.append(((row, column), lax.slice(padded, start, limit, (1, *strides, 1))))
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    taps = [tap for _, tap in _taps(_padded(x, padding), window, strides)]
    return functools.reduce(jnp.maximum, taps)


def _max_pool_forward(x, window, strides, padding):
    pooled = _max_pool(x, window, strides, padding)
    return pooled, (x, pooled)


def _max_pool_backward(window, strides, padding, residuals, cotangent):
    x, pooled = residuals
    padded = _padded(x, padding)
    gradient = jnp.zeros_like(padded)
    claimed = jnp.zeros(pooled.shape, bool)
    for (row, column), tap in _taps(padded, window, strides):
        first = ((tap == pooled) | jnp.isnan(tap)) & ~claimed
        claimed = claimed | first
        share = jnp.where(first, cotangent, jnp.zeros_like(cotangent))
        gradient = gradient + lax.pad(
            share,
            jnp.zeros((), share.dtype),
            _placement(padded.shape, share.shape, (row, column), strides),
        )
    (top, bottom), (left, right) = padding
    height, width = padded.shape[1:3]
    return (gradient[:, top : height - bottom, left : width - right, :],)


def _placement(
    padded_shape: tuple[int, ...], share_shape: tuple[int, ...], tap: Pair, strides: Pair
) -> list[tuple[int, int, int]]:
    """`lax.pad`'s (low, high, interior) per dimension that puts output position (i, j) of a
    tap's share at padded position (tap row + i * stride, tap column + j * stride)."""
    config = [(0, 0, 0)]
    for axis in (0, 1):
        size, count, offset, stride = (
            padded_shape[1 + axis],
            share_shape[1 + axis],
            tap[axis],
            strides[axis],
        )
        spanned = offset + (count - 1) * stride + 1
        config.append((offset, size - spanned, stride - 1))
    return [*config, (0, 0, 0)]


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)
