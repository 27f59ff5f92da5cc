"""The PyTorch peer of the benchmark's `kd_1bwd` and `mokd` steps (`mokd-benchmark
--framework=torch|both`): what a PyTorch user would write for the same distillation, so
that our jitted steps are timed against it on the same shapes and data.

Needs torch (`pip install .[torch]`): `mokd_jax.benchmark` imports this module only when a
torch framework is asked for. The models are `mokd_jax.torch_peer_models`' (torchvision's
ResNets, timm's RegNetY and ViT/DeiT, in those libraries' layouts), the MoKD weights
`mokd_jax.torch_peer_weights`'.

Both peer steps run the teacher in eval mode under `no_grad`, the student in train mode,
and the loss vector [task_weight * CE, logit_weight * T^2 KL] of our `distill` settings;
the optimizer is SGD with momentum 0.9 and L2 weight decay at a constant rate.
  kd_1bwd  one backward of the summed losses, then SGD;
  mokd     two backward passes (the first keeps the graph) for the two per-objective
           gradients, our `mokd` weights for K = 2 in closed form (min-norm point of the
           log-loss gradients, `sum_norm` rescale, clip), the combination written to
           `.grad`, then SGD.
When the benchmark runs a peer, our steps run these losses and this optimizer too
(`mokd_jax.benchmark_like_peer`, which says why logits only), so that both frameworks do
the same work.
"""

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mokd_jax import models
from mokd_jax.checks import check_choice
from mokd_jax.models.regnet import RegNet
from mokd_jax.models.vit import VisionTransformer
from mokd_jax.normalization import Normalization
from mokd_jax.torch_peer_models import TORCH_RESNETS, TorchRegNet, TorchViT, torch_resnet
from mokd_jax.torch_peer_weights import mokd_coefficients

PEER_MODES = ("kd_1bwd", "mokd")


# ----------------------------------------------------------------------------- models


def torch_regnet(ours: RegNet, num_classes: int) -> nn.Module:
    return TorchRegNet(
        num_classes, ours.widths, ours.depths, ours.group_width, ours.stem_width, ours.se_ratio
    )


def torch_vit(ours: VisionTransformer, num_classes: int) -> nn.Module:
    return TorchViT(
        num_classes,
        ours.embed_dim,
        ours.num_heads,
        ours.depth,
        ours.image_size,
        ours.patch_size,
        ours.mlp_ratio,
        ours.drop_path_rate,
    )


TORCH_BUILDERS = {RegNet: torch_regnet, VisionTransformer: torch_vit}
"""Our module types with a torch counterpart, built from the module's own settings."""

PEER_ARCHITECTURES = (
    *TORCH_RESNETS,
    *(name for name in models.NAMES if type(models.get(name, 2)) in TORCH_BUILDERS),
)
"""Our models with a torch peer: torchvision's ResNets, and those of TORCH_BUILDERS' types
(DeiT's students and teacher)."""


def check_architectures(teacher_arch: str, student_arch: str) -> None:
    """InputError unless both models have a torch peer (PEER_ARCHITECTURES)."""
    for role, arch in (("teacher", teacher_arch), ("student", student_arch)):
        check_choice(role, arch, PEER_ARCHITECTURES)


def peer_model(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """The torch model of our `arch` (one of PEER_ARCHITECTURES), built from our module's
    own settings (RegNetY's widths, depths and group width; a ViT's width, heads, depth,
    patch, image size and drop-path rate), so that both frameworks run the same network."""
    if arch in TORCH_RESNETS:
        return torch_resnet(arch, num_classes)
    ours = models.get(arch, num_classes, image_size=image_size)
    return TORCH_BUILDERS[type(ours)](ours, num_classes)


def peer_models(
    teacher_arch: str, student_arch: str, num_classes: int, seed: int, image_size: int
) -> tuple[nn.Module, nn.Module]:
    """Teacher and student with torch's default random initialisation (seeded): step cost
    does not depend on the weights."""
    check_architectures(teacher_arch, student_arch)
    torch.manual_seed(seed)
    return (
        peer_model(teacher_arch, num_classes, image_size),
        peer_model(student_arch, num_classes, image_size),
    )


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    """How the peer runs: `device` ('cpu', 'cuda'), bf16 autocast, channels_last memory
    layout, `torch.compile` of both models."""

    device: str
    bf16: bool
    channels_last: bool
    compile: bool


def options_with(overrides: Mapping[str, object]) -> PeerOptions:
    """`default_options` for `overrides["device"]`, with every other non-None override
    (`bf16`, `channels_last`, `compile`) in place of its default."""
    defaults = default_options(overrides.get("device"))
    chosen = {k: v for k, v in overrides.items() if k != "device" and v is not None}
    return dataclasses.replace(defaults, **chosen)


def default_options(device: str | None = None) -> PeerOptions:
    """The fastest settings a PyTorch user would pick: on a GPU, bf16 autocast, channels_last
    and `torch.compile`; on CPU, float32 eager (bf16 and compile rarely pay there, and
    compiling costs minutes)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    return PeerOptions(device=device, bf16=on_gpu, channels_last=on_gpu, compile=on_gpu)


def prepared(model: nn.Module, options: PeerOptions) -> nn.Module:
    """`model` on the device, in the options' memory layout, compiled if asked."""
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    model = model.to(options.device, memory_format=memory_format)
    return torch.compile(model) if options.compile else model


# ----------------------------------------------------------------------------- losses


def distill_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    task_weight: float,
    logit_weight: float,
    temperature: float,
) -> torch.Tensor:
    """[task_weight * CE, logit_weight * T^2 KL(teacher || student at temperature T)], in
    float32 whatever the autocast dtype of the logits (as `objectives.loss_vector` without
    the feature loss)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    task = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return torch.stack([task_weight * task, logit_weight * temperature**2 * kl])


def normalized(images: torch.Tensor, inputs: Normalization) -> torch.Tensor:
    """uint8 images [B, H, W, C] -> float32 [B, C, H, W] through the inputs' statistics, as
    `normalization.apply` does inside our steps."""
    mean = torch.tensor(inputs.mean, device=images.device).view(-1, 1, 1)
    std = torch.tensor(inputs.std, device=images.device).view(-1, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- steps


@dataclasses.dataclass
class PeerSetup:
    """What a peer step works on: both models, the student's SGD, the batch on the device."""

    teacher: nn.Module
    student: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    labels: torch.Tensor
    inputs: Normalization
    options: PeerOptions


