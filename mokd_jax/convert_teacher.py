"""Turns a PyTorch state dict into a mokd_jax teacher checkpoint (the `mokd-convert`
command; the conversion itself is `mokd_jax.convert`):

    mokd-convert --arch=resnet50 --input=resnet50.pth --output=DIR
    mokd-train --config=... \\
        --config.teacher.model=resnet50 --config.teacher.checkpoint_dir=DIR

(or `python -m mokd_jax.convert_teacher ...`). --input is a `.safetensors` file or
anything `torch.save` wrote (a state dict, possibly inside {'state_dict': ...} or
{'model': ...}, possibly with DataParallel's 'module.' keys; reading it needs torch:
`pip install "mokd_jax[torch]"`); --arch is the mokd_jax model whose torch counterpart
wrote it (`mokd_jax.torch_layouts.NAMES`), or one of torchvision's RetinaNets
(`retinanet_resnet50_fpn`, `retinanet_resnet50_fpn_v2`: `mokd_jax.detection.retinanet`,
converted by `mokd_jax.detection.convert_retinanet`); the class count is the classifier's
(a RetinaNet's: its logits per anchor). The checkpoint
records the input statistics the teacher was trained on, which the trainer feeds it with:
by default its source's (ImageNet's for torchvision and timm, CIFAR-100's for the CIFAR
models); --input_normalization overrides them for a teacher trained otherwise (a preset
name or 'MEAN/STD', as `--config.teacher.input_normalization`). Bad input ends with a
one-line error and exit status 2, before anything at --output is touched.

--bn_epsilon (RetinaNets only) is the epsilon the source ran its backbone's BatchNorms
with: torch's 1e-5 by default, but 0 for torchvision's published retinanet_resnet50_fpn
COCO weights, which torchvision runs so.
"""

import functools
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging

from mokd_jax import cli, convert, normalization, torch_layouts
from mokd_jax.checks import check_nonnegative
from mokd_jax.detection import convert_retinanet
from mokd_jax.errors import InputError, invalid

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    flags.DEFINE_string(
        "arch",
        None,
        f"mokd_jax model: {', '.join(torch_layouts.NAMES + torch_layouts.DETECTION_NAMES)}.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "input",
        None,
        "PyTorch state dict (.pth, .pt, .safetensors).",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output",
        None,
        "Directory for the Orbax checkpoint.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace what is already at --output.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "input_normalization",
        "",
        "Input statistics the teacher was trained on: '' (its source's: ImageNet's for "
        f"torchvision and timm, CIFAR-100's for the CIFAR models), one of "
        f"{', '.join(normalization.PRESETS)}, or 'MEAN/STD' (comma-separated per channel).",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "bn_epsilon",
        convert_retinanet.TORCH_BN_EPSILON,
        "RetinaNets only: the epsilon of the source's backbone BatchNorms (0 for "
        "torchvision's published retinanet_resnet50_fpn COCO weights).",
        flag_values=flag_values,
    )


def _conversion() -> Callable[[convert.StateDict, normalization.Normalization | None], tuple]:
    """(state dict, input statistics) -> (variables, identity) for --arch, a classifier or
    a RetinaNet, after the quick checks of --arch and --bn_epsilon (before a long read)."""
    convert.layout(FLAGS.arch)
    if FLAGS.arch in convert_retinanet.VARIANTS:
        check_nonnegative("bn_epsilon", FLAGS.bn_epsilon)
        return functools.partial(
            convert_retinanet.convert, FLAGS.arch, source_bn_epsilon=FLAGS.bn_epsilon
        )
    if FLAGS.bn_epsilon != convert_retinanet.TORCH_BN_EPSILON:
        raise invalid(
            "bn_epsilon",
            FLAGS.bn_epsilon,
            f"the default {convert_retinanet.TORCH_BN_EPSILON:g} for {FLAGS.arch} (only "
            "RetinaNets take another)",
        )
    return functools.partial(convert.convert, FLAGS.arch)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs a dozen INFO lines per save
    try:
        conversion = _conversion()  # the quick checks first, before a long read
        inputs = normalization.parse("input_normalization", FLAGS.input_normalization)
        convert.check_output(FLAGS.output, FLAGS.overwrite)
        state_dict = convert.read_state_dict(FLAGS.input)
        variables, identity = conversion(state_dict, inputs)
        convert.write(FLAGS.output, variables, identity, FLAGS.overwrite)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    inputs = normalization.spell(normalization.from_identity(identity, FLAGS.output))
    # A RetinaNet's model is its backbone; its variant is set beside it.
    variant = f" --config.teacher.variant={identity['variant']}" if "variant" in identity else ""
    print(
        f"wrote {FLAGS.arch} ({count:,} params, {identity['num_classes']} classes, inputs "
        f"normalised with {inputs}) "
        f"from {FLAGS.input} to {FLAGS.output}; use it with "
        f"--config.teacher.model={identity['model']}{variant} "
        f"--config.teacher.checkpoint_dir={FLAGS.output}"
    )


def run() -> None:
    """The `mokd-convert` entry point."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
