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
from mokd_jax import checkpoint, config_checks, config_helpers, models, recipes, train


@pytest.mark.parametrize(
    "module, pair",
    [(cifar100, p) for p in cifar100.PAIRS] + [(imagenet, p) for p in imagenet.PAIRS],
)
def test_every_pair_is_a_valid_config_of_registered_models(module, pair):
    config = module.get_config(pair)
    config_checks.check_config(config)
    assert (config.teacher.model, config.student.model) == module.PAIRS[pair]
    assert {config.teacher.model, config.student.model} <= set(models.NAMES)


CIFAR_STEPS = 50_000 // 64
IMAGENET_STEPS = 1_281_167 // 512
IMAGENET_SOLVER = {
    "batch_size": 512,
    "student.optimizer": "sgd",
    "student.learning_rate": 0.2,
    "student.weight_decay": 1e-4,
    "student.num_train_steps": 100 * IMAGENET_STEPS,
    "student.decay_boundaries": tuple(e * IMAGENET_STEPS for e in (30, 60, 90)),
}
SUMMED = {"aggregator": "sum", "aggregation.sum.weights": (1.0, 1.0)}
CIFAR_KD = {
    "distill.logit_loss": "kd",
    "distill.temperature": 4.0,
    "distill.task_weight": 0.1,
    "distill.logit_weight": 0.9,
    "distill.feature_weight": 0.0,
}
IMAGENET_KD = {
    **CIFAR_KD,
    "distill.temperature": 1.0,
    "distill.task_weight": 0.5,
    "distill.logit_weight": 0.5,
}


def cifar_solver(learning_rate):
    """SOLVER of every configs/cifar100/*.yaml; LR 0.01 in the *_shuv1, *_shuv2, *_mv2 ones."""
    return {
        "batch_size": 64,
        "student.optimizer": "sgd",
        "student.weight_decay": 5e-4,
        "student.learning_rate": learning_rate,
        "student.num_train_steps": 240 * CIFAR_STEPS,
        "student.decay_boundaries": tuple(e * CIFAR_STEPS for e in (150, 180, 210)),
    }


def cifar_dkd(beta, learning_rate):
    """engine/cfg.py CFG.DKD (CE 1, alpha 1, T 4, warm-up 20 epochs) with the pair's beta."""
    return {
        **cifar_solver(learning_rate),
        "aggregator": "sum",
        "aggregation.sum.weights": (1.0, 1.0),
        "distill.logit_loss": "dkd",
        "distill.temperature": 4.0,
        "distill.task_weight": 1.0,
        "distill.dkd_alpha": 1.0,
        "distill.dkd_beta": beta,
        "distill.feature_weight": 0.0,
        "distill.dkd_warmup_steps": 19 * CIFAR_STEPS,
    }


def imagenet_dkd(beta):
    """configs/imagenet/*/dkd.yaml: CE 1, T 1, warm-up 1 epoch (full from the first epoch)."""
    return {
        **cifar_dkd(beta, 0.2),
        **IMAGENET_SOLVER,
        "distill.temperature": 1.0,
        "distill.dkd_warmup_steps": 0,
    }


