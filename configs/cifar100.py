"""CIFAR-100: the teacher -> student pairs of the CRD/DKD benchmark (RepDistiller's zoo).

Command (one GPU; prepare the data first, docs/usage.md "Data"; convert a released teacher,
docs/usage.md "Teachers", or let the run train it):
    python -m mokd_jax.main --config=configs/cifar100.py:PAIR[,METHOD] \
        --config.data_dir=DIR [--config.teacher.checkpoint_dir=TEACHER_DIR]

PAIR (default resnet32x4_resnet8x4) and the published top-1 (%): teacher / student trained
alone / KD / DKD (DKD paper, CVPR 2022: Table 1 for the same-family pairs, Table 2 for the
others):
    resnet56_resnet20           72.34 / 69.06 / 70.66 / 71.97   (Table 1)
    resnet110_resnet32          74.31 / 71.14 / 73.08 / 74.11   (Table 1)
    resnet32x4_resnet8x4        79.42 / 72.50 / 73.33 / 76.32   (Table 1)
    wrn_40_2_wrn_16_2           75.61 / 73.26 / 74.92 / 76.24   (Table 1)
    wrn_40_2_wrn_40_1           75.61 / 71.98 / 73.54 / 74.81   (Table 1)
    vgg13_vgg8                  74.64 / 70.36 / 72.98 / 74.68   (Table 1)
    resnet32x4_shufflenet_v1    79.42 / 70.50 / 74.07 / 76.45   (Table 2)
    wrn_40_2_shufflenet_v1      75.61 / 70.50 / 74.83 / 76.70   (Table 2)
    vgg13_mobilenet_v2          74.64 / 64.60 / 67.37 / 69.71   (Table 2)
    resnet50_mobilenet_v2       79.34 / 64.60 / 67.35 / 70.35   (Table 2)
    resnet32x4_shufflenet_v2    79.42 / 71.82 / 74.45 / 77.07   (Table 2)
The models are RepDistiller's (`mokd_jax.models`): the MobileNetV2 student is its
`mobile_half` and the ResNet50 teacher its CIFAR `ResNet50` (`resnet50_cifar`).
Append ',smoke' (e.g. 'resnet56_resnet20,dkd,smoke', or 'smoke' alone) for a few steps of
tiny models: what the tests run under tfds.testing.mock_data.

Methods (`PAIR,METHOD`; default mokd): every method of `mokd_jax.recipes` (kd, dkd, dot,
mokd, ce, kd_feature, and every aggregator), each with the reference implementation's
hyperparameters for the pair: mdistiller (github.com/megvii-research/mdistiller), paths
relative to its root, defaults from mdistiller/engine/cfg.py where a pair's file sets none:
    kd    T 4, CE 0.1, KD 0.9                     configs/cifar100/kd.yaml; engine/cfg.py CFG.KD
    dkd   CE 1.0, alpha 1.0, T 4, warm-up 20 epochs (engine/cfg.py CFG.DKD); beta per pair,
          from configs/cifar100/dkd/<file> (DKD_BETA below)
    dot   the KD recipe with DOT delta 0.075        configs/cifar100/dot/*.yaml
    mokd  (and every other aggregator) the KD recipe's losses plus the feature loss
Training (every method, the teacher too): batch 64, SGD momentum 0.9, lr 0.05 (0.01 for
the MobileNetV2 and ShuffleNet students), weight decay 5e-4, 240 epochs, lr x0.1 at epochs
150, 180 and 210 (configs/cifar100/dkd/*.yaml SOLVER); pad-4 crop + flip. The teacher is
trained with the same recipe unless `teacher.checkpoint_dir` names one (`mokd-convert`
imports a PyTorch checkpoint). Expected time: 240 epochs are 187k steps per phase; a
ResNet-32x4 -> ResNet-8x4 student phase takes a few hours on one modern GPU (measure yours
with mokd-benchmark).
"""

import ml_collections

from mokd_jax import config_helpers

