"""The detection steps (mokd_jax.detection.steps) on resnet18 RetinaNets at 64 x 64 px, batch
2: the inputs' padding against torchvision's transform, the networks from a config, the
split of the student (C5 first), the evaluation step's shapes, each way of driving an
aggregator through the trainer's own distillation step (`mokd_jax.steps.distill_step` with
the detection task), K = 3 among them, the summed step against `sum`, and the teacher
step's loss going down.

One compilation of the detection distillation step takes 2-17 s on 2 CPU cores (the
per-objective methods the most, growing with K), and a RetinaNet's initialisation about
10 s, so every test that compiles a step or creates a state is slow; the fast tier traces
(`jax.eval_shape`) and checks inputs and configs. Initialisation draws its keys with 'rbg',
which compiles in a fraction of threefry's time (tests/test_detection_retinanet.py), and
the teacher is the student's network with its FPN and heads changed (`teacher_like`), which
needs no second initialisation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mokd_jax import aggregation, config_helpers, networks, optimizers, state, steps
from mokd_jax.detection import steps as detection_steps
from mokd_jax.detection.anchors import retinanet_anchors
from mokd_jax.detection.batch import DetectionBatch
from mokd_jax.errors import InputError
from mokd_jax.normalization import IMAGENET
from mokd_jax.objectives import objective_names

SIDE = 64
CLASSES = 3
IMAGE_SHAPE = (SIDE, SIDE, 3)
ANCHORS = retinanet_anchors((SIDE, SIDE))
TASK = functools.partial(detection_steps.detection_student_functions, anchors=ANCHORS)


def detection_config(**overrides):
    """The base config with the detection fields, resnet18 for both roles with the lightest
    heads (FPN and heads 8 channels wide, no conv before each head's output: what is
    tested does not depend on the widths, and the step compiles faster), a learning rate
    from the first step, and `overrides` (dotted keys)."""
    config = config_helpers.base_config()
    config_helpers.add_detection_fields(config, teacher="resnet18", student="resnet18")
    for role in ("teacher", "student"):
        config[role].fpn_width = 8
        config[role].head_depth = 0
    config.student.warmup_steps = 0
    config.student.learning_rate = 1e-4
    config.update_from_flattened_dict(overrides)
    return config


def detection_batch() -> DetectionBatch:
    """Random images, the second 56 x 48 inside its 64 x 64 padding (zeros, as the datasets
    pad), with three and one real boxes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, SIDE, SIDE, 3), dtype=np.uint8)
    images[1, 56:] = 0
    images[1, :, 48:] = 0
    return DetectionBatch(
        images=images,
        boxes=np.float32(
            [
                [[4, 6, 30, 40], [30, 30, 62, 50], [8, 8, 24, 20]],
                [[10, 10, 44, 40], [0, 0, 0, 0], [0, 0, 0, 0]],
            ]
        ),
        labels=np.int32([[0, 2, 1], [1, 0, 0]]),
        box_mask=np.array([[True, True, True], [True, False, False]]),
        image_ids=np.int64([1, 2]),
        scales=np.ones(2, np.float32),
        image_sizes=np.int32([[SIDE, SIDE], [56, 48]]),
        example_mask=np.ones(2, bool),
    )


@pytest.fixture(scope="module")
def nets() -> networks.DetectionNetworks:
    return networks.build_detection_networks(
        detection_config(), CLASSES, teacher_input=IMAGENET, student_input=IMAGENET
    )


def create_student_state(nets: networks.DetectionNetworks, key: jax.Array) -> state.TrainState:
    """A fresh student (and projectors) with a placeholder optimizer: each test sets its own
    (`with_optimizer`)."""
    return state.create_student_state(
        nets, IMAGE_SHAPE, optax.identity(), key, example_features=detection_steps.example_pyramid
    )


@pytest.fixture(scope="module")
def student_state(nets) -> state.TrainState:
    return jax.jit(functools.partial(create_student_state, nets))(jax.random.key(0, impl="rbg"))


