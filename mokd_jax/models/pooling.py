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


def _tap_spans(shape: tuple[int, ...], window: Pair, strides: Pair) -> list[tuple[Pair, Pair]]:
    """Per tap of the window, in row-major window order: the (start, limit) of its strided
    slice of a padded NHWC map of `shape`, rows then columns: the tap's value at every
    output position."""
    spans = []
    for axis in (0, 1):
        outputs = (shape[1 + axis] - window[axis]) // strides[axis] + 1
        last = (outputs - 1) * strides[axis] + 1
        spans.append([(offset, offset + last) for offset in range(window[axis])])
    return [(rows, columns) for rows in spans[0] for columns in spans[1]]


def _tap(padded: jax.Array, rows: Pair, columns: Pair, strides: Pair) -> jax.Array:
    batch, _, _, channels = padded.shape
    start, limit = (0, rows[0], columns[0], 0), (batch, rows[1], columns[1], channels)
    return lax.slice(padded, start, limit, (1, *strides, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    padded = _padded(x, padding)
    taps = [_tap(padded, *span, strides) for span in _tap_spans(padded.shape, window, strides)]
    return functools.reduce(jnp.maximum, taps)


def _max_pool_forward(x, window, strides, padding):
    pooled = _max_pool(x, window, strides, padding)
    return pooled, (x, pooled)


def _max_pool_backward(window, strides, padding, residuals, cotangent):
    """Each tap's share of the cotangent padded back to where its slice came from: the
    slice's start before it, the rest of the map after, `stride - 1` between positions."""
    x, pooled = residuals
    padded = _padded(x, padding)
    height, width = padded.shape[1:3]
    gradient = jnp.zeros_like(padded)
    claimed = jnp.zeros(pooled.shape, bool)
    zero = jnp.zeros((), cotangent.dtype)
    for rows, columns in _tap_spans(padded.shape, window, strides):
        tap = _tap(padded, rows, columns, strides)
        first = ((tap == pooled) | jnp.isnan(tap)) & ~claimed
        claimed = claimed | first
        placement = (
            (0, 0, 0),
            (rows[0], height - rows[1], strides[0] - 1),
            (columns[0], width - columns[1], strides[1] - 1),
            (0, 0, 0),
        )
        gradient = gradient + lax.pad(jnp.where(first, cotangent, zero), zero, placement)
    (top, bottom), (left, right) = padding
    return (gradient[:, top : height - bottom, left : width - right, :],)


_max_pool.defvjp(_max_pool_forward, _max_pool_backward)
