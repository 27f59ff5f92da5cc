"""Per-objective losses of knowledge distillation, stacked into one vector.

The trainer differentiates the loss vector (e.g. `[task, distill]`) through one `jax.vjp`,
so every objective here is a pure function of logits/features that returns a scalar mean
over the batch. One definition serves training and evaluation.
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

OBJECTIVES = {"merged": ("task", "distill"), "separate": ("task", "logit", "feature")}
"""The objective vectors on offer (`distill.objectives`): the distillation signal as one
objective (logit + feature, K = 2), or logit and feature distillation as objectives of their
own (K = 3), so that the aggregator also balances them against each other."""

LOGIT_LOSSES = ("kd", "dkd")


def objective_names(distill: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The names of the K objectives that `distill.objectives` selects, in loss-vector order."""
    return OBJECTIVES[distill.objectives]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels [B] or soft targets [B, C]
    (label smoothing, Mixup/CutMix)."""
    if labels.ndim == logits.ndim:
        return optax.softmax_cross_entropy(logits, labels).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def hard_labels(labels: jax.Array) -> jax.Array:
    """Integer labels [B] from integer labels or soft targets [B, C] (their arg-max: the
    dominant class of a Mixup/CutMix pair), for accuracy and DKD's target class."""
    return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


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


def feature_distance(
    projected_student: jax.Array,
    teacher_target: jax.Array,
    location_weights: jax.Array | None = None,
) -> jax.Array:
    """Smooth-L1 (Huber, delta 1) distance between projected student and teacher features.

    Both inputs are per-sample standardised by the projector, so delta = 1 separates the
    quadratic regime (small mismatches) from the linear one (outliers early in training).
    The mean runs over samples and dimensions, so the loss does not grow with the width D.

    `location_weights`, of the features' shape less the last axis (a detector's [B, H, W]
    feature-map locations) and averaging 1, weigh each location's mean over the last
    axis; the result is then a weighted mean on the unweighted mean's scale.
    """
    distance = optax.huber_loss(projected_student, teacher_target, delta=1.0)
    if location_weights is None:
        return distance.mean()
    return (distance.mean(-1) * location_weights).mean()


def mean_feature_distance(
    projections: Sequence[tuple[jax.Array, jax.Array]],
    location_weights: Sequence[jax.Array] | None = None,
) -> jax.Array:
    """The feature loss over the taps: the mean of each tap's `feature_distance` over
    `(projected_student, teacher_target)` pairs, so that it keeps the single projector's
    scale (and `distill.feature_weight` its meaning) whatever the number of taps; with
    `location_weights`, one array per tap, each tap's distance is weighted by its own."""
    if location_weights is None:
        location_weights = (None,) * len(projections)
    return jnp.mean(
        jnp.stack(
            [
                feature_distance(*pair, weights)
                for pair, weights in zip(projections, location_weights, strict=True)
            ]
        )
    )


def decoupled_kd(
    student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """DKD's two parts (Zhao et al. 2022), each T^2-scaled: (TCKD, NCKD).

    TCKD is the KL between the binary (target, rest) distributions, NCKD the KL between the
    distributions over the non-target classes. Both come from log-probabilities with the
    target masked to -inf, not from the common "-1000" logit shift, so they stay exact for
    logits of any size; the masked entries are replaced by 0 before any product, so neither
    the values nor the gradients meet inf - inf.
    """
    target = jax.nn.one_hot(labels, student_logits.shape[-1], dtype=bool)

    def binary_log_probs(logits):
        log_probs = jax.nn.log_softmax(logits / temperature)
        log_target = jnp.sum(jnp.where(target, log_probs, 0.0), axis=-1)
        log_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_probs), axis=-1)
        return jnp.stack([log_target, log_rest], axis=-1)

    def non_target_log_probs(logits):
        log_probs = jax.nn.log_softmax(jnp.where(target, -jnp.inf, logits / temperature))
        return jnp.where(target, 0.0, log_probs)

    def kl(teacher_log_probs, student_log_probs, valid=True):
        terms = jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs)
        return jnp.sum(jnp.where(valid, terms, 0.0), axis=-1).mean()

    tckd = kl(binary_log_probs(teacher_logits), binary_log_probs(student_logits))
    nckd = kl(non_target_log_probs(teacher_logits), non_target_log_probs(student_logits), ~target)
    return temperature**2 * tckd, temperature**2 * nckd


def logit_distillation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    step: jax.Array,
    distill: ml_collections.ConfigDict,
) -> jax.Array:
    """Hinton KD, or DKD = warm-up(step) x (alpha TCKD + beta NCKD), by `distill.logit_loss`.

    DKD's warm-up ramps the loss linearly from 0 over `dkd_warmup_steps` (the published
    recipe uses 20 epochs), since NCKD with a large beta dominates a random student.
    """
    if distill.logit_loss == "kd":
        return hinton_kd(student_logits, teacher_logits, distill.temperature)
    tckd, nckd = decoupled_kd(
        student_logits, teacher_logits, hard_labels(labels), distill.temperature
    )
    warmup = jnp.minimum(1.0, (step + 1) / max(distill.dkd_warmup_steps, 1))
    return warmup * (distill.dkd_alpha * tckd + distill.dkd_beta * nckd)


def weighted_objectives(
    task: jax.Array, logit: jax.Array, feature: jax.Array, distill: ml_collections.ConfigDict
) -> jax.Array:
    """The loss vector [K] from the task, logit and feature losses (scalars), in the order of
    `OBJECTIVES[distill.objectives]`:

    merged: [task_weight * task, logit_weight * logit + feature_weight * feature];
    separate: [task_weight * task, logit_weight * logit, feature_weight * feature].
    """
    weighted = (distill.logit_weight * logit, distill.feature_weight * feature)
    if distill.objectives == "merged":
        return jnp.stack([distill.task_weight * task, weighted[0] + weighted[1]])
    return jnp.stack([distill.task_weight * task, *weighted])


def loss_vector(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    projections: Sequence[tuple[jax.Array, jax.Array]],
    step: jax.Array,
    distill: ml_collections.ConfigDict,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The objectives named by `OBJECTIVES[distill.objectives]` (`weighted_objectives`), and
    their parts for logging; `feature` is the mean over the taps' `(projected_student,
    teacher_target)` pairs. The weights are the recipe's (KD's CE 0.1 / KD 0.9 on
    CIFAR-100): inside the loss vector, so that the plain recipe's update is the
    unweighted sum of its gradients (`mokd`'s default rescale gives its step that norm).
    The parts are unweighted.
    """
    task = cross_entropy(student_logits, labels)
    logit = logit_distillation(student_logits, teacher_logits, labels, step, distill)
    feature = mean_feature_distance(projections)
    losses = weighted_objectives(task, logit, feature, distill)
    return losses, {"cross_entropy": task, "kd_logit": logit, "kd_feature": feature}
