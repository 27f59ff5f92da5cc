"""Trajectory parity: 30 SGD steps of the KD and DKD recipes against a PyTorch reference.

The reference step is written here with torch.optim.SGD (momentum 0.9, weight decay 5e-4
coupled as torch applies it: added to the gradient before the momentum), F.cross_entropy,
torch's BatchNorm2d (momentum 0.1, eps 1e-5) and the losses of mdistiller (`kd_loss`:
KL(softmax(t/T) || softmax(s/T)) T^2, batch mean; `dkd_loss`: alpha TCKD + beta NCKD with
its -1000 masking, times min(epoch / warm-up, 1)). Our side is the trainer's own step
(`steps.make_distill_step` with the `sum` aggregator and `optimizers.student_optimizer`),
on the same weights (created in torch, converted by `mokd_jax.convert`) and the same uint8
batches, with the feature weight 0: KD and DKD have no feature loss.

The pair is shrunk from resnet32x4 -> resnet8x4 to fit a CPU test: the student is
resnet8x4 at a quarter of its width (depth 8, widths 8/16/32/64), the teacher resnet32x4's
family at depth 14 and half its width (two blocks a stage). Layouts and block kinds are the
full models' (the converter maps them with the same rules, `test_convert.py` checks the
full-size ones), and the step's arithmetic does not depend on the width. CIFAR shapes:
32 x 32 images, 100 classes, batch 16 (random pixels and labels).

CE 0.1 / KD 0.9 (mdistiller's CIFAR KD recipe) are the config's `distill.task_weight` and
`distill.logit_weight`, as `mokd_jax.recipes` sets them for `kd`.

Tolerance. The reference runs in float64, so it is the exact step; ours runs in float32.
30 steps of SGD at lr 0.05 on random labels amplify float32's roundings, by how much depends
on the machine (its vector width changes the order of XLA's and torch's sums). On the KD
recipe torch's own float32 step ends 2.3e-5 (losses), 2.2e-3 (parameters) and 1.2e-3
(running statistics) relative from the float64 one on an AVX-512 machine, ours 6.7e-7,
9.3e-5 and 9.4e-4; on an AVX2 one torch's 2.8e-5, 1.8e-3, 1.3e-3 and ours 2.5e-5, 2.0e-3,
1.2e-3. `TOLERANCE` is 4-8x above both. DKD's beta 8 makes its steps larger and the
roundings grow about tenfold every five steps: its final drift was 6.3e-5, 5.5e-3, 1.1e-3
(ours, AVX-512) and is 2.6e-3, 0.14, 0.084 (ours) against torch float32's 3.4e-3, 0.17,
0.089 (AVX2). So DKD is checked where the roundings are still small, its first five steps'
losses (ours within 4e-7 and torch float32 within 2.4e-5 on the AVX2 machine, while a
float32 reference with beta 1, a one-step warm-up, temperature 1 or alpha 2 moves them 0.25,
1.35, 0.04 and 4.4e-4), and its end against torch's own float32 run of the same steps on the same
machine (`DKD_TORCH_FLOAT32_FACTOR`). Each deliberately wrong setting of the reference
falls at least 5x outside KD's (`test_a_wrong_setting_falls_outside_the_tolerance`): decoupled
weight decay moves the losses 8.7e-4 (8.7x), torch BN momentum 0.9 the running statistics
0.16 (16x), no momentum and temperature 1 everything by 0.07-0.3. The margin for
decoupled weight decay is the thinnest: over 30 steps its effect is of the order of
float32's drift in the parameters and shows in the losses only.

The wrong settings run in float32, as a wrong float32 implementation would (3-6x
faster on the CPU than float64): float32's own drift in the losses is 3% of the thinnest margin's
effect, so what they show is that such an implementation would not pass.

The teacher's logits, the targets of every reference step, come from a float32 forward of
the teacher (cast to float64), as our trainer computes its own: they are the steps'
inputs, not what is checked; they match a float64 forward within 7e-7 relative, at a sixth
of its time. (Measured with the module's own functions, one process, 2 CPU cores.)
"""

import copy
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax import config_helpers, convert, normalization, steps
from mokd_jax.models.resnet import cifar_resnet
from mokd_jax.networks import Networks, build_projector
from mokd_jax.optimizers import student_optimizer
from mokd_jax.state import create_student_state

torch = pytest.importorskip("torch")
import torch_zoo  # noqa: E402  (needs torch)
from torch.nn import functional  # noqa: E402
from torch_references import numpy_state_dict, randomized  # noqa: E402

pytestmark = pytest.mark.slow  # two compiles and 30 steps a trajectory: about 70 s of CPU

