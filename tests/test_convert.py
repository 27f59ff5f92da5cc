"""Tests for mokd_jax.convert and scripts/convert_teacher.py: PyTorch teachers in Flax.

The torch reference models are written with torch.nn (torchvision and timm cannot be
installed beside the pinned CPU torch; RepDistiller and mdistiller are not packages), using
the real libraries' module names so that their state-dict keys are the real ones: the
torchvision / timm ones in `torch_references.py`, the RepDistiller / mdistiller ones in
`torch_zoo.py`. Parity runs small but structurally faithful models at 32x32 (resnet18,
mobilenet_v2, vgg13, mobile_half, the ShuffleNets and mobilenet_v1 themselves; a shrunk
bottleneck ResNet of either layout, a shrunk CIFAR ResNet and WRN, a 2-block DeiT and a
shrunk RegNetY, each with every kind of block); the full-size key layouts of every
convertible arch are checked shape for shape on torch's meta device, which allocates nothing.

Parity tolerance, rtol = atol / max|logits| = 1e-4: both sides compute in float32 with
different summation orders (oneDNN vs XLA); the differences measured here stay under 1e-6
of the logit scale, so 1e-4 leaves two orders of magnitude for deeper models and other
CPUs, while any mapping error (an untransposed kernel, swapped mean and var, a wrong
padding, q/k/v in the wrong order) moves the logits by O(1) relative.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from mokd_jax import checkpoint, convert, models, normalization, torch_layouts
from mokd_jax.errors import InputError
from mokd_jax.models.regnet import RegNet
from mokd_jax.models.resnet import BOTTLENECK, ResNet, cifar_resnet, wide_resnet
from mokd_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
import torch_zoo  # noqa: E402  (needs torch)
from torch_references import (  # noqa: E402  (needs torch)
    TORCH_RESNETS,
    Bottleneck,
    TorchMobileNetV2,
    TorchRegNet,
    TorchResNet,
    TorchViT,
    numpy_state_dict,
    randomized,
    timm_regnet_stages,
    torch_resnet,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4
IMAGENET_IDENTITY = {
    "input_normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
}


# --- helpers ------------------------------------------------------------------------------


def abstract_variables(module, size):
    init = jax.jit(lambda images: module.init(jax.random.key(0), images, train=False))
    return jax.eval_shape(init, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def max_relative_error(arch, torch_model, flax_module, size, batch=4):
    """Converts `torch_model` to `flax_module` and returns max |flax - torch| / max |torch|
    of their logits on random images, after asserting the parity tolerance."""
    variables = convert.to_flax(
        arch, numpy_state_dict(torch_model), abstract_variables(flax_module, size)
    )
    images = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    apply = jax.jit(lambda v, x: flax_module.apply(v, x, train=False))
    logits = np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=RTOL * scale)
    return float(np.abs(logits - expected).max() / scale)


# --- parity -------------------------------------------------------------------------------

# Full-size torch models of every convertible arch (vit_* are timm's ViTs, as deit_*).
REGNETY_160 = timm_regnet_stages(w0=200, wa=106.23, wm=2.48, depth=18, group_size=112)
FULL_SIZE = {
    **{arch: functools.partial(torch_resnet, arch) for arch in TORCH_RESNETS},
    "mobilenet_v2": TorchMobileNetV2,
    **dict.fromkeys(("deit_tiny", "vit_tiny"), functools.partial(TorchViT, dim=192, num_heads=3)),
    **dict.fromkeys(("deit_small", "vit_small"), functools.partial(TorchViT, dim=384, num_heads=6)),
    "regnety_160": lambda num_classes: TorchRegNet(num_classes, *REGNETY_160),
    **torch_zoo.REFERENCES,  # RepDistiller's CIFAR zoo, mdistiller's MobileNetV1
}

# Parity models: (arch whose layout converts them, torch model, Flax module, image size).
# Full size where a 32x32 forward is cheap; otherwise shrunk in width and depth, keeping
# every kind of block (projecting and identity shortcuts, several blocks in a stage).
SMALL_RESNET = {"widths": (8, 16, 24, 32), "stem": 16}
SMALL_VIT = {"depth": 2, "image_size": 32}
SMALL_REGNET = {"widths": (16, 32, 48, 64), "depths": (1, 2, 1, 1)}


def full_size_at_10_classes(arch):
    """A parity case of the full-size model (cheap at 32 px)."""
    return arch, FULL_SIZE[arch](10), models.get(arch, 10), 32


# resnet8x4's shape of stages (a stem narrower than stage 1: a stride-1 projection) at
# depth 14 (two blocks a stage).
SMALL_CIFAR_RESNET = (14, (8, 16, 24, 32))
PARITY = {
    "resnet18": lambda: ("resnet18", torch_resnet("resnet18"), models.get("resnet18", 10), 32),
    "bottleneck resnet": lambda: (
        "resnet50",
        TorchResNet(Bottleneck, (1, 2, 1, 1), 10, **SMALL_RESNET),
        ResNet(
            10,
            stage_sizes=(1, 2, 1, 1),
            block=BOTTLENECK,
            widths=SMALL_RESNET["widths"],
            stem_width=SMALL_RESNET["stem"],
        ),
        32,
    ),
    "mobilenet_v2": lambda: (
        "mobilenet_v2",
        TorchMobileNetV2(10),
        models.get("mobilenet_v2", 10),
        32,
    ),
    "deit, 2 blocks, 32 px": lambda: (
        "deit_tiny",
        TorchViT(10, dim=48, num_heads=3, patch=8, **SMALL_VIT),
        VisionTransformer(10, embed_dim=48, num_heads=3, patch_size=8, **SMALL_VIT),
        32,
    ),
    "cifar resnet, shrunk": lambda: (
        "resnet8x4",
        torch_zoo.repdistiller_resnet(*SMALL_CIFAR_RESNET, 10),
        cifar_resnet(*SMALL_CIFAR_RESNET, 10),
        32,
    ),
    "cifar resnet50, shrunk": lambda: (
        "resnet50_cifar",
        torch_zoo.TorchResNetV2((1, 2, 1, 1), 10, SMALL_RESNET["widths"], SMALL_RESNET["stem"]),
        ResNet(
            10,
            stage_sizes=(1, 2, 1, 1),
            block=BOTTLENECK,
            widths=SMALL_RESNET["widths"],
            stem_width=SMALL_RESNET["stem"],
            imagenet_stem=False,
        ),
        32,
    ),
    "wrn_16_1": lambda: (
        "wrn_40_2",
        torch_zoo.TorchWideResNet(16, 10, 1),
        wide_resnet(16, 1, 10),
        32,
    ),
    **{
        arch: functools.partial(full_size_at_10_classes, arch)
        for arch in ("vgg13", "mobile_half", "shufflenet_v1", "shufflenet_v2", "mobilenet_v1")
    },
    "regnety, shrunk": lambda: (
        "regnety_160",
        TorchRegNet(10, **SMALL_REGNET, group_size=8, stem=16),
        RegNet(10, **SMALL_REGNET, group_width=8, stem_width=16),
        32,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY)
def test_logits_match_torch(name):
    arch, torch_model, flax_module, size = PARITY[name]()
    error = max_relative_error(arch, randomized(torch_model), flax_module, size)
    print(f"{name}: max relative error {error:.1e}")


def test_every_convertible_arch_has_a_reference():
    assert sorted(FULL_SIZE) == sorted(torch_layouts.NAMES)


def test_regnety_160_widths_are_timms():
    """The widths written out in mokd_jax's RegNet are the ones timm derives."""
    widths, depths, group_size = REGNETY_160
    module = models.get("regnety_160", 10)
    assert (module.widths, module.depths, module.group_width) == (widths, depths, group_size)