@jax.jit
def teacher_like(student_state: state.TrainState) -> dict:
    """A different detector of the student's shape: its FPN and heads scaled by 1.1, and its
    class logits' bias raised by 3, so that its scores (about 0.17 at the start) pass the
    post-processing's 0.05 threshold."""
    params = {
        name: module if name == "body" else jax.tree.map(lambda leaf: 1.1 * leaf, module)
        for name, module in student_state.params["student"].items()
    }
    cls_logits = params["classification_head"]["cls_logits"]
    cls_logits["bias"] = cls_logits["bias"] + 3.0
    return {"params": params, "batch_stats": student_state.batch_stats}


@pytest.fixture(scope="module")
def teacher_variables(student_state) -> dict:
    return teacher_like(student_state)


def with_optimizer(student_state: state.TrainState, tx) -> state.TrainState:
    return student_state.replace(opt_state=jax.jit(tx.init)(student_state.params))


def changed(before, after) -> bool:
    return any(
        not np.array_equal(b, a)
        for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def test_the_padding_is_zero_after_normalising_as_in_torchvision():
    """`model_inputs` equals torchvision's GeneralizedRCNNTransform normalising each image
    at its own size and then batching with zero padding (the transform's resize left out:
    the images are already at their model size)."""
    torch = pytest.importorskip("torch")
    from torchvision_shim import import_torchvision

    import_torchvision()
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    batch = detection_batch()
    transform = GeneralizedRCNNTransform(SIDE, SIDE, list(IMAGENET.mean), list(IMAGENET.std))
    images = [
        torch.from_numpy(image[:height, :width]).permute(2, 0, 1).float() / 255
        for image, (height, width) in zip(batch.images, batch.image_sizes, strict=True)
    ]
    expected = transform.batch_images([transform.normalize(image) for image in images])
    inputs = detection_steps.model_inputs(IMAGENET, batch)
    np.testing.assert_allclose(inputs, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    assert float(jnp.abs(inputs[1, 56:]).max()) == 0.0  # not the normalised black


def test_networks_from_a_config_with_a_coco_teacher():
    """A 91-class teacher indexed by COCO category id, for a dataset of 3 classes."""
    config = detection_config(
        **{"teacher.num_classes": 91, "teacher.variant": "v2", "student.box_loss": "giou"}
    )
    config.distill.teacher_classes = (1, 3, 7)
    built = networks.build_detection_networks(
        config, CLASSES, teacher_input=IMAGENET, student_input=IMAGENET
    )
    assert (built.teacher.num_classes, built.teacher.variant) == (91, "v2")
    assert (built.student.num_classes, built.student.variant) == (CLASSES, "v1")
    assert built.teacher_classes == (1, 3, 7) and built.box_loss == "giou"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"teacher.model": "vgg13"}, r"teacher.model='vgg13' is not allowed: one of resnet18"),
        ({"student.variant": "v3"}, r"student.variant='v3' is not allowed: one of v1, v2"),
        ({"student.box_loss": "l2"}, r"student.box_loss='l2' is not allowed: one of l1, "),
        ({"teacher.num_classes": -1}, r"teacher.num_classes=-1 is not allowed: an integer >= 0"),
        ({"teacher.num_classes": 91}, r"distill.teacher_classes=\(\) is not allowed: the "
                                      r"teacher's column of each of the student's 3 classes"),
        ({"distill.teacher_classes": (0, 3, 1)},
         r"distill.teacher_classes=\(0, 3, 1\) is not allowed: 3 indices .* in \[0, 3\)"),
    ],
)  # fmt: skip
def test_a_bad_detection_config_is_refused(overrides, message):
    with pytest.raises(InputError, match=message):
        networks.build_detection_networks(
            detection_config(**overrides), CLASSES, teacher_input=IMAGENET, student_input=IMAGENET
        )