STEPS = 30
BATCH = 16
CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
STUDENT = (8, (8, 16, 32, 64))  # resnet8x4 at a quarter of its width
TEACHER = (14, (16, 32, 64, 128))  # resnet32x4 at depth 14, half its width
LAYOUT = "resnet8x4"  # the converter's layout of every RepDistiller CIFAR ResNet
INPUTS = normalization.CIFAR100


class Recipe(NamedTuple):
    """One reference training step's settings (mdistiller's CIFAR-100 recipes)."""

    logit_loss: str
    task_weight: float
    distill_weight: float
    temperature: float = 4.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20  # in steps here, epochs in mdistiller: inside the 30 steps
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decoupled_weight_decay: bool = False
    bn_momentum: float = 0.1  # torch's convention: the weight of the new batch


KD = Recipe("kd", task_weight=0.1, distill_weight=0.9)
DKD = Recipe("dkd", task_weight=1.0, distill_weight=1.0)
# Relative drift allowed from the float64 reference on KD (module docstring).
TOLERANCE = {"losses": 1e-4, "params": 1e-2, "batch_stats": 1e-2}
# DKD (module docstring): its first steps' losses, before float32's roundings have grown,
# and its final drift against a float32 torch run of the same steps on the same machine.
DKD_EARLY_STEPS, DKD_EARLY_TOLERANCE, DKD_TORCH_FLOAT32_FACTOR = 5, 1e-4, 3.0
WRONG_SETTINGS = {
    "decoupled weight decay": {"decoupled_weight_decay": True},
    "BN momentum 0.9": {"bn_momentum": 0.9},
    "no momentum": {"momentum": 0.0},
    "temperature 1": {"temperature": 1.0},
}


# --- the PyTorch reference --------------------------------------------------------------


def torch_inputs(images: np.ndarray):
    """uint8 NHWC images as the reference feeds them: NCHW, CIFAR-100 statistics, float64."""
    pixels = torch.from_numpy(images).double().permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(INPUTS.mean).view(1, 3, 1, 1)
    std = torch.tensor(INPUTS.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def kd_loss(student_logits, teacher_logits, temperature):
    """mdistiller's kd_loss: KL(softmax(t/T) || softmax(s/T)), summed over classes,
    averaged over the batch, times T^2."""
    log_student = functional.log_softmax(student_logits / temperature, dim=1)
    teacher = functional.softmax(teacher_logits / temperature, dim=1)
    kl = functional.kl_div(log_student, teacher, reduction="none").sum(1).mean()
    return kl * temperature**2


def dkd_loss(student_logits, teacher_logits, labels, recipe):
    """mdistiller's dkd_loss: alpha TCKD + beta NCKD, each T^2-scaled and summed over the
    batch / batch size, NCKD through its -1000 shift of the target logit."""
    temperature, batch = recipe.temperature, labels.shape[0]
    target = functional.one_hot(labels, student_logits.shape[1]).to(student_logits.dtype)

    def binary(logits):
        probs = functional.softmax(logits / temperature, dim=1)
        return torch.stack([(probs * target).sum(1), (probs * (1 - target)).sum(1)], dim=1)

    tckd = functional.kl_div(
        torch.log(binary(student_logits)), binary(teacher_logits), reduction="sum"
    )
    shifted_student = student_logits / temperature - 1000.0 * target
    shifted_teacher = teacher_logits / temperature - 1000.0 * target
    nckd = functional.kl_div(
        functional.log_softmax(shifted_student, dim=1),
        functional.softmax(shifted_teacher, dim=1),
        reduction="sum",
    )
    scale = temperature**2 / batch
    return recipe.dkd_alpha * tckd * scale + recipe.dkd_beta * nckd * scale


def torch_distill_loss(student_logits, teacher_logits, labels, step, recipe):
    """The reference's unweighted distillation loss of a step (DKD's warm-up included, with
    mdistiller's epoch counted from 1 as our step + 1)."""
    if recipe.logit_loss == "kd":
        return kd_loss(student_logits, teacher_logits, recipe.temperature)
    warmup = min((step + 1) / recipe.dkd_warmup, 1.0)
    return warmup * dkd_loss(student_logits, teacher_logits, labels, recipe)


def torch_trajectory(student, teacher_logits, batches, recipe, dtype=torch.float64):
    """The reference's steps, in `dtype` (float64: the exact step), from `student`'s
    weights: per-step [task, distill] losses (unweighted) and the final state dict."""
    student = copy.deepcopy(student).to(dtype).train()
    for module in student.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = recipe.bn_momentum
    coupled = 0.0 if recipe.decoupled_weight_decay else recipe.weight_decay
    optimizer = torch.optim.SGD(
        student.parameters(), recipe.learning_rate, recipe.momentum, weight_decay=coupled
    )
    losses = []
    for step, ((images, labels), targets) in enumerate(zip(batches, teacher_logits, strict=True)):
        labels = torch.from_numpy(labels).long()
        logits = student(torch_inputs(images).to(dtype))
        task = functional.cross_entropy(logits, labels)
        distill = torch_distill_loss(logits, targets.to(dtype), labels, step, recipe)
        optimizer.zero_grad()
        (recipe.task_weight * task + recipe.distill_weight * distill).backward()
        if recipe.decoupled_weight_decay:
            with torch.no_grad():
                for parameter in student.parameters():
                    parameter.mul_(1 - recipe.learning_rate * recipe.weight_decay)
        optimizer.step()
        losses.append([task.item(), distill.item()])
    return np.array(losses), numpy_state_dict(student)


# --- our step -----------------------------------------------------------------------------


def our_config(recipe: Recipe):
    """The trainer's config for `recipe`: `sum` of [task_weight x task, logit_weight x
    logit], the feature loss off."""
    config = config_helpers.base_config()
    config.aggregator = "sum"
    section = config.student
    section.optimizer = "sgd"
    section.learning_rate = recipe.learning_rate
    section.weight_decay = recipe.weight_decay
    section.warmup_steps = 0
    section.schedule = "step"
    section.num_train_steps = STEPS
    distill = config.distill
    distill.logit_loss = recipe.logit_loss
    distill.temperature = recipe.temperature
    distill.task_weight = recipe.task_weight
    distill.logit_weight = recipe.distill_weight
    distill.feature_weight = 0.0
    distill.dkd_alpha, distill.dkd_beta = recipe.dkd_alpha, recipe.dkd_beta
    distill.dkd_warmup_steps = recipe.dkd_warmup
    return config


def flax_variables(module, torch_model):
    """`torch_model`'s weights converted to `module`'s variables."""
    init = functools.partial(module.init, jax.random.key(0), train=False)
    shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32))
    return convert.to_flax(LAYOUT, numpy_state_dict(torch_model), shapes)


