"""`lax.conv_general_dilated` whose backward pass reads its input from one stored buffer.

Why: the weight gradient of a convolution on XLA:CPU is itself a convolution, fed the
layer's input transposed so that the batch is the minor dimension. XLA fuses that transpose
with whatever elementwise work produced the input (the previous batch norm, residual add
and ReLU), and rather than read the activation the forward pass already wrote, the fused
loop recomputes it from the two to four larger maps it came from, each read in the
transposed order, a page or more apart. On a ResNet-18 student at 224 px, batch 32, those
transposes took 578 ms of a 4.1 s distillation step on 2 cores; the first stage's alone
took 274 ms, where a plain transpose of the same 25 MB map takes about 5 ms.

`conv_general_dilated` computes the same convolution, but saves its input through
`stored.stored_whole` (an identity XLA cannot fuse, CPU only). The transposes then copy
one stored map: 172-188 ms instead of 578 ms in the same step, which took 3-5% less time in
all (two runs alternating both versions in one process; at 112 px, batch 16 the difference
was within the noise; docs/benchmarks.md). It costs one copy of each convolution input per
step (XLA's plan for the ResNet-34 -> ResNet-18 step at 112 px, batch 16: 5 MiB more of
341 MiB).

The forward values are `lax.conv_general_dilated`'s; the gradients are its transposes in
each argument, evaluated at the same input, i.e. its own VJP's (tests/test_convolution.py).
Like every `custom_vjp`, it has no forward-mode derivative (`jax.jvp`); nothing in the
trainer takes one, and `pooling.max_pool` already had the same limit.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

from mokd_jax.models.stored import stored_whole


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` with the same arguments (the signature flax's `nn.Conv`
    calls), differentiated through a stored copy of `lhs` on CPU (module docstring)."""
    options = (
        ("window_strides", tuple(window_strides)),
        ("padding", padding if isinstance(padding, str) else tuple(map(tuple, padding))),
        ("lhs_dilation", None if lhs_dilation is None else tuple(lhs_dilation)),
        ("rhs_dilation", None if rhs_dilation is None else tuple(rhs_dilation)),
        ("dimension_numbers", dimension_numbers),
        ("feature_group_count", feature_group_count),
        ("batch_group_count", batch_group_count),
        ("precision", precision),
        ("preferred_element_type", preferred_element_type),
    )
    return _convolution(lhs, rhs, options)


def _plain(lhs: jax.Array, rhs: jax.Array, options: tuple) -> jax.Array:
    return lax.conv_general_dilated(lhs, rhs, **dict(options))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _convolution(lhs, rhs, options):
    return _plain(lhs, rhs, options)


def _convolution_forward(lhs, rhs, options):
    return _plain(lhs, rhs, options), (stored_whole(lhs), rhs)


def _convolution_backward(options, residuals, cotangent):
    """The convolution's transposes in each argument (it is linear in each), which, unlike
    a `jax.vjp`, do not evaluate the forward convolution again outside `jit`."""
    lhs, rhs = residuals
    (lhs_gradient,) = jax.linear_transpose(lambda x: _plain(x, rhs, options), lhs)(cotangent)
    (rhs_gradient,) = jax.linear_transpose(lambda w: _plain(lhs, w, options), rhs)(cotangent)
    return lhs_gradient, rhs_gradient


_convolution.defvjp(_convolution_forward, _convolution_backward)