TRAIN_EXAMPLES = 50_000
PAIRS = {
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "resnet110_resnet32": ("resnet110", "resnet32"),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn_40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
    "resnet32x4_shufflenet_v1": ("resnet32x4", "shufflenet_v1"),
    "wrn_40_2_shufflenet_v1": ("wrn_40_2", "shufflenet_v1"),
    "vgg13_mobilenet_v2": ("vgg13", "mobile_half"),
    "resnet50_mobilenet_v2": ("resnet50_cifar", "mobile_half"),
    "resnet32x4_shufflenet_v2": ("resnet32x4", "shufflenet_v2"),
}
DKD_BETA = {  # mdistiller configs/cifar100/dkd/<file> DKD.BETA; 8.0 = engine/cfg.py's default
    "resnet32x4_resnet8x4": 8.0,  # res32x4_res8x4.yaml (no BETA)
    "resnet56_resnet20": 2.0,  # res56_res20.yaml
    "resnet110_resnet32": 2.0,  # res110_res32.yaml
    "wrn_40_2_wrn_16_2": 6.0,  # wrn40_2_wrn_16_2.yaml
    "wrn_40_2_wrn_40_1": 6.0,  # wrn40_2_wrn_40_1.yaml
    "vgg13_vgg8": 6.0,  # vgg13_vgg8.yaml
    "resnet32x4_shufflenet_v1": 8.0,  # res32x4_shuv1.yaml (no BETA)
    "wrn_40_2_shufflenet_v1": 8.0,  # wrn40_2_shuv1.yaml (no BETA)
    "vgg13_mobilenet_v2": 6.0,  # vgg13_mv2.yaml
    "resnet50_mobilenet_v2": 8.0,  # res50_mv2.yaml (no BETA)
    "resnet32x4_shufflenet_v2": 8.0,  # res32x4_shuv2.yaml (no BETA)
}
# The students trained at lr 0.01 instead of 0.05: mdistiller's dkd/*_shuv1, *_shuv2, *_mv2.
LIGHTWEIGHT_STUDENTS = ("mobile_half", "shufflenet_v1", "shufflenet_v2")


def set_recipes(
    recipes: ml_collections.ConfigDict, pair: str, learning_rate: float, steps_per_epoch: int
) -> None:
    """mdistiller's CIFAR-100 values for the pair (sources in the module docstring)."""
    recipes.kd.update(temperature=4.0, task_weight=0.1, logit_weight=0.9)
    recipes.dkd.update(
        temperature=4.0,
        task_weight=1.0,
        alpha=1.0,
        beta=DKD_BETA[pair],
        warmup_steps=config_helpers.dkd_warmup_steps(20, steps_per_epoch),
    )
    recipes.dot.update(delta=0.075, learning_rate=learning_rate)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    pair, method, smoke = config_helpers.split_arg(arg, tuple(PAIRS))
    teacher, student = PAIRS[pair]
    config = config_helpers.base_config()
    config.dataset = "cifar100"
    config.num_classes = 100
    config.image_size = 32
    config.batch_size = 64
    config.eval_batch_size = 512
    steps_per_epoch = TRAIN_EXAMPLES // config.batch_size
    recipe = dict(
        optimizer="sgd",
        weight_decay=5e-4,
        steps_per_epoch=steps_per_epoch,
        epochs=240,
        decay_epochs=(150, 180, 210),
    )
    config_helpers.set_phase(config.teacher, model=teacher, learning_rate=0.05, **recipe)
    student_lr = 0.01 if student in LIGHTWEIGHT_STUDENTS else 0.05
    config_helpers.set_phase(config.student, model=student, learning_rate=student_lr, **recipe)
    set_recipes(config.recipes, pair, student_lr, steps_per_epoch)
    config_helpers.select_method(config, method)
    config.log_every_steps = 100
    config.checkpoint_every_steps = steps_per_epoch
    if smoke:
        config_helpers.shrink_to_smoke(config, "cnn_large", "cnn_small")
    return config
