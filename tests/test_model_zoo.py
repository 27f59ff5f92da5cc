"""Tests for the model zoo beyond the ResNets: MobileNetV1/V2, the CIFAR zoo (VGGs,
mobile_half, ShuffleNets, the CIFAR ResNet50), ViT/DeiT and RegNetY-16GF (sizes against the
reference figures, feature taps, parameter names, init), DeiT's stochastic depth and
float32 residual stream, and the computation dtype of every model family.

Big models are only traced (`jax.eval_shape`); real forwards run on small inputs: a ViT at
32 px and a scaled-down RegNetY (the BatchNorm-mode test of every family is in
test_models.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax import models
from mokd_jax.errors import InputError
from mokd_jax.models.layers import computation_dtype
from mokd_jax.models.mobilenet import DepthwiseSeparable
from mokd_jax.models.regnet import RegNet
from mokd_jax.models.vgg import CFG_B, CFG_S
from mokd_jax.models.vit import VisionTransformer, drop_path, drop_path_rates


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _model(name, num_classes=10, size=None, dtype="float32"):
    """The registry's model; a ViT's `image_size` set to `size`."""
    model = models.get(name, num_classes, dtype=dtype)
    return model.clone(image_size=size) if size and name.startswith(("vit", "deit")) else model


def _abstract_init(model, size, channels=3):
    """Variables as shapes only: tracing regnety_160 costs no compute."""
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((2, size, size, channels)))


def _abstract_apply(model, variables, size, channels=3, **kwargs):
    apply = functools.partial(model.apply, return_features=True, **kwargs)
    return jax.eval_shape(apply, variables, jnp.zeros((2, size, size, channels)))


def _small_regnet():
    """RegNetY blocks at toy widths: grouped convs (8 channels a group), SE, projections,
    identity shortcuts."""
    return RegNet(10, widths=(16, 32), depths=(1, 2), group_width=8, stem_width=8)


@functools.cache
def _real_init(build):
    """(model, variables) of `build()`, initialised at 32 px; one compiled init each."""
    model = build()
    init = jax.jit(functools.partial(model.init, train=False))
    return model, init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))


def _vit_tiny_32():
    return _model("vit_tiny", size=32)


# ------------------------------------------------------------------------ sizes


# Reference sizes at 1000 classes: torchvision's `num_params` of
# MobileNet_V2_Weights.IMAGENET1K_V1; timm's deit_tiny/small_patch16_224 and regnety_160
# (DeiT's teacher); mdistiller's MobileNetV1 (its 4.2M, counted by hand from the definition).
@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("mobilenet_v1", 4_231_976),
        ("mobilenet_v2", 3_504_872),
        ("vit_tiny", 5_717_416),
        ("deit_tiny", 5_717_416),
        ("vit_small", 22_050_664),
        ("deit_small", 22_050_664),
        ("regnety_160", 83_590_140),
    ],
)
def test_imagenet_param_counts_match_references(name, size):
    variables = _abstract_init(_model(name, 1000), 224)
    assert _count(variables["params"]) == size


def _vgg_size(cfg, classes):
    """RepDistiller's VGG with BN, by hand: per conv3x3 9*cin*cout weights + cout bias,
    then BN 2*cout; fc 512*classes + classes."""
    total, cin = 0, 3
    for widths in cfg:
        for width in widths:
            total += 9 * cin * width + width + 2 * width
            cin = width
    return total + cin * classes + classes


# CIFAR-100 sizes reported in the CRD/RepDistiller tables, in millions.
@pytest.mark.parametrize(
    ("name", "cfg", "size", "millions"),
    [("vgg8", CFG_S, 3_965_028, 3.96), ("vgg13", CFG_B, 9_462_180, 9.46)],
)
def test_vgg_param_counts_match_repdistiller(name, cfg, size, millions):
    count = _count(_abstract_init(_model(name, 100), 32)["params"])
    assert count == size == _vgg_size(cfg, 100)
    assert count / 1e6 == pytest.approx(millions, abs=0.006)


# The CIFAR-100 sizes of the CRD/DKD zoo's models, each counted from RepDistiller's
# definition (tests/torch_zoo.py; the CRD paper's tables round them to 0.47M, 1.74M, 23.71M,
# 0.57M, 0.81M, 0.95M and 1.36M).
CIFAR_ZOO_SIZES = {
    "resnet32": 472_756,
    "resnet110": 1_736_564,
    "resnet50_cifar": 23_705_252,
    "wrn_40_1": 569_780,
    "mobile_half": 812_836,
    "shufflenet_v1": 949_258,
    "shufflenet_v2": 1_355_528,
}


@pytest.mark.parametrize(("name", "size"), CIFAR_ZOO_SIZES.items())
def test_cifar_zoo_param_counts_equal_repdistillers(name, size):
    """Exactly the reference's parameters (its trainable tensors, BatchNorm statistics
    aside), counted on torch's meta device: nothing is allocated."""
    torch = pytest.importorskip("torch")
    import torch_zoo

    with torch.device("meta"):
        reference = torch_zoo.param_count(torch_zoo.REFERENCES[name](100))
    assert _count(_abstract_init(_model(name, 100), 32)["params"]) == size == reference


