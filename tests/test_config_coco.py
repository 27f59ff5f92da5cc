"""configs/coco.py: its pairs, the 1x schedule, the converted teachers it restores, and its
smoke run through the whole trainer on tests/coco_records.py's hand-made TFDS records."""

import functools
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from coco_records import mock_reader

from configs import coco
from mokd_jax import (
    checkpoint,
    config_checks,
    convert,
    identities,
    models,
    normalization,
    optimizers,
    train,
)
from mokd_jax.detection import coco_categories, convert_retinanet, phases
from mokd_jax.networks import build_detection_networks
from mokd_jax.state import init_model

COCO_CLASSES = 80


@pytest.mark.parametrize("arg", [*coco.PAIRS, "smoke", "r101_r50,smoke"])
def test_every_pair_is_a_valid_detection_config(arg):
    config = coco.get_config(arg)
    config_checks.check_config(config)
    networks = build_detection_networks(  # checks the detection fields
        config,
        COCO_CLASSES,
        teacher_input=normalization.IMAGENET,
        student_input=normalization.IMAGENET,
    )
    assert config.task == "detection" and config.dataset == "coco/2017"
    if arg in coco.PAIRS:
        teacher, variant, student = coco.PAIRS[arg]
        assert (networks.teacher.backbone, networks.student.backbone) == (teacher, student)
        assert networks.teacher.variant == networks.student.variant == variant
        assert config.student.backbone_weights == f"backbones/{student}"


@pytest.mark.parametrize("pair", ["r50_r18", "r50_mobilenet_v2", "r50v2_r18"])
def test_a_converted_torchvision_teacher_is_the_configured_one(pair):
    """The identity `mokd-convert` saves passes the run's teacher check, and is the one the
    trainer exports its own RetinaNets with; the teacher's column of each class is its id."""
    config = coco.get_config(pair)
    arch = coco.TORCHVISION_TEACHERS[config.teacher.variant]
    assert config.teacher.checkpoint_dir == f"teachers/{arch}"
    converted = convert_retinanet.identity(arch, coco.COCO_CLASSES_BY_ID)
    inputs = identities.check_teacher_identity(converted, config, config.teacher.num_classes, "DIR")
    assert inputs == normalization.IMAGENET
    assert converted == phases.detector_identity(config, "teacher", coco.COCO_CLASSES_BY_ID, inputs)
    assert config.distill.teacher_classes == coco_categories.CATEGORY_IDS


def test_the_r101_teacher_is_trained_here_from_its_imagenet_backbone():
    config = coco.get_config("r101_r50")
    assert config.teacher.checkpoint_dir == "" and config.teacher.num_classes == 0
    assert config.teacher.backbone_weights == "backbones/resnet101"
    assert config.distill.teacher_classes == ()


def test_the_1x_schedule():
    config = coco.get_config()
    assert config.batch_size == 16 and config.student.weight_decay == 1e-4
    assert config.student.optimizer == "sgd"
    schedule = optimizers.learning_rate_schedule(config.student)
    steps = (0, 250, 500, 59_999, 60_000, 79_999, 80_000, 89_999)
    rates = [float(schedule(step)) for step in steps]
    expected = [0, 0.005, 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4]
    np.testing.assert_allclose(rates, expected, rtol=1e-5)
    assert config.student.num_train_steps == 90_000


def test_multi_scale_training_reaches_the_geometry():
    config = coco.get_config()
    assert phases.dataset_geometry(config, config.dataset).train_min_sizes == ()
    config.augment.train_min_sizes = coco.MULTI_SCALE_MIN_SIZES
    geometry = phases.dataset_geometry(config, config.dataset)
    assert (geometry.min_size, geometry.max_size) == (800, 1333)
    assert geometry.training_min_sizes == (640, 672, 704, 736, 768, 800)


@pytest.mark.parametrize("arg", ["r50_r18,r101_r50", "r50_r18,kd", "smoke,smoke", "r18"])
def test_an_unknown_config_arg_lists_the_allowed_ones(arg):
    with pytest.raises(ValueError, match="r50_r18, r50_mobilenet_v2, r50v2_r18, r101_r50.*smoke"):
        coco.get_config(arg)


def write_constant_classifier(directory: str) -> None:
    """A resnet18 classifier as `mokd-convert` writes one (variables and identity, ImageNet
    inputs), without torch: every parameter 0.01, every BatchNorm at mean 0, variance 1."""
    classifier = models.get("resnet18", 10)
    abstract = jax.eval_shape(
        functools.partial(init_model, classifier, (32, 32, 3)), jax.random.key(0)
    )

    def constant(path, leaf):
        value = {"mean": 0.0, "var": 1.0}.get(path[-1].key, 0.01)
        return np.full(leaf.shape, value, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(constant, abstract)
    convert.write(directory, variables, convert.identity("resnet18", 10))


@pytest.mark.slow
def test_smoke_runs_on_hand_made_coco_records_from_imagenet_backbones(tmp_path):
    """The whole detection trainer on TFDS coco/2017 (six records per split, 32 px,
    multi-scale), both networks starting from a converted classifier: summary.json with
    both networks' AP, and each exported detector's frozen backbone parts (the stem, every
    BatchNorm) still the classifier's."""
    backbone = str(tmp_path / "backbone")
    write_constant_classifier(backbone)
    config = coco.get_config("smoke")
    config.teacher.backbone_weights = config.student.backbone_weights = backbone
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(as_dataset_fn=mock_reader):
        summary = train.train_and_evaluate(config, str(workdir))
    with open(workdir / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["dataset"] == "coco/2017"
    classifier = checkpoint.load_variables(backbone)
    for role in ("teacher", "student"):
        for key in phases.COCO_KEYS:
            assert -1.0 <= summary[role][key] <= 1.0, (role, key)
        exported = checkpoint.load_variables(str(workdir / role))
        np.testing.assert_array_equal(
            exported["params"]["body"]["conv1"]["kernel"], classifier["params"]["conv1"]["kernel"]
        )
        jax.tree.map(
            np.testing.assert_array_equal,
            exported["batch_stats"]["body"],
            classifier["batch_stats"],
        )
