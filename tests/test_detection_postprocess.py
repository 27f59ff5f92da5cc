"""Detection post-processing: parity with torchvision's `RetinaNet.postprocess_detections` on
random head outputs, hand-made suppression cases and the input checks.

Parity: two images of different resized sizes, two levels (8x8 and 4x4 positions, 3 anchors
each, 4 classes), logits spread so that about half the scores pass the 0.05 threshold,
anchors a jittered grid of overlapping boxes and deltas that push some boxes past the image
edge. The same detections (boxes to 1e-4 px, scores to 1e-6, labels exact) once with the
defaults (1000 candidates per level, 100 detections per image; torchvision's model is set
to 100 from its 300) and once with 40 and 10, so that both truncations bite. Rows are
compared best first; random float scores have no ties.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax.detection.postprocess import postprocess_detections
from mokd_jax.errors import InputError

NUM_CLASSES = 4
ANCHORS_PER_POSITION = 3
LEVEL_GRIDS = ((8, 8), (4, 4))  # (rows, columns) of positions
IMAGE_SIZES = np.array([[64, 48], [50, 64]], np.int32)  # (height, width), padded to 64 x 64


def grid_anchors(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """[rows * columns * A, 4] boxes around each position's centre on a 64 px image, sides
    two to three strides, so that neighbours overlap; jittered so that no IoU is tied."""
    stride = 64 / rows
    centre_y, centre_x = np.meshgrid(
        (np.arange(rows) + 0.5) * stride, (np.arange(columns) + 0.5) * stride, indexing="ij"
    )
    centres = np.stack([centre_x, centre_y], -1).reshape(-1, 1, 2)
    sides = stride * rng.uniform(2.0, 3.0, (rows * columns, ANCHORS_PER_POSITION, 2))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], -1)
    return boxes.reshape(-1, 4).astype(np.float32)


def random_head_outputs(seed: int):
    """Per-level (logits [B, N, C], deltas [B, N, 4], anchors [N, 4]) as numpy."""
    rng = np.random.default_rng(seed)
    batch = len(IMAGE_SIZES)
    levels = []
    for rows, columns in LEVEL_GRIDS:
        anchors = grid_anchors(rng, rows, columns)
        count = len(anchors)
        logits = rng.normal(-3.0, 2.0, (batch, count, NUM_CLASSES)).astype(np.float32)
        deltas = rng.normal(0.0, 0.3, (batch, count, 4)).astype(np.float32)
        levels.append((logits, deltas, anchors))
    return levels


def torchvision_detections(levels, topk_candidates: int, detections_per_img: int):
    """torchvision's `RetinaNet.postprocess_detections` on the same outputs."""
    torch = pytest.importorskip("torch")
    from torchvision_shim import import_torchvision

    torchvision = import_torchvision()
    model = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    )
    model.topk_candidates = topk_candidates
    model.detections_per_img = detections_per_img
    head_outputs = {
        "cls_logits": [torch.from_numpy(logits) for logits, _, _ in levels],
        "bbox_regression": [torch.from_numpy(deltas) for _, deltas, _ in levels],
    }
    anchors = [[torch.from_numpy(anchors) for _, _, anchors in levels]] * len(IMAGE_SIZES)
    image_shapes = [tuple(int(side) for side in size) for size in IMAGE_SIZES]
    with torch.no_grad():
        return model.postprocess_detections(head_outputs, anchors, image_shapes)


jitted_postprocess = jax.jit(
    postprocess_detections,
    static_argnames=(
        "score_threshold",
        "candidates_per_level",
        "iou_threshold",
        "detections_per_image",
    ),
)


def jax_detections(levels, **settings):
    logits, deltas, anchors = (list(field) for field in zip(*levels, strict=True))
    arrays = jitted_postprocess(logits, deltas, anchors, jnp.asarray(IMAGE_SIZES), **settings)
    return jax.device_get(arrays)


@pytest.mark.parametrize(
    "candidates, detections", [(1000, 100), (40, 10)], ids=["defaults", "truncating"]
)
def test_matches_torchvision_retinanet(candidates, detections):
    levels = random_head_outputs(seed=candidates)
    expected = torchvision_detections(levels, candidates, detections)
    ours = jax_detections(levels, candidates_per_level=candidates, detections_per_image=detections)
    assert ours.boxes.shape == (len(IMAGE_SIZES), detections, 4)
    for image, reference in enumerate(expected):
        count = len(reference["scores"])
        assert count > 5, "too few detections for the comparison to mean much"
        np.testing.assert_array_equal(ours.valid[image], np.arange(detections) < count)
        np.testing.assert_array_equal(ours.labels[image, :count], reference["labels"].numpy())
        np.testing.assert_allclose(
            ours.scores[image, :count], reference["scores"].numpy(), atol=1e-6
        )
        np.testing.assert_allclose(ours.boxes[image, :count], reference["boxes"].numpy(), atol=1e-4)
        assert not ours.boxes[image, count:].any() and not ours.scores[image, count:].any()