def test_cifar100_pairs_use_the_cifar_zoo():
    """Every model of the CIFAR-100 benchmark is a RepDistiller model, so that a converted
    teacher gets CIFAR-100's input statistics."""
    from configs import cifar100

    assert {model for pair in cifar100.PAIRS.values() for model in pair} <= set(models.CIFAR_NAMES)


# ------------------------------------------------------------------------ taps


@pytest.mark.parametrize(
    ("name", "taps", "width"),
    [
        ("resnet50_cifar", ((32, 256), (16, 512), (8, 1024), (4, 2048)), 2048),
        ("mobile_half", ((16, 12), (8, 16), (4, 48), (2, 160)), 1280),
        ("shufflenet_v1", ((16, 240), (8, 480), (4, 960)), 960),
        ("shufflenet_v2", ((16, 116), (8, 232), (4, 464)), 1024),
    ],
)
def test_cifar_zoo_taps_at_32px(name, taps, width):
    """A CIFAR stem keeps 32 px (the ResNet50) or halves it once (mobile_half); the taps are
    RepDistiller's stage features."""
    model = _model(name)
    logits, features = _abstract_apply(model, _abstract_init(model, 32), 32)
    assert set(features) == {f"stage{i}" for i in range(1, len(taps) + 1)} | {"pooled"}
    for stage, (side, channels) in enumerate(taps, start=1):
        assert features[f"stage{stage}"].shape == (2, side, side, channels)
    assert model.feature_width == width
    assert features["pooled"].shape == (2, width)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "widths"),
    [("mobilenet_v1", (128, 256, 512, 1024)), ("mobilenet_v2", (24, 32, 96, 1280))],
)
def test_mobilenet_taps_have_strides_4_to_32(name, widths):
    model = _model(name)
    logits, features = _abstract_apply(model, _abstract_init(model, 224), 224)
    assert set(features) == {"stage1", "stage2", "stage3", "stage4", "pooled"}
    for stage, (width, stride) in enumerate(zip(widths, (4, 8, 16, 32), strict=True), start=1):
        side = 224 // stride
        assert features[f"stage{stage}"].shape == (2, side, side, width)
    assert model.feature_width == widths[-1]
    assert features["pooled"].shape == (2, model.feature_width)
    assert logits.shape == (2, 10)


def test_regnet_taps_have_strides_4_to_32():
    model = _model("regnety_160")
    logits, features = _abstract_apply(model, _abstract_init(model, 64), 64)
    for stage, (width, side) in enumerate(
        zip((224, 448, 1232, 3024), (16, 8, 4, 2), strict=True), start=1
    ):
        assert features[f"stage{stage}"].shape == (2, side, side, width)
    assert model.feature_width == 3024
    assert features["pooled"].shape == (2, 3024)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", ["vgg8", "vgg13"])
