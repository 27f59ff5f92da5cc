"""The benchmark configs (CIFAR-100, ImageNet): their recipes, their smoke runs under
tfds.testing.mock_data (no network, nothing downloaded), and the schedule / mixing / bf16
options they use."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar100, default, imagenet
from mokd_jax import checkpoint, config_checks, models, train


@pytest.mark.parametrize(
    "module, pair",
    [(cifar100, p) for p in cifar100.PAIRS] + [(imagenet, p) for p in imagenet.PAIRS],
)
def test_every_pair_is_a_valid_config_of_registered_models(module, pair):
    config = module.get_config(pair)
    config_checks.check_config(config)
    assert (config.teacher.model, config.student.model) == module.PAIRS[pair]
    assert {config.teacher.model, config.student.model} <= set(models.NAMES)


def test_imagenet_default_is_the_torchvision_recipe():
    config = imagenet.get_config()
    steps_per_epoch = 1_281_167 // 256
    assert (config.teacher.model, config.student.model) == ("resnet34", "resnet18")
    assert config.batch_size == 256 and config.student.learning_rate == pytest.approx(0.1)
    assert config.student.optimizer == "sgd" and config.student.weight_decay == 1e-4
    assert config.student.num_train_steps == 100 * steps_per_epoch
    assert config.student.decay_boundaries == tuple(e * steps_per_epoch for e in (30, 60, 90))


def test_imagenet_deit_pairs_use_the_deit_recipe():
    config = imagenet.get_config("regnety160_deit_small")
    assert config.recipe == "deit" and config.student.optimizer == "adamw"
    assert config.student.learning_rate == pytest.approx(1e-3)
    assert config.student.weight_decay == 0.05 and config.student.schedule == "cosine"
    assert (config.augment.mixup_alpha, config.augment.cutmix_alpha) == (0.8, 1.0)
    assert config.augment.label_smoothing == 0.1


def test_cifar100_recipe():
    config = cifar100.get_config("vgg13_vgg8")
    steps_per_epoch = 50_000 // 64
    assert config.student.learning_rate == 0.05 and config.student.weight_decay == 5e-4
    assert config.student.num_train_steps == 240 * steps_per_epoch
    assert config.student.decay_boundaries == tuple(e * steps_per_epoch for e in (150, 180, 210))
    assert cifar100.get_config("resnet50_mobilenet_v2").student.learning_rate == 0.01


@pytest.mark.parametrize("arg", ["resnet18", "smoke,smoke,x", "resnet34_resnet18,vgg13_vgg8"])
def test_unknown_config_arg_lists_the_allowed_ones(arg):
    with pytest.raises(ValueError, match="resnet34_resnet18.*smoke"):
        imagenet.get_config(arg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, arg",
    [(cifar100, "smoke"), (imagenet, "smoke"), (imagenet, "regnety160_deit_tiny,smoke")],
)
def test_smoke_runs_under_mock_data(module, arg, tmp_path):
    """The whole trainer on the TFDS pipeline (the DeiT arg adds RandAugment, Mixup, CutMix
    and label smoothing), with mock examples: summary.json as for the default run.

    48 examples are more than a phase's 4 steps of 8 read, so no epoch is rebuilt during a
    phase: TFDS's mock swaps the file system (process-wide) while it builds a dataset, which
    would send an asynchronous Orbax save running at that moment into its fake folder.
    """
    config = module.get_config(arg)
    with tfds.testing.mock_data(num_examples=48):
        summary = train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["dataset"] == config.dataset
    for role in ("teacher", "student"):
        assert 0 <= summary[role]["test_accuracy"] <= summary[role]["test_top5_accuracy"] <= 1
    assert np.isfinite(summary["training_diagnostics"]["loss_task"])
    assert os.path.isdir(tmp_path / "checkpoints" / "student")


@pytest.mark.slow
def test_bfloat16_run_keeps_float32_parameters(tmp_path):
    config = default.get_config("smoke")
    config.dtype = "bfloat16"
    config.teacher.num_train_steps = config.student.num_train_steps = 4
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(summary["training_diagnostics"]["loss_distill"])
    exported = checkpoint.load_variables(str(tmp_path / "student"))
    assert {leaf.dtype for leaf in jax.tree.leaves(exported)} == {jnp.dtype(jnp.float32)}
