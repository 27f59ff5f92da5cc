"""RetinaNet's training losses: sigmoid focal loss for classification and a box loss on the
foreground anchors, both normalised per image by its number of foreground anchors and then
averaged over the images, as torchvision's `RetinaNetHead.compute_loss`.

Fixed shapes throughout: the anchors of each image are matched to its padded boxes
(`matching.match_anchors`), and foreground, ignored and background anchors are selected
with masks rather than by indexing, so that the loss compiles once for any number of real
boxes per image.
"""

import functools

import jax
import jax.numpy as jnp

from mokd_jax.checks import check_choice
from mokd_jax.detection import boxes as box_ops
from mokd_jax.detection.matching import IGNORED, match_anchors
from mokd_jax.errors import invalid

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
BOX_LOSSES = ("l1", "smooth_l1", "giou")
"""'l1' on the encoded deltas (torchvision's RetinaNet v1), 'smooth_l1' on them (beta
SMOOTH_L1_BETA), or 'giou' on the decoded boxes (v2)."""
SMOOTH_L1_BETA = 1.0
"""torchvision's beta for a RetinaNet head with the 'smooth_l1' box loss."""


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
) -> jax.Array:
    """Focal loss [...] of independent sigmoid logits against targets in [0, 1] (same
    shape): cross-entropy scaled by (1 - p_t)^gamma, so that the many easy negatives of
    dense detection do not swamp the loss, and weighted alpha on positives, 1 - alpha on
    negatives.

    The value is computed as optax's `sigmoid_focal_loss` computes it (the focal factor in
    log space); the gradient is its closed form (`_focal_loss_parts`), for the logits
    only: the targets are labels, held constant (stop_gradient). The rule is for memory.
    Autodiff of optax's form keeps many logit-sized intermediates for the backward pass
    (its log-sum-exp stacks two of them); the rule keeps only the logits and targets and
    computes its derivative inside each pullback (`tied_to_cotangent`), so that MoKD's one
    pullback per objective does not keep it alive from the first to the last. The figures
    for a RetinaNet step are in docs/benchmarks.md.
    """
    targets = jax.lax.stop_gradient(targets.astype(logits.dtype))
    return _focal_loss(logits, targets, alpha, gamma)


def _focal_loss_parts(logits, targets, alpha, gamma):
    """(value, derivative in the logits) of the focal loss, elementwise.

    With p = sigmoid(x), target y, the cross-entropy ce = -y log p - (1 - y) log(1 - p),
    u = 1 - p_t = y (1 - p) + (1 - y) p and alpha_t = alpha y + (1 - alpha)(1 - y), the
    loss is alpha_t u^gamma ce. Since d ce/dx = p - y and du/dx = (1 - 2y) p (1 - p),

        dL/dx = alpha_t (u^gamma (p - y) + gamma (1 - 2y) ce u^(gamma - 1) p (1 - p)),

    with every power and product taken in log space (log u as optax's log-sum-exp over
    log p and log(1 - p); u^(gamma - 1) p (1 - p) as one exponential), so that neither
    large logits nor gamma < 1 make an infinity.
    """
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    log_u = jnp.logaddexp(log_p + jnp.log1p(-targets), log_not_p + jnp.log(targets))
    cross_entropy = -targets * log_p - (1.0 - targets) * log_not_p
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    focal_factor = jnp.exp(gamma * log_u)
    value = alpha_t * focal_factor * cross_entropy
    focal_slope = jnp.exp((gamma - 1.0) * log_u + log_p + log_not_p)
    derivative = alpha_t * (
        focal_factor * (jnp.exp(log_p) - targets)
        + gamma * (1.0 - 2.0 * targets) * cross_entropy * focal_slope
    )
    return value, derivative


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _focal_loss(logits, targets, alpha, gamma):
    return _focal_loss_parts(logits, targets, alpha, gamma)[0]


def _focal_loss_forward(logits, targets, alpha, gamma):
    return _focal_loss(logits, targets, alpha, gamma), (logits, targets)


def _focal_loss_backward(alpha, gamma, saved, cotangent):
    logits, targets = saved
    logits = tied_to_cotangent(logits, cotangent)
    derivative = _focal_loss_parts(logits, targets, alpha, gamma)[1]
    return cotangent * derivative, None


_focal_loss.defvjp(_focal_loss_forward, _focal_loss_backward)


def tied_to_cotangent(saved: jax.Array, cotangent: jax.Array) -> jax.Array:
    """`saved`, a value a backward rule reads, made to depend on that pullback's
    `cotangent` (an optimization barrier with one of its elements; no copy, no arithmetic).

    Why: a rule's derivative is a function of saved forward values, identical in every
    pullback of the same forward pass. When MoKD pulls it back once per objective, XLA's
    common-subexpression elimination would compute that derivative once for all pullbacks
    and keep it alive from the first to the last; tied to each pullback's own cotangent,
    it is computed inside each pullback. In a small test graph the untied rule kept seven
    logit-sized buffers more for two pullbacks than for one, the tied rule one
    (tests/test_detection_losses.py).
    """
    tied, _ = jax.lax.optimization_barrier((saved, cotangent.reshape(-1)[0]))
    return tied