def test_parity_case_exercises_threshold_clipping_and_suppression():
    """The random case is not trivial: scores fall on both sides of the threshold, some boxes
    are clipped, and suppression removes a good share of the live candidates."""
    levels = random_head_outputs(seed=1000)
    logits = np.concatenate([level[0] for level in levels], axis=1)
    live = (1 / (1 + np.exp(-logits)) > 0.05).sum(axis=(1, 2))
    kept = jax_detections(levels, detections_per_image=1000).valid.sum(axis=1)
    assert (live > 200).all() and (kept < 0.8 * live).all()
    boxes = jax_detections(levels).boxes
    on_edge = (boxes[..., 2] == IMAGE_SIZES[:, None, 1]) | (
        boxes[..., 3] == IMAGE_SIZES[:, None, 0]
    )
    assert on_edge.any(axis=1).all()


OFF = -10.0  # sigmoid(-10) < 0.05: below the score threshold


def hand_detections(anchors, logits, image_size=(32, 32)):
    """One image, one level of 3 anchors and 2 classes whose deltas are zero, so that each
    candidate's box is its anchor; anchors and classes not given score OFF (one compile for
    every hand case)."""
    padded_anchors = np.tile(np.float32([0, 0, 1, 1]), (3, 1))
    padded_anchors[: len(anchors)] = anchors
    padded_logits = np.full((1, 3, 2), OFF, np.float32)
    padded_logits[0, : len(logits), : len(logits[0])] = logits
    deltas = np.zeros((1, 3, 4), np.float32)
    sizes = np.asarray([image_size], np.int32)
    return jitted_postprocess(
        [padded_logits], [deltas], [padded_anchors], sizes, detections_per_image=4
    )


LOGIT_09 = float(np.log(9.0))  # sigmoid = 0.9
LOGIT_08 = float(np.log(4.0))  # sigmoid = 0.8
# IoU([0, 0, 10, 10], [1, 1, 11, 11]) = 81 / 119 > 0.5; with [5, 0, 15, 10]: 50 / 150 < 0.5
OVERLAPPING = [[0, 0, 10, 10], [1, 1, 11, 11]]
APART = [[0, 0, 10, 10], [5, 0, 15, 10]]


def test_same_class_overlapping_boxes_keep_the_better_one():
    detections = hand_detections(OVERLAPPING, [[OFF, LOGIT_08], [OFF, LOGIT_09]])
    np.testing.assert_array_equal(detections.valid[0], [True, False, False, False])
    np.testing.assert_allclose(detections.boxes[0, 0], [1, 1, 11, 11])
    np.testing.assert_allclose(detections.scores[0, 0], 0.9, rtol=1e-6)
    assert detections.labels[0, 0] == 1


def test_different_classes_are_not_suppressed():
    detections = hand_detections(OVERLAPPING, [[LOGIT_09, OFF], [OFF, LOGIT_08]])
    np.testing.assert_array_equal(detections.valid[0], [True, True, False, False])
    np.testing.assert_array_equal(detections.labels[0, :2], [0, 1])
    np.testing.assert_allclose(detections.scores[0, :2], [0.9, 0.8], rtol=1e-6)


def test_same_class_boxes_below_the_iou_threshold_are_both_kept():
    detections = hand_detections(APART, [[LOGIT_08, OFF], [LOGIT_09, OFF]])
    np.testing.assert_array_equal(detections.valid[0], [True, True, False, False])
    np.testing.assert_allclose(detections.boxes[0, :2], [[5, 0, 15, 10], [0, 0, 10, 10]])


def test_boxes_are_clipped_to_the_image_height_and_width():
    detections = hand_detections([[-4, 2, 40, 20]], [[LOGIT_09]], image_size=(16, 24))
    np.testing.assert_allclose(detections.boxes[0, 0], [0, 2, 24, 16])


def test_a_suppressed_box_does_not_suppress_others():
    """A (0.9) suppresses B (0.8); B would suppress C (0.7), but C overlaps A by less than
    the threshold, so greedy NMS keeps A and C."""
    anchors = [[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]  # IoU(A,B)=IoU(B,C)=7/13, A,C: 4/16
    logit_07 = float(np.log(0.7 / 0.3))
    detections = hand_detections(anchors, [[LOGIT_09], [LOGIT_08], [logit_07]])
    np.testing.assert_array_equal(detections.valid[0], [True, True, False, False])
    np.testing.assert_allclose(detections.boxes[0, :2], [[0, 0, 10, 10], [6, 0, 16, 10]])


def test_mismatched_levels_are_rejected_naming_the_field():
    logits = jnp.zeros((2, 12, 3))
    deltas = jnp.zeros((2, 12, 4))
    anchors = jnp.zeros((12, 4))
    sizes = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(InputError, match=r"levels .*=\(1, 1, 2\)"):
        postprocess_detections([logits], [deltas], [anchors, anchors], sizes)
    with pytest.raises(InputError, match=r"box_regression\[0\].shape=\(2, 11, 4\).*\(2, 12, 4\)"):
        postprocess_detections([logits], [deltas[:, :11]], [anchors], sizes)
    with pytest.raises(InputError, match=r"image_sizes.shape=\(3, 2\)"):
        postprocess_detections([logits], [deltas], [anchors], jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(InputError, match="detections_per_image=0"):
        postprocess_detections([logits], [deltas], [anchors], sizes, detections_per_image=0)
