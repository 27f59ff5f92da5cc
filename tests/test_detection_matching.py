"""Anchor matching (mokd_jax.detection.matching): a hand-computed case covering every
outcome, and exact parity with torchvision's `Matcher(0.5, 0.4, allow_low_quality_matches=
True)` as RetinaNet uses it, on random whole-pixel boxes (which tie often: a small box
inside several same-size anchors has the same IoU with each), with padding rows and images
without real boxes."""

import jax
import numpy as np
import pytest

from mokd_jax.detection import anchors, matching
from mokd_jax.errors import InputError

torch = pytest.importorskip("torch")
from torchvision_shim import import_torchvision  # noqa: E402  (needs torch)

torchvision = import_torchvision()
from torchvision.models.detection._utils import Matcher  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

IMAGE_SIZE = (64, 96)
MAX_BOXES = 8


def whole_pixel_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random float32 boxes [count, 4] with integer corners inside IMAGE_SIZE."""
    height, width = IMAGE_SIZE
    x1 = rng.integers(0, width - 4, count)
    y1 = rng.integers(0, height - 4, count)
    x2 = x1 + rng.integers(2, width - x1 + 1)
    y2 = y1 + rng.integers(2, height - y1 + 1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


def torchvision_matches(anchor_boxes: np.ndarray, real_boxes: np.ndarray) -> np.ndarray:
    """What torchvision's RetinaNet.compute_loss matches: all -1 without boxes."""
    if len(real_boxes) == 0:
        return np.full(len(anchor_boxes), -1)
    iou = box_iou(torch.from_numpy(real_boxes), torch.from_numpy(anchor_boxes))
    return Matcher(0.5, 0.4, allow_low_quality_matches=True)(iou).numpy()


def padded(real_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [MAX_BOXES, 4] zero-padded after the real rows, box_mask [MAX_BOXES])."""
    boxes = np.zeros((MAX_BOXES, 4), np.float32)
    boxes[: len(real_boxes)] = real_boxes
    return boxes, np.arange(MAX_BOXES) < len(real_boxes)


def test_hand_computed_outcomes():
    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 10]], np.float32)
    box_mask = np.array([True, True, False])  # the padding row would be a perfect match
    anchor_boxes = np.array(
        [
            [0, 0, 10, 10],  # IoU 1 with box 0: foreground
            [0, 0, 10, 22],  # IoU 0.45: ignored
            [0, 0, 10, 30],  # IoU 0.33: background
            [100, 100, 110, 125],  # IoU 0.4 with box 1, its best (tied): claimed by it
            [100, 100, 110, 125],
        ],
        np.float32,
    )
    matched = matching.match_anchors(anchor_boxes, boxes, box_mask)
    np.testing.assert_array_equal(matched, [0, matching.IGNORED, matching.BACKGROUND, 1, 1])
    assert matched.dtype == np.int32


def test_identical_to_torchvision_on_ties():
    rng = np.random.default_rng(0)
    anchor_boxes = anchors.retinanet_anchors(IMAGE_SIZE)
    tied_claims = 0
    for trial in range(12):
        real_boxes = whole_pixel_boxes(rng, int(rng.integers(1, MAX_BOXES + 1)))
        if trial % 3 == 0:  # a duplicated box: ties in every anchor's arg-max over boxes
            real_boxes[-1] = real_boxes[0]
        iou = box_iou(torch.from_numpy(real_boxes), torch.from_numpy(anchor_boxes))
        tied_claims += int((iou == iou.max(dim=1, keepdim=True).values).sum()) - len(iou)
        ours = matching.match_anchors(anchor_boxes, *padded(real_boxes))
        np.testing.assert_array_equal(ours, torchvision_matches(anchor_boxes, real_boxes))
    assert tied_claims > 10  # boxes did claim several equally good anchors


def test_batch_with_empty_images_matches_torchvision():
    rng = np.random.default_rng(1)
    anchor_boxes = anchors.retinanet_anchors(IMAGE_SIZE)
    counts = [0, 3, MAX_BOXES, 0, 1]
    real = [whole_pixel_boxes(rng, count) for count in counts]
    boxes, box_mask = (np.stack(arrays) for arrays in zip(*map(padded, real), strict=True))
    ours = jax.jit(matching.match_batch)(anchor_boxes, boxes, box_mask)
    expected = np.stack([torchvision_matches(anchor_boxes, image) for image in real])
    np.testing.assert_array_equal(ours, expected)
    assert (ours[0] == matching.BACKGROUND).all()
    outcomes = set(np.unique(ours[1:]).tolist())
    assert {matching.IGNORED, matching.BACKGROUND} < outcomes and max(outcomes) > 0


def test_padding_rows_anywhere_never_match():
    rng = np.random.default_rng(2)
    anchor_boxes = anchors.retinanet_anchors(IMAGE_SIZE)
    real_boxes = whole_pixel_boxes(rng, 4)
    # Padding rows first and in between, each a copy of an anchor (IoU 1 if it counted).
    boxes = np.concatenate([anchor_boxes[:2], real_boxes[:2], anchor_boxes[5:6], real_boxes[2:]])
    box_mask = np.array([False, False, True, True, False, True, True])
    ours = np.asarray(matching.match_anchors(anchor_boxes, boxes, box_mask))
    real_rows = np.flatnonzero(box_mask)
    expected = torchvision_matches(anchor_boxes, real_boxes)
    np.testing.assert_array_equal(ours, np.where(expected >= 0, real_rows[expected], expected))


def test_no_box_rows_at_all_is_all_background():
    anchor_boxes = anchors.retinanet_anchors(IMAGE_SIZE)
    matched = matching.match_anchors(anchor_boxes, np.zeros((0, 4)), np.zeros((0,), bool))
    np.testing.assert_array_equal(matched, np.full(len(anchor_boxes), matching.BACKGROUND))


def test_bad_input_names_the_field():
    anchor_boxes = anchors.retinanet_anchors(IMAGE_SIZE)
    with pytest.raises(InputError, match=r"box_mask\.shape=\(3,\) is not allowed: \(2,\)"):
        matching.match_anchors(anchor_boxes, np.zeros((2, 4)), np.zeros(3, bool))
    with pytest.raises(InputError, match=r"anchors\.shape=\(4,\)"):
        matching.match_anchors(np.zeros(4), np.zeros((2, 4)), np.zeros(2, bool))
