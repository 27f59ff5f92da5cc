"""Per-objective losses of knowledge distillation, stacked into one vector.

The trainer differentiates the vector `[task, distill]` with one `jax.jacrev`, so every
objective here is a pure function of logits/features that returns a scalar mean over the
batch. One definition serves training and evaluation.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

OBJECTIVE_NAMES = ("task", "distill")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def hinton_kd(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
    """T^2-scaled KL(teacher || student) of temperature-softened distributions (Hinton 2015).

    The T^2 factor keeps the gradient magnitude independent of the temperature.
    """
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature)
    student_log_probs = jax.nn.log_softmax(student_logits / temperature)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return temperature**2 * kl.mean()


def feature_distance(projected_student: jax.Array, teacher_target: jax.Array) -> jax.Array:
    """Smooth-L1 (Huber, delta 1) distance between projected student and teacher features.

    Both inputs are per-sample standardised by the projector, so delta = 1 separates the
    quadratic regime (small mismatches) from the linear one (outliers early in training).
    The mean runs over samples and dimensions, so the loss does not grow with the width D.
    """
    return optax.huber_loss(projected_student, teacher_target, delta=1.0).mean()


def loss_vector(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    projected_student: jax.Array,
    teacher_target: jax.Array,
    *,
    temperature: float,
    logit_weight: float,
    feature_weight: float,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The objectives `[task, distill]` and their components for logging.

    distill = logit_weight * KD + feature_weight * feature distance, one objective: it is
    the distillation signal that MoKD balances against the task.
    """
    task = cross_entropy(student_logits, labels)
    kd = hinton_kd(student_logits, teacher_logits, temperature)
    feature = feature_distance(projected_student, teacher_target)
    distill = logit_weight * kd + feature_weight * feature
    return jnp.stack([task, distill]), {"kd_logit": kd, "kd_feature": feature}
