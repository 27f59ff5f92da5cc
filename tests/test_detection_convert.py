"""mokd_jax.detection.convert_retinanet: torchvision's RetinaNets (the real torchvision, through
tests/torchvision_shim.py) converted to mokd_jax's RetinaNet, and their outputs compared.

Parity tolerance, max |ours - torchvision| / max |torchvision| <= 1e-4 for the class logits,
the box regressions and every pyramid level, as tests/test_convert.py's: both sides compute
in float32 with different summation orders, and any mapping error (a transposed kernel, an
FPN level's weights on another level, a GroupNorm in the wrong place, another flattening
order) moves the outputs by O(1) relative. All weights and BatchNorm statistics are random
(`randomized`): torchvision's own head init (normal(0, 0.01)) would leave the logits at
their bias and hide most mistakes.

The fast tier runs torchvision's ResNet-50 models from its builders, each from the same
uint8 images through its own preprocessing (about 5 s each on 2 idle cores); the slow tier
also RetinaNets on a resnet18 backbone (built from torchvision's parts as its builders build
the ResNet-50 ones) at 40x72 px, where the FPN upsamples 2 -> 3 and 3 -> 5 rows and 3 -> 5
and 5 -> 9 columns (not an exact 2x).
"""

import functools
import os
import subprocess
import sys
from collections.abc import Callable

import jax
import numpy as np
import pytest

from mokd_jax import checkpoint, convert, normalization, torch_layouts
from mokd_jax.detection import convert_retinanet
from mokd_jax.detection.retinanet import RetinaNet
from mokd_jax.errors import InputError

torch = pytest.importorskip("torch")
from torch_references import numpy_state_dict, randomized  # noqa: E402  (needs torch)
from torchvision_shim import import_torchvision  # noqa: E402  (needs torch)

torchvision = import_torchvision()
from torchvision.models.detection import backbone_utils  # noqa: E402
from torchvision.models.detection import retinanet as torch_retinanet  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4
ARCHS = tuple(convert_retinanet.VARIANTS)
CLASSES = 3
SMALL_SIZE = (40, 72)


def torchvision_resnet18_retinanet(variant: str):
    """torchvision's RetinaNet on a resnet18, assembled as retinanet_resnet50_fpn (v1) and
    _v2 assemble theirs: P6 from P5 (v1, LastLevelP6P7(256, 256)) or from C5 (v2), v2's
    heads with GroupNorm(32); every backbone layer trainable (irrelevant in eval mode)."""
    v2 = variant == "v2"
    backbone = backbone_utils._resnet_fpn_extractor(
        torchvision.models.resnet18(),
        5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(512 if v2 else 256, 256),
    )
    norm = functools.partial(torch.nn.GroupNorm, 32) if v2 else None
    head = torch_retinanet.RetinaNetHead(256, 9, CLASSES, norm_layer=norm)
    return randomized(torch_retinanet.RetinaNet(backbone, CLASSES, head=head))


@functools.cache
def small_model(variant: str) -> tuple[dict, Callable]:
    """Our resnet18 RetinaNet's abstract variables and its jitted apply (traced and
    compiled once per variant)."""
    model = RetinaNet("resnet18", CLASSES, variant=variant)
    return convert_retinanet.abstract_variables(model), jax.jit(model.apply)


def torchvision_outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Class logits, box regressions and the pyramid levels of torchvision's `model` on
    normalised NCHW `images`: its backbone and head, as its forward runs them after the
    transform; the head returns [B, sum of H * W * A, K], the order postprocess splits."""
    with torch.no_grad():
        features = model.backbone(torch.from_numpy(images))
        head = model.head(list(features.values()))
    levels = [feature.permute(0, 2, 3, 1).numpy() for feature in features.values()]
    return {
        "class_logits": head["cls_logits"].numpy(),
        "box_regression": head["bbox_regression"].numpy(),
        **{f"p{level}": feature for level, feature in zip(range(3, 8), levels, strict=True)},
    }


def our_outputs(apply, variables, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = apply(variables, images)
    return {
        "class_logits": np.asarray(outputs.class_logits),
        "box_regression": np.asarray(outputs.box_regression),
        **{name: np.asarray(feature) for name, feature in outputs.features.items()},
    }


def relative_errors(ours: dict, theirs: dict) -> dict[str, float]:
    """max |ours - theirs| / max |theirs| per output, after checking the shapes agree."""
    assert {name: value.shape for name, value in ours.items()} == {
        name: value.shape for name, value in theirs.items()
    }
    return {
        name: float(np.abs(ours[name] - theirs[name]).max() / np.abs(theirs[name]).max())
        for name in theirs
    }


def random_inputs(shape, seed=0) -> np.ndarray:
    """Normalised-looking NHWC images."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def small_parity(variant: str, torch_model, source_bn_epsilon=1e-5) -> dict[str, float]:
    abstract, apply = small_model(variant)
    variables = convert_retinanet.to_flax(
        ARCHS[0], numpy_state_dict(torch_model), abstract, source_bn_epsilon
    )
    images = random_inputs((1, *SMALL_SIZE, 3))
    expected = torchvision_outputs(torch_model, images.transpose(0, 3, 1, 2))
    return relative_errors(our_outputs(apply, variables, images), expected)


