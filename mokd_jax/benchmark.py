"""Step cost of MoKD against plain KD and cross-entropy, on synthetic data (the
`mokd-benchmark` command):

    mokd-benchmark --teacher=resnet34 --student=resnet18 --image_size=112 \\
        --batch_size=16 --steps=5 --json=/tmp/bench_r18.json \\
        [--modes=ce,kd_1bwd,mokd_amortized,kd,mokd,kd_separate,mokd_separate] \\
        [--num_classes=1000] \\
        [--dtype=bfloat16] [--framework=jax|torch|both]

(or `python -m mokd_jax.benchmark ...`). Modes (each the base config of configs/default.py,
`config_helpers.base_config()`, with the teacher, student and batch size set):
  ce              the student alone, cross-entropy, one forward + one backward, no teacher
                  (`steps.teacher_step` run on the student: it is exactly that step);
  kd              aggregator `sum` in `steps.distill_step`: summed KD as the trainer runs it,
                  which still pulls back the K unit rows (K backward passes, batched);
  kd_1bwd         the same summed loss with ONE backward (pullback of a ones row), then the
                  plain optimizer: the fair baseline for the cost goals;
  mokd            aggregator `mokd`, K = 2 rows pulled back;
  mokd_amortized  aggregator `mokd_amortized`, one weighted row pulled back;
  kd_separate     aggregator `sum` with `distill.objectives='separate'`, K = 3 rows;
  mokd_separate   aggregator `mokd` with `distill.objectives='separate'`, K = 3 rows.
Every distillation mode keeps the default feature loss, so all of them compute the same
forward; only the backward and the aggregation differ.

Each step is jitted with the state donated, compiled outside the timing, run twice to warm
up and then `--steps` times; the median wall time (after `block_until_ready`) is reported.
Weights are random (`state_lib.init_model`): step cost does not depend on them. `--dtype`
sets the models' compute dtype (`config.dtype`; parameters, optimizer state and the
aggregation stay float32).

Memory: `peak_bytes` is the device allocator's peak so far in this process, where the
backend reports one (GPU, TPU; None on CPU). Peaks only grow, so a mode's figure is exact
when the modes before it needed less: the default order runs them from the least to the
most memory they should need. `compiled_temp_bytes` is XLA's planned scratch memory of the
mode's compiled step alone.

The FLOP floor R = (F_t + 5 F_s) / (F_t + 3 F_s), with F_t and F_s the XLA cost-analysis
FLOPs of the teacher's and the student's forward passes (a backward costs about two
forwards): the cost of the teacher forward + student forward + two student backwards over
that of one-backward KD. Goal: mokd / kd_1bwd <= 1.05 R.

The aggregation's share of the step (goal <= 2%), two ways, for K = 2 (`mokd`) and K = 3
(`mokd_separate`):
  share           the jitted `mokd` update alone, on random K-stacked gradients shaped like
                  the student's parameters, over the mokd step time: an upper bound, since
                  alone its ~60 per-leaf reductions run as separate kernels that inside the
                  step XLA fuses with the backward pass and the optimizer;
  in_step_share   (mokd - kd) / mokd, where `kd` (`kd_separate` for K = 3) is the same step
                  (same K pullbacks, same diagnostics) with the summing aggregator: what
                  MoKD's aggregation adds to the compiled step. The diagnostics' Gram matrix
                  is computed in both, and XLA computes the aggregator's identical Gram
                  only once, so this counts the weights and the combination, not the Gram.

PyTorch peer (`--framework=torch` or `both`; needs torch, `pip install .[torch]`): the
`kd_1bwd` and `mokd` steps written as a PyTorch user would (`mokd_jax.torch_peer`), on the
same models (resnet18/34/50), batch and data, timed the same way (warm-up, then the median).
`both` times ours and the peer's one mode after the other in one process (ours, peer, for
kd_1bwd then mokd) and adds a `peer` section and `ratios_vs_peer` (ours / peer per mode).
`--peer_device`, `--peer_bf16`, `--peer_channels_last`, `--peer_compile` override the
peer's defaults (`torch_peer.default_options`: on a GPU bf16 autocast, channels_last and
torch.compile; on CPU float32 eager).

Sizes: XLA on CPU is ~20x slower for 3x3 convolutions on 2x2 maps (docs/architecture.md), so
ImageNet ResNets need >= 112 px on CPU (the last stage is then 4x4). Measured on 2 CPU cores
(resnet34 -> resnet18, 112 px, batch 16, 5 steps): see docs/benchmarks.md.
"""

