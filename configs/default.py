"""MoKD on scikit-learn's bundled digits: the embedded default, no download needed.

Command:
    python -m mokd_jax.main --config=configs/default.py [--workdir=runs/default]
or, the package installed, from any directory: `mokd-train --config=default`.

Phase 1 trains a `cnn_large` teacher with cross-entropy (or restores it from
WORKDIR/teacher), phase 2 distills a `cnn_small` student (about 10x fewer parameters) with
the aggregator named by `aggregator` (default `mokd`), phase 3 evaluates both on the fixed
test split and writes WORKDIR/summary.json.

Expected on 2 CPU cores: about 30 s in all; teacher about 99.7% and student about 99%
test accuracy (docs/benchmarks.md gives the measured figures).

Arguments (`--config=configs/default.py:ARG`):
    smoke  a few steps of everything, for tests and a quick look (seconds).

Any field can be overridden: `--config.aggregator=mgda --config.student.num_train_steps=500`.
Bring your own data: `--config.dataset=npz --config.data_dir=DIR` with DIR/train.npz and
DIR/test.npz (arrays `image` uint8 [N,H,W,C] and `label` int [N]).
"""

import ml_collections

from mokd_jax import config_helpers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_helpers.base_config()
    if arg == "smoke":
        config.teacher.num_train_steps = 20
        config.student.num_train_steps = 20
        config.teacher.warmup_steps = 2
        config.student.warmup_steps = 2
        config.log_every_steps = 5
        config.checkpoint_every_steps = 10
    elif arg is not None:
        raise ValueError(f"config arg={arg!r} is not allowed: use no arg or 'smoke'")
    return config