# --- the key layout -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_is_torchvisions(arch):
    """Every key of torchvision's full-size model, with its shape, and no other (meta
    tensors: nothing allocated), in both backbone norm kinds' key sets (BatchNorm2d adds
    only num_batches_tracked, which is ignored)."""
    with torch.device("meta"):
        build = getattr(torchvision.models.detection, arch)
        state_dict = build(weights=None, weights_backbone=None, num_classes=91).state_dict()
    expected = {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not key.endswith("num_batches_tracked")
    }
    abstract = jax.eval_shape(
        convert_retinanet.model(arch, 91).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32),
    )
    shapes = convert.torch_shapes(arch, abstract)
    assert {key: shape for key, (_, shape) in shapes.items()} == expected


def test_the_variants_are_the_layouts_detection_names():
    assert ARCHS == torch_layouts.DETECTION_NAMES


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_resnet18_retinanet_matches_torchvision_at_odd_sizes(variant):
    errors = small_parity(variant, torchvision_resnet18_retinanet(variant))
    print(f"{variant}: max relative errors {errors}")
    assert max(errors.values()) < RTOL, errors


@pytest.mark.slow
def test_a_source_bn_epsilon_is_folded_into_the_variance():
    """A backbone run with eps 0 (torchvision's published v1 COCO weights), some stem
    channels' running variances tiny, where the epsilon matters: converted with
    source_bn_epsilon=0 it matches, with the default it does not."""
    torch_model = torchvision_resnet18_retinanet("v1")
    for module in torch_model.backbone.body.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    torch_model.backbone.body.bn1.running_var[::8] = 1e-6
    assert max(small_parity("v1", torch_model, source_bn_epsilon=0.0).values()) < RTOL
    assert max(small_parity("v1", torch_model).values()) > 100 * RTOL


def _uint8_images(height, width, batch=2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_resnet50_retinanet_matches_torchvision_from_uint8_images(arch):
    """torchvision's builder at min_size = max_size = 128, so that its transform keeps a
    96x128 image as is (scale min(128 / 96, 128 / 128) = 1) and pads nothing (a multiple
    of 32): its normalised batch is then ours (ImageNet `Normalization` of the uint8
    pixels), which the test checks before comparing the outputs."""
    build = getattr(torchvision.models.detection, arch)
    torch_model = randomized(
        build(weights=None, weights_backbone=None, num_classes=CLASSES, min_size=128, max_size=128)
    )
    pixels = _uint8_images(96, 128)
    with torch.no_grad():
        batch, _ = torch_model.transform(
            [torch.from_numpy(image).permute(2, 0, 1) / 255.0 for image in pixels]
        )
    theirs = batch.tensors.numpy()
    inputs = np.asarray(normalization.apply(normalization.IMAGENET, pixels))
    np.testing.assert_allclose(inputs, theirs.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)

    variables, identity = convert_retinanet.convert(arch, numpy_state_dict(torch_model))
    model = convert_retinanet.model(arch, identity["num_classes"])
    ours = our_outputs(jax.jit(model.apply), variables, inputs)
    errors = relative_errors(ours, torchvision_outputs(torch_model, theirs))
    print(f"{arch}: max relative errors {errors}")
    assert max(errors.values()) < RTOL, errors


# --- what a state dict must be ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state_dicts() -> dict[str, dict[str, np.ndarray]]:
    return {
        variant: numpy_state_dict(torchvision_resnet18_retinanet(variant))
        for variant in ("v1", "v2")
    }


def legacy(key: str) -> str:
    """The key as torchvision stored it before its FPN and head convs became
    Conv2dNormActivations (v1 has no norms, so each such key ends in '.0.weight|bias')."""
    for prefix in ("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks."):
        if key.startswith(prefix):
            index, _, leaf = key.removeprefix(prefix).split(".")
            return f"{prefix}{index}.{leaf}"
    for head in ("head.classification_head.conv.", "head.regression_head.conv."):
        if key.startswith(head):
            index, _, leaf = key.removeprefix(head).split(".")
            return f"{head}{2 * int(index)}.{leaf}"  # conv, relu, conv, relu, ...
    return key


def test_legacy_keys_are_read_as_the_current_ones(small_state_dicts):
    current = small_state_dicts["v1"]
    old = {legacy(key): value for key, value in current.items()}
    assert "backbone.fpn.inner_blocks.0.weight" in old
    assert "head.regression_head.conv.6.bias" in old
    assert {convert_retinanet.current_key(key) for key in old} == set(current)
    abstract, _ = small_model("v1")
    jax.tree.map(
        np.testing.assert_array_equal,
        convert_retinanet.to_flax(ARCHS[0], old, abstract),
        convert_retinanet.to_flax(ARCHS[0], current, abstract),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_a_resnet18_body_is_refused_as_a_resnet50s(small_state_dicts, arch):
    """A 3x3 conv where a bottleneck has a 1x1: the first mismatch in the state dict."""
    with pytest.raises(InputError, match=r"'backbone\.body\.layer1\.0\.conv1\.weight'") as error:
        convert_retinanet.convert(arch, small_state_dicts[convert_retinanet.VARIANTS[arch]])
    assert arch in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "source, target, message",
    [
        ("v2", "v1", r"'backbone\.fpn\.extra_blocks\.p6\.weight'=\(256, 512, 3, 3\)"),
        ("v1", "v2", r"'backbone\.fpn\.extra_blocks\.p6\.weight'=\(256, 256, 3, 3\)"),
    ],
)
def test_a_state_dict_of_the_other_variant_is_refused(small_state_dicts, source, target, message):
    """P6 reads C5 (512 channels in a resnet18) in v2, P5 (256) in v1."""
    with pytest.raises(InputError, match=message):
        convert_retinanet.to_flax(ARCHS[0], small_state_dicts[source], small_model(target)[0])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("head.regression_head.conv.3.0.weight"), r"no 'head\.regression_head"),
        (
            lambda sd: sd.update({"head.classification_head.conv.4.0.bias": np.zeros(256)}),
            r"'head\.classification_head\.conv\.4\.0\.bias'.*has no such parameter",
        ),
        (
            lambda sd: sd.update({"head.classification_head.conv.3.bias": np.zeros(256)}),
            r"'head\.classification_head\.conv\.3\.bias'.*has no such parameter",
        ),
        (
            lambda sd: sd.update({"head.classification_head.conv.2.bias": np.zeros(256)}),
            r"conv\.2\.bias'.*reads it as '.*conv\.1\.0\.bias', which the state dict also",
        ),
    ],
)
def test_a_missing_or_unused_key_is_named(small_state_dicts, edit, message):
    """A missing head conv, a fifth one, an odd legacy index (a relu holds no weights), a
    legacy key beside the current key it stands for."""
    state_dict = dict(small_state_dicts["v1"])
    edit(state_dict)
    abstract, _ = small_model("v1")
    with pytest.raises(InputError, match=message):
        convert_retinanet.to_flax(ARCHS[0], state_dict, abstract)


