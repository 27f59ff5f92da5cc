"""Box geometry for RetinaNet: areas, IoU, clipping, the anchor-relative box coder and the
box-regression losses. Boxes are [x1, y1, x2, y2] in pixels throughout.

Every function is elementwise or pairwise jax.numpy on static shapes, so it runs inside a
jitted step. The formulas follow torchvision's operation by operation (the same
subtractions, products and divisions in the same order), so that float32 results agree
with torchvision's to rounding and pretrained torchvision heads decode identically.
"""

import math

import jax
import jax.numpy as jnp
import optax

from mokd_jax.checks import check_positive
from mokd_jax.errors import invalid

DELTA_SIZE_CLAMP = math.log(1000.0 / 16)
"""Largest log-size delta that `decode` exponentiates: a predicted box is at most 1000/16
times as wide (high) as its anchor, so an untrained head cannot overflow `exp`."""

GIOU_EPS = 1e-7
"""Guards the IoU and enclosing-box divisions of the GIoU loss against empty boxes."""


def check_box_shape(field: str, boxes: jax.Array, ndim: int | None = None) -> None:
    """Raises InputError unless `boxes` has 4 coordinates on its last axis (and exactly
    `ndim` axes when given)."""
    shape = tuple(boxes.shape)
    if not shape or shape[-1] != 4 or (ndim is not None and len(shape) != ndim):
        axes = "[..., 4]" if ndim is None else "[" + "n, " * (ndim - 1) + "4]"
        raise invalid(f"{field}.shape", shape, f"a box array of shape {axes}")


def box_areas(boxes: jax.Array) -> jax.Array:
    """Areas [...] of boxes [..., 4] (negative for boxes with x2 < x1 xor y2 < y1)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Intersection over union [N, M] of every box of `boxes_a` [N, 4] with every box of
    `boxes_b` [M, 4]; NaN where both boxes of a pair are empty (as torchvision)."""
    check_box_shape("boxes_a", boxes_a, ndim=2)
    check_box_shape("boxes_b", boxes_b, ndim=2)
    top_left = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    overlap = jnp.clip(bottom_right - top_left, min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = box_areas(boxes_a)[:, None] + box_areas(boxes_b)[None, :] - intersection
    return intersection / union


def clip_to_image(boxes: jax.Array, image_size: jax.Array) -> jax.Array:
    """Boxes [..., 4] with x clamped to [0, width] and y to [0, height], where
    `image_size` is (height, width) as in `DetectionBatch.image_sizes` (may be traced)."""
    height, width = image_size[0], image_size[1]
    upper = jnp.stack([width, height, width, height]).astype(boxes.dtype)
    return jnp.clip(boxes, 0, upper)


def _centres_and_sizes(boxes: jax.Array) -> tuple[jax.Array, ...]:
    """(centre x, centre y, width, height) of boxes [..., 4]."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode(boxes: jax.Array, anchors: jax.Array) -> jax.Array:
    """The regression targets [..., 4] that turn `anchors` into `boxes` (both [..., 4],
    broadcastable): centre offsets in anchor widths/heights and log size ratios.

    The box weights are (1, 1, 1, 1), RetinaNet's: the deltas are not rescaled."""
    anchor_x, anchor_y, anchor_w, anchor_h = _centres_and_sizes(anchors)
    box_x, box_y, box_w, box_h = _centres_and_sizes(boxes)
    return jnp.stack(
        [
            (box_x - anchor_x) / anchor_w,
            (box_y - anchor_y) / anchor_h,
            jnp.log(box_w / anchor_w),
            jnp.log(box_h / anchor_h),
        ],
        axis=-1,
    )


def decode(deltas: jax.Array, anchors: jax.Array) -> jax.Array:
    """Boxes [..., 4] from regression `deltas` [..., 4] relative to `anchors` [..., 4]
    (broadcastable); the inverse of `encode`, with the log-size deltas clamped at
    `DELTA_SIZE_CLAMP`."""
    anchors = anchors.astype(deltas.dtype)
    anchor_x, anchor_y, anchor_w, anchor_h = _centres_and_sizes(anchors)
    centre_x = deltas[..., 0] * anchor_w + anchor_x
    centre_y = deltas[..., 1] * anchor_h + anchor_y
    half_w = 0.5 * (jnp.exp(jnp.minimum(deltas[..., 2], DELTA_SIZE_CLAMP)) * anchor_w)
    half_h = 0.5 * (jnp.exp(jnp.minimum(deltas[..., 3], DELTA_SIZE_CLAMP)) * anchor_h)
    return jnp.stack(
        [centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], axis=-1
    )


def generalized_iou_loss(boxes: jax.Array, target_boxes: jax.Array) -> jax.Array:
    """1 - GIoU [...] of each box with its target (both [..., 4], paired elementwise):
    1 - IoU plus the share of the smallest enclosing box that neither box covers, so that
    boxes which do not overlap their target still get a gradient towards it."""
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    tx1, ty1, tx2, ty2 = (target_boxes[..., i] for i in range(4))
    inner_w = jnp.minimum(x2, tx2) - jnp.maximum(x1, tx1)
    inner_h = jnp.minimum(y2, ty2) - jnp.maximum(y1, ty1)
    # Zero unless both sides are positive: two negative sides must not make an overlap.
    intersection = jnp.where((inner_w > 0) & (inner_h > 0), inner_w * inner_h, 0.0)
    union = box_areas(boxes) + box_areas(target_boxes) - intersection
    iou = intersection / (union + GIOU_EPS)
    enclosing = (jnp.maximum(x2, tx2) - jnp.minimum(x1, tx1)) * (
        jnp.maximum(y2, ty2) - jnp.minimum(y1, ty1)
    )
    return 1 - (iou - (enclosing - union) / (enclosing + GIOU_EPS))


def l1_loss(deltas: jax.Array, target_deltas: jax.Array) -> jax.Array:
    """L1 distance [...] between predicted and target deltas [..., 4], summed over the 4."""
    return jnp.abs(deltas - target_deltas).sum(axis=-1)


def smooth_l1_loss(deltas: jax.Array, target_deltas: jax.Array, beta: float) -> jax.Array:
    """Smooth-L1 distance [...] between deltas [..., 4], summed over the 4: quadratic
    (0.5 d^2 / beta) below `beta`, linear (|d| - beta / 2) above, as torch's smooth_l1_loss.

    It is the Huber loss with delta = beta, divided by beta; beta must be > 0 (beta = 0 is
    `l1_loss`)."""
    check_positive("beta", beta)
    return (optax.huber_loss(deltas, target_deltas, delta=beta) / beta).sum(axis=-1)
