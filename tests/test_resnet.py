"""Tests for mokd_jax.models.resnet: sizes against the reference architectures, feature
taps, torch-exact padding and initialisation, BatchNorm modes.

The big models are only traced (`jax.eval_shape`); real forwards run on small models and
inputs (ImageNet ResNets at 64x64 at most).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mokd_jax import models
from mokd_jax.errors import InputError
from mokd_jax.models.resnet import (
    BOTTLENECK,
    ResNet,
    cifar_resnet,
    stem_max_pool,
    wide_resnet,
)

IMAGENET = ("resnet18", "resnet34", "resnet50", "resnet101")
CIFAR_RESNETS = {  # name: (depth, num_filters), as in RepDistiller models/resnet.py
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
WRNS = {"wrn_16_2": (16, 2), "wrn_40_2": (40, 2)}  # name: (depth, widen_factor)


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _abstract_init(model, size):
    """Variables as shapes only: tracing resnet101 costs no compute."""
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((2, size, size, 3)))


def _jit_init(model, size):
    """Real variables; one compiled init is ~2x faster than resnet18's op-by-op one."""
    init = jax.jit(functools.partial(model.init, train=False))
    return init(jax.random.key(0), jnp.zeros((2, size, size, 3)))


@functools.cache
def _init(name, size, num_classes=10):
    model = models.get(name, num_classes)
    return model, _jit_init(model, size)


def _images(size, batch=2, offset=0.0):
    return offset + jax.random.normal(jax.random.key(1), (batch, size, size, 3))


# Hand-written sizes of RepDistiller's models, independent of the model code: a conv
# (bias-free) has k*k*cin*cout weights, a BatchNorm 2*c, the fc cin*classes + classes.
def _conv(k, cin, cout):
    return k * k * cin * cout


def _bn(channels):
    return 2 * channels


def _fc(cin, classes):
    return cin * classes + classes


def _cifar_resnet_size(depth, filters, classes):
    """Stem conv3x3 + BN; 3 stages of (depth-2)/6 basic blocks (two conv3x3 + BN each);
    a conv1x1 + BN shortcut where the stride or the width changes."""
    total, cin = _conv(3, 3, filters[0]) + _bn(filters[0]), filters[0]
    for stage, width in enumerate(filters[1:]):
        for block in range((depth - 2) // 6):
            total += _conv(3, cin, width) + _bn(width) + _conv(3, width, width) + _bn(width)
            if (stage > 0 and block == 0) or cin != width:
                total += _conv(1, cin, width) + _bn(width)
            cin = width
    return total + _fc(cin, classes)


def _wrn_size(depth, widen_factor, classes):
    """Stem conv3x3; 3 stages of (depth-4)/6 pre-activation blocks (BN, conv3x3, BN,
    conv3x3); a bias-free conv1x1 shortcut where the width changes; final BN."""
    total, cin = _conv(3, 3, 16), 16
    for width in (16 * widen_factor, 32 * widen_factor, 64 * widen_factor):
        for _ in range((depth - 4) // 6):
            total += _bn(cin) + _conv(3, cin, width) + _bn(width) + _conv(3, width, width)
            if cin != width:
                total += _conv(1, cin, width)
            cin = width
    return total + _bn(cin) + _fc(cin, classes)


# torchvision's published sizes: the `num_params` of ResNet{18,34,50,101}_Weights.IMAGENET1K_V1
# in torchvision.models (1000 classes).
@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
    ],
)
def test_imagenet_param_counts_match_torchvision(name, size):
    variables = _abstract_init(models.get(name, 1000), 64)
    assert _count(variables["params"]) == size


# The sizes KD papers commonly report for these CIFAR-100 models, in millions.
REPORTED_MILLIONS = {
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.26,
}


@pytest.mark.parametrize("name", [*CIFAR_RESNETS, *WRNS])
def test_cifar_param_counts_match_repdistiller(name):
    expected = (
        _cifar_resnet_size(*CIFAR_RESNETS[name], 100)
        if name in CIFAR_RESNETS
        else _wrn_size(*WRNS[name], 100)
    )
    count = _count(_abstract_init(models.get(name, 100), 32)["params"])
    assert count == expected
    assert count / 1e6 == pytest.approx(REPORTED_MILLIONS[name], abs=0.006)


