"""RetinaNet losses (mokd_jax.detection.losses): focal loss against torchvision's
sigmoid_focal_loss, the batch loss against torchvision's `retinanet_resnet50_fpn`
`compute_loss` (its matcher, then `RetinaNetHead.compute_loss`) for every box loss on random
head outputs, anchors and padded targets (relative 1e-5), and one compilation for targets
with different numbers of real boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax.detection import anchors, losses
from mokd_jax.errors import InputError

torch = pytest.importorskip("torch")
from torchvision_shim import import_torchvision  # noqa: E402  (needs torch)

torchvision = import_torchvision()

NUM_CLASSES = 5
MAX_BOXES = 6
RTOL = 1e-5


@pytest.fixture(scope="module")
def retinanet():
    return torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    )


def random_targets(rng: np.random.Generator, counts: list[int], side: int) -> tuple:
    """Padded (boxes [B, MAX_BOXES, 4], labels, box_mask) with counts[i] real boxes of
    whole-pixel corners in a side x side image (as torchvision, whose matcher ties exactly
    where ours does). The padding rows hold an inverted box, whose encoding is NaN, which
    must change nothing."""
    boxes = np.tile(np.float32([side, side, 0, 0]), (len(counts), MAX_BOXES, 1))
    for image, count in enumerate(counts):
        corners = rng.integers(0, side - 16, size=(count, 2))
        sizes = rng.integers(8, side // 2, size=(count, 2))
        boxes[image, :count] = np.concatenate([corners, np.minimum(corners + sizes, side)], 1)
    labels = rng.integers(0, NUM_CLASSES, size=(len(counts), MAX_BOXES)).astype(np.int32)
    box_mask = np.arange(MAX_BOXES)[None, :] < np.asarray(counts)[:, None]
    return boxes, labels, box_mask


def random_head_outputs(rng: np.random.Generator, batch: int, num_anchors: int) -> tuple:
    """(class logits [B, N, C] around the head's prior, box deltas [B, N, 4])."""
    logits = rng.normal(-2.0, 2.0, size=(batch, num_anchors, NUM_CLASSES)).astype(np.float32)
    deltas = rng.normal(0.0, 0.5, size=(batch, num_anchors, 4)).astype(np.float32)
    return logits, deltas


def test_sigmoid_focal_loss_matches_torchvision():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(200, 7)) * 4).astype(np.float32)
    targets = (rng.uniform(size=(200, 7)) < 0.2).astype(np.float32)
    expected = torchvision.ops.sigmoid_focal_loss(
        torch.from_numpy(logits), torch.from_numpy(targets), alpha=0.25, gamma=2.0
    ).numpy()
    ours = jax.jit(losses.sigmoid_focal_loss)(logits, targets)
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=1e-7)
    # The total, as the detection loss sums it, to the same relative tolerance.
    np.testing.assert_allclose(ours.sum(), expected.sum(), rtol=RTOL)


@pytest.mark.parametrize("box_loss", losses.BOX_LOSSES)
def test_matches_torchvision_retinanet_compute_loss(retinanet, monkeypatch, box_loss):
    rng = np.random.default_rng(1)
    anchor_boxes = anchors.retinanet_anchors((128, 128))
    counts = [0, 2, 5, MAX_BOXES]
    boxes, labels, box_mask = random_targets(rng, counts, side=128)
    logits, deltas = random_head_outputs(rng, len(counts), len(anchor_boxes))

    monkeypatch.setattr(retinanet.head.regression_head, "_loss_type", box_loss)
    torch_targets = [
        {
            "boxes": torch.from_numpy(boxes[image, :count]),
            "labels": torch.from_numpy(labels[image, :count]).long(),
        }
        for image, count in enumerate(counts)
    ]
    head_outputs = {
        "cls_logits": torch.from_numpy(logits),
        "bbox_regression": torch.from_numpy(deltas),
    }
    torch_anchors = [torch.from_numpy(anchor_boxes)] * len(counts)
    expected = retinanet.compute_loss(torch_targets, head_outputs, torch_anchors)

    retinanet_losses = jax.jit(losses.retinanet_losses, static_argnames="box_loss")
    ours = retinanet_losses(
        logits, deltas, anchor_boxes, boxes, labels, box_mask, box_loss=box_loss
    )
    assert set(ours) == {"classification", "box"}
    np.testing.assert_allclose(ours["classification"], expected["classification"], rtol=RTOL)
    np.testing.assert_allclose(ours["box"], expected["bbox_regression"], rtol=RTOL)


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])  # l1 shares smooth_l1's targets
def test_compiles_once_for_any_number_of_real_boxes(box_loss):
    rng = np.random.default_rng(2)
    anchor_boxes = anchors.retinanet_anchors((64, 64))
    traces = []

    def total(head_outputs, boxes, labels, box_mask):
        traces.append(box_loss)
        parts = losses.retinanet_losses(
            *head_outputs, anchor_boxes, boxes, labels, box_mask, box_loss=box_loss
        )
        return parts["classification"] + parts["box"]

    step = jax.jit(jax.value_and_grad(total))
    head_outputs = random_head_outputs(rng, 2, len(anchor_boxes))
    values = []
    for counts in ([1, 3], [0, MAX_BOXES]):
        value, gradients = step(head_outputs, *random_targets(rng, counts, side=64))
        assert all(jnp.isfinite(g).all() for g in gradients)  # from the padding rows
        values.append(float(value))
    assert len(traces) == 1 and values[0] != values[1]


def test_bad_input_names_the_field():
    anchor_boxes = anchors.retinanet_anchors((64, 64))
    logits, deltas = random_head_outputs(np.random.default_rng(3), 1, len(anchor_boxes))
    targets = random_targets(np.random.default_rng(3), [1], side=64)
    with pytest.raises(InputError, match=r"box_loss='iou' is not allowed: one of l1, smooth_l1"):
        losses.retinanet_losses(logits, deltas, anchor_boxes, *targets, box_loss="iou")
    with pytest.raises(
        InputError, match=r"anchors\.shape=\(773, 4\) is not allowed: \(774, 4\), as class"
    ):
        losses.retinanet_losses(logits, deltas, anchor_boxes[1:], *targets)
