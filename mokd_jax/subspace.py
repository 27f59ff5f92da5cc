"""The subspace projector: student features lifted into a higher-dimensional space.

The method (docs/method.md, "The subspace projector") leaves the details open; the choices
made here:

- Width D = `width_multiplier` x the teacher's feature width d_t (default 2), so D >= d_t
  always and the student's features are compared in a space larger than either network's.
- Student side: a learned `Dense(D)` (optionally with an orthogonal initialisation, the
  VkD flavour), then a per-sample standardisation (LayerNorm without scale or bias). The
  standardisation removes the scale of both sides, so the distance measures direction and
  shape, not magnitude, and the feature loss cannot be lowered by shrinking activations.
- Teacher side: the teacher's features are lifted to D by a FIXED matrix with orthonormal
  rows (an isometry, drawn once from `seed` and stored as a non-trainable variable in the
  `constants` collection), then standardised the same way. A learned teacher lift could
  collapse both sides onto a trivial match; a fixed isometry keeps every distance of the
  teacher's feature space.
- The projector is training-only: it lives beside the student in the train state, takes
  the distillation objective's gradient only, and is never part of the exported student.
"""

import flax.linen as nn
import jax

from mokd_jax.errors import invalid


def standardize(features: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Zero mean, unit variance over the last axis, per sample."""
    mean = features.mean(-1, keepdims=True)
    variance = features.var(-1, keepdims=True)
    return (features - mean) * jax.lax.rsqrt(variance + eps)


def orthonormal_rows(key: jax.Array, rows: int, columns: int) -> jax.Array:
    """A [rows, columns] matrix with orthonormal rows (rows <= columns)."""
    return jax.random.orthogonal(key, columns)[:rows]


class SubspaceProjector(nn.Module):
    """Maps (student features [B, d_s], teacher features [B, d_t]) to a shared space R^D.

    Returns `(projected_student, teacher_target)`, both [B, D] and per-sample standardised.
    """

    width: int
    orthogonal_init: bool = False
    seed: int = 0

    @nn.compact
    def __call__(self, student_features: jax.Array, teacher_features: jax.Array):
        teacher_width = teacher_features.shape[-1]
        if self.width < teacher_width:
            raise invalid("projector.width", self.width, f">= the teacher's width {teacher_width}")
        kernel_init = (
            nn.initializers.orthogonal() if self.orthogonal_init else nn.initializers.lecun_normal()
        )
        projected = nn.Dense(self.width, kernel_init=kernel_init, name="lift_student")(
            student_features
        )
        lift = self.variable(
            "constants",
            "teacher_lift",
            lambda: orthonormal_rows(jax.random.key(self.seed), teacher_width, self.width),
        )
        target = standardize(teacher_features) @ jax.lax.stop_gradient(lift.value)
        return standardize(projected), standardize(target)