DOT = {"aggregator": "dot", "aggregation.dot.delta": 0.075}
REFERENCE = [  # (module, "PAIR,METHOD", expected fields); sources: mdistiller's files named
    # configs/cifar100/kd.yaml + engine/cfg.py CFG.KD
    (cifar100, "resnet32x4_resnet8x4,kd", {**cifar_solver(0.05), **CIFAR_KD, **SUMMED}),
    (cifar100, "resnet50_mobilenet_v2,kd", {**cifar_solver(0.01), **CIFAR_KD, **SUMMED}),
    # configs/cifar100/dkd/<pair>.yaml: BETA (none: cfg.py's 8.0), SOLVER.LR
    (cifar100, "resnet32x4_resnet8x4,dkd", cifar_dkd(8.0, 0.05)),  # res32x4_res8x4.yaml
    (cifar100, "resnet56_resnet20,dkd", cifar_dkd(2.0, 0.05)),  # res56_res20.yaml
    (cifar100, "resnet110_resnet32,dkd", cifar_dkd(2.0, 0.05)),  # res110_res32.yaml
    (cifar100, "wrn_40_2_wrn_16_2,dkd", cifar_dkd(6.0, 0.05)),  # wrn40_2_wrn_16_2.yaml
    (cifar100, "wrn_40_2_wrn_40_1,dkd", cifar_dkd(6.0, 0.05)),  # wrn40_2_wrn_40_1.yaml
    (cifar100, "vgg13_vgg8,dkd", cifar_dkd(6.0, 0.05)),  # vgg13_vgg8.yaml
    (cifar100, "resnet32x4_shufflenet_v1,dkd", cifar_dkd(8.0, 0.01)),  # res32x4_shuv1.yaml
    (cifar100, "wrn_40_2_shufflenet_v1,dkd", cifar_dkd(8.0, 0.01)),  # wrn40_2_shuv1.yaml
    (cifar100, "vgg13_mobilenet_v2,dkd", cifar_dkd(6.0, 0.01)),  # vgg13_mv2.yaml
    (cifar100, "resnet50_mobilenet_v2,dkd", cifar_dkd(8.0, 0.01)),  # res50_mv2.yaml
    (cifar100, "resnet32x4_shufflenet_v2,dkd", cifar_dkd(8.0, 0.01)),  # res32x4_shuv2.yaml
    # configs/cifar100/dot/res32x4_res8x4.yaml, res32x4_shuv2.yaml: KD distiller, DELTA 0.075
    (cifar100, "resnet32x4_resnet8x4,dot", {**cifar_solver(0.05), **CIFAR_KD, **DOT}),
    (cifar100, "resnet32x4_shufflenet_v2,dot", {**cifar_solver(0.01), **CIFAR_KD, **DOT}),
    # configs/imagenet/r34_r18/{kd,dkd,dot}.yaml, r50_mv1/{kd,dkd,dot}.yaml
    (imagenet, "resnet34_resnet18,kd", {**IMAGENET_SOLVER, **IMAGENET_KD, **SUMMED}),
    (imagenet, "resnet50_mobilenet_v1,kd", {**IMAGENET_SOLVER, **IMAGENET_KD, **SUMMED}),
    (imagenet, "resnet34_resnet18,dkd", imagenet_dkd(0.5)),
    (imagenet, "resnet50_mobilenet_v1,dkd", imagenet_dkd(2.0)),
    (imagenet, "resnet34_resnet18,dot",
     {**IMAGENET_SOLVER, **IMAGENET_KD, **DOT, "aggregation.dot.delta": 0.09}),
    (imagenet, "resnet50_mobilenet_v1,dot",
     {**IMAGENET_SOLVER, **IMAGENET_KD, **DOT, "aggregation.dot.delta": 0.09}),
    # mokd: the mokd aggregator on the KD recipe's losses, plus the feature loss
    (cifar100, "vgg13_vgg8,mokd",
     {**cifar_solver(0.05), **CIFAR_KD, "aggregator": "mokd", "distill.feature_weight": 1.0}),
    (imagenet, "resnet34_resnet18,mokd",
     {**IMAGENET_SOLVER, **IMAGENET_KD, "aggregator": "mokd", "distill.feature_weight": 1.0}),
    # DeiT's soft distillation (facebookresearch/deit main.py: alpha 0.5, tau 1.0)
    (imagenet, "regnety160_deit_tiny,kd", {**IMAGENET_KD, **SUMMED, "student.optimizer": "adamw"}),
]  # fmt: skip


def field(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return tuple(config) if isinstance(config, (list, tuple)) else config


@pytest.mark.parametrize("module, arg, expected", REFERENCE, ids=[r[1] for r in REFERENCE])
def test_each_method_runs_the_reference_recipe_of_its_pair(module, arg, expected):
    config = module.get_config(arg)
    config_checks.check_config(config)
    actual = {name: field(config, name) for name in expected}
    assert actual == pytest.approx(expected)


def test_no_method_is_mokd_on_the_kd_recipe():
    assert (
        cifar100.get_config("vgg13_vgg8").to_dict()
        == cifar100.get_config("vgg13_vgg8,mokd").to_dict()
    )
    assert imagenet.get_config().aggregator == "mokd"


@pytest.mark.parametrize("method", recipes.METHODS)
def test_every_method_is_a_valid_config_with_smoke(method):
    config = cifar100.get_config(f"resnet56_resnet20,{method},smoke")
    config_checks.check_config(config)
    assert config.student.num_train_steps == 4


def test_imagenet_deit_pairs_use_the_deit_recipe():
    config = imagenet.get_config("regnety160_deit_small")
    assert config.recipe == "deit" and config.student.optimizer == "adamw"
    assert config.student.learning_rate == pytest.approx(1e-3)
    assert config.student.weight_decay == 0.05 and config.student.schedule == "cosine"
    assert (config.augment.mixup_alpha, config.augment.cutmix_alpha) == (0.8, 1.0)
    assert config.augment.label_smoothing == 0.1


def test_dkd_warmup_reaches_the_full_loss_when_mdistillers_staircase_does():
    """mdistiller: min(epoch / W, 1), epochs from 1: full from epoch W, total weight
    (W + 1) / 2 epochs by then; our ramp over W - 1 epochs matches both."""
    for warmup_epochs in (1, 5, 20):
        steps = config_helpers.dkd_warmup_steps(warmup_epochs, 100)
        ours = np.minimum(1.0, (np.arange(100 * warmup_epochs) + 1) / max(steps, 1))
        staircase = (
            np.minimum(np.arange(100 * warmup_epochs) // 100 + 1, warmup_epochs) / warmup_epochs
        )
        assert ours[-100:].min() == staircase[-100:].min() == 1.0
        assert ours.sum() == pytest.approx(staircase.sum(), rel=0.01)


@pytest.mark.parametrize(
    "arg", ["resnet18", "smoke,smoke,x", "resnet34_resnet18,vgg13_vgg8", "kd,dkd", "smoke,smoke"]
)
def test_unknown_config_arg_lists_the_allowed_ones(arg):
    with pytest.raises(ValueError, match="resnet34_resnet18.*mokd.*smoke"):
        imagenet.get_config(arg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, arg",
    [
        (cifar100, "smoke"),
        (cifar100, "resnet56_resnet20,dkd,smoke"),
        (imagenet, "smoke"),
        (imagenet, "regnety160_deit_tiny,smoke"),
    ],
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
