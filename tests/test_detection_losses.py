"""RetinaNet losses (mokd_jax.detection.losses): focal loss against torchvision's
sigmoid_focal_loss in value and gradient, what its backward rule and the sigmoid KD's keep
for one and for two pullbacks, the batch loss against torchvision's `retinanet_resnet50_fpn`
`compute_loss` (its matcher, then `RetinaNetHead.compute_loss`) for every box loss on random
head outputs, anchors and padded targets (relative 1e-5), and one compilation for targets
with different numbers of real boxes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from pullback_memory import pullback_peaks

from mokd_jax.detection import anchors, losses
from mokd_jax.detection import objectives as detection_objectives
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


@pytest.mark.parametrize("soft", [False, True], ids=["binary", "soft"])
def test_sigmoid_focal_loss_gradient_matches_torch_autograd(soft):
    """The closed-form derivative against torch's autograd of torchvision's focal loss,
    logits up to +-40 (where the focal factor underflows); the targets get no gradient."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(300, 7)) * 12).clip(-40, 40).astype(np.float32)
    targets = rng.uniform(size=logits.shape).astype(np.float32)
    targets = targets if soft else (targets < 0.2).astype(np.float32)
    torch_logits = torch.from_numpy(logits).requires_grad_()
    torchvision.ops.sigmoid_focal_loss(
        torch_logits, torch.from_numpy(targets), alpha=0.25, gamma=2.0, reduction="sum"
    ).backward()

    def total(logits, targets):
        return losses.sigmoid_focal_loss(logits, targets).sum()

    ours, target_gradient = jax.grad(total, argnums=(0, 1))(logits, targets)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, torch_logits.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(target_gradient, 0.0)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_sigmoid_focal_loss_gradient_matches_autodiff_of_optax_for_any_gamma(gamma):
    """In float64, against autodiff of optax's form of the same loss: gamma < 1, where the
    derivative's (1 - p_t)^(gamma - 1) grows without bound, included."""
    rng = np.random.default_rng(3)
    with jax.enable_x64():
        logits = jnp.asarray(rng.normal(size=(400,)) * 15)
        targets = jnp.asarray(rng.uniform(size=(400,)) < 0.5, jnp.float64)
        reference = jax.grad(
            lambda x: optax.sigmoid_focal_loss(x, targets, alpha=0.25, gamma=gamma).sum()
        )(logits)
        ours = jax.grad(lambda x: losses.sigmoid_focal_loss(x, targets, gamma=gamma).sum())(logits)
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-15)


def _loss_pullback_peaks(focal, kd, compiler_options=None) -> tuple[float, float]:
    """Planned peaks, in logit-sized buffers, of one pullback of [focal, sigmoid KD] summed
    and of two pullbacks, one per objective (the trainer's `steps.row_gradients`), for a
    linear head on fixed features: logits [8, 2000, 80] from a [32, 80] kernel."""
    rng = np.random.default_rng(4)
    features = jnp.asarray(rng.normal(size=(8, 2000, 32)), jnp.float32)
    teacher = jnp.asarray(rng.normal(-2.0, 2.0, size=(8, 2000, 80)), jnp.float32)
    targets = jnp.asarray(rng.uniform(size=teacher.shape) < 0.01, jnp.float32)
    params = {"kernel": jnp.asarray(rng.normal(size=(32, 80)) * 0.1, jnp.float32)}

    def objectives(params):
        logits = jnp.tanh(features) @ params["kernel"]
        return jnp.stack([focal(logits, targets).sum(), kd(logits, teacher).sum()]), None

    one, two = pullback_peaks(objectives, params, compiler_options)
    logit_bytes = teacher.size * 4
    return one / logit_bytes, two / logit_bytes


def test_loss_rules_keep_one_logit_buffer_per_pullback(monkeypatch):
    """The backward rules of the focal loss and of the sigmoid KD save only their inputs,
    and a second pullback of the same forward pass adds one logit-sized buffer (its
    cotangent), not the losses' derivatives: measured 2 buffers for one pullback and 3 for
    two. Autodiff of optax's forms kept 9 and 12; the rules without `tied_to_cotangent`
    kept 2 and 9 (XLA computed the derivatives once for both pullbacks) with XLA's default
    CPU settings, which is what the last check compiles with: with the package's fast-math
    default (`mokd_jax.xla_flags`) XLA happened to plan 2 and 3 for the untied rules too,
    which a user who turns the defaults off does not get (no other backend was measured)."""
    kd = functools.partial(detection_objectives.binary_kd_terms, temperature=4.0)
    one, two = _loss_pullback_peaks(losses.sigmoid_focal_loss, kd)
    assert one < 2.5 and two - one < 1.5

    def kd_autodiff(student, teacher, temperature=4.0):
        targets = jax.nn.sigmoid(teacher / temperature)
        return temperature**2 * (
            optax.sigmoid_binary_cross_entropy(student / temperature, targets)
            - optax.sigmoid_binary_cross_entropy(teacher / temperature, targets)
        )

    focal_autodiff = functools.partial(optax.sigmoid_focal_loss, alpha=0.25, gamma=2.0)
    one, two = _loss_pullback_peaks(focal_autodiff, kd_autodiff)
    assert one > 6

    monkeypatch.setattr(losses, "tied_to_cotangent", lambda saved, cotangent: saved)
    monkeypatch.setattr(detection_objectives, "tied_to_cotangent", lambda saved, cotangent: saved)
    xla_default = {"xla_cpu_enable_fast_math": False}
    one, two = _loss_pullback_peaks(losses.sigmoid_focal_loss, kd, xla_default)
    assert two - one > 4


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
