"""CIFAR-100: the teacher -> student pairs of the CRD/DKD benchmark (RepDistiller's zoo).

Command (one GPU; prepare the data first, docs/usage.md "Data"; convert a released teacher,
docs/usage.md "Teachers", or let the run train it):
    python -m mokd_jax.main --config=configs/cifar100.py:PAIR \
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
Append ',smoke' (or use 'smoke' alone) for a few steps of tiny models: what the tests run
under tfds.testing.mock_data.

Recipe (CRD / DKD): batch 64, SGD momentum 0.9, lr 0.05 (0.01 for the MobileNetV2 and
ShuffleNet students, as CRD and mdistiller's DKD configs set), weight decay 5e-4, 240
epochs, lr x0.1 at epochs 150, 180 and 210; pad-4 crop + flip. The teacher is trained with
the same recipe unless `teacher.checkpoint_dir` names one (`mokd-convert` imports a PyTorch
checkpoint). Expected time: 240 epochs are 187k steps per phase; a ResNet-32x4 ->
ResNet-8x4 student phase takes a few hours on one modern GPU (measure yours with
mokd-benchmark).
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
# The students trained at lr 0.01 instead of 0.05 (CRD's and DKD's lightweight students).
LIGHTWEIGHT_STUDENTS = ("mobile_half", "shufflenet_v1", "shufflenet_v2")


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
    student_lr = 0.01 if student in LIGHTWEIGHT_STUDENTS else 0.05
    config_helpers.set_phase(config.student, model=student, learning_rate=student_lr, **recipe)
    config.distill.dkd_warmup_steps = 20 * steps_per_epoch
    config.log_every_steps = 100
    config.checkpoint_every_steps = steps_per_epoch
    if smoke:
        config_helpers.shrink_to_smoke(config, "cnn_large", "cnn_small")
    return config