@pytest.mark.parametrize("arch", sorted(FULL_SIZE))
def test_full_size_layout_matches_torch(arch):
    """Every key of the full-size torch model, with its shape, and no other: the layout
    that `to_flax` demands (meta tensors: no memory, no compute)."""
    with torch.device("meta"):
        state_dict = FULL_SIZE[arch](1000).state_dict()
    expected = {
        key: tuple(value.shape)
        for key, value in state_dict.items()
        if not key.endswith("num_batches_tracked")
    }
    module = models.get(arch, 1000)
    shapes = convert.torch_shapes(arch, abstract_variables(module, 224))
    assert {key: shape for key, (_, shape) in shapes.items()} == expected


@pytest.mark.parametrize("arch", ["mobilenet_v2", "deit_tiny"])
def test_convert_takes_the_class_count_from_the_head(arch):
    """torchvision's `classifier.1` and timm's `head`; a ViT's variables at its image size."""
    variables, identity = convert.convert(arch, numpy_state_dict(FULL_SIZE[arch](7)))
    assert identity == {"model": arch, "num_classes": 7, **IMAGENET_IDENTITY}
    assert variables["params"][models.get(arch, 7).head_name]["kernel"].shape == (
        models.get(arch, 7).feature_width,
        7,
    )


def test_converted_teachers_record_their_sources_input_statistics():
    """torchvision / timm teachers were trained on ImageNet's statistics, the CIFAR zoo's on
    CIFAR-100's; an explicit choice overrides either."""
    assert (
        convert.identity("resnet50", 1000)["input_normalization"]
        == IMAGENET_IDENTITY["input_normalization"]
    )
    for arch in models.CIFAR_NAMES:
        saved = convert.identity(arch, 100)
        assert normalization.from_identity(saved, "DIR") == normalization.CIFAR100, arch
    explicit = convert.identity("resnet18", 10, normalization.UNIT)
    assert normalization.from_identity(explicit, "DIR") == normalization.UNIT