class Pair(NamedTuple):
    """Both sides' networks on the same weights, the batches, and the teacher's logits on
    them (float64 tensors of a float32 forward: module docstring)."""

    torch_student: object
    networks: Networks
    teacher_variables: dict
    student_variables: dict
    batches: list
    teacher_logits: list


@pytest.fixture(scope="module")
def single_threaded_torch():
    """One torch thread: the reference steps' small convolutions run several times faster
    than with threads competing with XLA's for the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(single_threaded_torch) -> Pair:
    torch_teacher = randomized(torch_zoo.repdistiller_resnet(*TEACHER, CLASSES), seed=1)
    torch_student = randomized(torch_zoo.repdistiller_resnet(*STUDENT, CLASSES), seed=2)
    teacher, student = cifar_resnet(*TEACHER, CLASSES), cifar_resnet(*STUDENT, CLASSES)
    base = config_helpers.base_config()
    projector = build_projector(base)
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.integers(0, 256, (BATCH, *IMAGE_SHAPE), dtype=np.uint8),
            rng.integers(0, CLASSES, BATCH).astype(np.int32),
        )
        for _ in range(STEPS)
    ]
    with torch.no_grad():
        teacher_logits = [
            torch_teacher(torch_inputs(images).float()).double() for images, _ in batches
        ]
    return Pair(
        torch_student,
        Networks(teacher, student, projector, base.projector.taps, INPUTS, INPUTS),
        flax_variables(teacher, torch_teacher),
        flax_variables(student, torch_student),
        batches,
        teacher_logits,
    )


def initial_state(pair: Pair, tx):
    """The student state on the converted torch weights (the projector as initialised)."""
    state = create_student_state(pair.networks, IMAGE_SHAPE, tx, jax.random.key(0))
    params = {**state.params, "student": pair.student_variables["params"]}
    return state.replace(
        params=params, batch_stats=pair.student_variables["batch_stats"], opt_state=tx.init(params)
    )


@functools.cache
def our_step(networks: Networks, recipe: Recipe):
    """The trainer's jitted step for `recipe` and its optimizer (compiled once per recipe)."""
    tx = student_optimizer(our_config(recipe))
    return jax.jit(steps.make_distill_step(our_config(recipe), networks, tx)), tx