import dataclasses
import functools
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from mokd_jax import (
    cli,
    config_helpers,
    measurement,
    models,
    networks,
    normalization,
    optimizers,
    steps,
)
from mokd_jax import state as state_lib
from mokd_jax.checks import check_choice
from mokd_jax.config_checks import check_config
from mokd_jax.errors import InputError, invalid
from mokd_jax.measurement import (
    aggregation_time,
    flop_floor_ratio,
    forward_flops,
    peak_bytes,
    time_step,
)
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

RATIOS: dict[str, tuple[str, str]] = {
    "mokd_over_kd": ("mokd", "kd"),
    "mokd_over_kd_1bwd": ("mokd", "kd_1bwd"),
    "mokd_amortized_over_kd": ("mokd_amortized", "kd"),
    "mokd_amortized_over_kd_1bwd": ("mokd_amortized", "kd_1bwd"),
    "kd_over_kd_1bwd": ("kd", "kd_1bwd"),
    "kd_1bwd_over_ce": ("kd_1bwd", "ce"),
}

FRAMEWORKS = ("jax", "torch", "both")
PEER_MODES = ("kd_1bwd", "mokd")
"""The modes with a PyTorch peer (`torch_peer.PEER_STEPS`, kept equal by a test): the
package must import without torch, so the list is not read from there."""

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    flags.DEFINE_string("teacher", "resnet34", "Teacher model name.", flag_values=flag_values)
    flags.DEFINE_string("student", "resnet18", "Student model name.", flag_values=flag_values)
    flags.DEFINE_integer(
        "image_size",
        112,
        "Square image side (>= 112 for ImageNet ResNets on CPU).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("batch_size", 16, "Images per step.", flag_values=flag_values)
    flags.DEFINE_integer(
        "steps", 5, "Timed steps per mode (after 2 warm-up steps).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "num_classes",
        1000,
        "Classes of the synthetic labels and model heads.",
        flag_values=flag_values,
    )
    flags.DEFINE_list(
        "modes", list(MODES), f"Modes to time, from {list(MODES)}.", flag_values=flag_values
    )
    flags.DEFINE_enum(
        "dtype", "float32", models.DTYPES, "Compute dtype of the models.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "framework", "jax", f"Whose steps to time, one of {FRAMEWORKS}.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "peer_device",
        None,
        "The peer's torch device (default: cuda if any, else cpu).",
        flag_values=flag_values,
    )
    for name, what in (
        ("peer_bf16", "bf16 autocast"),
        ("peer_channels_last", "channels_last layout"),
        ("peer_compile", "torch.compile"),
    ):
        flags.DEFINE_boolean(
            name, None, f"The peer's {what} (default: on GPU only).", flag_values=flag_values
        )
    flags.DEFINE_string(
        "json", None, "Where to write the results as JSON.", flag_values=flag_values
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup


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


def build_mode(
    mode: str,
    config: ml_collections.ConfigDict,
    image_shape: tuple[int, ...],
    teacher_variables: Mapping[str, Any],
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
    if mode == "kd_1bwd":
        tx = optimizers.make_optimizer(config.student)
        step = functools.partial(
            steps.summed_distill_step, networks=nets, tx=tx, distill=config.distill
        )
    else:
        tx = optimizers.student_optimizer(config)
        step = steps.make_distill_step(config, nets, tx)
    create = functools.partial(state_lib.create_student_state, nets, image_shape, tx)
    return step, jax.jit(create)(key), (teacher_variables,)


# ----------------------------------------------------------------------------- report


def ratios(modes: Mapping[str, Mapping[str, Any]], floor: float) -> dict[str, Any]:
    """Step-time ratios of the modes that were run, and the cost goals against them."""
    result: dict[str, Any] = {
        name: modes[a]["step_time_s"] / modes[b]["step_time_s"]
        for name, (a, b) in RATIOS.items()
        if a in modes and b in modes
    }
    result["goal_mokd"] = f"mokd_over_kd_1bwd <= 1.05 R = {1.05 * floor:.4f}"
    result["goal_mokd_amortized"] = "mokd_amortized_over_kd_1bwd <= 1.05"
    if "mokd_over_kd_1bwd" in result:
        result["goal_mokd_met"] = result["mokd_over_kd_1bwd"] <= 1.05 * floor
    if "mokd_amortized_over_kd_1bwd" in result:
        result["goal_mokd_amortized_met"] = result["mokd_amortized_over_kd_1bwd"] <= 1.05
    return result


def format_table(results: Mapping[str, Any]) -> str:
    """Our modes' table and figures (when run), then the peer's rows and the ratios."""
    lines = format_ours(results) if "modes" in results else []
    if "peer" in results:
        lines += format_peer(results["peer"], results.get("ratios_vs_peer", {}))
    return "\n".join(lines)


def format_ours(results: Mapping[str, Any]) -> list[str]:
    lines = [f"{'mode':<16}{'step s':>10}{'images/s':>10}{'temp MiB':>10}"]
    for mode, row in results["modes"].items():
        temp = row["compiled_temp_bytes"]
        temp_text = f"{temp / 2**20:.0f}" if temp is not None else "-"
        lines.append(
            f"{mode:<16}{row['step_time_s']:>10.4f}{row['images_per_s']:>10.1f}{temp_text:>10}"
        )
    lines.append(f"flop_floor_ratio R = {results['flop_floor_ratio']:.4f}")
    for name, value in results["ratios"].items():
        lines.append(f"{name} = {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    for k, row in results["aggregation"].items():
        share = row["share"]
        share_text = f"{100 * share:.3f}% of {row['step']}" if share is not None else "n/a"
        in_step = row["in_step_share"]
        in_step_text = f"{100 * in_step:.3f}%" if in_step is not None else "n/a"
        lines.append(
            f"aggregation {k}: {1e3 * row['time_s']:.3f} ms alone = {share_text}; "
            f"in the step: {in_step_text}"
        )
    return lines


def format_peer(peer: Mapping[str, Any], ratios_vs_peer: Mapping[str, float]) -> list[str]:
    lines = [f"peer (torch {peer['torch']}, {peer['options']})"]
    for mode, row in peer["modes"].items():
        lines.append(f"{'peer ' + mode:<16}{row['step_time_s']:>10.4f}{row['images_per_s']:>10.1f}")
    lines += [f"{mode} ours / peer = {value:.4f}" for mode, value in ratios_vs_peer.items()]
    return lines


def import_torch_peer():
    """`mokd_jax.torch_peer`, or a one-line InputError when torch is not installed."""
    try:
        from mokd_jax import torch_peer
    except ModuleNotFoundError as error:
        raise InputError(
            f"--framework needs torch ({error}): pip install .[torch], or --framework=jax"
        ) from None
    return torch_peer


def peer_timer(
    base: ml_collections.ConfigDict, image_size: int, steps: int, overrides: Mapping[str, Any]
) -> tuple[Callable[[str], dict[str, Any]], dict[str, Any]]:
    """(a function timing one peer mode on fresh models and the benchmark's batch, the
    JSON `peer` section that its rows go into). The models are checked here, before any
    of our modes runs, so that a pair without a peer is refused at once."""
    torch_peer = import_torch_peer()
    torch_peer.check_architectures(base.teacher.model, base.student.model)
    options = torch_peer.options_with(overrides)
    images, labels = synthetic_batch(base.batch_size, image_size, base.num_classes, base.seed)
    inputs = normalization.for_dataset(base.dataset)

    def time_mode(mode: str) -> dict[str, Any]:
        log(f"[peer {mode}] building and timing {steps} steps")
        teacher, student = torch_peer.peer_models(
            base.teacher.model, base.student.model, base.num_classes, base.seed
        )
        setup = torch_peer.build_setup(
            teacher, student, images, labels, inputs, options, base.student.learning_rate
        )
        row = torch_peer.time_mode(
            mode,
            setup,
            base.distill,
            base.aggregation.mokd.max_norm,
            steps,
            measurement.WARMUP_STEPS,
        )
        log(f"[peer {mode}] {row['step_time_s']:.4f} s/step")
        return row

    section = {
        "torch": torch_peer.torch.__version__,
        "options": dataclasses.asdict(options),
        "modes": {},
    }
    return time_mode, section


def machine_info(load_before: tuple[float, ...]) -> dict[str, Any]:
    return {
        "node": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }


def config_section(base: ml_collections.ConfigDict, image_size: int, steps: int) -> dict:
    return {
        "teacher": base.teacher.model,
        "student": base.student.model,
        "image_size": image_size,
        "batch_size": base.batch_size,
        "num_classes": base.num_classes,
        "steps": steps,
        "warmup_steps": measurement.WARMUP_STEPS,
        "dtype": base.dtype,
        "distill": base.distill.to_dict(),
    }


def check_request(mode_names: Sequence[str], framework: str) -> list[str]:
    """The peer modes among `mode_names` (none for `jax`), or an InputError for an unknown
    mode or framework, or a torch framework without any peer mode."""
    check_choice("framework", framework, FRAMEWORKS)
    for mode in mode_names:
        if mode not in MODES:
            raise invalid("modes", mode, f"one of {list(MODES)}")
    if framework == "jax":
        return []
    peer_modes = [mode for mode in mode_names if mode in PEER_MODES]
    if not peer_modes:
        allowed = f"with --framework={framework}, at least one of {', '.join(PEER_MODES)}"
        raise invalid("modes", ",".join(mode_names), allowed)
    return peer_modes


def measure(
    base: ml_collections.ConfigDict,
    image_size: int,
    steps: int,
    mode_names: Sequence[str],
    framework: str = "jax",
    peer_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Times every mode and the aggregation, ours (`jax`), the PyTorch peer's (`torch`) or
    both, each peer mode right after ours (`both`); returns the JSON-ready results."""
    peer_modes = check_request(mode_names, framework)
    load_before = os.getloadavg()
    time_peer, peer = None, None
    if peer_modes:
        time_peer, peer = peer_timer(base, image_size, steps, peer_overrides or {})
    if framework == "torch":
        peer["modes"] = {mode: time_peer(mode) for mode in peer_modes}
        return {
            "machine": machine_info(load_before),
            "config": config_section(base, image_size, steps),
            "peer": peer,
        }
    ours = measure_ours(base, image_size, steps, mode_names, time_peer, peer)
    results = {"machine": machine_info(load_before), **ours}
    if peer is not None:
        results["peer"] = peer
        results["ratios_vs_peer"] = {
            mode: results["modes"][mode]["step_time_s"] / row["step_time_s"]
            for mode, row in peer["modes"].items()
        }
    return results


def measure_ours(
    base: ml_collections.ConfigDict,
    image_size: int,
    steps: int,
    mode_names: Sequence[str],
    time_peer: Callable[[str], dict[str, Any]] | None,
    peer: dict[str, Any] | None,
) -> dict[str, Any]:
    """Our modes, the FLOP floor and the aggregation's share; a peer mode (`time_peer`) is
    timed right after ours, its row put in `peer["modes"]`."""
    image_shape = (image_size, image_size, 3)
    teacher = networks.build_model(base, "teacher", base.num_classes, image_size)
    student = networks.build_model(base, "student", base.num_classes, image_size)
    teacher_variables = jax.jit(functools.partial(state_lib.init_model, teacher, image_shape))(
        jax.random.key(base.seed)
    )
    batch = synthetic_batch(base.batch_size, image_size, base.num_classes, base.seed)

    modes: dict[str, dict[str, Any]] = {}
    student_params = None
    for mode in mode_names:
        config = mode_config(base, mode)
        log(f"[{mode}] building and compiling")
        step, state, args = build_mode(mode, config, image_shape, teacher_variables)
        if mode != "ce" and student_params is None:
            student_params = jax.tree.map(jnp.zeros_like, state.params)
        log(f"[{mode}] timing {steps} steps")
        seconds, temp_bytes = time_step(step, state, args, batch, steps)
        modes[mode] = {
            "step_time_s": seconds,
            "images_per_s": base.batch_size / seconds,
            "peak_bytes": peak_bytes(),
            "compiled_temp_bytes": temp_bytes,
        }
        log(f"[{mode}] {seconds:.4f} s/step")
        if time_peer is not None and mode in PEER_MODES:
            peer["modes"][mode] = time_peer(mode)

    log("FLOPs of the forward passes")
    floor = flop_floor_ratio(
        forward_flops(teacher, image_shape, base.batch_size),
        forward_flops(student, image_shape, base.batch_size),
    )
    aggregation_results = {}
    if student_params is not None:
        hparams = base.aggregation.mokd.to_dict()
        for k, reference, summed in ((2, "mokd", "kd"), (3, "mokd_separate", "kd_separate")):
            log(f"aggregation K={k}")
            seconds = aggregation_time(student_params, k, hparams)
            step_time = modes.get(reference, {}).get("step_time_s")
            summed_time = modes.get(summed, {}).get("step_time_s")
            aggregation_results[f"K{k}"] = {
                "time_s": seconds,
                "share": seconds / step_time if step_time else None,
                "in_step_share": (
                    (step_time - summed_time) / step_time if step_time and summed_time else None
                ),
                "step": reference,
            }
    return {
        "jax": jax.__version__,
        "devices": [str(device) for device in jax.devices()],
        "config": config_section(base, image_size, steps),
        "modes": modes,
        "flop_floor_ratio": floor,
        "ratios": ratios(modes, floor),
        "aggregation": aggregation_results,
    }


def main(argv: Sequence[str]) -> None:
    del argv
    base = config_helpers.with_overrides(
        config_helpers.base_config(),
        {
            "teacher.model": FLAGS.teacher,
            "student.model": FLAGS.student,
            "batch_size": FLAGS.batch_size,
            "num_classes": FLAGS.num_classes,
            "dtype": FLAGS.dtype,
        },
    )
    peer_overrides = {
        "device": FLAGS.peer_device,
        "bf16": FLAGS.peer_bf16,
        "channels_last": FLAGS.peer_channels_last,
        "compile": FLAGS.peer_compile,
    }
    try:
        results = measure(
            base, FLAGS.image_size, FLAGS.steps, FLAGS.modes, FLAGS.framework, peer_overrides
        )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    cli.report(format_table(results), results, FLAGS.json)


def run() -> None:
    """The `mokd-benchmark` entry point."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
