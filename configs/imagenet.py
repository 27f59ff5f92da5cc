"""ImageNet-1K (TFDS imagenet2012): the CNN pairs of every KD paper and MoKD's DeiT pairs.

Command (prepare the data first, docs/usage.md "Data"; convert the teacher,
docs/usage.md "Teachers"):
    python -m mokd_jax.main --config=configs/imagenet.py[:PAIR[,METHOD]] --config.data_dir=DIR \
        --config.teacher.checkpoint_dir=TEACHER_DIR [--workdir=runs/imagenet]

PAIR (default resnet34_resnet18):
    resnet34_resnet18     mdistiller's recipe (configs/imagenet/r34_r18/*.yaml SOLVER):
                          batch 512, SGD lr 0.2, momentum 0.9, wd 1e-4, 100 epochs, lr x0.1
                          at epochs 30, 60 and 90 (torchvision's lr 0.1 per 256 images).
    resnet50_mobilenet_v1 the same recipe (configs/imagenet/r50_mv1/*.yaml).
    regnety160_deit_tiny, regnety160_deit_small
                          DeiT recipe (DeiT's main.py): AdamW lr 1e-3 at batch 1024, wd
                          0.05 off biases, norms, pos_embed and cls_token, 300 epochs, 5
                          warm-up epochs then cosine, drop-path 0.1, bicubic
                          RandomResizedCrop, RandAugment (m9, mstd 0.5, n2), 3x repeated
                          augmentation, random erasing 0.25, Mixup 0.8, CutMix 1.0, label
                          smoothing 0.1.
Append ',smoke' (e.g. 'resnet34_resnet18,kd,smoke', or 'smoke' alone) for a few steps of
tiny models at 32 px: what the tests run under tfds.testing.mock_data.

Methods (`PAIR,METHOD`; default mokd; `mokd_jax.recipes`), with the reference values
(mdistiller, github.com/megvii-research/mdistiller, paths relative to its root):
    kd    T 1, CE 0.5, KD 0.5          configs/imagenet/r34_r18/kd.yaml, r50_mv1/kd.yaml
    dkd   CE 1.0, alpha 1.0, T 1, warm-up 1 epoch (no warm-up: `dkd_warmup_steps`), beta
          0.5 (R34 -> R18) / 2.0 (R50 -> MV1)  configs/imagenet/r34_r18/dkd.yaml,
          r50_mv1/dkd.yaml; alpha: engine/cfg.py
    dot   the KD recipe with DOT delta 0.09  configs/imagenet/r34_r18/dot.yaml, r50_mv1/dot.yaml
    mokd  (and every other aggregator) the KD recipe's losses plus the feature loss
The DeiT pairs have no mdistiller recipe: kd is DeiT's soft distillation (facebookresearch/
deit main.py: --distillation-alpha 0.5, --distillation-tau 1.0, i.e. CE 0.5 / KD 0.5 at
T 1; DeiT divides its KL by the class count as well and distills through a distillation
token, we distill the class token's logits), dkd takes the R34 -> R18 values and dot SGD
at lr 0.2 per 512 images with delta 0.09: ours, not published.

Hardware and time: ResNet-34 -> ResNet-18, 100 epochs = 250k steps of batch 512; plan on a
TPU v4-32 / 8 GPUs for about a day (measure a step with mokd-benchmark first). The
DeiT pairs are 300 epochs at batch 1024 with a RegNetY-16GF teacher forward per step:
several days on 8 A100-class GPUs. Without `teacher.checkpoint_dir` the teacher is trained
first with the same recipe, which doubles the cost.

Published top-1 to compare with (docs/method.md, "Published targets"):
ResNet-34 (73.31) -> ResNet-18 (69.76):
KD 70.66, DKD 71.70, KD+DOT 71.72, DIST 72.07. ResNet-50 -> MobileNet-V1:
KD 70.50, DKD 72.05, KD+DOT 73.09, DIST 73.24. RegNetY-160 -> DeiT-Ti 79.7 and DeiT-S 83.1
(DTO-KD, MoKD's successor; DeiT-Ti/S alone: 72.2 / 79.8).
"""

import ml_collections

