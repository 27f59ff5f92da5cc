"""CIFAR-100: the five standard teacher -> student pairs of the KD literature.

Command (one GPU; prepare the data first, docs/usage.md "Data"):
    python -m mokd_jax.main --config=configs/cifar100.py:PAIR \
        --config.data_dir=DIR [--workdir=runs/cifar100_PAIR]

PAIR (default resnet32x4_resnet8x4):
    resnet32x4_resnet8x4, wrn_40_2_wrn_16_2, resnet56_resnet20, vgg13_vgg8,
    resnet50_mobilenet_v2
Append ',smoke' (or use 'smoke' alone) for a few steps of tiny models: what the tests run
under tfds.testing.mock_data.

Recipe (CRD / DKD): batch 64, SGD momentum 0.9, lr 0.05 (0.01 for the MobileNetV2 student,
as published), weight decay 5e-4, 240 epochs, lr x0.1 at epochs 150, 180 and 210; pad-4 crop
+ flip. The teacher is trained with the same recipe unless `teacher.checkpoint_dir` names
one (`mokd-convert` imports a PyTorch checkpoint). Expected time: 240 epochs
are 187k steps per phase; a ResNet-32x4 -> ResNet-8x4 student phase takes a few hours on
one modern GPU (measure yours with mokd-benchmark).

Published top-1 (DKD paper, CVPR 2022, Tables 1-2): teacher / student trained alone /
KD / DKD:
    resnet32x4 -> resnet8x4   79.42 / 72.50 / 73.33 / 76.32
    wrn_40_2 -> wrn_16_2      75.61 / 73.26 / 74.92 / 76.24
    resnet56 -> resnet20      72.34 / 69.06 / 70.66 / 71.97
    vgg13 -> vgg8             74.64 / 70.36 / 72.98 / 74.68
    resnet50 -> mobilenet_v2  79.34 / 64.60 / 67.35 / 70.35
The last pair uses the torchvision (ImageNet-layout) ResNet-50 and MobileNetV2 here, not
RepDistiller's CIFAR variants, so its numbers are not directly comparable.
"""

import ml_collections

from mokd_jax import config_helpers

TRAIN_EXAMPLES = 50_000
PAIRS = {
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
    "resnet50_mobilenet_v2": ("resnet50", "mobilenet_v2"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    pair, smoke = config_helpers.split_arg(arg, tuple(PAIRS))
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
    student_lr = 0.01 if student == "mobilenet_v2" else 0.05
    config_helpers.set_phase(config.student, model=student, learning_rate=student_lr, **recipe)
    config.distill.dkd_warmup_steps = 20 * steps_per_epoch
    config.log_every_steps = 100
    config.checkpoint_every_steps = steps_per_epoch
    if smoke:
        config_helpers.shrink_to_smoke(config, "cnn_large", "cnn_small")
    return config