def build_setup(
    teacher: nn.Module,
    student: nn.Module,
    images,
    labels,
    inputs: Normalization,
    options: PeerOptions,
    learning_rate: float,
    weight_decay: float,
) -> PeerSetup:
    """Models prepared for the device (teacher in eval mode, student in train mode), the
    numpy batch copied to the device once, and SGD on the student: momentum 0.9, L2
    `weight_decay` on every parameter, as our `sgd` (`optimizers.make_optimizer`)."""
    teacher, student = prepared(teacher.eval(), options), prepared(student.train(), options)
    return PeerSetup(
        teacher=teacher,
        student=student,
        optimizer=torch.optim.SGD(
            student.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay
        ),
        images=torch.as_tensor(images, device=options.device),
        labels=torch.as_tensor(labels, dtype=torch.long, device=options.device),
        inputs=inputs,
        options=options,
    )


def forward_losses(setup: PeerSetup, distill) -> torch.Tensor:
    """The loss vector of one forward of both models on the setup's batch."""
    options = setup.options
    images = normalized(setup.images, setup.inputs)
    if options.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    device_type = "cuda" if options.device.startswith("cuda") else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=options.bf16):
        with torch.no_grad():
            teacher_logits = setup.teacher(images)
        student_logits = setup.student(images)
    return distill_losses(
        student_logits,
        teacher_logits,
        setup.labels,
        distill.task_weight,
        distill.logit_weight,
        distill.temperature,
    )


def kd_1bwd_step(setup: PeerSetup, distill, max_norm: float | None) -> torch.Tensor:
    """Summed KD: one backward of the summed losses, then SGD. Returns the losses.
    `max_norm` is unused: the signature is `mokd_step`'s, so that the benchmark calls either."""
    del max_norm
    losses = forward_losses(setup, distill)
    setup.optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    setup.optimizer.step()
    return losses.detach()


def mokd_step(setup: PeerSetup, distill, max_norm: float | None) -> torch.Tensor:
    """MoKD: the two per-objective gradients from two backward passes, flattened into the
    rows of one [2, P] matrix (its Gram matrix is one product), combined with
    `mokd_coefficients`, written to `.grad`, then SGD. Returns the losses."""
    losses = forward_losses(setup, distill)
    params = [p for p in setup.student.parameters() if p.requires_grad]
    task = torch.autograd.grad(losses[0], params, retain_graph=True)
    distillation = torch.autograd.grad(losses[1], params)
    rows = torch.stack(
        [torch.cat([g.reshape(-1) for g in grads]) for grads in (task, distillation)]
    )
    coefficients = mokd_coefficients(rows @ rows.T, losses.detach(), max_norm)
    combined = coefficients @ rows
    offset = 0
    for param in params:
        size = param.numel()
        param.grad = combined[offset : offset + size].view_as(param)
        offset += size
    setup.optimizer.step()
    return losses.detach()


PEER_STEPS: dict[str, Callable[[PeerSetup, object, float | None], torch.Tensor]] = {
    "kd_1bwd": kd_1bwd_step,
    "mokd": mokd_step,
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_peer_step(
    step: Callable[[], torch.Tensor], device: str, steps: int, warmup_steps: int
) -> float:
    """Median seconds of `step()` after `warmup_steps` calls (which also run any
    `torch.compile`), each call waited for on the device."""
    for _ in range(warmup_steps):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_bytes(device: str) -> None:
    """Starts the allocator's peak count afresh on a GPU, so that each mode's `peak_bytes`
    is its own (the teacher and student of earlier modes are freed by then)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    """`torch.cuda.max_memory_allocated` on a GPU: the peak since `reset_peak_bytes`; None
    on CPU, where torch's allocator keeps no such count."""
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def time_mode(
    mode: str,
    setup: PeerSetup,
    distill,
    max_norm: float | None,
    steps: int,
    warmup_steps: int,
) -> dict[str, float | int | None]:
    """The benchmark's row of a peer mode: median step seconds, images/s, peak bytes."""
    step = functools.partial(PEER_STEPS[mode], setup, distill, max_norm)
    reset_peak_bytes(setup.options.device)
    seconds = time_peer_step(step, setup.options.device, steps, warmup_steps)
    return {
        "step_time_s": seconds,
        "images_per_s": len(setup.labels) / seconds,
        "peak_bytes": peak_bytes(setup.options.device),
    }
