"""mokd_jax.benchmark_like_peer: with the peer's recipe, our benchmark step and the PyTorch
peer's step do the same thing: on the same weights and batch, one step of each gives the
same losses and the same updated student."""

import functools

import jax
import numpy as np
import pytest

from mokd_jax import config_helpers, convert, models, networks, normalization
from mokd_jax.benchmark_like_peer import LIKE_PEER, logits_only_state
from mokd_jax.benchmark_ours import distillation_step, mode_config

# A narrow ResNet-10 in resnet18's layout (one block per stage): the same code as the
# benchmark's ResNets, a cheap compile.
BLOCKS, WIDTHS, STEM = (1, 1, 1, 1), (8, 16, 32, 64), 8
IMAGE_SIZE = 64  # at 32 px the last stage is 1 x 1 and train-mode BatchNorm amplifies round-off


@pytest.fixture(scope="module")
def torch_peer():
    pytest.importorskip("torch")
    from mokd_jax import torch_peer

    return torch_peer


def narrow_resnet(seed):
    """(torch model, its flax module) with random weights and BatchNorm statistics."""
    from torch_references import randomized

    from mokd_jax import torch_peer_models

    block = torch_peer_models.BasicBlock
    torch_model = randomized(torch_peer_models.TorchResNet(block, BLOCKS, 10, WIDTHS, STEM), seed)
    module = models.get("resnet18", 10).clone(stage_sizes=BLOCKS, widths=WIDTHS, stem_width=STEM)
    return "resnet18", torch_model, module


def narrow_vit(seed):
    """A two-block ViT of width 16 in DeiT's layout (timm's), random weights."""
    from torch_references import randomized

    from mokd_jax import torch_peer_models

    settings = {"depth": 2, "image_size": IMAGE_SIZE}
    torch_model = randomized(torch_peer_models.TorchViT(10, 16, 2, **settings), seed)
    module = models.get("vit_tiny", 10).clone(embed_dim=16, num_heads=2, **settings)
    return "vit_tiny", torch_model, module


def to_flax(arch, module, torch_model) -> dict:
    from test_convert import abstract_variables
    from torch_references import numpy_state_dict

    abstract = abstract_variables(module, IMAGE_SIZE)
    variables = convert.to_flax(arch, numpy_state_dict(torch_model), abstract)
    # Copies: the arrays may share memory with the torch tensors, which the peer's step
    # then updates in place, while our step, dispatched asynchronously, may still read them.
    return jax.tree.map(np.array, variables)


def like_peer_config(mode: str):
    base = config_helpers.with_overrides(
        config_helpers.base_config(),
        {
            **LIKE_PEER,
            "num_classes": 10,
            "student.learning_rate": 0.1,
            "student.weight_decay": 0.05,  # large enough that a missing decay shows
            "distill.task_weight": 0.1,
            "distill.logit_weight": 0.9,
        },
    )
    return mode_config(base, mode)


@pytest.mark.parametrize(
    ("mode", "students"),
    [
        pytest.param("kd_1bwd", narrow_resnet, marks=pytest.mark.slow),
        ("mokd", narrow_resnet),
        pytest.param("mokd", narrow_vit, marks=pytest.mark.slow),
    ],
)
def test_one_step_of_ours_and_of_the_peer_agree(torch_peer, mode, students):
    """Losses to 1e-4 and every updated student parameter to 1e-4: the same losses, the
    same gradients (MoKD's combination included) and the same SGD with weight decay, for
    a ResNet student and a ViT one (DeiT's layout; its drop-path is off, as in vit_tiny).
    `kd_1bwd` is marked slow because it adds a second compile of about the same cost while
    checking little more: `mokd` runs the same losses and optimizer, and a second
    backward."""
    _, teacher, teacher_module = narrow_resnet(0)
    arch, student, module = students(1)
    teacher_vars = to_flax("resnet18", teacher_module, teacher)
    student_vars = to_flax(arch, module, student)
    config = like_peer_config(mode)
    inputs = normalization.IMAGENET
    nets = networks.Networks(teacher_module, module, None, "pooled", inputs, inputs)
    step, tx = distillation_step(mode, config, nets, like_peer=True)
    state = logits_only_state(student_vars, tx)
    image_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    images = np.random.default_rng(0).integers(0, 256, (2, *image_shape), dtype=np.uint8)
    labels = np.array([3, 7], np.int32)
    new_state, metrics = jax.jit(step)(state, teacher_vars, images, labels)

    options = torch_peer.default_options("cpu")
    setup = torch_peer.build_setup(
        teacher,
        student,
        images,
        labels,
        inputs,
        options,
        config.student.learning_rate,
        config.student.weight_decay,
    )
    peer_step = torch_peer.PEER_STEPS[mode]
    peer_losses = peer_step(setup, config.distill, config.aggregation.mokd.max_norm).numpy()

    if mode == "kd_1bwd":
        np.testing.assert_allclose(metrics["loss"], peer_losses.sum(), rtol=1e-4, atol=1e-4)
    else:
        ours = [metrics["loss_task"], metrics["loss_distill"]]
        np.testing.assert_allclose(ours, peer_losses, rtol=1e-4, atol=1e-4)
    peer_params = to_flax(arch, module, setup.student)["params"]
    moved = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4)
    jax.tree.map(moved, new_state.params["student"], peer_params)
    head = module.head_name
    assert not np.allclose(peer_params[head]["kernel"], student_vars["params"][head]["kernel"])
