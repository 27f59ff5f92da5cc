"""MoKD on scikit-learn's bundled digits: the embedded default, no download needed.

Command:
    python -m mokd_jax.main --config=configs/default.py [--workdir=runs/default]

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

from mokd_jax import aggregation


def aggregation_defaults() -> ml_collections.ConfigDict:
    """Hyperparameters per aggregator, with the defaults of `mokd_jax.aggregation`; only the
    section of the chosen aggregator is used (those a method takes from the optimizer, such
    as dot's weight decay, are not listed)."""
    return ml_collections.ConfigDict(
        {name: aggregation.default_hyperparameters(name) for name in aggregation.NAMES}
    )


def split_arg(arg: str | None, pairs: tuple[str, ...]) -> tuple[str, bool]:
    """A config arg 'PAIR', 'smoke' or 'PAIR,smoke' -> (pair, smoke); no pair: pairs[0]."""
    parts = [part for part in (arg or "").split(",") if part]
    smoke = "smoke" in parts
    named = [part for part in parts if part != "smoke"]
    if len(named) > 1 or (named and named[0] not in pairs):
        raise ValueError(
            f"config arg={arg!r} is not allowed: use one of {', '.join(pairs)}, "
            "optionally followed by ',smoke' (or 'smoke' alone)"
        )
    return (named[0] if named else pairs[0]), smoke


def set_phase(
    section: ml_collections.ConfigDict,
    *,
    model: str,
    optimizer: str,
    learning_rate: float,
    weight_decay: float,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: int = 0,
    decay_epochs: tuple[int, ...] = (),
) -> None:
    """Fills a teacher/student section from an epoch-based recipe: a step decay at
    `decay_epochs` when given, else cosine."""
    section.model = model
    section.optimizer = optimizer
    section.learning_rate = learning_rate
    section.weight_decay = weight_decay
    section.num_train_steps = epochs * steps_per_epoch
    section.warmup_steps = warmup_epochs * steps_per_epoch
    section.schedule = "step" if decay_epochs else "cosine"
    section.decay_boundaries = tuple(epoch * steps_per_epoch for epoch in decay_epochs)


def shrink_to_smoke(config: ml_collections.ConfigDict, teacher: str, student: str) -> None:
    """A few steps of tiny models on tiny batches: the whole path in about a minute on a
    CPU (tests run it under tfds.testing.mock_data)."""
    for section, model in (("teacher", teacher), ("student", student)):
        config[section].model = model
        config[section].num_train_steps = 4
        config[section].warmup_steps = 1
        config[section].schedule = "cosine"
        config[section].decay_boundaries = ()
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.dataset = "digits"
    config.data_dir = ""
    config.num_classes = 0  # 0: the largest label + 1
    config.image_size = 0  # TFDS datasets: crop side (0: 224 for ImageNet, 32 for CIFAR)
    config.recipe = "standard"  # TFDS datasets: or "deit" (RandAugment on the host)
    config.batch_size = 64  # global: split over every device and process
    config.eval_batch_size = 256

    # Device-side batch mixing (the DeiT recipe: mixup 0.8, cutmix 1.0, smoothing 0.1).
    config.augment = ml_collections.ConfigDict()
    config.augment.mixup_alpha = 0.0
    config.augment.cutmix_alpha = 0.0
    config.augment.label_smoothing = 0.0

    config.dtype = "float32"  # or "bfloat16": compute in bf16, float32 params and optimizer
    config.mesh = ml_collections.ConfigDict()
    config.mesh.fsdp = 1  # devices per parameter shard group; the rest is data parallel
    config.mesh.fsdp_min_size = 2**18  # leaves smaller than this stay replicated

    config.teacher = ml_collections.ConfigDict()
    config.teacher.model = "cnn_large"
    config.teacher.checkpoint_dir = ""  # "": WORKDIR/teacher, trained there when missing
    config.teacher.num_train_steps = 600
    config.teacher.optimizer = "adamw"
    config.teacher.learning_rate = 3e-3
    config.teacher.weight_decay = 1e-4
    config.teacher.warmup_steps = 50
    config.teacher.schedule = "cosine"  # or "step": x decay_factor at each decay boundary
    config.teacher.decay_boundaries = ()
    config.teacher.decay_factor = 0.1

    config.student = ml_collections.ConfigDict()
    config.student.model = "cnn_small"
    config.student.num_train_steps = 1000
    config.student.optimizer = "adamw"
    config.student.learning_rate = 3e-3
    config.student.weight_decay = 1e-4
    config.student.warmup_steps = 50
    config.student.schedule = "cosine"  # or "step": x decay_factor at each decay boundary
    config.student.decay_boundaries = ()
    config.student.decay_factor = 0.1

    config.distill = ml_collections.ConfigDict()
    config.distill.temperature = 4.0
    config.distill.logit_weight = 1.0
    config.distill.feature_weight = 1.0
    config.distill.objectives = "merged"  # [task, distill]; "separate": [task, logit, feature]
    config.distill.logit_loss = "kd"  # or "dkd": decoupled KD (TCKD + NCKD)
    config.distill.dkd_alpha = 1.0
    config.distill.dkd_beta = 8.0
    config.distill.dkd_warmup_steps = 100

    config.projector = ml_collections.ConfigDict()
    config.projector.width_multiplier = 2
    config.projector.orthogonal_init = False

    config.aggregator = "mokd"
    config.granularity = "global"  # or "per_layer": every parameter leaf weighted on its own
    config.aggregation = aggregation_defaults()

    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.max_checkpoints_to_keep = 2

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
