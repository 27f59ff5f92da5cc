"""The pure, jittable detection steps: the distillation task for `mokd_jax.steps`, the
teacher's RetinaNet step and the evaluation step.

Distillation runs through the trainer's one step (`mokd_jax.steps.distill_step` with
`task=functools.partial(detection_student_functions, anchors=...)`), so detection gets the
per-objective gradients, every aggregator and the conflict diagnostics of classification
with no code of its own for them. What detection supplies is the split of the student:

    encode           the student's backbone: its taps are (C5, C3, C4). C5 comes first
                     because the first tap is the representation at which a
                     representation method (GradDrop) combines the objectives'
                     gradients: the backbone's last output, where the FPN's top-down path
                     and P6 (v2) branch off, as classification's pooled features are
                     where classifier and projectors branch off.
    head_objectives  the student's FPN and heads on those taps, the projectors on P3-P7
                     against the teacher's, and the loss vector
                     (`mokd_jax.detection.objectives`).

Inputs. Batches are uint8 images zero-padded at the bottom and right; torchvision pads
after normalising, so its padding is 0 in the normalised input (the mean colour), not
black. `model_inputs` reproduces that: each network's statistics, then zero outside each
image's `image_sizes`, for teacher and student alike.

The backbones' BatchNorms are frozen (`mokd_jax.detection.retinanet`), so no step changes
`batch_stats`; which parameters train is the optimizer's (`retinanet.trainable_mask`).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mokd_jax import normalization
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.losses import retinanet_losses
from mokd_jax.detection.objectives import detection_loss_vector
from mokd_jax.detection.postprocess import Detections, postprocess_detections
from mokd_jax.detection.retinanet import LEVELS, RetinaNet, RetinaNetOutputs
from mokd_jax.networks import DetectionNetworks
from mokd_jax.state import TrainState
from mokd_jax.steps import advanced


def pyramid_levels(outputs: RetinaNetOutputs) -> list[jax.Array]:
    """P3 .. P7 of a RetinaNet's outputs, in that order: the projectors' taps `tap0` ..
    `tap4`."""
    return [outputs.features[f"p{level}"] for level in LEVELS]


def padding_mask(image_sizes: jax.Array, height: int, width: int) -> jax.Array:
    """float32 [B, H, W, 1]: 1 inside each image's (height, width) `image_sizes` [B, 2],
    0 on the padding below and to the right of it."""
    rows = jnp.arange(height)[None, :] < image_sizes[:, :1]
    columns = jnp.arange(width)[None, :] < image_sizes[:, 1:]
    return (rows[:, :, None] & columns[:, None, :])[..., None].astype(jnp.float32)


def model_inputs(inputs: normalization.Normalization, batch: DetectionBatch) -> jax.Array:
    """A network's input: the batch's images through its statistics `inputs`, with the
    padding set to 0 afterwards, as torchvision pads normalised images (module docstring)."""
    height, width = batch.images.shape[1:3]
    mask = padding_mask(jnp.asarray(batch.image_sizes), height, width)
    return normalization.apply(inputs, batch.images) * mask


def example_pyramid(model: RetinaNet, image_shape: Sequence[int]) -> tuple[jax.Array, ...]:
    """Zero P3 .. P7 maps [1, H_l, W_l, 256] of `model` for images of `image_shape`, to
    initialise the projectors with (`state.create_student_state`'s `example_features`):
    the shapes come from tracing the model (`jax.eval_shape`), nothing is computed."""

    def pyramid(key):
        outputs, _ = model.init_with_output(key, jnp.zeros((1, *image_shape), jnp.float32))
        return pyramid_levels(outputs)

    shapes = jax.eval_shape(pyramid, jax.random.key(0))
    return tuple(jnp.zeros(shape.shape, jnp.float32) for shape in shapes)


def detection_student_functions(
    state: TrainState,
    teacher_variables: Mapping[str, Any],
    batch: DetectionBatch,
    *,
    networks: DetectionNetworks,
    distill: ml_collections.ConfigDict,
    anchors: np.ndarray,
) -> tuple[Callable, Callable]:
    """Detection's `mokd_jax.steps.TaskFunctions` (module docstring): the teacher's
    RetinaNet in eval mode on its own input statistics (its variables an argument, not
    closed over, not differentiated), then the student split at its backbone's outputs.
    `anchors` [N, 4] are the batch's padded image size's (`anchors.retinanet_anchors`).
    No task metric: the loss parts say what a detection step needs to say."""
    student = networks.student
    teacher = networks.teacher.apply(
        teacher_variables, model_inputs(networks.teacher_input, batch), train=False
    )
    teacher_levels = pyramid_levels(teacher)
    student_inputs = model_inputs(networks.student_input, batch)

    def encode(student_params):
        c3, c4, c5 = student.apply(
            {"params": student_params, "batch_stats": state.batch_stats},
            student_inputs,
            method="backbone_features",
        )
        return (c5, c3, c4), state.batch_stats

    def head_objectives(params, student_taps):
        c5, c3, c4 = student_taps
        outputs = student.apply(
            {"params": params["student"]}, (c3, c4, c5), method="from_backbone_features"
        )
        projections = networks.projector.apply(
            {"params": params["projector"], "constants": state.constants},
            pyramid_levels(outputs),
            teacher_levels,
        )
        losses, parts = detection_loss_vector(
            outputs,
            teacher.class_logits,
            projections,
            batch,
            anchors,
            distill,
            box_loss=networks.box_loss,
            teacher_classes=networks.teacher_classes,
        )
        return losses, (parts, {})

    return encode, head_objectives


def detection_teacher_step(
    state: TrainState,
    batch: DetectionBatch,
    *,
    model: RetinaNet,
    tx,
    inputs: normalization.Normalization,
    anchors: np.ndarray,
    box_loss: str,
) -> tuple[TrainState, dict]:
    """One step of RetinaNet's loss (classification + box, `losses.retinanet_losses`) for
    a detector trained here, fed through its `inputs` statistics; metrics `loss`,
    `loss_classification`, `loss_box`."""

    def loss_fn(params):
        outputs = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            model_inputs(inputs, batch),
            train=True,
        )
        parts = retinanet_losses(
            outputs.class_logits,
            outputs.box_regression,
            anchors,
            batch.boxes,
            batch.labels,
            batch.box_mask,
            box_loss,
        )
        return parts["classification"] + parts["box"], parts

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = advanced(state, updates, state.batch_stats, opt_state)
    return new_state, {"loss": loss, **{f"loss_{name}": value for name, value in parts.items()}}


def split_levels(
    array: jax.Array | np.ndarray, level_shapes: Sequence[tuple[int, int]], num_anchors: int
) -> list[jax.Array]:
    """`array`'s anchor axis (the second to last: [..., N, D]) cut into the pyramid's
    levels, H_l x W_l x `num_anchors` rows each, in the head's order."""
    sizes = [height * width * num_anchors for height, width in level_shapes]
    return jnp.split(array, np.cumsum(sizes)[:-1], axis=-2)


def detect(
    variables: Mapping[str, Any],
    batch: DetectionBatch,
    *,
    model: RetinaNet,
    inputs: normalization.Normalization,
    anchors: np.ndarray,
) -> Detections:
    """The evaluation step: a network's detections on a batch (eval mode, its `inputs`
    statistics), post-processed as torchvision's RetinaNet (`postprocess_detections`) in
    fixed-size arrays; jittable. Boxes are in pixels of the resized images; the padding
    rows of a last batch get detections too, which `coco_eval.CocoAccumulator` drops."""
    outputs = model.apply(variables, model_inputs(inputs, batch), train=False)
    level_shapes, num_anchors = outputs.level_shapes, model.num_anchors
    return postprocess_detections(
        split_levels(outputs.class_logits, level_shapes, num_anchors),
        split_levels(outputs.box_regression, level_shapes, num_anchors),
        split_levels(anchors, level_shapes, num_anchors),
        jnp.asarray(batch.image_sizes),
    )
