"""`stored_whole`: a value that XLA:CPU's backward pass reads from one buffer instead of
recomputing it inside each fusion that consumes it.

Why: XLA:CPU fuses elementwise producers into their consumers, including the transposed
copies it makes of a layer's input for that layer's weight gradient (a convolution's, or a
Dense layer's `x^T dy`). Rather than read the input the forward pass already wrote, such a
fused copy recomputes it from everything it was made of, reading those maps in transposed
order. Two cases measured on 2 CPU cores (docs/benchmarks.md):
- a ResNet's convolutions: each copy recomputed the previous batch norm, residual add and
  ReLU from two to four larger maps (578 ms of a 4.1 s distillation step at 224 px);
- a ViT's residual stream: the copy for a block's LayerNorm input recomputed the stream
  from every earlier block's branch outputs (up to 145 operands), 1.27 s of a DeiT-S
  forward and backward of 3.6 s at 224 px, batch 8.

`stored_whole` passes its input through an identity XLA cannot fuse (a `lax.cond` whose
predicate is true for every value, NaN included, but is not a compile-time constant); the
copies then read one stored buffer. Only the CPU lowering has it (`lax.platform_dependent`):
on GPUs and TPUs XLA lays the work out differently, and a conditional there would wait for
its predicate on the host. Its cotangent goes through the same identity (a `custom_vjp`):
in a ViT's backward pass, the cotangent of the residual stream is itself a sum over every
later block, which XLA would otherwise recompute in each weight gradient's copy. Like every
`custom_vjp`, it has no forward-mode derivative (`jax.jvp`); nothing in the trainer takes
one.
"""

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def stored_whole(x: jax.Array) -> jax.Array:
    """`x`, kept as one buffer that consumers read rather than recompute: on CPU through
    `_unfusible_identity`, elsewhere as it is. Its cotangent is stored the same way."""
    return lax.platform_dependent(x, cpu=_unfusible_identity, default=lambda value: value)


def _stored_whole_forward(x: jax.Array) -> tuple[jax.Array, None]:
    return stored_whole(x), None


def _stored_whole_backward(_: None, cotangent: jax.Array) -> tuple[jax.Array]:
    return (stored_whole(cotangent),)


stored_whole.defvjp(_stored_whole_forward, _stored_whole_backward)


def _unfusible_identity(x: jax.Array) -> jax.Array:
    """`x` through a conditional, which XLA does not fuse. The predicate (x == x) | (x != x)
    of one entry is true for every float, NaN included, but XLA does not fold it; the other
    branch is never taken and differs from the identity only so that XLA cannot merge the
    two branches and drop the conditional. Should a later XLA fold the predicate after
    all, this becomes a plain identity again: slower, never wrong."""
    probe = x.reshape(-1)[0] if x.size else jnp.zeros((), x.dtype)
    always = (probe == probe) | (probe != probe)
    return lax.cond(always, lambda value: value, jnp.zeros_like, x)
