"""The subspace projector: student features lifted into a higher-dimensional space.

The method (docs/method.md, "The subspace projector") leaves the details open; the choices
made here:

- Width D = `width_multiplier` x the teacher's feature width d_t (default 2), so D >= d_t
  always and the student's features are compared in a space larger than either network's.
- Student side: a learned `Dense(D)`, then a per-sample standardisation (LayerNorm
  without scale or bias). The standardisation removes the scale of both sides, so the
  distance measures direction and shape, not magnitude, and the feature loss cannot be
  lowered by shrinking activations.
- `orthogonal=True` (the VkD flavour) keeps the student lift semi-orthogonal throughout
  training, not only at initialisation: the trained parameter is a free matrix and the lift
  is the orthonormal factor of its QR decomposition (`semi_orthogonal`), so every optimizer
  step lands on an orthogonal lift. QR rather than a Cayley transform or a matrix
  exponential because the lift is rectangular (d_s x D): those parameterise square
  orthogonal matrices, so a rectangular lift would be cut from a max(d_s, D)-square one,
  with that many more parameters and a larger solve per step. With d_s <= D the lift has
  orthonormal rows (an isometry of the student's features into R^D); a student wider than
  D gets orthonormal columns instead.
- Teacher side: the teacher's features are lifted to D by a FIXED matrix with orthonormal
  rows (an isometry, drawn once from `seed` and the tap's index, and stored as a
  non-trainable variable in the `constants` collection), then standardised the same way.
  A learned teacher lift could collapse both sides onto a trivial match; a fixed isometry
  keeps every distance of the teacher's feature space.
- Multi-scale: `TapProjectors` holds one such lightweight projector per tap
  (`mokd_jax.taps`), each `width_multiplier` x its teacher tap's width; the feature loss is
  the mean over the taps (`objectives.mean_feature_distance`).
- The projectors are training-only: they live beside the student in the train state, take
  the distillation objective's gradient only, and are never part of the exported student.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mokd_jax.errors import invalid


def standardize(features: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Zero mean, unit variance over the last axis, per sample."""
    mean = features.mean(-1, keepdims=True)
    variance = features.var(-1, keepdims=True)
    return (features - mean) * jax.lax.rsqrt(variance + eps)


def orthonormal_rows(key: jax.Array, rows: int, columns: int) -> jax.Array:
    """A [rows, columns] matrix with orthonormal rows (rows <= columns)."""
    return jax.random.orthogonal(key, columns)[:rows]


def semi_orthogonal(matrix: jax.Array) -> jax.Array:
    """The orthonormal factor of `matrix` [m, n]: orthonormal rows when m <= n, else
    orthonormal columns. It is the Q of a reduced QR decomposition with R's diagonal made
    positive, which makes Q unique and differentiable in `matrix`, and leaves a matrix that
    is already (semi-)orthogonal unchanged."""
    wide = matrix.shape[0] <= matrix.shape[1]
    q, r = jnp.linalg.qr(matrix.T if wide else matrix)
    q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)
    return q.T if wide else q


class OrthogonalDense(nn.Module):
    """`Dense(features)` whose kernel is kept semi-orthogonal: the parameter `kernel` is
    free, the map applied is `semi_orthogonal(kernel)`. The free kernel starts orthogonal,
    so the first lift equals it."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.orthogonal(), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return x @ semi_orthogonal(kernel) + bias


class SubspaceProjector(nn.Module):
    """Maps (student features [B, d_s], teacher features [B, d_t]) to a shared space R^D.

    Returns `(projected_student, teacher_target)`, both [B, D] and per-sample standardised.
    The fixed teacher lift is drawn from (`seed`, `tap_index`): every run with the seed
    gets the same lifts, and the taps of one run different ones.
    """

    width: int
    orthogonal: bool = False
    seed: int = 0
    tap_index: int = 0

    @nn.compact
    def __call__(self, student_features: jax.Array, teacher_features: jax.Array):
        teacher_width = teacher_features.shape[-1]
        if self.width < teacher_width:
            raise invalid("projector.width", self.width, f">= the teacher's width {teacher_width}")
        lift_type = OrthogonalDense if self.orthogonal else nn.Dense
        projected = lift_type(self.width, name="lift_student")(student_features)
        lift = self.variable(
            "constants",
            "teacher_lift",
            lambda: orthonormal_rows(
                jax.random.fold_in(jax.random.key(self.seed), self.tap_index),
                teacher_width,
                self.width,
            ),
        )
        target = standardize(teacher_features) @ jax.lax.stop_gradient(lift.value)
        return standardize(projected), standardize(target)


class TapProjectors(nn.Module):
    """One `SubspaceProjector` per tap (`mokd_jax.taps`), named `tap0`, `tap1`, ... in tap
    order (`tap0` projects `pooled`): maps (student taps, teacher taps), paired by position,
    to one `(projected_student, teacher_target)` pair per tap. Each tap's width is
    `width_multiplier` x its teacher tap's width, so student and teacher taps of any widths
    meet in one space per tap."""

    width_multiplier: int = 2
    orthogonal: bool = False
    seed: int = 0

    @nn.compact
    def __call__(
        self, student_taps: Sequence[jax.Array], teacher_taps: Sequence[jax.Array]
    ) -> tuple[tuple[jax.Array, jax.Array], ...]:
        return tuple(
            SubspaceProjector(
                width=self.width_multiplier * teacher.shape[-1],
                orthogonal=self.orthogonal,
                seed=self.seed,
                tap_index=index,
                name=f"tap{index}",
            )(student, teacher)
            for index, (student, teacher) in enumerate(zip(student_taps, teacher_taps, strict=True))
        )
