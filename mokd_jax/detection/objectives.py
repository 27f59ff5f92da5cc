"""The loss vector of RetinaNet distillation: the detection loss and the distillation
signal as separate objectives, for the same aggregators as classification.

K objectives, named as classification's (`mokd_jax.objectives.OBJECTIVES`, so that the
trainer logs and diagnoses both tasks alike: `task` is the detection loss here):

    merged:   [task_weight * detection, logit_weight * kd_logit + feature_weight * kd_feature]
    separate: [task_weight * detection, logit_weight * kd_logit, feature_weight * kd_feature]

with detection = classification + box, RetinaNet's own losses (`losses.retinanet_losses`:
focal loss and box loss, each normalised by the image's foreground anchors).

Logit distillation (`sigmoid_kd`). A RetinaNet classifies with C independent sigmoids per
anchor, not a softmax, so the teacher's knowledge is C binary distributions per anchor and
the distillation is Hinton's KD applied to each: the student's sigmoid(s / T) against the
teacher's sigmoid(t / T), as the per-class binary distillation of dense detectors does
(BCKD, Yang et al. 2023, who argue that a softmax over a sigmoid head's classes distils the
wrong thing). The choices:
  * Every anchor counts, foreground, background and ignored alike: the teacher's scores on
    the background (which objects it half-sees, which classes it confuses) are much of what
    it knows, and there is no ground truth to ignore in its targets.
  * Summed over classes and anchors and divided by max(1, foreground anchors) per image,
    then averaged over the images: the focal loss's normalisation (Lin et al. 2017), so
    that the two classification signals keep one scale whatever the image size and the
    number of objects.
  * Multiplied by T^2, which keeps the gradient's magnitude independent of the temperature
    (Hinton et al. 2015).
  * The value is the binary KL divergence, i.e. the cross-entropy against the teacher's
    probabilities minus their entropy: the same gradient as that cross-entropy, but zero
    when the student matches the teacher. The aggregators that read loss values (FAMO and
    DB-MTL work on log-losses, the 'loss' normalisations of MGDA and MoKD divide by them)
    would otherwise see the teacher's entropy as part of the loss: 0.056 nats per
    (anchor, class) at the prior's score 0.01 and T = 1 (more at higher T), over a padded
    COCO image's 3 x 10^5 anchors x 80 classes, per ~100 foreground anchors: a floor
    above 10^4 under a signal that starts near 0.

Feature distillation. P3-P7 of the two FPNs (256 channels each) go through the subspace
projectors, one per level (`mokd_jax.subspace.TapProjectors`, taps `tap0` .. `tap4` =
P3 .. P7), applied at every location of the [B, H, W, 256] maps; the distance is
`objectives.feature_distance`, averaged over the levels as over classification's taps
(every level counts alike, whatever its area). Imitating the features the heads read
follows published detection KD (Wang et al. 2019's fine-grained feature imitation; FGD,
Yang et al. 2022, on the FPN outputs). The locations are weighed (`feature_location_weights`):
  * The padding is left out: a location counts where its cell overlaps the image. Images
    are padded to one square (1344 px for COCO), often half padding, whose features say
    nothing of the image and would otherwise dilute the mean by the padded area.
  * `distill.foreground_weight` w is our simple form of those papers' object-centred
    masks: 0 weighs the image's locations alike; w > 0 weighs a location whose cell
    touches a ground-truth box (the box scaled to the level, as FGD's masks) 1 + w, the
    image's others 1.
  * Normalised per image and level to average 1, so that the loss stays a mean over
    the image's locations and w moves the emphasis without changing its scale.

Teacher classes. A converted COCO teacher has 91 outputs, indexed by COCO category id,
while batches use contiguous labels (`DetectionDataset.category_ids` maps them).
`teacher_classes` (static, one teacher column per student class, e.g. the dataset's
`category_ids`) picks the teacher's columns in the student's order; None when both count
the same classes in the same order.
"""

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mokd_jax.checks import check_nonnegative
from mokd_jax.detection.anchors import STRIDES
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.losses import retinanet_losses, tied_to_cotangent
from mokd_jax.detection.matching import match_batch
from mokd_jax.detection.retinanet import RetinaNetOutputs
from mokd_jax.errors import invalid
from mokd_jax.objectives import mean_feature_distance, weighted_objectives


