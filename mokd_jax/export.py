"""Writes an exported network as a PyTorch `.safetensors` state dict (the `mokd-export`
command):

    mokd-export --checkpoint_dir=runs/r34_r18/student_best --output=resnet18.safetensors

(or `python -m mokd_jax.export ...`). --checkpoint_dir is any exported network (a run's
WORKDIR/student, student_best or teacher, a converted teacher) whose model has a torch
layout (`mokd_jax.torch_layouts.NAMES`: torchvision's ResNets and MobileNetV2, timm's DeiT / ViT
and RegNetY-160); the file holds the state dict in that library's key layout, the exact
inverse of `mokd-convert` (`convert.to_torch`), loadable with
`model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)`. Its metadata
records the model, the class count and the input statistics the network must be fed with
(`input_mean`, `input_std`: JSON lists for torchvision's `transforms.Normalize`). Bad input
ends with a one-line error and exit status 2, before anything is written.
"""

import json
import os
import sys

from absl import app, flags, logging
from etils import epath
from safetensors.numpy import save_file

from mokd_jax import checkpoint, cli, convert, normalization, torch_layouts
from mokd_jax.errors import InputError, invalid

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    cli.define_checkpoint_dir_flag(flag_values)
    flags.DEFINE_string(
        "output", None, "The .safetensors file to write.", required=True, flag_values=flag_values
    )
    flags.DEFINE_bool(
        "overwrite", False, "Replace a file already at --output.", flag_values=flag_values
    )


def metadata(identity: dict, directory: str) -> dict[str, str]:
    """The file's metadata (strings, as safetensors stores them): what the network is and
    how to feed it."""
    inputs = normalization.from_identity(identity, directory)
    return {
        "format": "pt",
        "model": identity["model"],
        "num_classes": str(identity["num_classes"]),
        "input_mean": json.dumps(list(inputs.mean)),
        "input_std": json.dumps(list(inputs.std)),
    }


def export(directory: str, output: str, overwrite: bool = False) -> dict[str, str]:
    """Writes the network exported in `directory` to the safetensors file `output`;
    returns the file's metadata. InputError (nothing written) for a directory without an
    exported network, a model without a torch layout, an identity without input
    statistics, or an existing `output` without `overwrite`."""
    if not output.endswith(".safetensors"):
        raise invalid("output", output, "a file name ending in .safetensors")
    if os.path.lexists(output) and not overwrite:
        raise invalid("output", output, "a new file (or pass --overwrite)")
    identity = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
    if identity is None:
        raise invalid("checkpoint_dir", directory, "a directory holding an exported network")
    arch = identity.get("model")
    if arch not in torch_layouts.NAMES:
        raise invalid(
            "checkpoint_dir",
            directory,
            f"a network with a PyTorch layout; it holds a {arch!r}, the exportable models are "
            f"{', '.join(torch_layouts.NAMES)}",
        )
    info = metadata(identity, directory)
    state_dict = convert.to_torch(arch, checkpoint.load_variables(directory))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_file(state_dict, output, metadata=info)
    return info


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs a dozen INFO lines per read
    try:
        info = export(FLAGS.checkpoint_dir, FLAGS.output, FLAGS.overwrite)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {info['model']} ({info['num_classes']} classes) from {FLAGS.checkpoint_dir} "
        f"to {FLAGS.output}; feed it images normalised with mean {info['input_mean']}, "
        f"std {info['input_std']}"
    )


def run() -> None:
    """The `mokd-export` entry point."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
