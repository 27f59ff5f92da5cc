"""COCO 2017 (TFDS coco/2017): RetinaNet students distilled from RetinaNet teachers on the
1x schedule.

Command (prepare the data, the teacher and the student's backbone first, below):
    python -m mokd_jax.main --config=configs/coco.py[:PAIR] --config.data_dir=DIR \
        [--workdir=runs/coco]

PAIR (default r50_r18; teacher -> student, published COCO val2017 box AP):
    r50_r18           torchvision's retinanet_resnet50_fpn (36.4) -> RetinaNet-ResNet-18
    r50_mobilenet_v2  retinanet_resnet50_fpn (36.4) -> RetinaNet-MobileNetV2
    r50v2_r18         torchvision's retinanet_resnet50_fpn_v2 (41.5) -> RetinaNet-ResNet-18
                      v2 (GroupNorm heads, P6 from C5, GIoU box loss)
    r101_r50          RetinaNet-ResNet-101 (38.9) -> RetinaNet-ResNet-50 (37.4 trained
                      alone): the pair of FGD and FRS, with the figures they report (on
                      mmdetection's models). torchvision publishes no RetinaNet-R101, and
                      our converter reads torchvision's layout only, so the teacher is
                      trained here first, in WORKDIR/teacher, on this schedule from an
                      ImageNet ResNet-101; that doubles the cost. A teacher trained
                      elsewhere in our format is given with --config.teacher.checkpoint_dir.
Ours: not measured (needs COCO and an accelerator).
Append ',smoke' ('r50_r18,smoke', or 'smoke' alone) for one step of tiny detectors on
32 px images, trained from scratch: what the tests run on hand-made records.

Data: TFDS coco/2017 (`mokd_jax.detection.tfds_coco`), prepared once: where the internet
is reachable `tfds build coco/2017 --data_dir=DIR`; elsewhere put train2017.zip,
val2017.zip, test2017.zip, annotations_trainval2017.zip and image_info_test2017.zip
(cocodataset.org) in DIR/downloads/manual/ and run the same command (about 25 GB).

Teachers and backbones (`mokd-convert`; the paths below are the defaults, relative to the
working directory; any other is given with --config.teacher.checkpoint_dir=... /
--config.student.backbone_weights=... / --config.teacher.backbone_weights=...):
    teachers/retinanet_resnet50_fpn     --arch=retinanet_resnet50_fpn --bn_epsilon=0
                                        --input=retinanet_resnet50_fpn_coco-eeacb38b.pth
    teachers/retinanet_resnet50_fpn_v2  --arch=retinanet_resnet50_fpn_v2
                                        --input=retinanet_resnet50_fpn_v2_coco-5905b1c5.pth
    backbones/resnet18                  --arch=resnet18 --input=resnet18-f37072fd.pth
    backbones/resnet50                  --arch=resnet50 --input=resnet50-0676ba61.pth
    backbones/resnet101                 --arch=resnet101 --input=resnet101-63fe2227.pth
    backbones/mobilenet_v2              --arch=mobilenet_v2 --input=mobilenet_v2-b0353104.pth
(torchvision's files at download.pytorch.org/models/). A converted teacher predicts
COCO's 91 category ids; `distill.teacher_classes` picks its column of each of the 80
classes. Both networks take ImageNet-normalised inputs.

Schedule (the 1x of Detectron and mmdetection, for each network trained here): 90k
iterations at batch 16, SGD lr 0.01, momentum 0.9, weight decay 1e-4, linear warm-up over
500 iterations (from 0; those start at lr x 0.001), lr x0.1 at 60k and 80k; shorter side
800, longer at most 1333, horizontal flips. Multi-scale training (shorter side drawn per
image): --config.augment.train_min_sizes="(640, 672, 704, 736, 768, 800)".
The backbone's stem and first stage and all its BatchNorms stay frozen
(`detection.retinanet.trainable_mask`).

Hardware: not measured here. Each network trained in the run takes 90k steps of 16
images at up to 800 x 1333 (a student step also runs the teacher forward): a job for a
multi-GPU host or a TPU slice.
"""

import ml_collections

from mokd_jax import config_helpers
from mokd_jax.detection.coco_categories import CATEGORY_IDS