def check_teacher_classes(
    field: str, teacher_classes: Sequence[int] | None, num_classes: int, teacher_count: int
) -> None:
    """Raises InputError unless `teacher_classes` holds one index in [0, teacher_count) per
    student class, or is None or empty with teacher and student counting the same
    classes."""
    if not teacher_classes:
        if teacher_count != num_classes:
            raise invalid(
                field,
                teacher_classes,
                f"the teacher's column of each of the student's {num_classes} classes, "
                f"since the teacher has {teacher_count}",
            )
        return
    indices = np.asarray(teacher_classes)
    if indices.shape != (num_classes,) or not np.all((indices >= 0) & (indices < teacher_count)):
        raise invalid(
            field,
            tuple(teacher_classes),
            f"{num_classes} indices (one per student class) in [0, {teacher_count})",
        )


def select_teacher_classes(
    teacher_logits: jax.Array, teacher_classes: Sequence[int] | None, num_classes: int
) -> jax.Array:
    """The teacher's class logits [B, N, num_classes] in the student's class order: its
    columns `teacher_classes` (static), or all of them when None or empty
    (`check_teacher_classes` says what is allowed)."""
    check_teacher_classes("teacher_classes", teacher_classes, num_classes, teacher_logits.shape[-1])
    if not teacher_classes:
        return teacher_logits
    return teacher_logits[..., np.asarray(teacher_classes)]


def foreground_counts(anchors: jax.Array, boxes: jax.Array, box_mask: jax.Array) -> jax.Array:
    """Each image's number of foreground anchors [B] (RetinaNet's matching, as its losses)."""
    return (match_batch(anchors, boxes, box_mask) >= 0).sum(axis=-1)


def sigmoid_kd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    foreground: jax.Array,
    temperature: float,
) -> jax.Array:
    """T^2 x the binary KL divergences of sigmoid(teacher / T) from sigmoid(student / T),
    summed over anchors and classes ([B, N, C] logits), divided by each image's
    max(1, `foreground` [B]) and averaged over the images (module docstring)."""
    per_image = binary_kd_terms(student_logits, teacher_logits, temperature).sum(axis=(1, 2))
    return (per_image / jnp.maximum(1, foreground)).mean()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def binary_kd_terms(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float):
    """T^2 KL(q || p) elementwise, q = sigmoid(t / T) the teacher's, p = sigmoid(s / T) the
    student's probabilities: the cross-entropy against q minus q's entropy.

    Differentiated by its closed form, which needs only the two logits (as the focal loss,
    `losses.sigmoid_focal_loss`, and for the same reason: memory): with a = t / T and
    b = s / T, dKL/dq = a - b and dKL/dp = (p - q) / (p (1 - p)), so

        d/ds = T (p - q),    d/dt = (t - s) q (1 - q).
    """
    targets = jax.nn.sigmoid(teacher_logits / temperature)
    cross_entropy = optax.sigmoid_binary_cross_entropy(student_logits / temperature, targets)
    entropy = optax.sigmoid_binary_cross_entropy(teacher_logits / temperature, targets)
    return temperature**2 * (cross_entropy - entropy)


def _binary_kd_forward(student_logits, teacher_logits, temperature):
    value = binary_kd_terms(student_logits, teacher_logits, temperature)
    return value, (student_logits, teacher_logits)


def _binary_kd_backward(temperature, saved, cotangent):
    student_logits, teacher_logits = saved
    student_logits = tied_to_cotangent(student_logits, cotangent)
    student = jax.nn.sigmoid(student_logits / temperature)
    teacher = jax.nn.sigmoid(teacher_logits / temperature)
    return (
        cotangent * temperature * (student - teacher),
        cotangent * (teacher_logits - student_logits) * teacher * (1.0 - teacher),
    )


binary_kd_terms.defvjp(_binary_kd_forward, _binary_kd_backward)


