"""mokd_jax.export (`mokd-export`) and convert.to_torch: exported networks as PyTorch
safetensors in the torchvision / timm key layout, the exact inverse of mokd-convert.

The torch reference models are those of tests/torch_references.py (the real libraries'
module names, so the real state-dict keys)."""

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from safetensors import numpy as safetensors_numpy
from test_convert import PARITY, RTOL, SMALL_RESNET, abstract_variables
from torch_references import Bottleneck, TorchResNet, numpy_state_dict, randomized

from mokd_jax import checkpoint, convert, export, normalization, state, steps
from mokd_jax.errors import InputError
from mokd_jax.models.resnet import BOTTLENECK, ResNet

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def write_exported(directory, variables, arch, num_classes=10, inputs=normalization.IMAGENET):
    identity = {"model": arch, "num_classes": num_classes, **normalization.to_identity(inputs)}
    checkpoint.export_variables(str(directory), variables, identity, step=3)


@pytest.mark.parametrize("name", ["resnet18", "deit, 2 blocks, 32 px"])
def test_convert_then_export_gives_back_the_torch_state_dict_exactly(tmp_path, name):
    arch, torch_model, flax_module, size = PARITY[name]()
    original = numpy_state_dict(randomized(torch_model))
    variables = convert.to_flax(arch, original, abstract_variables(flax_module, size))
    write_exported(tmp_path / "net", variables, arch)
    info = export.export(str(tmp_path / "net"), str(tmp_path / "net.safetensors"))
    exported = safetensors_numpy.load_file(str(tmp_path / "net.safetensors"))
    assert sorted(exported) == sorted(original)  # every key, nothing more
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    assert info["model"] == arch and json.loads(info["input_mean"]) == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_a_trained_network_loads_strictly_into_torch_with_the_same_logits(tmp_path):
    """A bottleneck ResNet (resnet50's layout, shrunk) trained 3 steps here, so its weights
    and BatchNorm statistics are its own; exported, loaded with strict=True, and run by
    torch on the same normalised images. Slow: compiles a training step."""
    flax_module = ResNet(
        10,
        stage_sizes=(1, 2, 1, 1),
        block=BOTTLENECK,
        widths=SMALL_RESNET["widths"],
        stem_width=SMALL_RESNET["stem"],
    )
    tx = optax.sgd(0.1, momentum=0.9)
    train_state = state.create_teacher_state(flax_module, (32, 32, 3), tx, jax.random.key(0))
    step = jax.jit(
        functools.partial(
            steps.teacher_step, model=flax_module, tx=tx, inputs=normalization.IMAGENET
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        train_state, _ = step(train_state, images, rng.integers(0, 10, 8))
    variables = {"params": train_state.params, "batch_stats": train_state.batch_stats}
    write_exported(tmp_path / "net", variables, "resnet50")
    export.export(str(tmp_path / "net"), str(tmp_path / "net.safetensors"))

    torch_model = TorchResNet(Bottleneck, (1, 2, 1, 1), 10, **SMALL_RESNET).eval()
    torch_model.load_state_dict(
        safetensors_torch.load_file(str(tmp_path / "net.safetensors")), strict=True
    )
    images = np.asarray(normalization.apply(normalization.IMAGENET, images))
    expected = np.asarray(flax_module.apply(variables, images, train=False))
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=RTOL, atol=RTOL * scale)


def small_cnn(tmp_path):
    """An exported cnn_small, a model without a torch layout (refused before its variables
    are read, so any will do)."""
    write_exported(tmp_path / "cnn", {"params": {"w": np.zeros(2)}}, "cnn_small")
    return str(tmp_path / "cnn")


def test_a_model_without_a_torch_layout_is_refused_listing_the_exportable_ones(tmp_path):
    with pytest.raises(InputError, match="'cnn_small', the exportable models are resnet18, "):
        export.export(small_cnn(tmp_path), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "output, message", [("x.pth", "ending in .safetensors"), ("taken.safetensors", "a new file")]
)
def test_bad_output_is_refused_before_reading(tmp_path, output, message):
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    with pytest.raises(InputError, match=message):
        export.export(str(tmp_path / "missing"), str(tmp_path / output))
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"


def test_to_torch_of_another_arch_lists_the_convertible_ones():
    with pytest.raises(InputError, match="arch='cnn_small'.*resnet18"):
        convert.to_torch("cnn_small", {"params": {}})


@pytest.mark.slow
def test_the_command_exits_2_with_one_line_on_bad_input(tmp_path):
    """A subprocess (it imports JAX: seconds)."""
    directory = small_cnn(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "mokd_jax.export", f"--checkpoint_dir={directory}",
         f"--output={tmp_path}/cnn.safetensors"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "exportable models" in errors[0]