@pytest.mark.parametrize(("size", "sides"), [(32, (32, 16, 8, 4, 4)), (64, (64, 32, 16, 8, 4))])
def test_vgg_taps_pool_before_block4_only_at_64px(name, size, sides):
    """RepDistiller's `if h == 64: pool3`: at 32 px blocks 3 and 4 share 4x4 maps."""
    model = _model(name)
    logits, features = _abstract_apply(model, _abstract_init(model, size), size)
    for stage, (width, side) in enumerate(
        zip((64, 128, 256, 512, 512), sides, strict=True), start=1
    ):
        assert features[f"stage{stage}"].shape == (2, side, side, width)
    assert model.feature_width == 512
    assert features["pooled"].shape == (2, 512)
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(("name", "width"), [("vit_tiny", 192), ("deit_small", 384)])
@pytest.mark.parametrize("size", [224, 32])
def test_vit_taps_and_position_embedding_follow_image_size(name, width, size):
    model = _model(name, size=size)
    variables = _abstract_init(model, size)
    patches = (size // 16) ** 2
    assert (model.image_size, model.patch_size) == (size, 16)
    assert variables["params"]["pos_embed"].shape == (1, 1 + patches, width)
    logits, features = _abstract_apply(model, variables, size)
    assert set(features) == {"tokens", "pooled"}
    assert features["tokens"].shape == (2, 1 + patches, width)
    assert model.feature_width == width
    assert features["pooled"].shape == (2, width)
    assert logits.shape == (2, 10)


def test_vit_rejects_other_image_sizes():
    model = _model("vit_tiny", size=32)
    variables = _abstract_init(model, 32)
    with pytest.raises(InputError, match="images='48x48 pixels' is not allowed: 32x32"):
        _abstract_apply(model, variables, 48)
    with pytest.raises(InputError, match="image_size=40 is not allowed: a multiple of"):
        _abstract_init(model.clone(image_size=40), 40)


# ------------------------------------------------------------------------ names


def test_mobilenet_parameter_names_follow_torch_state_dicts():
    v1 = _abstract_init(_model("mobilenet_v1", 1000), 32)["params"]
    assert set(v1) == {f"model_{i}" for i in range(14)} | {"fc"}
    assert set(v1["model_0"]) == {"conv", "bn"}
    assert set(v1["model_1"]) == {"depthwise", "pointwise"}
    assert v1["model_1"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 32)
    assert v1["model_13"]["pointwise"]["conv"]["kernel"].shape == (1, 1, 1024, 1024)
    assert v1["fc"]["kernel"].shape == (1024, 1000)

    v2 = _abstract_init(_model("mobilenet_v2", 1000), 32)
    params = v2["params"]
    assert set(params) == {f"features_{i}" for i in range(19)} | {"classifier"}
    assert set(params["features_1"]) == {"depthwise", "project"}
    assert set(params["features_2"]) == {"expand", "depthwise", "project"}
    assert params["features_17"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 960)
    assert params["features_18"]["conv"]["kernel"].shape == (1, 1, 320, 1280)
    assert params["classifier"]["kernel"].shape == (1280, 1000)
    assert set(v2["batch_stats"]["features_2"]["expand"]["bn"]) == {"mean", "var"}


def test_vgg_parameter_names_follow_repdistiller():
    params = _abstract_init(_model("vgg13", 100), 32)["params"]
    layers = {f"block{block}_{layer}" for block in range(5) for layer in range(2)}
    assert set(params) == layers | {"classifier"}
    assert set(params["block0_0"]) == {"conv", "bn"}
    assert params["block0_0"]["conv"]["kernel"].shape == (3, 3, 3, 64)
    assert params["block0_0"]["conv"]["bias"].shape == (64,)
    assert params["classifier"]["kernel"].shape == (512, 100)


def test_vit_parameter_names_follow_timm():
    params = _abstract_init(_model("deit_tiny", 1000), 224)["params"]
    blocks = {f"blocks_{i}" for i in range(12)}
    assert set(params) == {"cls_token", "pos_embed", "patch_embed", "norm", "head"} | blocks
    assert params["cls_token"].shape == (1, 1, 192)
    assert params["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, 192)
    block = params["blocks_11"]
    assert set(block) == {"norm1", "attn", "norm2", "mlp"}
    assert set(block["attn"]) == {"qkv", "proj"}
    assert block["attn"]["qkv"]["kernel"].shape == (192, 576)  # fused, as timm's
    assert block["mlp"]["fc1"]["kernel"].shape == (192, 768)
    assert set(params["norm"]) == {"scale", "bias"}
    assert params["head"]["kernel"].shape == (192, 1000)


def test_regnet_parameter_names_follow_timm():
    params = _abstract_init(_model("regnety_160", 1000), 32)["params"]
    blocks = {
        f"s{stage}_b{block}"
        for stage, depth in enumerate((2, 4, 11, 1), start=1)
        for block in range(1, depth + 1)
    }
    assert set(params) == {"stem", "head_fc"} | blocks
    assert set(params["s1_b1"]) == {"conv1", "conv2", "se", "conv3", "downsample"}
    assert set(params["s1_b2"]) == {"conv1", "conv2", "se", "conv3"}
    assert set(params["s1_b1"]["conv2"]) == {"conv", "bn"}
    # 2 groups of 112 channels; SE widths from each block's input width (32, then 224).
    assert params["s1_b1"]["conv2"]["conv"]["kernel"].shape == (3, 3, 112, 224)
    assert params["s1_b1"]["se"]["fc1"]["kernel"].shape == (1, 1, 224, 8)
    assert params["s1_b2"]["se"]["fc1"]["kernel"].shape == (1, 1, 224, 56)
    assert params["s1_b2"]["se"]["fc2"]["bias"].shape == (224,)
    assert params["head_fc"]["kernel"].shape == (3024, 1000)


# ------------------------------------------------------------------------ behaviour


def test_mobilenet_v2_dropout_needs_an_rng_in_train_mode_only():
    model = _model("mobilenet_v2")
    variables = _abstract_init(model, 32)
    _abstract_apply(model, variables, 32)  # eval: no rng
    with pytest.raises(Exception, match="dropout"):
        _abstract_apply(model, variables, 32, train=True, mutable=["batch_stats"])
    rngs = {"dropout": jax.random.key(2)}
    _abstract_apply(model, variables, 32, train=True, mutable=["batch_stats"], rngs=rngs)
    _abstract_apply(model.clone(dropout_rate=0.0), variables, 32, train=True, mutable=True)


@pytest.mark.slow
def test_vit_init_follows_timm():
    params = _real_init(_vit_tiny_32)[1]["params"]
    assert 0 < np.std(params["cls_token"]) < 1e-5
    assert np.std(params["pos_embed"]) == pytest.approx(0.02, rel=0.15)  # 960 draws
    qkv = params["blocks_0"]["attn"]["qkv"]
    assert np.std(qkv["kernel"]) == pytest.approx(0.02, rel=0.02)
    np.testing.assert_array_equal(qkv["bias"], 0.0)
    np.testing.assert_array_equal(params["blocks_0"]["norm1"]["scale"], 1.0)
    bound = 1 / np.sqrt(16 * 16 * 3)  # torch's default for the patch conv
    kernel = params["patch_embed"]["proj"]["kernel"]
    assert 0.9 * bound < np.max(np.abs(kernel)) <= bound


@pytest.mark.slow
def test_regnet_init_follows_timm():
    """timm's fan_out divides by the groups; the last BN of every block starts at 0."""
    params = _real_init(_small_regnet)[1]["params"]
    kernel = params["s2_b1"]["conv2"]["conv"]["kernel"]  # 3x3, 4 groups, 32 out
    assert kernel.shape == (3, 3, 8, 32)
    assert np.std(kernel) == pytest.approx(np.sqrt(2 * 4 / (9 * 32)), rel=0.06)
    for name, block in params.items():
        if "_b" in name:  # s{i}_b{j}
            np.testing.assert_array_equal(block["conv3"]["bn"]["scale"], 0.0)
            np.testing.assert_array_equal(block["conv2"]["bn"]["scale"], 1.0)
    assert np.std(params["head_fc"]["kernel"]) == pytest.approx(0.01, rel=0.1)
    np.testing.assert_array_equal(params["head_fc"]["bias"], 0.0)


def test_mobilenet_v1_keeps_torch_default_init():
    """mdistiller sets no init: torch's uniform(+-1/sqrt(fan_in)), whose fan-in of a
    depthwise conv is 9 (one input channel per group)."""
    block = DepthwiseSeparable(64, 128, 1)
    params = block.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)), train=False)["params"]
    for layer, fan_in in (("depthwise", 9), ("pointwise", 64)):
        kernel = params[layer]["conv"]["kernel"]
        assert 0.9 / np.sqrt(fan_in) < np.max(np.abs(kernel)) <= 1 / np.sqrt(fan_in)


