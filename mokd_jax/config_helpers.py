"""What the config files in configs/ are built from: the base configuration (every field
with its default: the digits run), the aggregators' default hyperparameters, and the
helpers for epoch-based recipes, config args and smoke variants.

They live in the package, not beside the configs, so that a config file imports only from
`mokd_jax` and loads from any path (`--config=/anywhere/configs/imagenet.py`) or from the
installed package (`--config=imagenet`, see `mokd_jax.config_files`).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from mokd_jax import aggregation, recipes
from mokd_jax.errors import invalid


def aggregation_defaults() -> ml_collections.ConfigDict:
    """Hyperparameters per aggregator, with the defaults of `mokd_jax.aggregation`; only the
    section of the chosen aggregator is used (those a method takes from the optimizer, such
    as dot's weight decay, are not listed)."""
    return ml_collections.ConfigDict(
        {name: aggregation.default_hyperparameters(name) for name in aggregation.NAMES}
    )


def phase_section(model: str, num_train_steps: int) -> ml_collections.ConfigDict:
    """A teacher or student section: model, length, optimizer and learning-rate schedule
    (the digits defaults)."""
    section = ml_collections.ConfigDict()
    section.model = model
    section.num_train_steps = num_train_steps
    section.optimizer = "adamw"
    section.learning_rate = 3e-3
    section.weight_decay = 1e-4
    # Which parameters decay (`mokd_jax.optimizers.WEIGHT_DECAY_MASKS`): 'all', or 'timm':
    # not the biases, norm scales, pos_embed and cls_token (the DeiT recipe).
    section.weight_decay_mask = "all"
    section.warmup_steps = 50
    section.schedule = "cosine"  # or "step": x decay_factor at each decay boundary
    section.decay_boundaries = ()
    section.decay_factor = 0.1
    # The input statistics (`mokd_jax.normalization.parse`): '' is automatic (a restored
    # teacher's saved ones, else the dataset's standard ones), or a preset name ('imagenet',
    # 'cifar100', 'cifar10', 'unit') or 'MEAN/STD' values, e.g. '0.5,0.5,0.5/0.25,0.25,0.25'.
    section.input_normalization = ""
    section.steps_per_epoch = 0  # set by epoch-based recipes (`set_phase`); 0: not known
    return section


def base_config() -> ml_collections.ConfigDict:
    """Every field of a run with its default: the digits run of configs/default.py, which
    the CIFAR-100 and ImageNet configs start from."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # What is learnt (`config_checks.TASKS`): 'classification', or 'detection' (RetinaNet
    # on COCO-format data, `mokd_jax.detection.phases`; its fields: `add_detection_fields`).
    config.task = "classification"

    config.dataset = "digits"
    config.data_dir = ""
    config.num_classes = 0  # 0: the largest label + 1
    config.image_size = 0  # TFDS datasets: crop side (0: 224 for ImageNet, 32 for CIFAR)
    config.recipe = "standard"  # TFDS datasets: or "deit" (RandAugment on the host)
    config.batch_size = 64  # global: split over every device and process
    config.eval_batch_size = 256

    # Device-side batch augmentation (the DeiT recipe: random erasing 0.25, then mixup 0.8,
    # cutmix 1.0, smoothing 0.1; `mokd_jax.data.mixing`).
    config.augment = ml_collections.ConfigDict()
    config.augment.random_erasing = 0.0  # probability per example (timm's 'pixel' mode)
    config.augment.mixup_alpha = 0.0
    config.augment.cutmix_alpha = 0.0
    config.augment.label_smoothing = 0.0

    config.dtype = "float32"  # or "bfloat16": compute in bf16, float32 params and optimizer
    config.mesh = ml_collections.ConfigDict()
    config.mesh.fsdp = 1  # devices per parameter shard group; the rest is data parallel
    config.mesh.fsdp_min_size = 2**18  # leaves smaller than this stay replicated

    config.teacher = phase_section("cnn_large", num_train_steps=600)
    config.teacher.checkpoint_dir = ""  # "": WORKDIR/teacher, trained there when missing
    config.student = phase_section("cnn_small", num_train_steps=1000)

    config.distill = ml_collections.ConfigDict()
    config.distill.temperature = 4.0
    config.distill.task_weight = 1.0  # the task cross-entropy's weight in the loss vector
    config.distill.logit_weight = 1.0
    config.distill.feature_weight = 1.0
    config.distill.objectives = "merged"  # [task, distill]; "separate": [task, logit, feature]
    config.distill.logit_loss = "kd"  # or "dkd": decoupled KD (TCKD + NCKD)
    config.distill.dkd_alpha = 1.0
    config.distill.dkd_beta = 8.0
    config.distill.dkd_warmup_steps = 100

    config.projector = ml_collections.ConfigDict()
    # Which features are distilled, one projector each (`mokd_jax.taps`): "multi_scale"
    # (pooled + second-to-last stage for CNNs, class token + mean patch token for ViTs),
    # or "pooled" (the classifier's input alone).
    config.projector.taps = "multi_scale"
    config.projector.width_multiplier = 2  # each tap's D = multiplier x its teacher width
    config.projector.orthogonal = False  # the student lifts kept orthogonal while training

    # Reference values per method (`mokd_jax.recipes`): what `select_method` and mokd-compare
    # set for `kd`, `dkd`, `dot`, `mokd`, ...; the CIFAR-100 and ImageNet configs give theirs.
    config.recipes = recipes.recipes_section()

    config.aggregator = "mokd"
    config.granularity = "global"  # or "per_layer": every parameter leaf weighted on its own
    config.aggregation = aggregation_defaults()

    config.log_every_steps = 50
    # Test accuracy while training, to TensorBoard and the log; 0: automatic
    # (`phase_runner.evaluation_interval`: once per epoch where the phase knows its epoch,
    # else 4 times).
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 200
    config.max_checkpoints_to_keep = 2
    return config


def add_detection_fields(
    config: ml_collections.ConfigDict, teacher: str = "resnet50", student: str = "resnet18"
) -> None:
    """Adds what a RetinaNet distillation reads (`networks.build_detection_networks`,
    `detection.objectives`) to a base config, with torchvision's RetinaNet defaults:
    `ROLE.model` is the backbone (`detection.retinanet.BACKBONES`), `ROLE.variant` 'v1'
    or 'v2', `ROLE.box_loss` the role's box loss ('l1' for v1, 'giou' for v2 in
    torchvision), `ROLE.fpn_width` and `ROLE.head_depth` the FPN's and heads' channels and
    the heads' depth (torchvision's 256 and 4; smaller for a light detector),
    `teacher.num_classes` the teacher's class count (0: the dataset's; 91
    for a converted COCO teacher), `distill.teacher_classes` its column of each of the
    dataset's classes (empty: the same classes in the same order; for a COCO teacher, the
    dataset's `category_ids`) and `distill.foreground_weight` the feature loss's extra
    weight on locations touching a ground-truth box (0: every location alike).

    `ROLE.backbone_weights` is the classifier a detector trained here starts its backbone
    from (`detection.backbone_weights`: a `mokd-convert` output of `ROLE.model`, such as
    torchvision's ImageNet ResNets; '' = random initialisation); a restored teacher
    (`teacher.checkpoint_dir`, WORKDIR/teacher) does not read it. `augment.train_min_sizes`
    is multi-scale training: each training image's shorter side drawn from these (empty:
    the evaluation's, `image_size` or the dataset's), the longer still at most the max
    size (`detection.transforms.Geometry`). `shapes_images` is the shapes set's (training,
    evaluation) image counts when `dataset` is 'shapes' (empty: the set's own 1000 and 200,
    `detection.synthetic.write`)."""
    for role, backbone in (("teacher", teacher), ("student", student)):
        config[role].model = backbone
        config[role].variant = "v1"
        config[role].box_loss = "l1"
        config[role].fpn_width = 256
        config[role].head_depth = 4
        config[role].backbone_weights = ""
    config.augment.train_min_sizes = ()
    config.teacher.num_classes = 0
    config.distill.teacher_classes = ()
    config.distill.foreground_weight = 0.0
    config.shapes_images = ()


def split_arg(arg: str | None, pairs: tuple[str, ...]) -> tuple[str, str, bool]:
    """A config arg of comma-separated parts, at most one pair, one method and 'smoke'
    ('PAIR,METHOD', 'PAIR,METHOD,smoke', 'METHOD', 'smoke', ...) -> (pair, method, smoke);
    no pair: pairs[0], no method: 'mokd'."""
    parts = [part for part in (arg or "").split(",") if part]
    named = [part for part in parts if part in pairs]
    methods = [part for part in parts if part in recipes.METHODS]
    smoke = parts.count("smoke")
    if (
        len(named) > 1
        or len(methods) > 1
        or smoke > 1
        or len(parts) != len(named) + len(methods) + smoke
    ):
        raise ValueError(
            f"config arg={arg!r} is not allowed: use one of {', '.join(pairs)}, optionally "
            f"followed by a method ({', '.join(recipes.METHODS)}) and ',smoke' "
            "(or 'smoke' alone)"
        )
    return (named[0] if named else pairs[0]), (methods[0] if methods else "mokd"), bool(smoke)


def select_method(config: ml_collections.ConfigDict, method: str) -> None:
    """Sets the fields that select `method` with the reference values in `config.recipes`
    (`mokd_jax.recipes.method_overrides`)."""
    config.update_from_flattened_dict(recipes.method_overrides(config.recipes, method))


def dkd_warmup_steps(warmup_epochs: int, steps_per_epoch: int) -> int:
    """The length of our linear DKD warm-up that stands for the reference's `warmup_epochs`.

    mdistiller scales DKD by min(epoch / warmup, 1) with epochs counted from 1: a staircase
    that is 1/warmup in the first epoch and full from epoch `warmup` on (so warm-up 1, its
    ImageNet value, is no warm-up at all). Our warm-up is a linear ramp over steps
    (`objectives.logit_distillation`); over (warmup - 1) epochs it reaches the full loss at
    the same epoch as the staircase, with the same total weight by then ((warmup + 1) / 2
    epochs' worth), and equals it exactly for warmup 1.
    """
    return max(warmup_epochs - 1, 0) * steps_per_epoch


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
    section.steps_per_epoch = steps_per_epoch
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


def with_overrides(
    base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `base` with `overrides` (dotted field -> value, as on the command line)
    set by ml_collections. The copy is locked first, so an override cannot add a field:
    one the config lacks, or a value of another type, raises the InputError naming it."""
    config = base.copy_and_resolve_references()
    config.lock()
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except KeyError:
            raise invalid(key, value, "the config has no such field") from None
        except TypeError as error:
            raise invalid(key, value, str(error)) from None
    return config