@pytest.fixture(scope="module")
def resnet18():
    """A random torchvision resnet18 with 10 classes (shared: building it takes a second)."""
    return randomized(torch_resnet("resnet18"))


# --- strictness ---------------------------------------------------------------------------


def _without(key):
    return lambda state_dict: state_dict.pop(key)


def _with(key, shape):
    return lambda state_dict: state_dict.update({key: np.zeros(shape, np.float32)})


@pytest.mark.parametrize(
    "arch, edit, message",
    [
        # a resnet18 read as a resnet50: the first bottleneck conv is 1x1, not 3x3
        ("resnet50", None, r"'layer1\.0\.conv1\.weight'=\(64, 64, 3, 3\).*\(64, 64, 1, 1\)"),
        ("resnet18", _without("layer4.1.bn2.running_var"), r"no 'layer4\.1\.bn2\.running_var'"),
        # a resnet34's third block in stage 1: resnet18 has two
        ("resnet18", _with("layer1.2.conv1.weight", (64, 64, 3, 3)), r"'layer1\.2\.conv1\.weight'"),
        ("resnet18", _without("fc.weight"), r"no classifier weight 'fc\.weight'"),
    ],
)
def test_a_state_dict_of_another_model_is_refused(resnet18, arch, edit, message):
    state_dict = numpy_state_dict(resnet18)
    if edit is not None:
        edit(state_dict)
    with pytest.raises(InputError, match=message) as error:
        convert.convert(arch, state_dict)
    assert arch in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "source, arch, message",
    [
        # 9 blocks a stage read as 18
        ("resnet56", "resnet110", r"the state dict has no 'layer\d\.(9|1\d)\..*missing keys"),
        # twice as wide
        ("wrn_40_2", "wrn_40_1", r"'block1\.layer\.0\.conv1\.weight'=\(32, 16, 3, 3\).*\(16, 16"),
        # a ShuffleNetV2 DownBlock begins with a depthwise conv, a V1 unit with a conv1x1
        ("shufflenet_v2", "shufflenet_v1", r"'layer1\.0\.conv1\.weight'=\(24, 1, 3, 3\)"),
        # RepDistiller's MobileNetV2 read as torchvision's
        ("mobile_half", "mobilenet_v2", r"no classifier weight 'classifier\.1\.weight'"),
    ],
)
def test_a_cifar_state_dict_of_another_model_is_refused(source, arch, message):
    state_dict = numpy_state_dict(FULL_SIZE[source](100))
    with pytest.raises(InputError, match=message) as error:
        convert.convert(arch, state_dict)
    assert arch in str(error.value) and "\n" not in str(error.value)


def test_a_repdistiller_training_checkpoint_is_read(tmp_path):
    """RepDistiller's and mdistiller's teacher checkpoints (`cifar_teachers`, `ckpt.pth`)
    hold the state dict under 'model' beside the epoch, the accuracy and the optimizer's
    state; `torch.load(weights_only=True)` reads them and `unwrap` finds the weights."""
    model = randomized(FULL_SIZE["resnet20"](100))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers in the optimizer's state
    path = str(tmp_path / "ckpt.pth")
    checkpoint_content = {"epoch": 240, "best_acc": torch.tensor(69.06)}
    checkpoint_content |= {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint_content, path)
    state_dict = convert.read_state_dict(path)
    assert state_dict.keys() == model.state_dict().keys()
    variables = convert.convert("resnet20", state_dict)[0]
    np.testing.assert_array_equal(
        variables["params"]["fc"]["kernel"], model.fc.weight.detach().numpy().T
    )


