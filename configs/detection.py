"""MoKD for object detection: RetinaNets on the embedded shapes set, no download needed.

Command:
    python -m mokd_jax.main --config=configs/detection.py [--workdir=runs/detection]

The shapes set (`mokd_jax.detection.synthetic`: 1000 training and 200 evaluation images of
128 x 128 px, four kinds of shape, up to four per image) is drawn into `data_dir`, a
temporary folder when it is '' (a few seconds). Phase 1 trains a RetinaNet teacher with
RetinaNet's loss (or restores it from WORKDIR/teacher), phase 2 distills a RetinaNet
student with the aggregator named by `aggregator` (default `mokd`), both evaluated by COCO
box AP on the evaluation split; WORKDIR/summary.json holds the AP figures and
WORKDIR/detections_val.json the student's detections (COCO results).

The detectors are light, for CPUs: a resnet34 teacher and a resnet18 student, their
backbones trained from scratch (no ImageNet weights are embedded), FPN and heads 48
channels wide with one conv before each head's output (torchvision's are 256 and 4).

Measured on 2 CPU cores (one run, seed 0): 524 s in all; teacher AP 2.0% (AP50 5.7%)
after its 300 steps, student AP 9.3% (AP50 19.1%) after its 150. The student overtakes
the teacher: neither is near convergence, and the teacher's step counts are not tuned.

Arguments (`--config=configs/detection.py:ARG`):
    smoke  2 steps per phase of the lightest detectors (resnet18, 8-channel FPN, no head
           conv before the outputs) on 32 px images, for tests (`shrink_to_smoke`).

Any field can be overridden, e.g. `--config.aggregator=sum --config.student.num_train_steps=500`;
a COCO-format folder (DIR/train.json, DIR/val.json): `--config.dataset=coco_json
--config.data_dir=DIR`.
"""

import ml_collections

from mokd_jax import config_helpers


def shrink_to_smoke(config: ml_collections.ConfigDict) -> None:
    """The tests' run: what they check (every phase trains, evaluates, checkpoints,
    exports and resumes; the student detects something) does not depend on the network's
    size, and compiling the steps is most of a smoke run's time, so both detectors are
    the smallest RetinaNet there is: resnet18, an 8-channel FPN, no head conv before the
    outputs, on 32 px images. Two steps per phase, so each phase checkpoints and evaluates
    once on the way (at its last step, which the summary reuses). The shapes set shrinks to
    the 8 training images the two steps read and 40 evaluation images (drawing the 1,200
    took 3 s, and the unoptimised test builds detected on the 200 in 10 s per evaluation),
    all 40 in one batch, so one evaluation is one program run. The learning rate is raised to 1e-2
    without warm-up so that after two steps some scores pass the post-processing's 0.05
    threshold (the prior starts every score at 0.01) and the student's results file is not
    empty."""
    config.image_size = 32
    for role in ("teacher", "student"):
        section = config[role]
        section.model = "resnet18"
        section.fpn_width = 8
        section.head_depth = 0
        section.num_train_steps = 2
        section.warmup_steps = 0
        section.learning_rate = 1e-2
    config.batch_size = 4
    config.shapes_images = (8, 40)
    config.eval_batch_size = 40
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_helpers.base_config()
    config.task = "detection"
    config.dataset = "shapes"
    config.image_size = 128
    config_helpers.add_detection_fields(config, teacher="resnet34", student="resnet18")
    for role in ("teacher", "student"):
        config[role].fpn_width = 48
        config[role].head_depth = 1
        config[role].learning_rate = 1e-3
        config[role].warmup_steps = 20
    config.teacher.num_train_steps = 300
    config.student.num_train_steps = 150
    config.eval_every_steps = 100  # each evaluation costs about 30 s on 2 CPU cores
    config.batch_size = 16
    config.eval_batch_size = 40
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    if arg == "smoke":
        shrink_to_smoke(config)
    elif arg is not None:
        raise ValueError(f"config arg={arg!r} is not allowed: use no arg or 'smoke'")
    return config
