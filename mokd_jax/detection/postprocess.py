"""RetinaNet post-processing: from the head's per-level outputs to at most 100 detections per
image, as torchvision's `RetinaNet.postprocess_detections` computes them, in fixed-size
arrays so that it runs inside a jitted evaluation step.

Per image and per level: sigmoid scores over (anchor, class), those above the score
threshold, the best `candidates_per_level` of them, their boxes decoded and clipped to the
resized image. Over the levels together: greedy non-maximum suppression within each class,
then the best `detections_per_image`.

Static shapes: each level contributes exactly min(candidates_per_level, anchors x classes)
candidates, those at or below the score threshold carried with a False `alive` flag instead
of being dropped; the output has `detections_per_image` rows and a `valid` mask.

Suppression picks, `detections_per_image` times, the best live candidate, keeps it and kills
the live ones of its class that overlap it by IoU > the threshold. That is greedy NMS
stopped once the kept list is as long as the output, so it gives torchvision's first
`detections_per_image` kept boxes, with O(candidates) memory (no candidates x candidates IoU
matrix; a full-size RetinaNet has 5 levels x 1000 candidates per image) and a fixed loop of
`detections_per_image` steps. Classes are kept apart by comparing labels, not by offsetting
each class's coordinates as torchvision does, whose offsets cost float32 precision in the
IoU; the two can only disagree on an IoU within rounding of the threshold.

Ties: among equal scores the candidate that comes first wins, levels in order and, within a
level, (anchor, class) in order, as in torchvision (whose suppression, beyond 1000
candidates, sorts without this guarantee).
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mokd_jax.checks import check_int, check_range
from mokd_jax.detection.boxes import clip_to_image, decode, pairwise_iou
from mokd_jax.errors import invalid

# torchvision's RetinaNet defaults, but for the detections kept per image: 100, not 300,
# since COCO's box AP counts an image's 100 best detections and no more.
SCORE_THRESHOLD = 0.05
CANDIDATES_PER_LEVEL = 1000
NMS_IOU_THRESHOLD = 0.5
DETECTIONS_PER_IMAGE = 100


class Detections(NamedTuple):
    """D detection rows per image, best first; rows where `valid` is False are all zero."""

    boxes: jax.Array  # float32 [B, D, 4]: [x1, y1, x2, y2] in pixels of the resized image
    scores: jax.Array  # float32 [B, D]
    labels: jax.Array  # int32 [B, D]: contiguous class indices
    valid: jax.Array  # bool [B, D]


class Candidates(NamedTuple):
    """One image's candidates, from one level or from all of them concatenated."""

    boxes: jax.Array  # float32 [K, 4]
    scores: jax.Array  # float32 [K], 0 where not alive
    labels: jax.Array  # int32 [K]
    alive: jax.Array  # bool [K]: above the score threshold


def level_candidates(
    logits: jax.Array,
    regression: jax.Array,
    anchors: jax.Array,
    image_size: jax.Array,
    score_threshold: float,
    candidates_per_level: int,
) -> Candidates:
    """One image's best min(candidates_per_level, N x C) (anchor, class) pairs of one level,
    by score, with decoded and clipped boxes. `logits` [N, C], `regression` [N, 4],
    `anchors` [N, 4]. Scores are computed in float32 whatever the head's dtype."""
    num_classes = logits.shape[-1]
    scores = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(-1)
    count = min(candidates_per_level, scores.shape[0])
    # Scores at or below the threshold rank after every live one (-inf), so top_k takes
    # the live ones first, as torchvision's filter-then-topk does.
    ranked, flat_indices = jax.lax.top_k(
        jnp.where(scores > score_threshold, scores, -jnp.inf), count
    )
    alive = ranked > score_threshold
    anchor_indices = flat_indices // num_classes
    boxes = decode(regression[anchor_indices].astype(jnp.float32), anchors[anchor_indices])
    return Candidates(
        boxes=clip_to_image(boxes, image_size),
        scores=jnp.where(alive, ranked, 0.0),
        labels=(flat_indices % num_classes).astype(jnp.int32),
        alive=alive,
    )


def class_nms(
    candidates: Candidates, iou_threshold: float, max_kept: int
) -> tuple[jax.Array, jax.Array]:
    """Greedy per-class NMS stopped after `max_kept` boxes: (indices [max_kept] into the
    candidates, best first; kept [max_kept] bool, False once no live candidate is left).
    A box is suppressed by a kept box of its class when their IoU exceeds the threshold."""

    def keep_best(step, state):
        alive, indices, kept = state
        best = jnp.argmax(jnp.where(alive, candidates.scores, -jnp.inf))
        overlaps = pairwise_iou(candidates.boxes[best][None], candidates.boxes)[0] > iou_threshold
        suppressed = overlaps & (candidates.labels == candidates.labels[best])
        return (
            alive & ~suppressed & (jnp.arange(alive.shape[0]) != best),
            indices.at[step].set(best),
            kept.at[step].set(alive[best]),
        )

    initial = (
        candidates.alive,
        jnp.zeros(max_kept, jnp.int32),
        jnp.zeros(max_kept, bool),
    )
    _, indices, kept = jax.lax.fori_loop(0, max_kept, keep_best, initial)
    return indices, kept


