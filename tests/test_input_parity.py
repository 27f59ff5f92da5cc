"""End-to-end parity with PyTorch from uint8 pixels: a converted torchvision-layout ResNet
and a converted timm-layout DeiT, written as the converter writes them and read back the
way the trainer reads a teacher (identity -> input statistics, variables), give on the same
uint8 images the logits their torch models give through torchvision's
`ToTensor()` + `Normalize(mean, std)`, written here: (x / 255 - mean) / std on CHW floats.

Tolerance: max |difference| <= 1e-4 of the largest logit, as tests/test_convert.py (float32
on both sides, different summation orders). Fed the old global scaling (x / 255 - 0.5) /
0.25 instead, the same teachers are off by percents.
"""

import jax
import numpy as np
import pytest

from mokd_jax import checkpoint, convert, normalization, steps
from mokd_jax.models.resnet import BASIC, ResNet
from mokd_jax.models.vit import VisionTransformer

torch = pytest.importorskip("torch")
from torch_references import BasicBlock, TorchResNet, TorchViT, numpy_state_dict, randomized  # noqa: E402

RTOL = 1e-4
SMALL_RESNET = {"widths": (8, 16, 24, 32), "stem": 16}
SMALL_VIT = {"embed_dim": 48, "num_heads": 3, "depth": 2, "image_size": 32}

# (arch whose layout converts it, torch model, Flax module, image side)
TEACHERS = {
    "torchvision resnet": lambda: (
        "resnet18",
        TorchResNet(BasicBlock, (1, 1, 1, 1), 10, **SMALL_RESNET),
        ResNet(10, stage_sizes=(1, 1, 1, 1), block=BASIC, widths=SMALL_RESNET["widths"],
               stem_width=SMALL_RESNET["stem"]),
        64,
    ),
    "timm deit": lambda: (
        "deit_tiny",
        TorchViT(10, dim=48, num_heads=3, depth=2, image_size=32, patch=8),
        VisionTransformer(10, patch_size=8, **SMALL_VIT),
        32,
    ),
}  # fmt: skip


def torchvision_logits(model, images: np.ndarray, inputs: normalization.Normalization):
    """torchvision's ToTensor + Normalize on uint8 HWC images, then the torch model."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(inputs.mean).view(1, -1, 1, 1)
    std = torch.tensor(inputs.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((pixels - mean) / std).numpy()


def exported_teacher(tmp_path, arch, torch_model, module, size):
    """The torch model converted and written as `mokd-convert` writes it, read back as the
    trainer reads a teacher: (variables, the input statistics of its identity)."""
    directory = str(tmp_path / "teacher")
    abstract = jax.eval_shape(
        lambda: module.init(jax.random.key(0), np.zeros((1, size, size, 3)), train=False)
    )
    variables = convert.to_flax(arch, numpy_state_dict(torch_model), abstract)
    convert.write(directory, variables, convert.identity(arch, 10))
    inputs = normalization.from_identity(checkpoint.read_identity(directory), directory)
    return checkpoint.load_variables(directory), inputs


@pytest.mark.parametrize("name", TEACHERS)
def test_converted_teacher_matches_torch_from_uint8_pixels(tmp_path, name):
    arch, torch_model, module, size = TEACHERS[name]()
    torch_model = randomized(torch_model)
    variables, inputs = exported_teacher(tmp_path, arch, torch_model, module, size)
    assert inputs == normalization.IMAGENET
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    expected = torchvision_logits(torch_model, images, normalization.IMAGENET)
    predict = jax.jit(steps.predict, static_argnames=("model", "inputs"))
    logits = np.asarray(predict(variables, images, model=module, inputs=inputs))
    scale = np.abs(expected).max()
    error = np.abs(logits - expected).max() / scale
    print(f"{name}: max relative error {error:.1e}")
    assert error <= RTOL
    old_scaling = np.asarray(predict(variables, images, model=module, inputs=normalization.UNIT))
    assert np.abs(old_scaling - expected).max() / scale > 100 * RTOL
