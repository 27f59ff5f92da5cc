"""Tests for mokd_jax.models: registry, shapes, feature taps, sizes, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax import models
from mokd_jax.errors import InputError
from mokd_jax.models.regnet import RegNet


def _param_count(widths, blocks, channels, num_classes):
    """Conv3x3 without bias, then BatchNorm (scale, bias) per block; Dense head with bias."""
    total, fan_in = 0, channels
    for width, num_blocks in zip(widths, blocks, strict=True):
        for _ in range(num_blocks):
            total += 9 * fan_in * width + 2 * width
            fan_in = width
    return total + fan_in * num_classes + num_classes


def _init(name, shape, num_classes=10):
    model = models.get(name, num_classes)
    return model, model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    ("name", "widths", "blocks"),
    [("cnn_large", (32, 64, 96), (2, 2, 2)), ("cnn_small", (16, 32, 48), (1, 1, 1))],
)
@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 32, 32, 3)])
def test_shapes_taps_and_param_counts(name, widths, blocks, shape):
    model, variables = _init(name, shape)
    assert set(variables) == {"params", "batch_stats"}
    assert _count(variables["params"]) == _param_count(widths, blocks, shape[-1], 10)
    assert model.feature_width == widths[-1]

    images = jax.random.normal(jax.random.key(1), shape)
    logits, features = model.apply(variables, images, return_features=True)
    assert logits.shape == (2, 10)
    assert features["pooled"].shape == (2, widths[-1])
    size = shape[1]
    assert features["stage1"].shape == (2, size, size, widths[0])
    assert features["stage3"].shape == (2, size // 2, size // 2, widths[2])
    np.testing.assert_array_equal(model.apply(variables, images), logits)


def test_teacher_is_much_larger_than_student():
    teacher = _count(_init("cnn_large", (1, 8, 8, 1))[1]["params"])
    student = _count(_init("cnn_small", (1, 8, 8, 1))[1]["params"])
    assert 100_000 <= teacher <= 300_000
    assert teacher >= 5 * student


def test_init_is_deterministic():
    first = _init("cnn_small", (1, 8, 8, 1))[1]
    second = _init("cnn_small", (1, 8, 8, 1))[1]
    jax.tree.map(np.testing.assert_array_equal, first, second)


# A scaled-down RegNetY stands for regnety_160 (83.6M parameters): the same blocks.
_SMALL_REGNET = RegNet(10, widths=(16, 32), depths=(1, 2), group_width=8, stem_width=8)


def eval_and_train_pass(model, shape: tuple[int, ...]):
    """(variables, eval logits, train logits, train-mode batch-statistics updates) of a
    fresh `model` on one batch of shifted normal images (mean 3, so that every running
    statistic has somewhere to move): initialisation and both passes in one jitted program,
    one trace and compilation (most of the time) instead of three."""

    @jax.jit
    def passes(images):
        variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
        eval_logits = model.apply(variables, images, train=False)
        train_logits, updates = model.apply(
            variables, images, train=True, mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2)},
        )  # fmt: skip
        return variables, eval_logits, train_logits, updates

    return passes(3.0 + jax.random.normal(jax.random.key(1), shape))


@pytest.mark.parametrize(
    "model, shape",
    [
        ("cnn_small", (2, 8, 8, 1)),
        pytest.param("resnet8x4", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("wrn_16_2", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("vgg8", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("mobilenet_v1", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("mobilenet_v2", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("mobile_half", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("shufflenet_v1", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param("shufflenet_v2", (2, 32, 32, 3), marks=pytest.mark.slow),
        pytest.param(_SMALL_REGNET, (2, 16, 16, 3), id="regnet_small", marks=pytest.mark.slow),
    ],
)
def test_train_mode_uses_and_updates_batch_statistics(model, shape):
    model = models.get(model, 10) if isinstance(model, str) else model
    variables, eval_logits, train_logits, updates = eval_and_train_pass(model, shape)
    assert not np.allclose(eval_logits, train_logits)
    # Every BatchNorm's running variance moves. A running mean may rightly stay at 0: a BN
    # fed a linear map of another BN's output sees zero-mean batches (MobileNetV2's expand
    # convs after the previous block's project BN).
    moved = jax.tree.map(
        lambda old, new: not np.allclose(old["var"], new["var"]),
        variables["batch_stats"],
        updates["batch_stats"],
        is_leaf=lambda node: isinstance(node, dict) and "var" in node,
    )
    assert all(jax.tree.leaves(moved))


def test_unknown_model():
    with pytest.raises(
        InputError, match="model='resnet' is not allowed: one of cnn_large, cnn_small"
    ):
        models.get("resnet", 10)


@pytest.mark.parametrize("num_classes", [1, 0])
def test_too_few_classes(num_classes):
    with pytest.raises(InputError, match=f"num_classes={num_classes} is not allowed"):
        models.get("cnn_small", num_classes)