def test_unknown_arch_lists_the_convertible_ones():
    with pytest.raises(InputError, match="cnn_large.*resnet18, resnet34, resnet50, resnet101"):
        convert.layout("cnn_large")


def test_a_torch_file_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    path = tmp_path / "teacher.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(InputError, match="pip install torch"):
        convert.read_state_dict(str(path))


# --- the command line and the checkpoint it writes -----------------------------------------


def run_cli(*args):
    script = os.path.join(ROOT, "scripts", "convert_teacher.py")
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_cli_writes_a_teacher_checkpoint(resnet18, tmp_path, suffix):
    state_dict = numpy_state_dict(resnet18)
    source = str(tmp_path / f"teacher{suffix}")
    if suffix == ".pth":  # a training script's checkpoint of a DataParallel model
        wrapped = {f"module.{key}": value for key, value in resnet18.state_dict().items()}
        torch.save({"epoch": 90, "state_dict": wrapped}, source)
    else:
        safetensors_numpy.save_file(state_dict, source)
    output = str(tmp_path / "teacher")
    result = run_cli("--arch=resnet18", f"--input={source}", f"--output={output}")
    assert result.returncode == 0, result.stderr
    assert checkpoint.read_identity(output) == {
        "model": "resnet18",
        "num_classes": 10,
        **IMAGENET_IDENTITY,
    }
    expected, _ = convert.convert("resnet18", state_dict)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_variables(output), expected)
    assert sorted(os.listdir(tmp_path)) == sorted([f"teacher{suffix}", "teacher"])


@pytest.mark.slow
def test_cli_refuses_an_occupied_output(tmp_path):
    output = tmp_path / "teacher"
    output.mkdir()
    (output / "notes.txt").write_text("keep")
    result = run_cli("--arch=resnet18", "--input=unread.pth", f"--output={output}")
    assert result.returncode == 2
    assert "--overwrite" in result.stderr and result.stderr.count("\n") == 1
    assert os.listdir(output) == ["notes.txt"] and (output / "notes.txt").read_text() == "keep"


@pytest.mark.slow
def test_cli_records_the_input_statistics_it_is_given(resnet18, tmp_path):
    source = str(tmp_path / "teacher.safetensors")
    safetensors_numpy.save_file(numpy_state_dict(resnet18), source)
    output = str(tmp_path / "teacher")
    arguments = ("--arch=resnet18", f"--input={source}", f"--output={output}")
    bad = run_cli(*arguments, "--input_normalization=0.5,0.5/0.25")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "input_normalization='0.5,0.5/0.25' is not allowed" in bad.stderr
    assert not os.path.exists(output)
    result = run_cli(*arguments, "--input_normalization=cifar100")
    assert result.returncode == 0, result.stderr
    assert "normalised with cifar100" in result.stdout
    saved = checkpoint.read_identity(output)
    assert normalization.from_identity(saved, output) == normalization.CIFAR100


def test_overwrite_replaces_the_output_whole(tmp_path):
    output = tmp_path / "teacher"
    output.mkdir()
    (output / "notes.txt").write_text("old")
    variables = {"params": {"w": np.arange(3.0)}}
    convert.write(str(output), variables, {"model": "m", "num_classes": 2}, overwrite=True)
    assert "notes.txt" not in os.listdir(output)
    np.testing.assert_array_equal(checkpoint.load_variables(str(output))["params"]["w"], [0, 1, 2])
    assert os.listdir(tmp_path) == ["teacher"]


def test_a_failed_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    output = tmp_path / "teacher"
    output.mkdir()
    (output / "notes.txt").write_text("old")

    def full_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint, "export_variables", full_disk)
    with pytest.raises(OSError):
        convert.write(str(output), {"params": {}}, {"model": "m", "num_classes": 2}, True)
    assert os.listdir(tmp_path) == ["teacher"] and (output / "notes.txt").read_text() == "old"