def test_the_class_count_is_the_logits_per_anchor(small_state_dicts):
    state_dict = dict(small_state_dicts["v1"])
    assert convert_retinanet.num_classes(ARCHS[0], state_dict) == CLASSES
    state_dict["head.classification_head.cls_logits.bias"] = np.zeros(9 * CLASSES + 1)
    with pytest.raises(InputError, match=r"cls_logits\.bias'=\(28,\).*each of 9 anchors x classes"):
        convert_retinanet.num_classes(ARCHS[0], state_dict)
    del state_dict["head.classification_head.cls_logits.bias"]
    with pytest.raises(InputError, match=r"arch='retinanet_resnet50_fpn'.*no 'head\."):
        convert_retinanet.num_classes(ARCHS[0], state_dict)


def test_a_negative_source_epsilon_is_refused(small_state_dicts):
    abstract, _ = small_model("v1")
    with pytest.raises(InputError, match=r"source_bn_epsilon=-1e-05.*>= 0"):
        convert_retinanet.to_flax(ARCHS[0], small_state_dicts["v1"], abstract, -1e-5)


# --- the command line -------------------------------------------------------------------------


def run_cli(*args):
    script = os.path.join(ROOT, "scripts", "convert_teacher.py")
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_writes_a_retinanet_teacher(tmp_path):
    """The published v1 COCO weights' case: legacy keys, 91 classes, eps 0."""
    with torch.device("meta"):
        shapes = torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None
        ).state_dict()
    rng = np.random.default_rng(0)
    state_dict = {
        legacy(key): rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        for key, value in shapes.items()
        if not key.endswith("num_batches_tracked")
    }
    source, output = str(tmp_path / "retinanet.pth"), str(tmp_path / "teacher")
    torch.save({key: torch.from_numpy(value) for key, value in state_dict.items()}, source)
    arch = "--arch=retinanet_resnet50_fpn"
    result = run_cli(arch, f"--input={source}", f"--output={output}", "--bn_epsilon=0")
    assert result.returncode == 0, result.stderr
    assert checkpoint.read_identity(output) == convert_retinanet.identity(ARCHS[0], 91)
    expected, _ = convert_retinanet.convert(ARCHS[0], state_dict, source_bn_epsilon=0.0)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_variables(output), expected)


@pytest.mark.slow
def test_cli_refuses_a_bn_epsilon_for_a_classifier(tmp_path):
    result = run_cli("--arch=resnet18", "--input=x.pth", f"--output={tmp_path}", "--bn_epsilon=0")
    assert result.returncode == 2
    assert "bn_epsilon=0.0 is not allowed: the default 1e-05 for resnet18" in result.stderr