def cells_touching_boxes(
    boxes: jax.Array, box_mask: jax.Array, level_shape: tuple[int, int], stride: int
) -> jax.Array:
    """bool [B, H, W]: whether cell (i, j) of a level, the pixels [j, j + 1) x [i, i + 1)
    times `stride`, overlaps one of the image's real boxes ([B, M, 4] with mask [B, M])
    with positive area; every real box touches at least one cell of every level."""
    height, width = level_shape
    top = jnp.arange(height) * stride
    left = jnp.arange(width) * stride

    def overlaps(low_edges, box_low, box_high):  # [B, M, cells]
        return (low_edges < box_high[..., None]) & (low_edges + stride > box_low[..., None])

    rows = overlaps(top, boxes[..., 1], boxes[..., 3]) & box_mask[..., None]
    columns = overlaps(left, boxes[..., 0], boxes[..., 2])
    return jnp.any(rows[:, :, :, None] & columns[:, :, None, :], axis=1)


def cells_in_image(image_sizes: jax.Array, level_shape: tuple[int, int], stride: int) -> jax.Array:
    """bool [B, H, W]: whether cell (i, j) of a level (as in `cells_touching_boxes`)
    overlaps the image of (height, width) `image_sizes` [B, 2], rather than its padding."""
    height, width = level_shape
    rows = jnp.arange(height)[None, :] * stride < image_sizes[:, :1]
    columns = jnp.arange(width)[None, :] * stride < image_sizes[:, 1:]
    return rows[:, :, None] & columns[:, None, :]


def feature_location_weights(
    batch: DetectionBatch, level_shapes: Sequence[tuple[int, int]], foreground_weight: float
) -> list[jax.Array]:
    """Per level, [B, H, W] weights (module docstring): 0 on the padding, 1 +
    `foreground_weight` on the image's cells that touch a box, 1 on its others, divided by
    their mean over the level (a padding row of an evaluation batch, which has no image,
    keeps its zeros)."""
    weights = []
    for level_shape, stride in zip(level_shapes, STRIDES, strict=True):
        image = cells_in_image(jnp.asarray(batch.image_sizes), level_shape, stride)
        touched = cells_touching_boxes(batch.boxes, batch.box_mask, level_shape, stride)
        raw = image * (1.0 + foreground_weight * touched.astype(jnp.float32))
        mean = raw.mean(axis=(1, 2), keepdims=True)
        weights.append(raw / jnp.where(mean > 0, mean, 1.0))
    return weights


def detection_loss_vector(
    student: RetinaNetOutputs,
    teacher_logits: jax.Array,
    projections: Sequence[tuple[jax.Array, jax.Array]],
    batch: DetectionBatch,
    anchors: jax.Array,
    distill: ml_collections.ConfigDict,
    *,
    box_loss: str,
    teacher_classes: Sequence[int] | None = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """The loss vector [K] (module docstring) and its unweighted parts for logging:
    classification, box, kd_logit, kd_feature.

    `student` is the student's RetinaNet outputs, `teacher_logits` the teacher's class
    logits [B, N, C_teacher], `projections` one `(projected_student, teacher_target)` pair
    per pyramid level P3 .. P7, `anchors` [N, 4] the batch's (`anchors.retinanet_anchors`).
    `distill` gives temperature, the objectives' weights, `objectives` and
    `foreground_weight`; `box_loss` is the student's (`losses.BOX_LOSSES`).
    """
    if distill.logit_loss != "kd":
        raise invalid(
            "distill.logit_loss",
            distill.logit_loss,
            "'kd' for detection (DKD's target class is a softmax's; a RetinaNet's classes "
            "are independent sigmoids)",
        )
    check_nonnegative("distill.foreground_weight", distill.foreground_weight)
    detection = retinanet_losses(
        student.class_logits,
        student.box_regression,
        anchors,
        batch.boxes,
        batch.labels,
        batch.box_mask,
        box_loss,
    )
    teacher_logits = select_teacher_classes(
        teacher_logits, teacher_classes, student.class_logits.shape[-1]
    )
    logit = sigmoid_kd(
        student.class_logits,
        teacher_logits,
        foreground_counts(anchors, batch.boxes, batch.box_mask),
        distill.temperature,
    )
    location_weights = feature_location_weights(
        batch, student.level_shapes, distill.foreground_weight
    )
    feature = mean_feature_distance(projections, location_weights)
    task = detection["classification"] + detection["box"]
    losses = weighted_objectives(task, logit, feature, distill)
    return losses, {**detection, "kd_logit": logit, "kd_feature": feature}
