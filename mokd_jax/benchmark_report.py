"""The benchmark's report: progress lines, the step-time ratios and the cost goals read
off them, the configuration section of the JSON (its machine section: `mokd_jax.machine`),
and the table printed at the end (`mokd_jax.benchmark`)."""

import sys
from collections.abc import Mapping
from typing import Any

import ml_collections

from mokd_jax import measurement

RATIOS: dict[str, tuple[str, str]] = {
    "mokd_over_kd": ("mokd", "kd"),
    "mokd_over_kd_1bwd": ("mokd", "kd_1bwd"),
    "mokd_amortized_over_kd": ("mokd_amortized", "kd"),
    "mokd_amortized_over_kd_1bwd": ("mokd_amortized", "kd_1bwd"),
    "kd_over_kd_1bwd": ("kd", "kd_1bwd"),
    "kd_1bwd_over_ce": ("kd_1bwd", "ce"),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


EXTRA_OBJECTIVES = {"mokd": 1, "mokd_separate": 2}
"""The MoKD modes whose memory is compared with one-backward KD's, with the objectives
they add (K - 1): one gradient copy each is the goal's allowance."""


def extra_memory(
    modes: Mapping[str, Mapping[str, Any]],
    gradient_bytes: int,
    baseline: str = "kd_1bwd",
    extra_objectives: Mapping[str, int] = EXTRA_OBJECTIVES,
) -> dict[str, Any]:
    """The memory goal read off the compiled steps' plans: for each MoKD mode of
    `extra_objectives` run with `baseline`, its implied peak bytes over the baseline's, and
    that in units of one gradient copy (`gradient_bytes`, the student's parameter bytes).
    Goal: at most one gradient copy per extra objective (the K per-objective gradients
    against one summed one)."""
    result: dict[str, Any] = {
        "baseline": baseline,
        "gradient_copy_bytes": gradient_bytes,
        "goal": "extra_gradient_copies <= extra_objectives (K - 1)",
    }
    base = modes.get(baseline, {}).get("compiled_memory")
    for mode, objectives in extra_objectives.items():
        memory = modes.get(mode, {}).get("compiled_memory")
        if base is None or memory is None:
            continue
        extra = memory["peak_bytes"] - base["peak_bytes"]
        result[mode] = {
            "extra_bytes": extra,
            "extra_gradient_copies": extra / gradient_bytes,
            "extra_objectives": objectives,
            "goal_met": extra <= objectives * gradient_bytes,
        }
    return result


def format_table(results: Mapping[str, Any]) -> str:
    """Our modes' table and figures (when run), then the peer's rows and the ratios."""
    lines = format_ours(results) if "modes" in results else []
    if "peer" in results:
        lines += format_peer(results["peer"], results.get("ratios_vs_peer", {}))
    return "\n".join(lines)


def mebibytes(value: int | None) -> str:
    return f"{value / 2**20:.1f}" if value is not None else "-"


def format_modes(modes: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A row per mode: step time, images/s, the compiled step's implied peak and its
    temporaries (MiB)."""
    lines = [f"{'mode':<16}{'step s':>10}{'images/s':>10}{'peak MiB':>10}{'temp MiB':>10}"]
    for mode, row in modes.items():
        memory = row["compiled_memory"] or {}
        lines.append(
            f"{mode:<16}{row['step_time_s']:>10.4f}{row['images_per_s']:>10.1f}"
            f"{mebibytes(memory.get('peak_bytes')):>10}{mebibytes(memory.get('temp_bytes')):>10}"
        )
    return lines


def format_memory(memory: Mapping[str, Any]) -> list[str]:
    copy = memory["gradient_copy_bytes"]
    lines = [f"one gradient copy (student parameters) = {mebibytes(copy)} MiB"]
    for mode, row in memory.items():
        if isinstance(row, Mapping):
            lines.append(
                f"{mode} over {memory['baseline']}: {mebibytes(row['extra_bytes'])} MiB = "
                f"{row['extra_gradient_copies']:.2f} gradient copies "
                f"(goal <= {row['extra_objectives']}: {'met' if row['goal_met'] else 'not met'})"
            )
    return lines


def format_ours(results: Mapping[str, Any]) -> list[str]:
    lines = format_modes(results["modes"])
    lines.append(f"flop_floor_ratio R = {results['flop_floor_ratio']:.4f}")
    for name, value in results["ratios"].items():
        lines.append(f"{name} = {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    lines += format_memory(results["memory"])
    for k, row in results.get("aggregation", {}).items():
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


def config_section(
    base: ml_collections.ConfigDict, image_size: int, steps: int, like_peer: bool
) -> dict:
    """The JSON's `config`: what was run. `like_peer`: our steps ran the PyTorch peer's
    losses and optimizer (`benchmark_like_peer`), recorded with the optimizer's fields."""
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
        "like_peer": like_peer,
        "student_optimizer": {
            field: base.student[field]
            for field in ("optimizer", "learning_rate", "weight_decay", "schedule")
        },
    }
