"""Runs a command of the package (an absl app: `define_flags(flag_values)` and
`main(argv)`) as a console entry point or under `python -m`, with a `--help` that shows the
command's docstring and flags and exits with status 0."""

import gc
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from absl import app, flags

from mokd_jax import host_memory

HELP_FLAGS = ("help", "helpshort", "helpfull")

GC_THRESHOLDS = (100_000, 50, 50)
"""Python's collector thresholds in a command: its youngest generation collected every
100,000 net allocations instead of every 2,000, the older ones after 50 runs of the younger
instead of 10. Tracing and lowering a network's steps allocates millions of objects that
mostly live on (jaxprs, MLIR, caches), which the default thresholds walk again and again:
`mokd-train --config=configs/default.py:smoke`, whose time is mostly tracing and compiling,
took 7.7-8.2 s instead of 8.3-9.1 s (two runs each, 2 cores). Only garbage in reference
cycles waits longer; everything else is still freed as soon as it is unreferenced."""


def _exit_zero(parse: Callable[[str], None]) -> Callable[[str], None]:
    """A help flag's parse that exits with status 0 where absl's exits with 1: the help is
    what was asked for."""

    def parse_and_exit_zero(argument: str) -> None:
        try:
            parse(argument)
        except SystemExit:
            sys.exit(0)

    return parse_and_exit_zero


def define_checkpoint_dir_flag(flag_values: flags.FlagValues) -> None:
    """--checkpoint_dir, the exported network a command reads (`mokd-evaluate`,
    `mokd-export`)."""
    flags.DEFINE_string(
        "checkpoint_dir",
        None,
        "An exported network (WORKDIR/student, student_best, teacher, a converted teacher).",
        required=True,
        flag_values=flag_values,
    )


def report(table: str, results: Mapping[str, Any], json_path: str) -> None:
    """A benchmark's end: its table on stdout and, when `json_path` is set, its results as
    JSON there."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)


def run(
    main: Callable[[list[str]], None],
    define_flags: Callable[[flags.FlagValues], None],
    runs_steps: bool = False,
) -> None:
    """Defines the command's flags on absl's FLAGS, then `app.run(main)`. Every command
    first raises the collector's thresholds (GC_THRESHOLDS); one that `runs_steps` (trains
    or times steps) also sets malloc to reuse freed host memory (`host_memory`).

    absl's --help shows the docstring of `__main__` and the flags of the module named by
    sys.argv[0]: under `python -m` the command's module, but for an installed console
    script pip's wrapper (or a wrapper in scripts/); both are pointed at the command here.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    if runs_steps:
        host_memory.keep_freed_memory()
    defined_before = set(flags.FLAGS)
    define_flags(flags.FLAGS)
    for name in set(flags.FLAGS) - defined_before:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    sys.modules["__main__"].__doc__ = sys.modules[main.__module__].__doc__
    app.define_help_flags()
    for name in HELP_FLAGS:
        flags.FLAGS[name].parse = _exit_zero(flags.FLAGS[name].parse)
    app.run(main)
