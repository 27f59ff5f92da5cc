"""configs/coco.py: its pairs, the 1x schedule, the converted teachers it restores, and its
smoke run through the whole trainer on tests/coco_records.py's hand-made TFDS records."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from coco_records import mock_reader

from configs import coco
from mokd_jax import config_checks, identities, normalization, optimizers, train
from mokd_jax.detection import coco_categories, convert_retinanet, phases
from mokd_jax.networks import build_detection_networks

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


@pytest.mark.slow
def test_smoke_runs_on_hand_made_coco_records(tmp_path):
    """The whole detection trainer on TFDS coco/2017 (six records per split, 32 px,
    multi-scale): summary.json with both networks' AP."""
    config = coco.get_config("smoke")
    with tfds.testing.mock_data(as_dataset_fn=mock_reader):
        summary = train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["dataset"] == "coco/2017"
    for role in ("teacher", "student"):
        for key in phases.COCO_KEYS:
            assert -1.0 <= summary[role][key] <= 1.0, (role, key)