def test_the_students_taps_are_its_backbone_outputs_c5_first(nets):
    """GradDrop's representation is the first tap: C5 (512 channels at stride 32), then C3
    and C4. Traced only, the networks' creation included."""
    config = detection_config()

    def taps(key, batch):
        student_state = create_student_state(nets, key)
        encode, _ = TASK(
            student_state, teacher_like(student_state), batch, networks=nets, distill=config.distill
        )
        return encode(student_state.params["student"])[0]

    shapes = jax.eval_shape(taps, jax.random.key(0), detection_batch())
    assert [shape.shape for shape in shapes] == [(2, 2, 2, 512), (2, 8, 8, 128), (2, 4, 4, 256)]


@pytest.mark.slow  # initialises a RetinaNet and compiles the evaluation step (10-20 s)
def test_detect_returns_fixed_size_detections_inside_each_image(nets, teacher_variables):
    """On the teacher-like network (a fresh network's scores, the prior's 0.01, are all
    below the 0.05 score threshold: it would detect nothing)."""
    detect = jax.jit(
        functools.partial(
            detection_steps.detect, model=nets.student, inputs=IMAGENET, anchors=ANCHORS
        )
    )
    detections = detect(teacher_variables, detection_batch())
    assert detections.boxes.shape == (2, 100, 4)
    assert detections.scores.shape == detections.labels.shape == detections.valid.shape == (2, 100)
    assert bool(detections.valid.any())
    valid = np.asarray(detections.valid)
    boxes = np.asarray(detections.boxes)
    assert np.all(boxes[1][valid[1]][:, [2, 3]] <= [48, 56])  # clipped to the 56 x 48 image
    assert np.all((np.asarray(detections.labels) >= 0) & (np.asarray(detections.labels) < CLASSES))


THREE_OBJECTIVES = {"distill.objectives": "separate", "distill.foreground_weight": 1.0}
DRIVE_EXAMPLES = (("mokd", {}), ("famo", THREE_OBJECTIVES), ("graddrop", {}))
"""One method per way the step drives an aggregator (`AggregatorSpec.drive`): per-objective
rows, one weighted row, the objectives combined at the representation, each with the
config overrides it runs on. The detection task changes only the functions the step
differentiates, not how an aggregator is driven or what it computes from the rows, so these
three cover it; every registered method goes through the same step with the classification
task (tests/test_steps.py). A detection step compiles for 2-7 s on 2 cores, so a sweep
over all of them would cost minutes. The three objectives (K = 3) run through the weighted
row (famo) rather than the per-objective rows: K per-objective pullbacks make the program K
times as long, and its compilation took 17 s for K = 3 against 6.5 s for mokd with K = 2
and 1.8 s for famo with K = 3; the rows themselves do not depend on K or on the task
(K = 3 per-objective rows: tests/test_steps.py's three-objective test)."""


@pytest.mark.slow  # one compilation of the detection distillation step per method
@pytest.mark.parametrize("name, overrides", DRIVE_EXAMPLES)
def test_each_way_of_driving_an_aggregator_runs_through_the_detection_distill_step(
    name, overrides, nets, student_state, teacher_variables
):
    """The trainer's own step with the detection task, jitted: the student moves, the
    teacher's variables and the frozen backbone statistics do not, every metric is finite,
    each objective's loss and weight and each loss part are logged, and the conflict
    diagnostics (the task's cosine with every other objective) exist exactly for the
    methods given the per-objective gradients. With three objectives the feature loss is
    the feature part scaled by its weight."""
    config = detection_config(aggregator=name, **overrides)
    if aggregation.spec(name).owns_momentum:
        config.student.optimizer = "sgd"
    tx = optimizers.student_optimizer(config)
    before = with_optimizer(student_state, tx)
    teacher_before = jax.tree.map(np.array, teacher_variables)
    step = jax.jit(steps.make_distill_step(config, nets, tx, task=TASK))
    after, metrics = step(before, teacher_variables, detection_batch())

    assert changed(before.params["student"], after.params["student"])
    jax.tree.map(np.testing.assert_array_equal, teacher_before, teacher_variables)
    jax.tree.map(np.testing.assert_array_equal, before.batch_stats, after.batch_stats)
    assert all(np.isfinite(float(value)) for value in metrics.values()), metrics
    names = objective_names(config.distill)
    parts = {f"loss_{part}" for part in ("classification", "box", "kd_logit", "kd_feature")}
    logged = {f"{kind}_{objective}" for kind in ("loss", "weight") for objective in names}
    assert logged | parts <= set(metrics)
    per_objective = aggregation.spec(name).drive == aggregation.PER_OBJECTIVE
    cosines = {f"cos_task_{objective}" for objective in names[1:]}
    assert (cosines <= set(metrics)) == per_objective
    if "feature" in names:
        assert float(metrics["loss_feature"]) == pytest.approx(
            float(metrics["loss_kd_feature"]) * config.distill.feature_weight, rel=1e-6
        )