def image_detections(
    logits: Sequence[jax.Array],
    regression: Sequence[jax.Array],
    anchors: Sequence[jax.Array],
    image_size: jax.Array,
    score_threshold: float,
    candidates_per_level: int,
    iou_threshold: float,
    detections_per_image: int,
) -> Detections:
    """One image's detections (rows without the batch axis) from its per-level outputs."""
    levels = [
        level_candidates(*level, image_size, score_threshold, candidates_per_level)
        for level in zip(logits, regression, anchors, strict=True)
    ]
    candidates = Candidates(*(jnp.concatenate(field) for field in zip(*levels, strict=True)))
    indices, kept = class_nms(candidates, iou_threshold, detections_per_image)
    return Detections(
        boxes=jnp.where(kept[:, None], candidates.boxes[indices], 0.0),
        scores=jnp.where(kept, candidates.scores[indices], 0.0),
        labels=jnp.where(kept, candidates.labels[indices], 0),
        valid=kept,
    )


def check_head_outputs(
    class_logits: Sequence, box_regression: Sequence, anchors: Sequence, image_sizes
) -> None:
    """Raises InputError unless the three per-level lists agree: class_logits[l] [B, N_l, C],
    box_regression[l] [B, N_l, 4], anchors[l] [N_l, 4], and image_sizes [B, 2], where B and
    C are class_logits[0]'s and N_l is anchors[l]'s."""
    if (
        not class_logits
        or len(box_regression) != len(class_logits)
        or len(anchors) != len(class_logits)
    ):
        lengths = (len(class_logits), len(box_regression), len(anchors))
        raise invalid(
            "levels (class_logits, box_regression, anchors)",
            lengths,
            "the same number (>= 1) of levels in each",
        )
    if len(class_logits[0].shape) != 3:
        shape = tuple(class_logits[0].shape)
        raise invalid("class_logits[0].shape", shape, "3 axes: [batch, anchors, classes]")
    batch, _, num_classes = class_logits[0].shape
    for level, (logits, regression, level_anchors) in enumerate(
        zip(class_logits, box_regression, anchors, strict=True)
    ):
        count = level_anchors.shape[0]
        expected = {
            f"anchors[{level}]": (level_anchors.shape, (count, 4), "[anchors, 4]"),
            f"class_logits[{level}]": (
                logits.shape,
                (batch, count, num_classes),
                "[batch, anchors, classes]",
            ),
            f"box_regression[{level}]": (
                regression.shape,
                (batch, count, 4),
                "[batch, anchors, 4]",
            ),
        }
        for field, (shape, wanted, layout) in expected.items():
            if tuple(shape) != wanted:
                raise invalid(f"{field}.shape", tuple(shape), f"{wanted}: {layout}")
    if tuple(image_sizes.shape) != (batch, 2):
        raise invalid(
            "image_sizes.shape", tuple(image_sizes.shape), f"({batch}, 2): (height, width)"
        )


def postprocess_detections(
    class_logits: Sequence[jax.Array],
    box_regression: Sequence[jax.Array],
    anchors: Sequence[jax.Array],
    image_sizes: jax.Array,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    candidates_per_level: int = CANDIDATES_PER_LEVEL,
    iou_threshold: float = NMS_IOU_THRESHOLD,
    detections_per_image: int = DETECTIONS_PER_IMAGE,
) -> Detections:
    """Each image's detections from the per-level head outputs (see the module docstring).

    class_logits[l] [B, N_l, C] and box_regression[l] [B, N_l, 4] (deltas as `boxes.decode`
    reads them), for anchors[l] [N_l, 4] shared by the batch (images are padded to one size,
    so their anchors are the same); image_sizes [B, 2] is each resized image's (height,
    width), which the boxes are clipped to. Jittable with the keyword arguments static.
    """
    check_range("score_threshold", score_threshold, 0.0, 1.0, open_high=True)
    check_range("iou_threshold", iou_threshold, 0.0, 1.0)
    check_int("candidates_per_level", candidates_per_level, 1)
    check_int("detections_per_image", detections_per_image, 1)
    check_head_outputs(class_logits, box_regression, anchors, image_sizes)

    def one_image(logits, regression, image_size):
        return image_detections(
            logits,
            regression,
            anchors,
            image_size,
            score_threshold,
            candidates_per_level,
            iou_threshold,
            detections_per_image,
        )

    return jax.vmap(one_image)(list(class_logits), list(box_regression), image_sizes)
