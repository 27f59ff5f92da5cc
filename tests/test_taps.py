"""mokd_jax.taps: which features each tap set selects, per model family, and their widths
against the reference architectures' stage widths."""

import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax import models, taps


def cnn_features(dtype=jnp.float32):
    """A CNN's `encode` output: three stage maps and the pooled features."""
    rng = np.random.default_rng(0)
    maps = {f"stage{i}": rng.normal(size=(2, 8 // i, 8 // i, 4 * i)) for i in (1, 2, 3)}
    features = {**maps, "pooled": maps["stage3"].mean((1, 2))}
    return {name: jnp.asarray(value, dtype) for name, value in features.items()}


def vit_features(dtype=jnp.float32):
    """A ViT's `encode` output: the class token first in `tokens`, `pooled` the class token."""
    tokens = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 6)), dtype)
    return {"tokens": tokens, "pooled": tokens[:, 0]}


@pytest.mark.parametrize(
    ("features", "tap_set", "names"),
    [
        (cnn_features(), "multi_scale", ("pooled", "penultimate")),
        (vit_features(), "multi_scale", ("pooled", "patch_mean")),
        (cnn_features(), "pooled", ("pooled",)),
        (vit_features(), "pooled", ("pooled",)),
    ],
)
def test_each_tap_set_names_the_pooled_features_first(features, tap_set, names):
    assert taps.tap_names(features, tap_set) == names
    assert len(taps.select(features, tap_set)) == len(names)


def test_cnn_taps_are_the_pooled_features_and_the_pooled_second_to_last_stage():
    features = cnn_features()
    pooled, penultimate = taps.select(features, "multi_scale")
    np.testing.assert_array_equal(pooled, features["pooled"])
    np.testing.assert_allclose(penultimate, np.asarray(features["stage2"]).mean((1, 2)), rtol=1e-6)
    assert penultimate.shape == (2, 8)


def test_vit_taps_are_the_class_token_and_the_mean_patch_token():
    features = vit_features()
    class_token, patch_mean = taps.select(features, "multi_scale")
    tokens = np.asarray(features["tokens"])
    np.testing.assert_array_equal(class_token, tokens[:, 0])
    np.testing.assert_allclose(patch_mean, tokens[:, 1:].mean(1), rtol=1e-6)


@pytest.mark.parametrize("features", [cnn_features(jnp.bfloat16), vit_features(jnp.bfloat16)])
def test_taps_are_float32_whatever_the_compute_dtype(features):
    assert all(tap.dtype == jnp.float32 for tap in taps.select(features, "multi_scale"))


@pytest.mark.parametrize(
    ("name", "widths"),
    [
        ("resnet8x4", (256, 128)),  # RepDistiller: stages of 64, 128, 256 channels
        ("wrn_16_2", (128, 64)),  # 16k, 32k, 64k with k = 2
        ("vgg8", (512, 512)),  # its last two blocks have 512 channels
        ("mobile_half", (1280, 48)),  # conv2's 1280; stage3 = blocks[4] at width 0.5 x 96
        ("resnet18", (512, 256)),  # torchvision: layer3 256, layer4 512
        ("regnety_160", (3024, 1232)),  # timm: stage widths 224, 448, 1232, 3024
        ("deit_tiny", (192, 192)),  # embed_dim 192 for both token kinds
    ],
)
def test_multi_scale_tap_widths_follow_the_reference_architectures(name, widths):
    """Traced, not computed: the widths the projectors are built for."""
    model = models.get(name, 10, image_size=32)
    example = taps.example_taps(model, (32, 32, 3), "multi_scale")
    assert tuple(tap.shape for tap in example) == tuple((1, width) for width in widths)
    assert all(not np.any(np.asarray(tap)) for tap in example)