def box_regression_loss(
    box_loss: str, deltas: jax.Array, anchors: jax.Array, target_boxes: jax.Array
) -> jax.Array:
    """Per-anchor box loss [N] of predicted `deltas` [N, 4] relative to `anchors` [N, 4]
    against `target_boxes` [N, 4]: on encoded deltas ('l1', 'smooth_l1') or on decoded
    boxes ('giou')."""
    if box_loss == "giou":
        return box_ops.generalized_iou_loss(box_ops.decode(deltas, anchors), target_boxes)
    target_deltas = box_ops.encode(target_boxes, anchors)
    if box_loss == "smooth_l1":
        return box_ops.smooth_l1_loss(deltas, target_deltas, SMOOTH_L1_BETA)
    return box_ops.l1_loss(deltas, target_deltas)


def image_losses(
    class_logits: jax.Array,
    box_deltas: jax.Array,
    anchors: jax.Array,
    boxes: jax.Array,
    labels: jax.Array,
    box_mask: jax.Array,
    box_loss: str,
) -> tuple[jax.Array, jax.Array]:
    """(classification, box) loss of one image: logits [N, C], deltas [N, 4], anchors
    [N, 4], padded boxes [M, 4], labels [M], box_mask [M]; each a sum over anchors divided
    by max(1, number of foreground anchors)."""
    matched = match_anchors(anchors, boxes, box_mask)
    foreground = matched >= 0
    normaliser = jnp.maximum(1, foreground.sum())
    box_index = jnp.maximum(matched, 0)

    num_classes = class_logits.shape[-1]
    class_targets = jax.nn.one_hot(labels[box_index], num_classes) * foreground[:, None]
    focal = sigmoid_focal_loss(class_logits, class_targets.astype(class_logits.dtype))
    classification = jnp.where((matched != IGNORED)[:, None], focal, 0.0).sum() / normaliser

    # Anchors without a box regress onto themselves, a finite stand-in whose loss the mask
    # drops. Their gathered row may be padding, of any content: an inverted box encodes to
    # NaN, and a masked NaN still poisons the gradient (0 * NaN).
    target_boxes = jnp.where(foreground[:, None], boxes[box_index], anchors)
    per_anchor = box_regression_loss(box_loss, box_deltas, anchors, target_boxes)
    box = jnp.where(foreground, per_anchor, 0.0).sum() / normaliser
    return classification, box


def _check_shapes(class_logits, box_regression, anchors, boxes, labels, box_mask) -> None:
    """Raises InputError naming the first array whose shape disagrees with the others."""
    if class_logits.ndim != 3:
        raise invalid("class_logits.shape", tuple(class_logits.shape), "[B, N, C]")
    batch, num_anchors = class_logits.shape[:2]
    num_boxes = boxes.shape[1]
    expected_shapes = (
        ("box_regression", box_regression, (batch, num_anchors, 4)),
        ("anchors", anchors, (num_anchors, 4)),
        ("boxes", boxes, (batch, num_boxes, 4)),
        ("labels", labels, (batch, num_boxes)),
        ("box_mask", box_mask, (batch, num_boxes)),
    )
    for field, array, shape in expected_shapes:
        if tuple(array.shape) != shape:
            raise invalid(f"{field}.shape", tuple(array.shape), f"{shape}, as class_logits")


def retinanet_losses(
    class_logits: jax.Array,
    box_regression: jax.Array,
    anchors: jax.Array,
    boxes: jax.Array,
    labels: jax.Array,
    box_mask: jax.Array,
    box_loss: str = "l1",
) -> dict[str, jax.Array]:
    """RetinaNet's losses for a batch, each the mean over the B images of a per-image loss
    normalised by that image's foreground anchors (torchvision's `compute_loss`).

    class_logits [B, N, C] and box_regression [B, N, 4] are the head's outputs for the
    anchors [N, 4] (`anchors.retinanet_anchors`); boxes [B, M, 4], labels [B, M] and
    box_mask [B, M] are a `DetectionBatch`'s. Returns {'classification', 'box'} scalars,
    for the trainer to sum or to keep as separate objectives.

    Every one of the B images counts in the mean, as every target does in torchvision's;
    a batch's `example_mask` is not consulted (training batches have no padding images).
    """
    check_choice("box_loss", box_loss, BOX_LOSSES)
    _check_shapes(class_logits, box_regression, anchors, boxes, labels, box_mask)
    per_image = jax.vmap(
        functools.partial(image_losses, box_loss=box_loss), in_axes=(0, 0, None, 0, 0, 0)
    )
    classification, box = per_image(class_logits, box_regression, anchors, boxes, labels, box_mask)
    return {"classification": classification.mean(), "box": box.mean()}
