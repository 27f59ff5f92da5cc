"""Compares distillation methods over seeds, every run distilled from one shared teacher
(the `mokd-compare` command):

    mokd-compare --config=configs/default.py --methods=ce,kd,mokd,mgda,pcgrad \\
        --seeds=0,1,2 --workdir=runs/compare [--config.key=value ...]

(or `python -m mokd_jax.compare ...`; --config also takes a bundled config's name, e.g.
`--config=default`). The teacher is trained once, with the base configuration and its
seed, in WORKDIR/teacher (or taken from --config.teacher.checkpoint_dir). Each (method,
seed) run is a full `train.train_and_evaluate` in WORKDIR/<method>/seed<k> with the
method's recipe applied (`mokd_jax.recipes`: the config's reference values for that method,
e.g. DKD's beta for the pair; they win over --config.* flags for the same fields; change a
recipe with --config.recipes.*) and `seed` = k, which changes the student's
initialisation, the projector and the data order; the teacher stays valid because a
teacher checkpoint is matched on model and class count only. A rerun resumes each run from
its checkpoints.

Writes WORKDIR/comparison.md (one row per method: student test accuracy mean ± std over
seeds, steps/s, mean cos(g_task, g_distill), conflict fraction; the teacher's accuracy; the
command) and WORKDIR/comparison.png (mean accuracy with std error bars). The trainer's log
lines are off unless --verbosity is given: the output is one progress line per run. JAX's
compilation cache (WORKDIR/jax_cache) lets the seeds of a method share their compilations.

Measured on 2 CPU cores with configs/default.py: the teacher about 20 s, a method's first
seed about 20 s, each further seed about 12 s (it reuses the compilations), so about
4 minutes for 5 methods x 3 seeds.
"""

import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mokd_jax import cli, config_files, config_helpers, parallel, recipes
from mokd_jax.config_checks import check_config
from mokd_jax.errors import InputError, invalid
from mokd_jax.events import read_scalars

METHODS = recipes.METHODS
"""Every method `--methods` takes: the baselines (ce, kd, kd_feature, dkd, dot), then every
aggregator on the KD recipe's losses (`mokd_jax.recipes`)."""

TABLE_HEADER = (
    "| method | seeds | student test accuracy (%), mean ± std | steps/s | "
    "mean cos(g_task, g_distill) | conflict fraction |\n"
    "|---|---|---|---|---|---|"
)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One (method, seed) run. Accuracy and conflict fraction are fractions in [0, 1]."""

    method: str
    seed: int
    accuracy: float
    steps_per_sec: float
    mean_cos: float
    conflict_fraction: float
    wall_time_s: float


@dataclasses.dataclass(frozen=True)
class Row:
    """One method over its seeds: means, and the sample std (ddof 1) of the accuracy."""

    method: str
    num_seeds: int
    accuracy_mean: float
    accuracy_std: float  # NaN for a single seed: no spread to estimate
    steps_per_sec: float
    mean_cos: float
    conflict_fraction: float


# ----------------------------------------------------------------------------- methods


def method_config(
    base: ml_collections.ConfigDict, method: str, seed: int
) -> ml_collections.ConfigDict:
    """A copy of `base` with `method`'s recipe (`recipes.method_overrides` of the reference
    values in `base.recipes`) and `seed`, checked as a run would check it.

    Checked here, before any training, so that a recipe naming a config field or an
    aggregator this version does not have stops the comparison at once, with the method
    named, instead of after the runs before it.
    """
    if method not in METHODS:
        raise invalid("methods", method, f"one of {', '.join(METHODS)}")
    if "recipes" not in base:
        allowed = "a config with a `recipes` section (config_helpers.base_config() has one)"
        raise invalid("methods", method, allowed)
    try:
        overrides = {**recipes.method_overrides(base.recipes, method), "seed": seed}
        config = config_helpers.with_overrides(base, overrides)
        check_config(config)
    except InputError as error:
        raise invalid("methods", method, f"its recipe gives {error}") from error
    return config


# ----------------------------------------------------------------------------- runs


def shared_teacher(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The exported teacher every run restores: `teacher.checkpoint_dir`, else trained once
    (or restored) in the workdir WORKDIR/teacher, whose export is WORKDIR/teacher/teacher."""
    if config.teacher.checkpoint_dir:
        return config.teacher.checkpoint_dir
    from mokd_jax import data, train  # imported here: see `compare`

    teacher_workdir = os.path.join(workdir, "teacher")
    mesh = parallel.make_mesh(config.mesh.fsdp)
    train.obtain_teacher(config, teacher_workdir, data.load_configured(config), mesh)
    return os.path.join(teacher_workdir, "teacher")