from mokd_jax import config_helpers

TRAIN_EXAMPLES = 1_281_167
PAIRS = {
    "resnet34_resnet18": ("resnet34", "resnet18"),
    "resnet50_mobilenet_v1": ("resnet50", "mobilenet_v1"),
    "regnety160_deit_tiny": ("regnety_160", "deit_tiny"),
    "regnety160_deit_small": ("regnety_160", "deit_small"),
}
DKD_BETA = {  # mdistiller configs/imagenet/<pair>/dkd.yaml DKD.BETA
    "resnet34_resnet18": 0.5,  # r34_r18/dkd.yaml
    "resnet50_mobilenet_v1": 2.0,  # r50_mv1/dkd.yaml
    "regnety160_deit_tiny": 0.5,  # none published: r34_r18's
    "regnety160_deit_small": 0.5,  # none published: r34_r18's
}


def set_recipes(config: ml_collections.ConfigDict, pair: str) -> None:
    """The methods' reference values for the pair (sources in the module docstring)."""
    recipes = config.recipes
    # mdistiller's kd.yaml KD section; DeiT's soft distillation (main.py) has the same values.
    recipes.kd.update(temperature=1.0, task_weight=0.5, logit_weight=0.5)
    recipes.dkd.update(
        temperature=1.0,
        task_weight=1.0,
        alpha=1.0,
        beta=DKD_BETA[pair],
        warmup_steps=config_helpers.dkd_warmup_steps(1, config.student.steps_per_epoch),
    )
    recipes.dot.update(delta=0.09, learning_rate=0.2 * config.batch_size / 512)


def mdistiller_recipe(config: ml_collections.ConfigDict, teacher: str, student: str) -> None:
    """mdistiller's ImageNet SOLVER (configs/imagenet/r34_r18/kd.yaml, r50_mv1/kd.yaml)."""
    config.batch_size = 512
    steps_per_epoch = TRAIN_EXAMPLES // config.batch_size
    recipe = dict(
        optimizer="sgd",
        learning_rate=0.2,
        weight_decay=1e-4,
        steps_per_epoch=steps_per_epoch,
        epochs=100,
        decay_epochs=(30, 60, 90),
    )
    config_helpers.set_phase(config.teacher, model=teacher, **recipe)
    config_helpers.set_phase(config.student, model=student, **recipe)


def deit_recipe(config: ml_collections.ConfigDict, teacher: str, student: str) -> None:
    config.batch_size = 1024
    steps_per_epoch = TRAIN_EXAMPLES // config.batch_size
    recipe = dict(
        optimizer="adamw",
        learning_rate=1e-3 * config.batch_size / 1024,
        weight_decay=0.05,
        steps_per_epoch=steps_per_epoch,
        epochs=300,
        warmup_epochs=5,
    )
    config_helpers.set_phase(config.teacher, model=teacher, **recipe)
    config_helpers.set_phase(config.student, model=student, **recipe)
    # timm's param_groups_weight_decay: no decay on biases, norms, pos_embed, cls_token.
    config.student.weight_decay_mask = config.teacher.weight_decay_mask = "timm"
    # Host: bicubic RandomResizedCrop, RandAugment m9-mstd0.5, 3 repeats; device: the rest.
    config.recipe = "deit"
    config.augment.random_erasing = 0.25
    config.augment.mixup_alpha = 0.8
    config.augment.cutmix_alpha = 1.0
    config.augment.label_smoothing = 0.1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    pair, method, smoke = config_helpers.split_arg(arg, tuple(PAIRS))
    teacher, student = PAIRS[pair]
    config = config_helpers.base_config()
    config.dataset = "imagenet2012"
    config.num_classes = 1000
    config.image_size = 224
    config.eval_batch_size = 512  # a multiple of any power-of-two device count
    if pair.startswith("regnety160"):
        deit_recipe(config, teacher, student)
    else:
        mdistiller_recipe(config, teacher, student)
    set_recipes(config, pair)
    config_helpers.select_method(config, method)
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    if smoke:
        config_helpers.shrink_to_smoke(config, "cnn_large", "cnn_small")
        config.image_size = 32
    return config
