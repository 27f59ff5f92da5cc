"""Writes a dataset mokd_jax can load as DIR/train.npz and DIR/test.npz (the
`mokd-export-npz` command):

    mokd-export-npz --dataset=digits --out=/tmp/digits_npz
    mokd-train --config=configs/default.py \\
        --config.dataset=npz --config.data_dir=/tmp/digits_npz

(or `python -m mokd_jax.data.export_npz ...`). The files are the format
`--config.dataset=npz` reads (arrays `image`, uint8 [N,H,W,C], and `label`, int [N]): a
template for bringing your own data.
"""

import os

import numpy as np
from absl import flags

from mokd_jax import cli, data

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    flags.DEFINE_enum(
        "dataset", "digits", list(data.NAMES), "Dataset to export.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "data_dir",
        "",
        "Where the dataset's own files are, if it reads any.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "out", None, "Directory for train.npz and test.npz.", required=True, flag_values=flag_values
    )


def export(dataset: data.InMemoryDataset, directory: str) -> None:
    """Writes both splits of an in-memory dataset as DIRECTORY/{train,test}.npz."""
    os.makedirs(directory, exist_ok=True)
    for split in ("train", "test"):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        np.savez(os.path.join(directory, f"{split}.npz"), image=images, label=labels)


def main(argv: list[str]) -> None:
    del argv
    dataset = data.load(FLAGS.dataset, FLAGS.data_dir)
    export(dataset, FLAGS.out)
    print(
        f"wrote {len(dataset.train_labels)} train and {len(dataset.test_labels)} test examples "
        f"of {FLAGS.dataset} ({dataset.num_classes} classes) to {FLAGS.out}"
    )


def run() -> None:
    """The `mokd-export-npz` entry point."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
