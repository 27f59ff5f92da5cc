"""Our classification steps in the benchmark (`mokd_jax.benchmark`): each mode's config
and compiled step, built on synthetic data, timed and its memory plan read
(`measurement.mode_row`), then the FLOP floor, the memory goal and the aggregation's share
of the step. With the PyTorch peer, the distillation modes run its losses
(`benchmark_like_peer`)."""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mokd_jax import config_helpers, networks, normalization, optimizers, steps
from mokd_jax import state as state_lib
from mokd_jax.benchmark_like_peer import logit_student_functions, logits_only_state
from mokd_jax.benchmark_report import config_section, extra_memory, log, ratios
from mokd_jax.config_checks import check_config
from mokd_jax.measurement import aggregation_time, mode_row, models_flop_floor, tree_bytes
from mokd_jax.state import TrainState

MODES: dict[str, dict[str, Any]] = {
    "ce": {},
    "kd_1bwd": {"aggregator": "sum"},
    "mokd_amortized": {"aggregator": "mokd_amortized"},
    "kd": {"aggregator": "sum"},
    "mokd": {"aggregator": "mokd"},
    "kd_separate": {"aggregator": "sum", "distill.objectives": "separate"},
    "mokd_separate": {"aggregator": "mokd", "distill.objectives": "separate"},
}
"""Config overrides per mode; `ce` and `kd_1bwd` also use their own step (`build_mode`)."""


def mode_config(base: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
    """The base config with the mode's overrides, validated like a training run's."""
    config = config_helpers.with_overrides(base, MODES[mode])
    check_config(config)
    return config


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images and labels, the dtypes the trainer's batches have."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (batch_size,), dtype=np.int32)
    return images, labels


def distillation_step(
    mode: str, config: ml_collections.ConfigDict, nets: networks.Networks, like_peer: bool
) -> tuple[Callable, optax.GradientTransformation]:
    """(step function, its optimizer) of a distillation mode: `kd_1bwd` the summed loss with
    one backward and the plain optimizer, the others the trainer's step with the mode's
    aggregator. `like_peer`: the logits-only losses of the PyTorch peer
    (`benchmark_like_peer`; the config then carries its `LIKE_PEER` optimizer)."""
    task = logit_student_functions if like_peer else steps.student_functions
    if mode == "kd_1bwd":
        tx = optimizers.make_optimizer(config.student)
        step = functools.partial(
            steps.summed_distill_step, networks=nets, tx=tx, distill=config.distill, task=task
        )
        return step, tx
    tx = optimizers.student_optimizer(config)
    return steps.make_distill_step(config, nets, tx, task=task), tx


def build_mode(
    mode: str,
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, ...],
    teacher_variables: Mapping[str, Any],
    like_peer: bool = False,
) -> tuple[Callable, TrainState, tuple]:
    """(step function, initial state, the step's arguments after the state and batch)."""
    inputs = normalization.for_dataset(config.dataset)
    nets = networks.build_networks(
        config, config.num_classes, image_shape[0], teacher_input=inputs, student_input=inputs
    )
    key = jax.random.key(config.seed + 1)
    if mode == "ce":
        tx = optimizers.make_optimizer(config.student)
        create = functools.partial(state_lib.create_teacher_state, nets.student, image_shape, tx)
        return (
            functools.partial(steps.teacher_step, model=nets.student, tx=tx, inputs=inputs),
            jax.jit(create)(key),
            (),
        )
    step, tx = distillation_step(mode, config, nets, like_peer)
    if like_peer:

        def create(key):
            return logits_only_state(state_lib.init_model(nets.student, image_shape, key), tx)

    else:
        create = functools.partial(state_lib.create_student_state, nets, image_shape, tx)
    return step, jax.jit(create)(key), (teacher_variables,)


def aggregation_shares(
    modes: Mapping[str, Mapping[str, Any]], student_params: Any, hparams: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """The aggregation's share of the step for K = 2 (`mokd`) and K = 3 (`mokd_separate`):
    alone (the jitted update on random gradients shaped like `student_params`, over the
    step) and in the step (against `kd` / `kd_separate`: the same pullbacks, summed; None
    where that mode was not run). A K whose step (`mokd` / `mokd_separate`) was not run is
    left out: with no step to divide by, timing its update (a compilation of its own) would
    give no share."""
    shares = {}
    for k, reference, summed in ((2, "mokd", "kd"), (3, "mokd_separate", "kd_separate")):
        if reference not in modes:
            continue
        log(f"aggregation K={k}")
        seconds = aggregation_time(student_params, k, hparams)
        step_time = modes[reference]["step_time_s"]
        summed_time = modes.get(summed, {}).get("step_time_s")
        shares[f"K{k}"] = {
            "time_s": seconds,
            "share": seconds / step_time,
            "in_step_share": (step_time - summed_time) / step_time if summed_time else None,
            "step": reference,
        }
    return shares


def measure_ours(
    base: ml_collections.ConfigDict,
    image_size: int,
    steps: int,
    mode_names: Sequence[str],
    after_mode: Callable[[str], None] | None = None,
    like_peer: bool = False,
) -> dict[str, Any]:
    """Our modes, the FLOP floor, the memory goal and the aggregation's share;
    `after_mode(mode)` is called right after each mode is timed (the orchestrator times
    the peer's mode there, so that ours and the peer's run under the same load).
    `like_peer`: every distillation mode with the peer's losses (`benchmark_like_peer`;
    `base` then has its optimizer)."""
    image_shape = (image_size, image_size, 3)
    teacher = networks.build_model(base, "teacher", base.num_classes, image_size)
    student = networks.build_model(base, "student", base.num_classes, image_size)
    key = jax.random.key(base.seed)
    teacher_variables = jax.jit(functools.partial(state_lib.init_model, teacher, image_shape))(key)
    student_params = jax.eval_shape(
        functools.partial(state_lib.init_model, student, image_shape), key
    )["params"]
    batch = synthetic_batch(base.batch_size, image_size, base.num_classes, base.seed)

    modes: dict[str, dict[str, Any]] = {}
    for mode in mode_names:
        config = mode_config(base, mode)
        log(f"[{mode}] building and compiling")
        step, state, args = build_mode(mode, config, image_shape, teacher_variables, like_peer)
        log(f"[{mode}] timing {steps} steps")
        modes[mode] = mode_row(step, state, args, batch, steps)
        log(f"[{mode}] {modes[mode]['step_time_s']:.4f} s/step")
        if after_mode is not None:
            after_mode(mode)

    log("FLOPs of the forward passes")
    floor = models_flop_floor(teacher, student, image_shape, base.batch_size)
    aggregation = {}
    if set(mode_names) - {"ce"}:
        zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), student_params)
        shared = {"student": zeros, "projector": {}}
        aggregation = aggregation_shares(modes, shared, base.aggregation.mokd.to_dict())
    return {
        "jax": jax.__version__,
        "devices": [str(device) for device in jax.devices()],
        "config": config_section(base, image_size, steps, like_peer),
        "modes": modes,
        "flop_floor_ratio": floor,
        "ratios": ratios(modes, floor),
        "memory": extra_memory(modes, tree_bytes(student_params)),
        "aggregation": aggregation,
    }
