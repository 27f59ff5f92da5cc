"""Hand-made TFDS coco/2017 records for the tests, offline on `tfds.testing.mock_data`.

tfds's random mock cannot build coco's objects (it draws each field of the sequence with
its own length), so `mock_reader` stands in for the file reader: it serves NUM_EXAMPLES
records per split (tiny JPEGs of 24 + 4i x 40 px, known boxes, a crowd object, a box
without area) through the real feature encoding and decoding, and resolves split slices
with TFDS's own arithmetic. Use it as `tfds.testing.mock_data(as_dataset_fn=mock_reader)`.
"""

import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NUM_EXAMPLES = 6
# Normalised [ymin, xmin, ymax, xmax] of each record's objects, with label and crowd flag.
OBJECTS = [
    ([0.1, 0.2, 0.5, 0.6], 0, False),
    ([0.0, 0.5, 1.0, 1.0], 79, False),
    ([0.3, 0.3, 0.3, 0.9], 3, False),  # no height: dropped
    ([0.2, 0.0, 0.9, 0.4], 11, True),  # crowd: ground truth only
]


def record(index):
    height, width = 24 + 4 * index, 40
    pixels = np.full((height, width, 3), 10 * index, np.uint8)
    objects = [
        {"id": 1, "area": 50, "bbox": tfds.features.BBox(*box), "label": label, "is_crowd": crowd}
        for box, label, crowd in OBJECTS[: 1 + index % len(OBJECTS)]
    ]
    return {
        "image": pixels,
        "image/filename": f"{index}.jpg",
        "image/id": 1000 + index,
        "objects": objects,
    }


def mock_reader(self, split, decoders=None, read_config=None, shuffle_files=False):
    """A `FileReaderBuilder._as_dataset` serving NUM_EXAMPLES records per split."""
    infos = tfds.core.SplitDict(
        [
            tfds.core.SplitInfo(name=name, shard_lengths=[NUM_EXAMPLES], num_bytes=0)
            for name in ("train", "validation")
        ]
    )
    (instruction,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    features = self.info.features
    records = [features.encode_example(record(index)) for index in range(NUM_EXAMPLES)]
    records = records[instruction.from_ : instruction.to]
    signature = tf.nest.map_structure(
        lambda info: tf.TensorSpec(info.shape, info.tf_dtype), features.get_serialized_info()
    )
    examples = tf.data.Dataset.from_generator(lambda: iter(records), output_signature=signature)
    examples = examples.apply(tf.data.experimental.assert_cardinality(len(records)))
    return examples.map(functools.partial(features.decode_example, decoders=decoders))