def _taps(name, size, num_classes=10):
    model = models.get(name, num_classes)
    variables = _abstract_init(model, size)
    apply = functools.partial(model.apply, return_features=True)
    return model, jax.eval_shape(apply, variables, jnp.zeros((2, size, size, 3)))


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_taps_have_strides_4_to_32(name):
    model, (logits, features) = _taps(name, 224)
    expansion = 4 if name in ("resnet50", "resnet101") else 1
    assert set(features) == {"stage1", "stage2", "stage3", "stage4", "pooled"}
    for stage, (width, stride) in enumerate(
        zip((64, 128, 256, 512), (4, 8, 16, 32), strict=True), start=1
    ):
        side = 224 // stride
        assert features[f"stage{stage}"].shape == (2, side, side, width * expansion)
    assert model.feature_width == 512 * expansion
    assert features["pooled"].shape == (2, model.feature_width)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", [*CIFAR_RESNETS, *WRNS])
def test_cifar_taps_have_strides_1_to_4(name):
    model, (logits, features) = _taps(name, 32)
    widths = (
        CIFAR_RESNETS[name][1][1:]
        if name in CIFAR_RESNETS
        else tuple(w * WRNS[name][1] for w in (16, 32, 64))
    )
    assert set(features) == {"stage1", "stage2", "stage3", "pooled"}
    for stage, (width, side) in enumerate(zip(widths, (32, 16, 8), strict=True), start=1):
        assert features[f"stage{stage}"].shape == (2, side, side, width)
    assert model.feature_width == widths[-1]
    assert features["pooled"].shape == (2, widths[-1])
    assert logits.shape == (2, 10)


def test_bottleneck_strides_its_3x3_conv():
    """torchvision v1.5: the first block of a stage keeps the resolution through conv1
    (1x1) and halves it in conv2 (3x3)."""
    model = models.get("resnet50", 10)
    apply = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
    _, state = jax.eval_shape(apply, _abstract_init(model, 64), jnp.zeros((2, 64, 64, 3)))
    block = state["intermediates"]["layer2_0"]
    assert block["conv1"]["__call__"][0].shape == (2, 16, 16, 128)
    assert block["conv2"]["__call__"][0].shape == (2, 8, 8, 128)