@pytest.mark.slow  # compiles two steps
def test_the_summed_step_equals_the_sum_aggregator(nets, student_state, teacher_variables):
    """One backward of the summed losses (`summed_distill_step`) and the K rows summed by
    `sum` give the same update, with plain SGD after them."""
    config = detection_config(aggregator="sum", **{"student.optimizer": "sgd"})
    aggregated_tx, plain_tx = (
        optimizers.student_optimizer(config),
        optimizers.make_optimizer(config.student),
    )
    batch = detection_batch()
    aggregated = jax.jit(steps.make_distill_step(config, nets, aggregated_tx, task=TASK))
    summed = jax.jit(
        functools.partial(
            steps.summed_distill_step, networks=nets, tx=plain_tx, distill=config.distill, task=TASK
        )
    )
    before = student_state.params
    by_sum, sum_metrics = aggregated(
        with_optimizer(student_state, aggregated_tx), teacher_variables, batch
    )
    by_one_backward, metrics = summed(
        with_optimizer(student_state, plain_tx), teacher_variables, batch
    )

    def update(after):
        return jnp.concatenate(
            [
                (a - b).ravel()
                for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
            ]
        )

    reference = update(by_sum.params)
    difference = jnp.linalg.norm(update(by_one_backward.params) - reference)
    assert float(difference) <= 1e-4 * float(jnp.linalg.norm(reference))
    assert "cos_task_distill" in sum_metrics  # per-objective rows, K = 2
    total = float(sum_metrics["loss_task"] + sum_metrics["loss_distill"])
    assert float(metrics["loss"]) == pytest.approx(total, rel=1e-6)


@pytest.mark.slow  # compiles the teacher step (about 10 s)
def test_the_teacher_step_lowers_the_detection_loss(nets, student_state):
    """Five plain gradient-descent steps on one batch, from the student's initial network:
    the loss falls every step, and the backbone's frozen statistics stay. The step size,
    1e-3, is a third of one at which this light head's loss already rises once (Adam's
    steps of a fixed size overshoot it too, even at 1e-5)."""
    tx = optax.sgd(1e-3)
    params = student_state.params["student"]
    teacher = state.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=student_state.batch_stats,
        constants={},
        opt_state=jax.jit(tx.init)(params),
    )
    step = jax.jit(
        functools.partial(
            detection_steps.detection_teacher_step,
            model=nets.teacher,
            tx=tx,
            inputs=IMAGENET,
            anchors=ANCHORS,
            box_loss="l1",
        )
    )
    batch, losses = detection_batch(), []
    for _ in range(5):
        teacher, metrics = step(teacher, batch)
        assert set(metrics) == {"loss", "loss_classification", "loss_box"}
        losses.append(float(metrics["loss"]))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert int(teacher.step) == 5
    jax.tree.map(np.testing.assert_array_equal, teacher.batch_stats, student_state.batch_stats)