def our_trajectory(pair: Pair, recipe: Recipe):
    """Our per-step [task, distill] losses (unweighted, as the reference's) and the final
    student variables."""
    step, tx = our_step(pair.networks, recipe)
    state = initial_state(pair, tx)
    losses = []
    for images, labels in pair.batches:
        state, metrics = step(state, pair.teacher_variables, images, labels)
        losses.append([metrics["loss_cross_entropy"], metrics["loss_kd_logit"]])
    final = {"params": state.params["student"], "batch_stats": state.batch_stats}
    return np.array(losses), final


def relative_drift(ours, reference) -> float:
    """max over leaves of max |ours - reference| / max |reference|."""
    drifts = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()),
        ours,
        reference,
    )
    return max(jax.tree.leaves(drifts))


def drifts(trajectory, reference) -> dict[str, float]:
    """How far `trajectory` ends from `reference`: the relative drift of the per-step losses,
    of the final parameters and of the final BatchNorm running statistics."""
    (losses, variables), (expected_losses, expected_variables) = trajectory, reference
    return {
        "losses": relative_drift(losses, expected_losses),
        **{part: relative_drift(variables[part], expected_variables[part]) for part in variables},
    }


def reference_trajectory(pair: Pair, recipe: Recipe):
    """The reference's trajectory of `recipe`: its losses, and its final student converted
    to our layout."""
    losses, state_dict = torch_trajectory(
        pair.torch_student, pair.teacher_logits, pair.batches, recipe
    )
    shapes = jax.eval_shape(lambda: pair.student_variables)
    return losses, convert.to_flax(LAYOUT, state_dict, shapes)


def float32_trajectory(pair: Pair, recipe: Recipe):
    """The reference's steps of `recipe` in float32, as a float32 torch implementation
    would take them, in our layout."""
    losses, state_dict = torch_trajectory(
        pair.torch_student, pair.teacher_logits, pair.batches, recipe, dtype=torch.float32
    )
    shapes = jax.eval_shape(lambda: pair.student_variables)
    return losses, convert.to_flax(LAYOUT, state_dict, shapes)


@pytest.fixture(scope="module")
def reference(pair):
    """`reference_trajectory` of a recipe, computed once per module."""
    return functools.cache(functools.partial(reference_trajectory, pair))


# --- tests --------------------------------------------------------------------------------


def test_the_kd_trajectory_matches_the_torch_reference(pair, reference):
    drift = drifts(our_trajectory(pair, KD), reference(KD))
    print(f"kd: drift from the float64 reference {drift}")
    assert all(drift[part] < TOLERANCE[part] for part in drift), drift


def test_the_dkd_trajectory_matches_the_torch_reference(pair, reference):
    """The first steps' losses to DKD_EARLY_TOLERANCE, and a final drift within
    DKD_TORCH_FLOAT32_FACTOR of torch's own float32 drift along the same steps."""
    expected = reference(DKD)
    ours = our_trajectory(pair, DKD)
    early = slice(0, DKD_EARLY_STEPS)
    assert relative_drift(ours[0][early], expected[0][early]) < DKD_EARLY_TOLERANCE
    torch_float32 = float32_trajectory(pair, DKD)
    drift, yardstick = drifts(ours, expected), drifts(torch_float32, expected)
    print(f"dkd: drift from the float64 reference {drift}, torch float32's {yardstick}")
    assert all(drift[part] < DKD_TORCH_FLOAT32_FACTOR * yardstick[part] for part in drift), (
        drift,
        yardstick,
    )


@pytest.mark.parametrize("setting", WRONG_SETTINGS)
def test_a_wrong_setting_falls_outside_the_tolerance(pair, reference, setting):
    wrong = float32_trajectory(pair, KD._replace(**WRONG_SETTINGS[setting]))
    drift = drifts(wrong, reference(KD))
    print(f"{setting}: drift {drift}")
    assert any(drift[part] > 5 * TOLERANCE[part] for part in drift), drift


def test_the_projector_has_no_effect_without_feature_weight(pair):
    step, tx = our_step(pair.networks, KD)
    state = initial_state(pair, tx)
    other_projector = jax.tree.map(lambda leaf: 3.0 * leaf + 1.0, state.params["projector"])
    moved = state.replace(params={**state.params, "projector": other_projector})
    images, labels = pair.batches[0]
    (after, metrics), (moved_after, moved_metrics) = (
        step(start, pair.teacher_variables, images, labels) for start in (state, moved)
    )
    assert metrics["loss_kd_feature"] != moved_metrics["loss_kd_feature"]
    assert metrics["loss_distill"] == moved_metrics["loss_distill"]
    unchanged = jax.tree.map(np.array_equal, after.params["student"], moved_after.params["student"])
    assert all(jax.tree.leaves(unchanged))