def mean_over(scalars: Mapping[str, tuple[np.ndarray, np.ndarray]], prefix: str) -> float:
    """The mean of every logged value of the tags starting with `prefix`; NaN if none."""
    values = [series[1] for tag, series in scalars.items() if tag.startswith(prefix)]
    return float(np.mean(np.concatenate(values))) if values else float("nan")


def run_result(method: str, seed: int, summary: Mapping[str, Any], run_dir: str) -> RunResult:
    """The numbers of one finished run, read from its summary and its student events.

    The diagnostics come from the events rather than the summary's means: a rerun of a
    finished workdir trains no step and its summary has no means, its events still do.
    steps/s is the mean of the progress reports' `steps_per_sec`, which time the training loop
    only (compilation and evaluation excluded); NaN when the run was too short to report.
    """
    scalars = read_scalars(os.path.join(run_dir, "tensorboard", "student"))
    return RunResult(
        method=method,
        seed=seed,
        accuracy=summary["student"]["test_accuracy"],
        steps_per_sec=mean_over(scalars, "steps_per_sec"),
        mean_cos=mean_over(scalars, "cos_"),
        conflict_fraction=mean_over(scalars, "conflict"),
        wall_time_s=summary["wall_time_s"],
    )


# ----------------------------------------------------------------------------- report


def summarise(results: Sequence[RunResult]) -> list[Row]:
    """One row per method, in the order the methods first appear in `results`."""
    methods = list(dict.fromkeys(result.method for result in results))
    rows = []
    for method in methods:
        runs = [result for result in results if result.method == method]
        accuracies = np.array([run.accuracy for run in runs])
        rows.append(
            Row(
                method=method,
                num_seeds=len(runs),
                accuracy_mean=float(accuracies.mean()),
                accuracy_std=float(accuracies.std(ddof=1)) if len(runs) > 1 else float("nan"),
                steps_per_sec=float(np.mean([run.steps_per_sec for run in runs])),
                mean_cos=float(np.mean([run.mean_cos for run in runs])),
                conflict_fraction=float(np.mean([run.conflict_fraction for run in runs])),
            )
        )
    return rows


def format_accuracy(row: Row) -> str:
    mean = f"{100 * row.accuracy_mean:.2f}"
    return mean if np.isnan(row.accuracy_std) else f"{mean} ± {100 * row.accuracy_std:.2f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The comparison as a markdown table; NaN (nothing measured) reads n/a."""

    def number(value: float, digits: int) -> str:
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"

    lines = [TABLE_HEADER]
    for row in rows:
        cells = (
            row.method,
            str(row.num_seeds),
            format_accuracy(row),
            number(row.steps_per_sec, 1),
            number(row.mean_cos, 3),
            number(row.conflict_fraction, 3),
        )
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def report(
    rows: Sequence[Row], teacher: Mapping[str, Any], student_model: str, command: str
) -> str:
    """The whole comparison.md: what was compared, the table, what each column means."""
    return f"""# Method comparison

Command: `{command}`

Teacher {teacher["model"]}: test accuracy {teacher["test_accuracy"]:.2%} (one checkpoint, \
shared by every run). Student {student_model}.

{markdown_table(rows)}

- accuracy: top-1 on the test split, mean ± sample std (ddof 1) over the seeds;
- steps/s: mean of CLU's `steps_per_sec` reports in the student's events (the training
  loop only: compilation and evaluation excluded);
- mean cos: cos(g_task, g_k) over every step (and every distillation objective k);
- conflict fraction: the fraction of steps with cos(g_task, g_distill) < 0.
"""


