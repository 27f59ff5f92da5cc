"""The trainer's command line:

    mokd-train --config=configs/default.py [--workdir=DIR] [--config.key=value ...]

(or `python -m mokd_jax.main ...`). --config is a config file's path, or the name of a
config bundled with the package (`--config=imagenet:smoke`, `--config=default.py`), with
an optional `:ARG` for its get_config(ARG).

Flags, start-up and logging only; the work is `train.train_and_evaluate`. `--workdir`
defaults to runs/<config file name>[_<arg>]. Bad input (config, data, checkpoint) ends the
run with a one-line error and exit status 2, before anything saved is touched.

Launched on several hosts (a TPU pod slice, SLURM, or JAX_COORDINATOR_ADDRESS set), every
host runs this same command and `jax.distributed.initialize()` joins them first. SIGTERM
(a preemption notice) makes the run save a checkpoint at its current step and exit with
status 143 (128 + SIGTERM, what schedulers read as "terminated"); the same command then
resumes from it.
"""

import json
import logging as std_logging
import os
import signal
import sys

from absl import app, flags, logging

from mokd_jax import cli, config_files
from mokd_jax.errors import InputError

PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    config_files.define_config_flag(
        "config", "Config file or bundled config name, [:ARG] for get_config(ARG).", flag_values
    )
    flags.DEFINE_string(
        "workdir", None, "Checkpoints, logs and summary.json go here.", flag_values=flag_values
    )


def default_workdir(config_flag_value: str) -> str:
    """runs/<name of the config file>[_<arg>], e.g. runs/default or runs/default_smoke."""
    path, _, arg = config_flag_value.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{arg}" if arg else name)


def format_summary(summary: dict) -> str:
    """One line: both networks' headline figure (top-1 accuracy, or COCO box AP for a
    detection run) and the student's best."""
    teacher, student = summary["teacher"], summary["student"]
    best = student["best"]
    name, key = (
        ("AP", "test_ap")
        if summary.get("task") == "detection"
        else ("test accuracy", "test_accuracy")
    )
    return (
        f"method {summary['method']} on {summary['dataset']}: "
        f"teacher {teacher['model']} ({teacher['parameters']:,} params) "
        f"{name} {teacher[key]:.2%}; "
        f"student {student['model']} ({student['parameters']:,} params) "
        f"{name} {student[key]:.2%} (best {best[key]:.2%} at "
        f"step {best['step']}); {summary['wall_time_s']:.0f} s"
    )


def is_not_orbax_chatter(record) -> bool:
    """Drops Orbax's INFO records (a dozen per save) and keeps its warnings and errors."""
    return record.levelno > std_logging.INFO or "/orbax/" not in record.pathname.replace("\\", "/")


def refuse(error: InputError) -> None:
    """Bad input's one-line error and exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    from mokd_jax import parallel
    from mokd_jax.config_checks import check_config

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_logger().addFilter(is_not_orbax_chatter)
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    logging.info("workdir %s; config:\n%s", workdir, FLAGS.config)
    try:
        parallel.initialize_distributed()  # before anything that may start a JAX backend
        check_config(FLAGS.config)
    except InputError as error:
        refuse(error)
    # The trainer (JAX, the models, the data loaders: seconds) is imported once the flags
    # are parsed and the config checked, so that --help, a bad flag and a bad config
    # answer at once.
    from mokd_jax import loop, train

    # On SIGTERM the training loop saves and stops at the end of its current step.
    signal.signal(signal.SIGTERM, lambda signum, frame: loop.PREEMPTION.set())
    try:
        summary = train.train_and_evaluate(FLAGS.config, workdir)
    except InputError as error:
        refuse(error)
    except loop.Preempted as stopped:
        print(f"{stopped}; run the same command to resume from it", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_STATUS)
    print(format_summary(summary))
    print(f"summary: {os.path.join(workdir, 'summary.json')}")
    logging.info("summary: %s", json.dumps(summary))


def run() -> None:
    """The `mokd-train` entry point."""
    cli.run(main, define_flags, runs_steps=True)


if __name__ == "__main__":
    run()