def test_parameter_names_follow_torch_state_dicts():
    resnet = _abstract_init(models.get("resnet18", 1000), 64)
    params = resnet["params"]
    blocks = {f"layer{stage}_{index}" for stage in range(1, 5) for index in range(2)}
    assert set(params) == {"conv1", "bn1", "fc"} | blocks
    assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert set(params["layer2_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "downsample_conv",
        "downsample_bn",
    }
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert params["fc"]["kernel"].shape == (512, 1000)
    assert set(resnet["batch_stats"]["bn1"]) == {"mean", "var"}

    wrn = _abstract_init(models.get("wrn_16_2", 100), 32)["params"]
    blocks = {f"block{stage}_{index}" for stage in range(1, 4) for index in range(2)}
    assert set(wrn) == {"conv1", "bn1", "fc"} | blocks
    assert set(wrn["block1_0"]) == {"bn1", "conv1", "bn2", "conv2", "conv_shortcut"}
    assert set(wrn["block1_1"]) == {"bn1", "conv1", "bn2", "conv2"}


def test_stem_max_pool_pads_like_torch():
    # 4x4 map of -1..-16. torch pads one -inf on every side: windows cover rows/cols
    # [0, 1] and [1, 3]. 'SAME' pads only bottom/right ([0, 2] and [2, 3]); zero padding
    # would give 0 everywhere.
    x = -jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    torch_like = np.array([[-1.0, -2.0], [-5.0, -6.0]])
    np.testing.assert_array_equal(stem_max_pool(x)[0, ..., 0], torch_like)
    same = np.asarray(lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME"))
    assert not np.array_equal(same[0, ..., 0], torch_like)


def _strided_conv(inputs, kernel, padding):
    return lax.conv_general_dilated(
        inputs, kernel, (2, 2), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.slow
def test_strided_convs_pad_like_torch():
    """The stem conv7x7/2 pads 3 and a stage's first conv3x3/2 pads 1 on every side."""
    model, variables = _init("resnet18", 64)
    images = _images(64)
    (_, features), state = model.apply(
        variables,
        images,
        return_features=True,
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    params, outputs = variables["params"], state["intermediates"]
    stem = (images, params["conv1"], outputs["conv1"], 3)
    stage2 = (features["stage1"], params["layer2_0"]["conv1"], outputs["layer2_0"]["conv1"], 1)
    for inputs, conv_params, conv_outputs, pad in (stem, stage2):
        output, kernel = conv_outputs["__call__"][0], conv_params["kernel"]
        torch_like = _strided_conv(inputs, kernel, [(pad, pad)] * 2)
        np.testing.assert_allclose(output, torch_like, rtol=1e-5, atol=1e-5)
        assert not np.allclose(output, _strided_conv(inputs, kernel, "SAME"), atol=1e-3)


@pytest.mark.slow  # full-width resnet8x4 and wrn_16_2 initialised (about 12 s)
def test_init_follows_torch():
    """Kaiming-normal (fan_out, untruncated) convs, BN 1/0, torch's uniform Linear; the
    WRN zeroes its fc bias."""
    _, variables = _init("resnet8x4", 32)
    params = variables["params"]
    kernel = params["layer3_0"]["conv2"]["kernel"]  # 3x3x256x256: 590k draws
    std = np.sqrt(2 / (3 * 3 * 256))
    assert np.std(kernel) == pytest.approx(std, rel=0.02)
    assert np.max(np.abs(kernel)) > 3.5 * std  # a normal truncated at 2 stds never is
    np.testing.assert_array_equal(params["layer3_0"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(params["layer3_0"]["bn1"]["bias"], 0.0)
    bound = 1 / np.sqrt(256)
    for leaf in (params["fc"]["kernel"], params["fc"]["bias"]):
        assert np.max(np.abs(leaf)) <= bound
        assert np.max(np.abs(leaf)) > 0.8 * bound

    wrn = _init("wrn_16_2", 32)[1]["params"]
    np.testing.assert_array_equal(wrn["fc"]["bias"], 0.0)
    assert np.max(np.abs(wrn["fc"]["kernel"])) <= 1 / np.sqrt(128)


def _small_bottleneck_resnet():
    model = ResNet(10, stage_sizes=(1, 1), block=BOTTLENECK, widths=(8, 16), stem_width=8)
    return model, _jit_init(model, 32)


@pytest.mark.parametrize(
    ("build", "size"),
    [
        pytest.param(lambda: _init("resnet18", 64), 64, marks=pytest.mark.slow),
        pytest.param(_small_bottleneck_resnet, 32, marks=pytest.mark.slow),
        (lambda: _init("resnet8x4", 32), 32),
        (lambda: _init("wrn_16_2", 32), 32),
    ],
    ids=["resnet18", "bottleneck", "resnet8x4", "wrn_16_2"],
)
def test_encode_then_classify_is_call(build, size):
    model, variables = build()
    images = _images(size)
    features = model.apply(variables, images, method=model.encode)
    logits = model.apply(variables, features["pooled"], method=model.classify)
    call_logits, call_features = model.apply(variables, images, return_features=True)
    np.testing.assert_allclose(logits, call_logits, rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, features, call_features)
    np.testing.assert_array_equal(model.apply(variables, images), call_logits)
    assert np.all(np.isfinite(logits))


def test_bad_depths_are_input_errors():
    with pytest.raises(InputError, match="depth=21 is not allowed: 6n \\+ 2"):
        cifar_resnet(21, (16, 16, 32, 64), 10)
    with pytest.raises(InputError, match="num_filters=\\(16, 32, 64\\) is not allowed"):
        cifar_resnet(20, (16, 32, 64), 10)
    with pytest.raises(InputError, match="depth=15 is not allowed: 6n \\+ 4"):
        wide_resnet(15, 2, 10)
    with pytest.raises(InputError, match="widen_factor=0 is not allowed"):
        wide_resnet(16, 0, 10)