# ------------------------------------------------------------------------ dtype


# One model per family; every one computes in bfloat16 with float32 parameters, float32
# BatchNorm statistics and float32 logits.
@pytest.mark.parametrize(
    ("name", "size", "channels"),
    [
        ("cnn_small", 8, 1),
        ("resnet18", 64, 3),
        ("resnet8x4", 32, 3),
        ("wrn_16_2", 32, 3),
        ("mobilenet_v1", 32, 3),
        ("mobilenet_v2", 32, 3),
        ("resnet50_cifar", 32, 3),
        ("mobile_half", 32, 3),
        ("shufflenet_v1", 32, 3),
        ("shufflenet_v2", 32, 3),
        ("vgg8", 32, 3),
        ("vit_tiny", 32, 3),
        ("regnety_160", 32, 3),
    ],
)
def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits(name, size, channels):
    model = _model(name, size=size, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    variables = _abstract_init(model, size, channels)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    (logits, features), state = _abstract_apply(
        model,
        variables,
        size,
        channels,
        train=True,
        mutable=True,
        rngs={"dropout": jax.random.key(0)},
    )
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(state)} <= {jnp.dtype(jnp.float32)}
    assert {tap.dtype for tap in features.values()} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow  # a ViT and a RegNetY compiled twice, bf16 and f32 (about 10 s each)
