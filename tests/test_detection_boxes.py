"""Box geometry (mokd_jax.detection.boxes): hand-computed cases, and float32 parity with
torchvision's box_iou, clip_boxes_to_image, BoxCoder, generalized_box_iou_loss and torch's
l1 / smooth-l1 losses on random boxes (relative 1e-5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax.detection import boxes
from mokd_jax.errors import InputError

torch = pytest.importorskip("torch")
from torchvision_shim import import_torchvision  # noqa: E402  (needs torch)

torchvision = import_torchvision()
from torchvision.models.detection._utils import BoxCoder  # noqa: E402
from torchvision.ops import box_iou, clip_boxes_to_image, generalized_box_iou_loss  # noqa: E402

RTOL = 1e-5


def random_boxes(rng: np.random.Generator, count: int, extent: float = 100.0) -> np.ndarray:
    """Valid float32 boxes [count, 4] with corners in [0, extent + extent / 2]."""
    corners = rng.uniform(0, extent, size=(count, 2))
    sizes = rng.uniform(1, extent / 2, size=(count, 2))
    return np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)


def test_hand_computed_areas_and_iou():
    unit_square = np.array([[0, 0, 2, 2]], np.float32)
    others = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 7], [0, 0, 1, 2]], np.float32)
    np.testing.assert_allclose(boxes.box_areas(others), [4, 4, 2, 2])
    np.testing.assert_allclose(boxes.pairwise_iou(unit_square, others), [[1 / 7, 1, 0, 0.5]])


def test_pairwise_iou_matches_torchvision():
    rng = np.random.default_rng(0)
    boxes_a, boxes_b = random_boxes(rng, 40), random_boxes(rng, 30)
    expected = box_iou(torch.from_numpy(boxes_a), torch.from_numpy(boxes_b)).numpy()
    ours = np.asarray(boxes.pairwise_iou(boxes_a, boxes_b))
    assert ours.shape == (40, 30) and (expected > 0.3).any() and (expected == 0).any()
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=1e-7)


def test_clip_to_image_matches_torchvision_with_a_traced_size():
    rng = np.random.default_rng(1)
    unclipped = random_boxes(rng, 50, extent=120) - 20
    expected = clip_boxes_to_image(torch.from_numpy(unclipped), (70, 90)).numpy()
    clip = jax.jit(boxes.clip_to_image)
    np.testing.assert_array_equal(clip(unclipped, jnp.array([70, 90], jnp.int32)), expected)


def test_encode_and_decode_match_torchvision_box_coder():
    rng = np.random.default_rng(2)
    anchors, targets = random_boxes(rng, 60), random_boxes(rng, 60)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    expected_deltas = coder.encode_single(torch.from_numpy(targets), torch.from_numpy(anchors))
    deltas = boxes.encode(targets, anchors)
    np.testing.assert_allclose(deltas, expected_deltas.numpy(), rtol=RTOL, atol=1e-6)

    # Random deltas, some far past the size clamp.
    predicted = (rng.normal(size=(60, 4)) * np.array([0.5, 0.5, 3, 3])).astype(np.float32)
    expected_boxes = coder.decode_single(torch.from_numpy(predicted), torch.from_numpy(anchors))
    decoded = boxes.decode(predicted, anchors)
    np.testing.assert_allclose(decoded, expected_boxes.numpy(), rtol=RTOL, atol=1e-4)


def test_decode_inverts_encode_and_clamps_the_size():
    rng = np.random.default_rng(3)
    anchors, targets = random_boxes(rng, 20), random_boxes(rng, 20)
    np.testing.assert_allclose(
        boxes.decode(boxes.encode(targets, anchors), anchors), targets, rtol=RTOL, atol=1e-4
    )
    anchor = np.array([[0, 0, 16, 32]], np.float32)
    huge = np.array([[0, 0, 50, 50]], np.float32)
    np.testing.assert_allclose(boxes.decode(huge, anchor), [[-492, -984, 508, 1016]], rtol=RTOL)
    assert boxes.DELTA_SIZE_CLAMP == pytest.approx(math.log(1000 / 16))


def test_decode_broadcasts_anchors_over_a_batch():
    rng = np.random.default_rng(4)
    anchors = random_boxes(rng, 7)
    deltas = rng.normal(size=(3, 7, 4)).astype(np.float32)
    batched = boxes.decode(deltas, anchors)
    assert batched.shape == (3, 7, 4)
    np.testing.assert_array_equal(batched[1], boxes.decode(deltas[1], anchors))


def test_generalized_iou_loss_hand_computed():
    predicted = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]], np.float32)
    target = np.array([[0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 3, 3]], np.float32)
    # identical: 0; apart, enclosing box 3 of which 1 uncovered: 1 + 1/3; IoU 1/7, hull 9.
    expected = [0, 4 / 3, 1 - (1 / 7 - 2 / 9)]
    np.testing.assert_allclose(boxes.generalized_iou_loss(predicted, target), expected, rtol=RTOL)


def test_generalized_iou_loss_matches_torchvision():
    rng = np.random.default_rng(5)
    predicted, target = random_boxes(rng, 80), random_boxes(rng, 80)
    predicted[:5] = target[:5]
    expected = generalized_box_iou_loss(
        torch.from_numpy(predicted), torch.from_numpy(target), reduction="none"
    ).numpy()
    assert (expected > 1).any() and (expected < 1).any()  # disjoint and overlapping pairs
    ours = boxes.generalized_iou_loss(predicted, target)
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.11])
def test_l1_and_smooth_l1_match_torch(beta):
    rng = np.random.default_rng(6)
    predicted, target = (rng.normal(size=(2, 30, 4)) * 2).astype(np.float32)
    tensors = torch.from_numpy(predicted), torch.from_numpy(target)
    l1 = torch.nn.functional.l1_loss(*tensors, reduction="none").sum(-1).numpy()
    smooth = torch.nn.functional.smooth_l1_loss(*tensors, reduction="none", beta=beta)
    np.testing.assert_allclose(boxes.l1_loss(predicted, target), l1, rtol=RTOL)
    np.testing.assert_allclose(
        boxes.smooth_l1_loss(predicted, target, beta), smooth.sum(-1).numpy(), rtol=RTOL
    )


def test_bad_input_names_the_field():
    with pytest.raises(InputError, match=r"boxes_b\.shape=\(3, 5\).*\[n, 4\]"):
        boxes.pairwise_iou(np.zeros((2, 4)), np.zeros((3, 5)))
    with pytest.raises(InputError, match=r"beta=0\.0 is not allowed: a finite number > 0"):
        boxes.smooth_l1_loss(np.zeros((1, 4)), np.zeros((1, 4)), 0.0)
