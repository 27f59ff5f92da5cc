"""Step cost of MoKD against plain KD and cross-entropy, on synthetic data (the
`mokd-benchmark` command):

    mokd-benchmark --teacher=resnet34 --student=resnet18 --image_size=112 \\
        --batch_size=16 --steps=5 --json=/tmp/bench_r18.json \\
        [--modes=ce,kd_1bwd,mokd_amortized,kd,mokd,kd_separate,mokd_separate] \\
        [--num_classes=1000] \\
        [--dtype=bfloat16] [--framework=jax|torch|both]
    mokd-benchmark --task=detection [--teacher=resnet50 --student=resnet18 \\
        --image_size=512 --batch_size=8 --num_classes=80 --fpn_width=256 --head_depth=4] \\
        [--modes=kd,mokd]

(or `python -m mokd_jax.benchmark ...`; unset flags take the task's defaults,
`TASK_DEFAULTS`). The modes of `--task=classification` (the default; each the base config
of configs/default.py, `config_helpers.base_config()`, with the teacher, student and batch
size set; built and timed by `mokd_jax.benchmark_ours`):
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
Every distillation mode keeps the default feature loss (with a peer, the peer's logits-only
losses instead: below), so all of them compute the same forward; only the backward and the
aggregation differ. `--task=detection` times the RetinaNet distillation step instead, `kd`
(summed, one backward) against `mokd` (`mokd_jax.benchmark_detection`).

Each step is jitted with the state donated, compiled outside the timing, run twice to warm
up and then `--steps` times; the median wall time (after `block_until_ready`) is reported.
Weights are random (`state_lib.init_model`): step cost does not depend on them. `--dtype`
sets the models' compute dtype (`config.dtype`; parameters, optimizer state and the
aggregation stay float32).

Memory, two figures per mode. `compiled_memory` is XLA's plan of the mode's compiled step
alone, on every backend (CPU included): its argument, output, temporary and aliased
(donated) bytes, and the peak they imply (`measurement.compiled_memory`). The JSON's
`memory` section reads the goal "MoKD's extra memory <= one gradient copy per extra
objective" off it: each MoKD mode's implied peak over the one-backward baseline's
(`kd_1bwd`; detection: `kd`), in bytes and in gradient copies (the student's parameter
bytes). `peak_bytes` is the device allocator's peak so far in this process, where the
backend reports one (GPU, TPU; None on CPU). Peaks only grow, so a mode's figure is exact
when the modes before it needed less: the default order runs them from the least to the
most memory they should need.

The FLOP floor R = (F_t + 5 F_s) / (F_t + 3 F_s), with F_t and F_s the XLA cost-analysis
FLOPs of the teacher's and the student's forward passes (a backward costs about two
forwards): the cost of the teacher forward + student forward + two student backwards over
that of one-backward KD. Goal: mokd / kd_1bwd <= 1.05 R.

The aggregation's share of the step (goal <= 2%), two ways, for K = 2 (`mokd`) and K = 3
(`mokd_separate`), each where that mode was run:
  share           the jitted `mokd` update alone, on random K-stacked gradients shaped like
                  the student's parameters, over the mokd step time: an upper bound, since
                  alone its reductions (one per parameter leaf) run as separate kernels
                  that inside the step XLA fuses with the backward pass and the optimizer;
  in_step_share   (mokd - kd) / mokd, where `kd` (`kd_separate` for K = 3) is the same step
                  (same K pullbacks, same diagnostics) with the summing aggregator: what
                  MoKD's aggregation adds to the compiled step. The diagnostics' Gram matrix
                  is computed in both, and XLA computes the aggregator's identical Gram
                  only once, so this counts the weights and the combination, not the Gram.

PyTorch peer (`--framework=torch` or `both`, classification only; needs torch,
`pip install .[torch]`): the `kd_1bwd` and `mokd` steps written as a PyTorch user would
(`mokd_jax.torch_peer`), on the same models (resnet18/34/50), batch and data, timed the
same way (warm-up, then the median; `mokd_jax.benchmark_peer`). With a peer, every mode of
ours runs the peer's losses (CE + T^2 KL on the logits, no projector) and both frameworks
the same optimizer (SGD, momentum 0.9, the config's weight decay, constant rate), so that
the ratios compare the same work (`mokd_jax.benchmark_like_peer` says why logits only);
the JSON's `config.like_peer` says which recipe ran. The peer's `peak_bytes` is
`torch.cuda.max_memory_allocated` per mode on a GPU, None on CPU.
`both` times ours and the peer's one mode after the other in one process (ours, peer, for
kd_1bwd then mokd) and adds a `peer` section and `ratios_vs_peer` (ours / peer per mode).
`--peer_device`, `--peer_bf16`, `--peer_channels_last`, `--peer_compile` override the
peer's defaults (`torch_peer.default_options`: on a GPU bf16 autocast, channels_last and
torch.compile; on CPU float32 eager).

Sizes: XLA on CPU is ~20x slower for 3x3 convolutions on 2x2 maps (docs/architecture.md), so
ImageNet ResNets need >= 112 px on CPU (the last stage is then 4x4). Measured on 2 CPU cores
(resnet34 -> resnet18, 112 px, batch 16, 5 steps): see docs/benchmarks.md.
"""

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import flags