@pytest.mark.parametrize("build", [_vit_tiny_32, _small_regnet], ids=["vit_tiny", "regnet"])
def test_bfloat16_logits_are_close_to_float32_logits(build):
    """Same float32 variables, bfloat16 compute: bfloat16 rounds each op to ~0.4% (8
    mantissa bits); over these 5-15 layers the logits stay within 5% of their largest
    magnitude (measured: ~2% for the ViT, < 1% for the conv nets)."""
    model, variables = _real_init(build)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    logits = jax.jit(model.apply)(variables, images)
    bf16_model = model.clone(dtype=jnp.bfloat16)
    bf16_logits, features = jax.jit(functools.partial(bf16_model.apply, return_features=True))(
        variables, images
    )
    assert bf16_logits.dtype == jnp.float32
    assert features["pooled"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(logits))
    scale = np.max(np.abs(logits))
    np.testing.assert_allclose(bf16_logits, logits, rtol=0, atol=0.05 * scale)
    assert not np.array_equal(bf16_logits, logits)


@pytest.mark.parametrize("dtype", ["float32", jnp.float32, np.dtype("float32")])
def test_float32_spellings(dtype):
    assert computation_dtype(dtype) == jnp.float32
    assert models.get("cnn_small", 10, dtype=dtype).dtype == jnp.float32


