"""Evaluates an exported network on a config's dataset (the `mokd-evaluate` command):

    mokd-evaluate --config=configs/default.py --checkpoint_dir=runs/default/student_best
    mokd-evaluate --config=imagenet --config.data_dir=DIR --checkpoint_dir=teachers/resnet34 \\
        --output=resnet34.json

(or `python -m mokd_jax.evaluate ...`). Any exported network: a run's WORKDIR/teacher,
WORKDIR/student or WORKDIR/student_best, or a teacher written by `mokd-convert`. The model,
its class count and its input statistics come from the checkpoint's identity; the dataset
(and `eval_batch_size`, `dtype`, `mesh`) from the config. Prints top-1 / top-5 and, with
--output, writes them as JSON. Bad input (an identity without those fields, a class count
other than the dataset's, variables that do not fit the model on the dataset's images)
ends with a one-line error and exit status 2.
"""

import json
import sys

import ml_collections
from absl import app, flags, logging
from etils import epath

from mokd_jax import (
    checkpoint,
    cli,
    config_files,
    data,
    identities,
    models,
    normalization,
    parallel,
)
from mokd_jax.errors import InputError, invalid
from mokd_jax.evaluation import make_evaluator

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    config_files.define_config_flag(
        "config",
        "Config file or bundled config name, [:ARG] for get_config(ARG): the dataset.",
        flag_values,
    )
    cli.define_checkpoint_dir_flag(flag_values)
    flags.DEFINE_string(
        "output", None, "Also write the accuracies here as JSON.", flag_values=flag_values
    )


def network_of(identity: dict | None, directory: str) -> tuple[str, int]:
    """(model name, class count) from an exported checkpoint's identity, or InputError."""
    if identity is None:
        raise invalid("checkpoint_dir", directory, "a directory holding an exported network")
    model, classes = identity.get("model"), identity.get("num_classes")
    if model not in models.NAMES or not isinstance(classes, int):
        raise invalid(
            "checkpoint_dir",
            directory,
            "an exported network whose identity names its model (one of mokd_jax.models) and "
            f"class count; it has model={model!r}, num_classes={classes!r}",
        )
    return model, classes


def evaluate_checkpoint(config: ml_collections.ConfigDict, directory: str) -> dict:
    """{'model', 'checkpoint_dir', 'dataset', 'test_examples', 'test_accuracy',
    'test_top5_accuracy'} of the network exported in `directory` on the config's dataset."""
    identity = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
    name, classes = network_of(identity, directory)
    inputs = normalization.from_identity(identity, directory)
    mesh = parallel.make_mesh(config.mesh.fsdp)
    parallel.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
    dataset = data.load_configured(config)
    if classes != dataset.num_classes:
        raise invalid(
            "checkpoint_dir",
            directory,
            f"a network for the {dataset.num_classes} classes of {dataset.name}; "
            f"it holds a {name} for {classes} classes",
        )
    model = models.get(
        name, num_classes=classes, dtype=config.dtype, image_size=dataset.image_shape[0]
    )
    variables = checkpoint.load_variables(directory)
    mismatch = identities.shape_mismatch(variables, model, dataset.image_shape)
    if mismatch is not None:
        raise invalid(
            "checkpoint_dir",
            directory,
            f"variables of a {name} for {dataset.name} images of shape "
            f"{tuple(dataset.image_shape)}; {mismatch}",
        )
    variables = parallel.place_variables(variables, mesh, config.mesh.fsdp_min_size)
    counts = make_evaluator(model, dataset, config.eval_batch_size, mesh, inputs)(variables)
    return {
        "model": name,
        "checkpoint_dir": directory,
        "dataset": dataset.name,
        "test_examples": counts.examples,
        **counts.accuracies(),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs a dozen INFO lines per read
    try:
        result = evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint_dir)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{result['model']} from {result['checkpoint_dir']} on {result['dataset']} "
        f"({result['test_examples']:,} test examples): top-1 {result['test_accuracy']:.2%}, "
        f"top-5 {result['test_top5_accuracy']:.2%}"
    )
    if FLAGS.output:
        epath.Path(FLAGS.output).write_text(json.dumps(result, indent=2))


def run() -> None:
    """The `mokd-evaluate` entry point."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
