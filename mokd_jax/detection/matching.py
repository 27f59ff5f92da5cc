"""Anchor-to-ground-truth assignment of RetinaNet, on padded ground truth.

Each anchor takes the real box it overlaps most: foreground when that IoU is >= 0.5,
background below 0.4, ignored in between (neither a positive nor a negative example).
Then every real box claims its best anchors, ties included, even below 0.5, so that no box
goes without a positive anchor (torchvision's `Matcher(0.5, 0.4, allow_low_quality_matches
=True)`); such an anchor is matched to the box it overlaps most, which need not be the box
that claimed it, as in torchvision.

Padding rows (`box_mask` False) get IoU -1 with every anchor: below every real IoU, they
never win an anchor's arg-max and never fall in a threshold band, and they claim no
anchors. An image without real boxes is therefore all background, as torchvision's
RetinaNet treats one. Everything is fixed-shape jax.numpy: one image per call, `jax.vmap`
over a batch (`match_batch`).
"""

import jax
import jax.numpy as jnp

from mokd_jax.detection.boxes import check_box_shape, pairwise_iou
from mokd_jax.errors import invalid

FOREGROUND_IOU = 0.5
BACKGROUND_IOU = 0.4
BACKGROUND = -1
"""Matched index of an anchor whose best IoU is below BACKGROUND_IOU."""
IGNORED = -2
"""Matched index of an anchor whose best IoU is in [BACKGROUND_IOU, FOREGROUND_IOU)."""


def match_quality(iou: jax.Array, box_mask: jax.Array) -> jax.Array:
    """Matched box index [N] (or BACKGROUND / IGNORED) for each anchor, from the IoU [M, N]
    of M padded boxes with N anchors and the boxes' real-row mask [M]."""
    iou = jnp.where(box_mask[:, None], iou, -1.0)
    best_box = jnp.argmax(iou, axis=0)  # the first box on ties, as torch's max
    best_iou = jnp.max(iou, axis=0)
    by_threshold = jnp.where(
        best_iou >= FOREGROUND_IOU,
        best_box,
        jnp.where(best_iou >= BACKGROUND_IOU, IGNORED, BACKGROUND),
    )
    best_of_some_box = (iou == jnp.max(iou, axis=1, keepdims=True)) & box_mask[:, None]
    return jnp.where(best_of_some_box.any(axis=0), best_box, by_threshold).astype(jnp.int32)


def match_anchors(anchors: jax.Array, boxes: jax.Array, box_mask: jax.Array) -> jax.Array:
    """Matched box index [N] (int32; BACKGROUND = -1, IGNORED = -2) of each anchor [N, 4]
    among one image's padded boxes [M, 4] with real-row mask [M]."""
    check_box_shape("anchors", anchors, ndim=2)
    check_box_shape("boxes", boxes, ndim=2)
    if box_mask.shape != boxes.shape[:1]:
        raise invalid("box_mask.shape", tuple(box_mask.shape), f"({boxes.shape[0]},) as boxes")
    if boxes.shape[0] == 0:  # no rows at all: nothing to take the arg-max over
        return jnp.full(anchors.shape[0], BACKGROUND, jnp.int32)
    return match_quality(pairwise_iou(boxes, anchors), box_mask)


def match_batch(anchors: jax.Array, boxes: jax.Array, box_mask: jax.Array) -> jax.Array:
    """`match_anchors` for a batch: boxes [B, M, 4], box_mask [B, M] -> [B, N]; the same
    anchors [N, 4] for every image (one padded size per batch)."""
    return jax.vmap(match_anchors, in_axes=(None, 0, 0))(anchors, boxes, box_mask)