# pair -> (teacher backbone, detector variant of both, student backbone)
PAIRS = {
    "r50_r18": ("resnet50", "v1", "resnet18"),
    "r50_mobilenet_v2": ("resnet50", "v1", "mobilenet_v2"),
    "r50v2_r18": ("resnet50", "v2", "resnet18"),
    "r101_r50": ("resnet101", "v1", "resnet50"),
}
# torchvision's COCO RetinaNets, by variant: the teachers that need no training here.
TORCHVISION_TEACHERS = {"v1": "retinanet_resnet50_fpn", "v2": "retinanet_resnet50_fpn_v2"}
BOX_LOSSES = {"v1": "l1", "v2": "giou"}  # torchvision's, per variant
COCO_CLASSES_BY_ID = 91  # a torchvision COCO model's logit columns: category ids 0..90
MULTI_SCALE_MIN_SIZES = (640, 672, 704, 736, 768, 800)


def parse_arg(arg: str | None) -> tuple[str, bool]:
    """'PAIR', 'PAIR,smoke', 'smoke' or nothing -> (pair, smoke); no pair: r50_r18."""
    parts = [part for part in (arg or "").split(",") if part]
    pairs = [part for part in parts if part in PAIRS]
    smoke = parts.count("smoke")
    if len(pairs) > 1 or smoke > 1 or len(parts) != len(pairs) + smoke:
        raise ValueError(
            f"config arg={arg!r} is not allowed: use one of {', '.join(PAIRS)}, optionally "
            "followed by ',smoke' (or 'smoke' alone)"
        )
    return (pairs[0] if pairs else "r50_r18"), bool(smoke)


def one_x_schedule(section: ml_collections.ConfigDict) -> None:
    """The 1x schedule (module docstring) for a teacher or student section."""
    section.optimizer = "sgd"
    section.learning_rate = 0.01
    section.weight_decay = 1e-4
    section.num_train_steps = 90_000
    section.warmup_steps = 500
    section.schedule = "step"
    section.decay_boundaries = (60_000, 80_000)
    section.decay_factor = 0.1


def set_teacher(config: ml_collections.ConfigDict, backbone: str, variant: str) -> None:
    """A converted torchvision teacher where one exists (91 columns, picked by category
    id), else one trained here from its ImageNet backbone."""
    if backbone == "resnet50":
        config.teacher.checkpoint_dir = f"teachers/{TORCHVISION_TEACHERS[variant]}"
        config.teacher.num_classes = COCO_CLASSES_BY_ID
        config.distill.teacher_classes = CATEGORY_IDS
    else:
        config.teacher.backbone_weights = f"backbones/{backbone}"


def shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
    """One step per phase of the lightest detectors (resnet18, 8-channel FPN and heads
    with no conv before their outputs: compiling is most of a smoke run's time) on 32 px
    images (two training sizes, so the multi-scale path runs), both trained from scratch;
    batches of 2, every evaluation image in one batch of 6 (the tests' record count)."""
    config.image_size = 32
    config.augment.train_min_sizes = (24, 32)
    for role in ("teacher", "student"):
        section = config[role]
        section.model = "resnet18"
        section.fpn_width = 8
        section.head_depth = 0
        section.backbone_weights = ""
        section.num_train_steps = 1
        section.warmup_steps = 0
        section.decay_boundaries = ()
    config.teacher.checkpoint_dir = ""
    config.teacher.num_classes = 0
    config.distill.teacher_classes = ()
    config.batch_size = 2
    config.eval_batch_size = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    pair, smoke = parse_arg(arg)
    teacher, variant, student = PAIRS[pair]
    config = config_helpers.base_config()
    config.task = "detection"
    config.dataset = "coco/2017"
    config.image_size = 0  # the dataset's geometry: shorter side 800, longer at most 1333
    config_helpers.add_detection_fields(config, teacher=teacher, student=student)
    for role in ("teacher", "student"):
        config[role].variant = variant
        config[role].box_loss = BOX_LOSSES[variant]
        config[role].input_normalization = "imagenet"
        one_x_schedule(config[role])
    config.student.backbone_weights = f"backbones/{student}"
    set_teacher(config, teacher, variant)
    config.batch_size = 16
    config.eval_batch_size = 16  # a multiple of any power-of-two device count up to 16
    config.eval_every_steps = 10_000  # an evaluation reads the 5,000 validation images
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2_000
    if smoke:
        shrink_to_smoke(config)
    return config
