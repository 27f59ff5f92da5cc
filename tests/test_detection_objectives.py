"""The detection loss vector (mokd_jax.detection.objectives) on hand-made head outputs: the
sigmoid KD against its float64 definition and its gradient against the cross-entropy's,
the foreground cells and the location weights by hand (padding left out), the weighted
feature distance, the K = 2 and K = 3 vectors part by part, the teacher's class columns,
and the input errors. No network
is built: everything runs on random arrays of a 64 x 64 image's anchors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mokd_jax import objectives
from mokd_jax.detection import objectives as detection_objectives
from mokd_jax.detection.anchors import retinanet_anchors
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.detection.losses import retinanet_losses
from mokd_jax.detection.matching import match_batch
from mokd_jax.detection.retinanet import RetinaNetOutputs, pyramid_shapes
from mokd_jax.errors import InputError

SIDE = 64
CLASSES = 3
LEVEL_SHAPES = pyramid_shapes(SIDE, SIDE)  # 8x8, 4x4, 2x2, 1x1, 1x1
ANCHORS = retinanet_anchors((SIDE, SIDE))  # 9 per location: 774


def distill_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        {"temperature": 2.0, "task_weight": 0.5, "logit_weight": 3.0, "feature_weight": 7.0,
         "objectives": "merged", "logit_loss": "kd", "foreground_weight": 0.0}
    )  # fmt: skip
    config.update(overrides)
    return config


def detection_batch() -> DetectionBatch:
    """Two images: three real boxes and a padding row in the first, no box in the second
    (its KD is then normalised by 1)."""
    boxes = np.float32(
        [[[4, 6, 30, 40], [30, 30, 62, 50], [8, 8, 16, 16], [0, 0, 64, 64]], [[0, 0, 0, 0]] * 4]
    )
    return DetectionBatch(
        images=np.zeros((2, SIDE, SIDE, 3), np.uint8),
        boxes=boxes,
        labels=np.int32([[0, 2, 1, 1], [0, 0, 0, 0]]),
        box_mask=np.array([[True, True, True, False], [False] * 4]),
        image_ids=np.int64([1, 2]),
        scales=np.ones(2, np.float32),
        image_sizes=np.int32([[SIDE, SIDE], [SIDE, SIDE]]),
        example_mask=np.ones(2, bool),
    )


def random_logits(rng, classes=CLASSES, scale=3.0, shift=-2.0) -> np.ndarray:
    return (rng.normal(size=(2, len(ANCHORS), classes)) * scale + shift).astype(np.float32)


def student_outputs(rng) -> RetinaNetOutputs:
    """What the head and the FPN give, at random: the features are not read by the loss
    vector (the projections are), only the level shapes."""
    return RetinaNetOutputs(
        class_logits=jnp.asarray(random_logits(rng)),
        box_regression=jnp.asarray(rng.normal(0, 0.5, (2, len(ANCHORS), 4)), jnp.float32),
        features={},
        level_shapes=LEVEL_SHAPES,
    )


def random_projections(rng) -> list[tuple[jax.Array, jax.Array]]:
    """One (projected student, teacher target) pair [2, H, W, 6] per level."""
    return [
        tuple(jnp.asarray(rng.normal(size=(2, h, w, 6)), jnp.float32) for _ in range(2))
        for h, w in LEVEL_SHAPES
    ]


def numpy_sigmoid_kd(student, teacher, foreground, temperature) -> float:
    """T^2 x the binary KL summed over anchors and classes, per max(1, foreground), in
    float64 from the definition."""
    sigmoid = lambda x: 1 / (1 + np.exp(-np.float64(x) / temperature))  # noqa: E731
    p, q = sigmoid(teacher), sigmoid(student)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return temperature**2 * np.mean(kl.sum(axis=(1, 2)) / np.maximum(1, foreground))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sigmoid_kd_matches_its_definition(temperature):
    rng = np.random.default_rng(0)
    student, teacher = random_logits(rng), random_logits(rng)
    foreground = np.array([7, 0])
    value = detection_objectives.sigmoid_kd(student, teacher, foreground, temperature)
    expected = numpy_sigmoid_kd(student, teacher, foreground, temperature)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_sigmoid_kd_is_zero_at_the_teacher_with_the_cross_entropys_gradient():
    """The value is the KL (0 when the student matches the teacher, where the cross-entropy
    against the teacher's probabilities would be their entropy, far from 0), and the
    gradient the cross-entropy's."""
    rng = np.random.default_rng(1)
    student, teacher = jnp.asarray(random_logits(rng)), jnp.asarray(random_logits(rng))
    foreground, temperature = jnp.array([5, 2]), 2.0
    at_teacher = detection_objectives.sigmoid_kd(teacher, teacher, foreground, temperature)
    assert abs(float(at_teacher)) < 1e-3

    def cross_entropy(logits):
        targets = jax.nn.sigmoid(teacher / temperature)
        summed = optax.sigmoid_binary_cross_entropy(logits / temperature, targets).sum((1, 2))
        return temperature**2 * (summed / foreground).mean()

    assert float(cross_entropy(teacher)) > 100.0
    gradient = jax.grad(detection_objectives.sigmoid_kd)(student, teacher, foreground, temperature)
    np.testing.assert_allclose(gradient, jax.grad(cross_entropy)(student), rtol=1e-5, atol=1e-7)


def test_cells_touching_boxes_by_hand():
    """P3 (stride 8) of a 64 x 64 image: cell (i, j) is pixels [8j, 8j + 8) x [8i, 8i + 8).
    The box [4, 6, 30, 40] touches columns 0-3 and rows 0-4; [8, 8, 16, 16] exactly cell
    (1, 1) (edges do not count); the padding row, the whole image, none."""
    batch = detection_batch()
    touched = detection_objectives.cells_touching_boxes(
        batch.boxes[:, [0, 2, 3]], batch.box_mask[:, [0, 2, 3]], (8, 8), 8
    )
    expected = np.zeros((2, 8, 8), bool)
    expected[0, 0:5, 0:4] = True
    assert np.array_equal(touched, expected)
    single = detection_objectives.cells_touching_boxes(
        batch.boxes[:, 2:3], batch.box_mask[:, 2:3], (8, 8), 8
    )
    assert np.argwhere(single).tolist() == [[0, 1, 1]]


def test_a_box_smaller_than_a_cell_still_marks_one_cell_on_the_coarsest_level():
    boxes = jnp.float32([[[40, 40, 44, 44]]])
    touched = detection_objectives.cells_touching_boxes(boxes, jnp.array([[True]]), (1, 1), 128)
    assert touched.tolist() == [[[True]]]


def sorted_weights(weight_counts: dict[float, int]) -> np.ndarray:
    return np.sort(
        np.concatenate([np.full(count, value) for value, count in weight_counts.items()])
    )


def test_feature_location_weights_by_hand():
    """w = 3: the image's cells touching a box weigh 4, its others 1, the padding 0, all
    divided by the level's mean. The first image (64 x 64) has boxes that touch 38 of P3's
    64 cells, 13 of P4's 16 and every cell of P5-P7; the second, 40 x 56 in its padding,
    has no box, and covers 5 x 7 of P3's cells, 3 x 4 of P4's and all of the others'."""
    batch = detection_batch()._replace(image_sizes=np.int32([[SIDE, SIDE], [40, 56]]))
    weights = jax.jit(detection_objectives.feature_location_weights, static_argnums=(1, 2))(
        batch, LEVEL_SHAPES, 3.0
    )
    assert [w.shape for w in weights] == [(2, h, w) for h, w in LEVEL_SHAPES]
    counts = zip(weights, (38, 13, 4, 1, 1), (35, 12, 4, 1, 1), strict=True)
    for level_weights, touched, in_image in counts:
        cells = level_weights[0].size
        mean = (4.0 * touched + (cells - touched)) / cells
        expected = sorted_weights({1.0 / mean: cells - touched, 4.0 / mean: touched})
        np.testing.assert_allclose(np.sort(level_weights[0], axis=None), expected, rtol=1e-6)
        expected = sorted_weights({0.0: cells - in_image, cells / in_image: in_image})
        np.testing.assert_allclose(np.sort(level_weights[1], axis=None), expected, rtol=1e-6)


def test_a_padding_row_without_an_image_weighs_nothing():
    batch = detection_batch()._replace(image_sizes=np.int32([[SIDE, SIDE], [0, 0]]))
    weights = jax.jit(detection_objectives.feature_location_weights, static_argnums=(1, 2))(
        batch, LEVEL_SHAPES, 0.0
    )
    for level_weights in weights:
        np.testing.assert_array_equal(level_weights[0], 1.0)
        np.testing.assert_array_equal(level_weights[1], 0.0)


def location_huber(student, target) -> np.ndarray:
    """The Huber (delta 1) distance of each location, its mean over the last axis, float64."""
    difference = np.abs(np.float64(student) - np.float64(target))
    return np.where(difference <= 1, 0.5 * difference**2, difference - 0.5).mean(-1)


def test_weighted_feature_distance_is_the_weighted_mean_of_the_location_distances():
    rng = np.random.default_rng(2)
    student, target = (jnp.asarray(rng.normal(size=(2, 3, 4, 5)) * 2, jnp.float32) for _ in "ab")
    weights = jnp.asarray(rng.uniform(0.5, 2.0, (2, 3, 4)), jnp.float32)
    weights = weights / weights.mean()
    huber = location_huber(student, target)
    value = objectives.feature_distance(student, target, weights)
    np.testing.assert_allclose(float(value), (huber * np.float64(weights)).mean(), rtol=1e-5)
    uniform = objectives.feature_distance(student, target, jnp.ones((2, 3, 4)))
    unweighted = objectives.feature_distance(student, target)
    # float32: summed in another order, so equal up to a rounding or two
    np.testing.assert_allclose(float(uniform), float(unweighted), rtol=1e-6)


@functools.cache
def loss_vector(teacher_classes=None, **overrides):
    """`detection_loss_vector` for a 64 x 64 batch with the l1 box loss and the
    `distill_config(**overrides)`, jitted (seconds faster than op by op) and kept for the
    tests that share it: (student, teacher_logits, projections, batch) -> (losses, parts)."""
    config = distill_config(**overrides)

    def losses(student, teacher_logits, projections, batch):
        return detection_objectives.detection_loss_vector(
            student, teacher_logits, projections, batch, ANCHORS, config,
            box_loss="l1", teacher_classes=teacher_classes,
        )  # fmt: skip

    return jax.jit(losses)


@jax.jit
def detection_losses_and_foreground(student, batch):
    """RetinaNet's losses and each image's foreground anchors, as the losses match them."""
    detection = retinanet_losses(
        student.class_logits,
        student.box_regression,
        ANCHORS,
        batch.boxes,
        batch.labels,
        batch.box_mask,
        "l1",
    )
    return detection, (match_batch(ANCHORS, batch.boxes, batch.box_mask) >= 0).sum(-1)


def reference_parts(student, teacher_logits, projections, batch, config):
    """The loss vector's parts from their reference pieces."""
    detection, foreground = detection_losses_and_foreground(student, batch)
    logit = numpy_sigmoid_kd(
        np.asarray(student.class_logits), teacher_logits, foreground, config.temperature
    )
    feature = np.mean([float(objectives.feature_distance(*pair)) for pair in projections])
    return float(detection["classification"]), float(detection["box"]), logit, feature


@pytest.mark.parametrize("mode", ["merged", "separate"])
def test_the_loss_vector_weighs_its_parts(mode):
    """K = 2: [task_weight (classification + box), logit_weight kd_logit + feature_weight
    kd_feature]; K = 3 keeps the two distillation terms apart."""
    rng = np.random.default_rng(3)
    student, teacher_logits = student_outputs(rng), random_logits(rng)
    projections, batch = random_projections(rng), detection_batch()
    config = distill_config(objectives=mode)
    losses, parts = loss_vector(objectives=mode)(student, teacher_logits, projections, batch)
    classification, box, logit, feature = reference_parts(
        student, teacher_logits, projections, batch, config
    )
    got = [float(parts[name]) for name in ("classification", "box", "kd_logit", "kd_feature")]
    np.testing.assert_allclose(got, [classification, box, logit, feature], rtol=1e-5)
    task = 0.5 * (classification + box)
    expected = [task, 3.0 * logit + 7.0 * feature] if mode == "merged" else [
        task, 3.0 * logit, 7.0 * feature
    ]  # fmt: skip
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_the_foreground_weight_reweighs_the_feature_loss_only():
    rng = np.random.default_rng(4)
    student, teacher_logits = student_outputs(rng), random_logits(rng)
    projections, batch = random_projections(rng), detection_batch()
    args = (student, teacher_logits, projections, batch)
    _, uniform = loss_vector()(*args)
    _, weighted = loss_vector(foreground_weight=2.0)(*args)
    weights = jax.jit(detection_objectives.feature_location_weights, static_argnums=(1, 2))(
        batch, LEVEL_SHAPES, 2.0
    )
    expected = np.mean(
        [
            (location_huber(*pair) * np.asarray(level_weights)).mean()
            for pair, level_weights in zip(projections, weights, strict=True)
        ]
    )
    np.testing.assert_allclose(float(weighted["kd_feature"]), expected, rtol=1e-6)
    assert abs(float(weighted["kd_feature"]) - float(uniform["kd_feature"])) > 1e-4
    for name in ("classification", "box", "kd_logit"):
        assert float(weighted[name]) == float(uniform[name])


def test_the_padding_takes_no_part_in_the_feature_loss():
    """Whatever the student's projections on the second image's padding (it is 40 x 56),
    the feature loss stays; inside the image, it changes."""
    rng = np.random.default_rng(7)
    student, teacher_logits, projections = (
        student_outputs(rng),
        random_logits(rng),
        random_projections(rng),
    )
    batch = detection_batch()._replace(image_sizes=np.int32([[SIDE, SIDE], [40, 56]]))
    compute = loss_vector()
    _, parts = compute(student, teacher_logits, projections, batch)

    def shifted(rows, columns):
        """P3's projected student with 5 added on the second image's rows x columns."""
        changed = list(projections)
        changed[0] = (projections[0][0].at[1, rows, columns].add(5.0), projections[0][1])
        return compute(student, teacher_logits, changed, batch)[1]["kd_feature"]

    assert float(shifted(slice(5, None), slice(None))) == float(parts["kd_feature"])
    assert float(shifted(slice(None), slice(7, None))) == float(parts["kd_feature"])
    assert float(shifted(slice(4, 5), slice(6, 7))) > float(parts["kd_feature"])


def test_teacher_classes_pick_the_teachers_columns():
    """A 6-class teacher whose columns 5, 0 and 3 are the student's classes 0, 1, 2 (as a
    91-class COCO teacher's category ids are a dataset's labels)."""
    rng = np.random.default_rng(5)
    student, projections, batch = student_outputs(rng), random_projections(rng), detection_batch()
    teacher_logits = random_logits(rng, classes=6)
    _, parts = loss_vector(teacher_classes=(5, 0, 3))(student, teacher_logits, projections, batch)
    _, _, expected, _ = reference_parts(
        student, teacher_logits[..., [5, 0, 3]], projections, batch, distill_config()
    )
    np.testing.assert_allclose(float(parts["kd_logit"]), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "teacher_classes, teacher_count, message",
    [
        (None, 6, r"teacher_classes=None is not allowed: the teacher's column of each of the "
                  r"student's 3 classes, since the teacher has 6"),
        ((5, 0), 6, r"teacher_classes=\(5, 0\) is not allowed: 3 indices .* in \[0, 6\)"),
        ((5, 0, 6), 6, r"teacher_classes=\(5, 0, 6\) is not allowed: 3 indices"),
        ((0, -1, 2), 3, r"teacher_classes=\(0, -1, 2\) is not allowed"),
    ],
)  # fmt: skip
def test_bad_teacher_classes_are_refused(teacher_classes, teacher_count, message):
    teacher_logits = jnp.zeros((2, 4, teacher_count))
    with pytest.raises(InputError, match=message):
        detection_objectives.select_teacher_classes(teacher_logits, teacher_classes, CLASSES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"logit_loss": "dkd"}, r"distill.logit_loss='dkd' is not allowed: 'kd' for detection"),
        ({"foreground_weight": -1.0}, r"distill.foreground_weight=-1.0 is not allowed: .* >= 0"),
    ],
)
def test_a_bad_distillation_setting_is_refused(overrides, message):
    rng = np.random.default_rng(6)
    with pytest.raises(InputError, match=message):
        detection_objectives.detection_loss_vector(
            student_outputs(rng), random_logits(rng), random_projections(rng),
            detection_batch(), ANCHORS, distill_config(**overrides), box_loss="l1",
        )  # fmt: skip