from mokd_jax import cli, config_helpers, models
from mokd_jax.benchmark_detection import DETECTION_MODES, measure_detection
from mokd_jax.benchmark_like_peer import LIKE_PEER
from mokd_jax.benchmark_ours import MODES, measure_ours
from mokd_jax.benchmark_peer import PEER_MODES, peer_timer
from mokd_jax.benchmark_report import config_section, format_table
from mokd_jax.checks import check_choice
from mokd_jax.errors import InputError, invalid
from mokd_jax.machine import machine_info

FRAMEWORKS = ("jax", "torch", "both")
FLAGS = flags.FLAGS


TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {
        "teacher": "resnet34",
        "student": "resnet18",
        "image_size": 112,
        "batch_size": 16,
        "num_classes": 1000,
    },
    "detection": {
        "teacher": "resnet50",
        "student": "resnet18",
        "image_size": 512,
        "batch_size": 8,
        "num_classes": 80,
    },
}
"""Each task's defaults for the flags left unset: ImageNet ResNets at a size a CPU runs
(classification), torchvision's RetinaNet pair at a realistic COCO size (detection)."""

TASK_MODES = {"classification": tuple(MODES), "detection": tuple(DETECTION_MODES)}


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    flags.DEFINE_enum(
        "task",
        "classification",
        tuple(TASK_DEFAULTS),
        "What to benchmark.",
        flag_values=flag_values,
    )
    for name, kind, what in (
        ("teacher", flags.DEFINE_string, "Teacher model (detection: its backbone)."),
        ("student", flags.DEFINE_string, "Student model (detection: its backbone)."),
        ("image_size", flags.DEFINE_integer, "Square image side (CPU: >= 112 for ResNets)."),
        ("batch_size", flags.DEFINE_integer, "Images per step."),
        ("num_classes", flags.DEFINE_integer, "Classes of the synthetic labels and heads."),
    ):
        defaults = ", ".join(f"{task} {values[name]}" for task, values in TASK_DEFAULTS.items())
        kind(name, None, f"{what} Default: {defaults}.", flag_values=flag_values)
    flags.DEFINE_integer(
        "steps", 5, "Timed steps per mode (after 2 warm-up steps).", flag_values=flag_values
    )
    for name, default, what in (
        ("fpn_width", 256, "FPN and head channels"),
        ("head_depth", 4, "convs in each head before its output"),
    ):
        flags.DEFINE_integer(
            name,
            default,
            f"Detection: both RetinaNets' {what} (torchvision's: {default}).",
            flag_values=flag_values,
        )
    flags.DEFINE_list(
        "modes",
        None,
        f"Modes to time (default: all of the task's), from {dict(TASK_MODES)}.",
        flag_values=flag_values,
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


def check_request(task: str, mode_names: Sequence[str], framework: str) -> list[str]:
    """The peer modes among `mode_names` (none for `jax`), or an InputError for a mode the
    task lacks, an unknown framework, a torch framework without any peer mode, or one
    asked for detection (the peer has none)."""
    check_choice("framework", framework, FRAMEWORKS)
    for mode in mode_names:
        if mode not in TASK_MODES[task]:
            raise invalid("modes", mode, f"with --task={task}, one of {list(TASK_MODES[task])}")
    if framework == "jax":
        return []
    if task != "classification":
        raise invalid("framework", framework, f"jax with --task={task} (no PyTorch peer)")
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
    both, each peer mode right after ours (`both`); returns the JSON-ready results. With a
    peer, `base` takes the peer's optimizer and every mode of ours its losses
    (`benchmark_like_peer`), so that both frameworks run the same step."""
    peer_modes = check_request("classification", mode_names, framework)
    load_before = os.getloadavg()
    like_peer = bool(peer_modes)
    if like_peer:
        base = config_helpers.with_overrides(base, LIKE_PEER)
    time_peer, peer = None, None
    if peer_modes:
        time_peer, peer = peer_timer(base, image_size, steps, peer_overrides or {})
    if framework == "torch":
        peer["modes"] = {mode: time_peer(mode) for mode in peer_modes}
        return {
            "machine": machine_info(load_before),
            "config": config_section(base, image_size, steps, like_peer),
            "peer": peer,
        }

    def time_peer_after_ours(mode: str) -> None:
        if mode in peer_modes:
            peer["modes"][mode] = time_peer(mode)

    ours = measure_ours(base, image_size, steps, mode_names, time_peer_after_ours, like_peer)
    results = {"machine": machine_info(load_before), **ours}
    if peer is not None:
        results["peer"] = peer
        results["ratios_vs_peer"] = {
            mode: results["modes"][mode]["step_time_s"] / row["step_time_s"]
            for mode, row in peer["modes"].items()
        }
    return results


def task_settings(task: str) -> dict[str, Any]:
    """The flags of TASK_DEFAULTS, each the task's default where left unset."""
    return {
        name: default if FLAGS[name].value is None else FLAGS[name].value
        for name, default in TASK_DEFAULTS[task].items()
    }


def measure_task(base: ml_collections.ConfigDict, task: str, image_size: int) -> dict[str, Any]:
    """The results of the flags' request: `measure` for classification, the detection
    benchmark (`benchmark_detection`) for detection."""
    mode_names = FLAGS.modes or list(TASK_MODES[task])
    if task == "classification":
        peer_overrides = {
            "device": FLAGS.peer_device,
            "bf16": FLAGS.peer_bf16,
            "channels_last": FLAGS.peer_channels_last,
            "compile": FLAGS.peer_compile,
        }
        return measure(base, image_size, FLAGS.steps, mode_names, FLAGS.framework, peer_overrides)
    check_request(task, mode_names, FLAGS.framework)
    load_before = os.getloadavg()
    results = measure_detection(
        base, image_size, FLAGS.steps, mode_names, FLAGS.fpn_width, FLAGS.head_depth
    )
    return {"machine": machine_info(load_before), **results}


def benchmark_base(settings: Mapping[str, Any], dtype: str) -> ml_collections.ConfigDict:
    """The base config of configs/default.py with the request's models, batch size, class
    count (`settings`, as `task_settings` gives them) and compute `dtype`."""
    return config_helpers.with_overrides(
        config_helpers.base_config(),
        {
            "teacher.model": settings["teacher"],
            "student.model": settings["student"],
            "batch_size": settings["batch_size"],
            "num_classes": settings["num_classes"],
            "dtype": dtype,
        },
    )


def main(argv: Sequence[str]) -> None:
    del argv
    settings = task_settings(FLAGS.task)
    try:
        base = benchmark_base(settings, FLAGS.dtype)
        results = measure_task(base, FLAGS.task, settings["image_size"])
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    cli.report(format_table(results), results, FLAGS.json)


def run() -> None:
    """The `mokd-benchmark` entry point."""
    cli.run(main, define_flags, runs_steps=True)


if __name__ == "__main__":
    run()