def bar_chart(rows: Sequence[Row], path: str) -> str:
    """Mean accuracy per method with std error bars, as a PNG at `path`; returns `path`.

    The y axis starts just below the lowest bar: accuracies of distilled students are
    usually within a few points, which bars from 0 would flatten into one height.
    """
    means = np.array([100 * row.accuracy_mean for row in rows])
    stds = np.nan_to_num(np.array([100 * row.accuracy_std for row in rows]))
    figure = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2.0), 4.0), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    ax = figure.subplots()
    positions = np.arange(len(rows))
    bars = ax.bar(positions, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.bar_label(bars, fmt="%.2f", label_type="center", color="white")
    ax.set_xticks(positions, [row.method for row in rows])
    low, high = float(np.min(means - stds)), float(np.max(means + stds))
    margin = max(high - low, 1.0)
    ax.set_ylim(max(0.0, low - margin), high + 0.25 * margin)
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    canvas.print_png(path)
    return path


# ----------------------------------------------------------------------------- command line


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag (a process that
    imports it may have defined its own --config)."""
    config_files.define_config_flag(
        "config", "Base config file or bundled config name, [:ARG].", flag_values
    )
    flags.DEFINE_list(
        "methods", ["ce", "kd", "mokd"], f"Any of: {', '.join(METHODS)}.", flag_values=flag_values
    )
    flags.DEFINE_list(
        "seeds", ["0"], "Student seeds (config.seed), e.g. 0,1,2.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "workdir", "runs/compare", "The teacher, every run and the report.", flag_values=flag_values
    )


def parse_seeds(values: Sequence[str]) -> list[int]:
    try:
        return [int(value) for value in values]
    except ValueError:
        raise invalid("seeds", ",".join(values), "comma-separated integers") from None


def compare(
    base: ml_collections.ConfigDict,
    methods: Sequence[str],
    seeds: Sequence[int],
    workdir: str,
    command: str,
) -> list[Row]:
    """Trains every (method, seed) from one teacher; writes comparison.md and .png.

    The trainer (JAX, the models, the data loaders: seconds) is imported by the functions
    that use it, not at the top, so that `mokd-compare --help` and a bad flag answer at
    once."""
    from mokd_jax import train

    for field, values in (("methods", methods), ("seeds", seeds)):
        if not values:
            raise invalid(field, "", "at least one")
    check_config(base)
    configs = {(m, s): method_config(base, m, s) for m in methods for s in seeds}
    teacher_dir = shared_teacher(base, workdir)
    results = []
    for index, ((method, seed), config) in enumerate(configs.items(), start=1):
        config.teacher.checkpoint_dir = teacher_dir
        run_dir = os.path.join(workdir, method, f"seed{seed}")
        summary = train.train_and_evaluate(config, run_dir)
        results.append(run_result(method, seed, summary, run_dir))
        print(
            f"[{index}/{len(configs)}] {method} seed {seed}: student test accuracy "
            f"{results[-1].accuracy:.2%}, {results[-1].steps_per_sec:.1f} steps/s, "
            f"{results[-1].wall_time_s:.0f} s",
            flush=True,
        )
    rows = summarise(results)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(report(rows, summary["teacher"], base.student.model, command))
    bar_chart(rows, os.path.join(workdir, "comparison.png"))
    return rows


def use_compilation_cache(workdir: str) -> None:
    """JAX's persistent compilation cache in WORKDIR/jax_cache, unless one is set already.

    The runs of one method differ only in data and initial values, so their steps compile
    to the same programs: with the cache they compile once (measured on the smoke config:
    8 s -> 1 s per run). Every compilation is cached, the sub-second ones too, since a run
    has several.
    """
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    use_compilation_cache(flags.FLAGS.workdir)
    command = shlex.join(["mokd-compare", *sys.argv[1:]])
    try:
        rows = compare(
            flags.FLAGS.config,
            flags.FLAGS.methods,
            parse_seeds(flags.FLAGS.seeds),
            flags.FLAGS.workdir,
            command,
        )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(rows))
    print(f"report: {os.path.join(flags.FLAGS.workdir, 'comparison.md')}")


def run() -> None:
    """The `mokd-compare` entry point."""
    cli.run(main, define_flags, runs_steps=True)


if __name__ == "__main__":
    run()
