"""Writes a dataset mokd_jax can load as DIR/train.npz and DIR/test.npz.

    python scripts/export_npz.py --dataset=digits --out=/tmp/digits_npz
    python -m mokd_jax.main --config=configs/default.py \
        --config.dataset=npz --config.data_dir=/tmp/digits_npz

The files are the format `--config.dataset=npz` reads (arrays `image`, uint8 [N,H,W,C], and
`label`, int [N]): a template for bringing your own data.
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mokd_jax import data  # noqa: E402

flags.DEFINE_enum("dataset", "digits", list(data.NAMES), "Dataset to export.")
flags.DEFINE_string("data_dir", "", "Where the dataset's own files are, if it reads any.")
flags.DEFINE_string("out", None, "Directory for train.npz and test.npz.", required=True)
FLAGS = flags.FLAGS


def export(dataset: data.InMemoryDataset, directory: str) -> None:
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


if __name__ == "__main__":
    app.run(main)