def test_bfloat16_spellings():
    assert computation_dtype("bfloat16") == computation_dtype(jnp.bfloat16) == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["float16", "float64", "fp32", None, 3])
def test_unknown_dtypes_are_input_errors(dtype):
    with pytest.raises(InputError, match=f"dtype={dtype!r} is not allowed: one of 'float32'"):
        models.get("vgg8", 10, dtype=dtype)


# ------------------------------------------------------------------------ DeiT's ViT training


def _tiny_vit(drop_path_rate=0.0, dtype=jnp.float32):
    """Two blocks at 16 px (4 patches): stochastic depth and dtypes, fast."""
    return VisionTransformer(
        5, embed_dim=16, num_heads=2, depth=2, image_size=16, patch_size=8, dtype=dtype
    ).clone(drop_path_rate=drop_path_rate)


def test_drop_path_rates_rise_linearly_over_the_blocks_as_timms():
    np.testing.assert_allclose(drop_path_rates(0.1, 12), np.linspace(0, 0.1, 12))
    assert drop_path_rates(0.1, 1) == [0.0]
    assert models.get("deit_tiny", 10).drop_path_rate == 0.1
    assert models.get("deit_small", 10).drop_path_rate == 0.1
    assert models.get("vit_tiny", 10).drop_path_rate == 0.0
    assert [block.drop_path_rate for block in _tiny_vit(0.1).bind(_tiny_variables()).blocks] == [
        0.0,
        0.1,
    ]


def test_drop_path_drops_whole_examples_and_keeps_the_mean():
    branch = jnp.ones((20_000, 3, 2))
    dropped = np.asarray(drop_path(branch, 0.25, jax.random.key(0)))
    per_example = dropped.reshape(20_000, -1)
    assert (per_example == per_example[:, :1]).all()  # one draw per example
    assert set(np.unique(dropped)) == {0.0, np.float32(1 / 0.75)}
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.01
    assert abs(dropped.mean() - 1.0) < 0.02
    assert drop_path(branch, 0.25, None) is branch


@functools.cache
def _tiny_variables():
    return jax.jit(_tiny_vit().init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_stochastic_depth_only_in_train_mode_with_the_dropout_rng():
    variables = _tiny_variables()
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    plain = _tiny_vit().apply(variables, images)
    model = _tiny_vit(0.9)
    np.testing.assert_array_equal(model.apply(variables, images), plain)  # evaluation

    def train(seed):
        return model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))
    assert not np.allclose(train(0), plain)
    no_drop = _tiny_vit(0.0).apply(variables, images, train=True)  # no rng needed at rate 0
    np.testing.assert_array_equal(no_drop, plain)


def test_bfloat16_vit_keeps_the_residual_stream_and_attention_logits_in_float32():
    """The blocks' outputs (the residual stream) are float32, and the attention logits'
    matmul accumulates and returns float32 (torch autocast's float32 softmax input)."""
    model = _tiny_vit(dtype=jnp.bfloat16)
    variables = _tiny_variables()
    images = jnp.zeros((2, 16, 16, 3))
    _, state = model.apply(
        variables,
        images,
        capture_intermediates=lambda module, method: (
            (module.name or "").startswith("blocks") and method == "__call__"
        ),
    )
    outputs = jax.tree.leaves(state["intermediates"])
    assert len(outputs) == 2 and {output.dtype for output in outputs} == {jnp.dtype(jnp.float32)}
    jaxpr = str(jax.make_jaxpr(model.apply)(variables, images))
    assert jaxpr.count("preferred_element_type=float32") >= 2  # one logits matmul per block
    assert "bf16" in jaxpr  # the branches still compute in bfloat16
