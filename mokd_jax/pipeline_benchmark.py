"""Images per second of the TFDS input pipelines on this host, and the host cores an
accelerator's step rate needs (the `mokd-pipeline-benchmark` command):

    mokd-pipeline-benchmark --batch_size=64 --batches=20 --step_rate=5576 \\
        [--pipelines=imagenet_train_standard,imagenet_train_deit,imagenet_eval,...] \\
        [--image_size=224] [--source_images=256] [--source_size=500] [--json=pipeline.json]

Pipelines: imagenet_train_standard (ResNet recipe), imagenet_train_deit (DeiT recipe),
imagenet_eval, cifar_train, cifar_eval (CIFAR-100; CIFAR-10 runs the same code).

(or `python -m mokd_jax.pipeline_benchmark ...`). A command of its own rather than a mode
of `mokd-benchmark`: it shares none of that command's flags (models, modes, dtype), never
touches the accelerator and needs no model code.

What runs: the real `tfds_pipeline.train_batches` and `eval_batches` (the shuffle
buffer, per-example seeds, the recipes' crops and RandAugment, repeated
augmentation, batching and prefetch), with one stand-in: TFDS's file reader is replaced
(`tfds.testing.mock_data`) by examples held in memory, generated once per run. So the
figures count decoding and augmentation, the pipeline's work, but not reading and parsing
the TFRecord files, which cost disk bandwidth rather than cores.

The generated images stand in for ImageNet's: `--source_images` JPEGs of 500x375 and
375x500 pixels (`--source_size` sets the long side), smooth colour fields with detail at
four scales and grain, encoded at quality 90, about as large as ImageNet's JPEGs (the JSON
records their mean size: decoding time grows with it). CIFAR's are 32x32
PNGs of the same kind. The split read by each pipeline cycles through them to exactly the
batches needed, so no epoch boundary (which rebuilds the pipeline) falls inside the timing.

Timing: `--warmup_batches` batches are drawn first (tracing, filling the shuffle buffer,
tf.data's autotuning), then `--batches` batches are timed, in wall time and in this
process's CPU time (all its threads). tf.data runs on every core this process may use
(`os.sched_getaffinity`): images/s over those cores is the per-core rate of a machine of
one's own. On a shared machine other processes take some of the cores, so wall rates
swing with their load; images per CPU second measure the work an image costs whatever the
load, and the cores needed for `--step_rate` images/s (default: `mokd` on one H200, bf16,
224 px, docs/benchmarks.md) are estimated from them, each core assumed as busy as here.
The load average before and after is recorded.

TensorFlow, TFDS and the pipelines are imported by the functions that run them, so that
`mokd-pipeline-benchmark --help` answers without importing TensorFlow (6.0 s -> 0.3 s).
"""

import functools
import io
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from absl import flags
from PIL import Image

from mokd_jax import cli
from mokd_jax.checks import check_int, check_positive
from mokd_jax.errors import invalid
from mokd_jax.machine import machine_info

if TYPE_CHECKING:
    import tensorflow as tf

FLAGS = flags.FLAGS

JPEG_QUALITY = 90
H200_MOKD_IMAGES_PER_S = 5576.0  # `mokd`, bf16, 224 px, batch 128: docs/benchmarks.md


class Pipeline(NamedTuple):
    dataset: str
    split: str  # 'train' or 'eval'
    recipe: str


PIPELINES: dict[str, Pipeline] = {
    "imagenet_train_standard": Pipeline("imagenet2012", "train", "standard"),
    "imagenet_train_deit": Pipeline("imagenet2012", "train", "deit"),
    "imagenet_eval": Pipeline("imagenet2012", "eval", "standard"),
    "cifar_train": Pipeline("cifar100", "train", "standard"),
    "cifar_eval": Pipeline("cifar100", "eval", "standard"),
}


def define_flags(flag_values: flags.FlagValues) -> None:
    """Defined by `run` only, so that importing this module defines no flag."""
    flags.DEFINE_list(
        "pipelines",
        list(PIPELINES),
        f"Pipelines to time, from {list(PIPELINES)}.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "image_size", 224, "Side of the ImageNet pipelines' output.", flag_values=flag_values
    )
    flags.DEFINE_integer("batch_size", 64, "Images per batch.", flag_values=flag_values)
    flags.DEFINE_integer(
        "warmup_batches", 5, "Batches drawn before the timing.", flag_values=flag_values
    )
    flags.DEFINE_integer("batches", 20, "Timed batches per pipeline.", flag_values=flag_values)
    flags.DEFINE_integer(
        "source_images", 256, "Distinct generated images per dataset.", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "source_size",
        500,
        "Long side of the generated JPEGs (the short side is 3/4 of it).",
        flag_values=flag_values,
    )
    flags.DEFINE_float(
        "step_rate",
        H200_MOKD_IMAGES_PER_S,
        "Images/s of the accelerator's training step, to estimate the host cores it needs.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "json", None, "Where to write the results as JSON.", flag_values=flag_values
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- source


def natural_looking_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [height, width, 3]: random colour fields at four scales, each upsampled
    smoothly (gradients and soft edges as in photographs; white noise would not compress),
    plus grain. The amplitudes make a 500x375 JPEG of about 95 KB at quality 90, near
    ImageNet's mean of about 110 KB."""
    image = np.full((height, width, 3), 128.0, np.float32)
    for cells, amplitude in ((4, 90.0), (16, 40.0), (64, 30.0), (160, 30.0)):
        grid = rng.uniform(-1.0, 1.0, (cells, cells, 3)).astype(np.float32)
        for channel in range(3):
            field = Image.fromarray(grid[..., channel], mode="F")
            image[..., channel] += amplitude * np.asarray(
                field.resize((width, height), Image.BICUBIC)
            )
    image += rng.normal(0.0, 12.0, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if image_format == "JPEG" else {}
    Image.fromarray(image).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def generated_images(dataset: str, count: int, long_side: int, seed: int = 0) -> list[bytes]:
    """`count` encoded images as `dataset` stores them: ImageNet JPEGs, landscape and
    portrait in turn (long_side x 3/4 of it), or CIFAR's 32x32 PNGs."""
    rng = np.random.default_rng(seed)
    if dataset.startswith("cifar"):
        return [encode(natural_looking_image(32, 32, rng), "PNG") for _ in range(count)]
    short_side = round(long_side * 3 / 4)
    shapes = [(short_side, long_side), (long_side, short_side)]
    return [encode(natural_looking_image(*shapes[i % 2], rng), "JPEG") for i in range(count)]


def in_memory_reader(encoded: Sequence[bytes], length: int) -> Callable[..., "tf.data.Dataset"]:
    """A stand-in for TFDS's file reader (`mock_data`'s `as_dataset_fn`): every split is
    `length` examples cycling through `encoded`, labelled by their index, decoded with the
    caller's decoders as TFDS decodes records (the pipelines skip the image's decoding)."""
    import tensorflow as tf

    def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
        labels = np.arange(len(encoded)) % builder.info.features["label"].num_classes
        examples = tf.data.Dataset.from_tensor_slices({"image": list(encoded), "label": labels})
        examples = examples.repeat().take(length)
        decode = functools.partial(builder.info.features.decode_example, decoders=decoders)
        return examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    return as_dataset


# ----------------------------------------------------------------------------- timing


def host_cores() -> int:
    """The cores this process may run on, which tf.data's thread pool is sized to."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cores_needed(step_rate: float, images_per_cpu_s: float) -> int:
    """Cores to feed `step_rate` images/s, each core as busy as this process's were."""
    return math.ceil(step_rate / images_per_cpu_s)


class Timing(NamedTuple):
    wall_s: float
    cpu_s: float  # CPU time of every thread of this process (tf.data's included)


def time_batches(batches: Iterator[Any], warmup: int, count: int) -> Timing:
    """Wall and CPU seconds for `count` batches of `batches`, after `warmup` untimed ones."""
    for _ in range(warmup):
        next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(batches)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def pipeline_batches(
    pipeline: Pipeline, batch_size: int, image_size: int
) -> Iterator[tuple[np.ndarray, ...]]:
    """The batches of `pipeline` (under `mock_data`, whose reader supplies the examples)."""
    from mokd_jax.data import tfds_pipeline

    if pipeline.split == "train":
        return tfds_pipeline.train_batches(
            pipeline.dataset, "", batch_size, 0, image_size=image_size, recipe=pipeline.recipe
        )
    return tfds_pipeline.eval_batches(
        pipeline.dataset, "", batch_size, image_size=image_size, recipe=pipeline.recipe
    )


def time_pipeline(
    pipeline: Pipeline,
    encoded: Sequence[bytes],
    image_size: int,
    batch_size: int,
    warmup: int,
    count: int,
) -> Timing:
    """The time of `count` batches of `pipeline` reading `encoded` from memory."""
    import tensorflow_datasets as tfds

    length = (warmup + count) * batch_size  # one epoch, no padded eval batch
    with tfds.testing.mock_data(as_dataset_fn=in_memory_reader(encoded, length)):
        batches = pipeline_batches(pipeline, batch_size, image_size)
        return time_batches(batches, warmup, count)


# ----------------------------------------------------------------------------- report


def format_table(results: dict[str, Any]) -> str:
    step_rate = results["config"]["step_rate"]
    lines = [
        f"{results['machine']['cores_used']} host cores; cores needed for {step_rate:.0f} images/s",
        f"{'pipeline':<26}{'size':>6}{'images/s':>10}{'per core':>10}{'per cpu s':>10}{'cores':>7}",
    ]
    for name, row in results["pipelines"].items():
        lines.append(
            f"{name:<26}{row['image_size']:>6}{row['images_per_s']:>10.1f}"
            f"{row['images_per_s_per_core']:>10.1f}{row['images_per_cpu_s']:>10.1f}"
            f"{row['cores_for_step_rate']:>7}"
        )
    return "\n".join(lines)


def check_arguments(
    names: Sequence[str], image_size: int, batch_size: int, warmup: int, count: int
) -> None:
    for name in names:
        if name not in PIPELINES:
            raise invalid("pipelines", name, f"one of {list(PIPELINES)}")
    check_int("image_size", image_size, 1)
    check_int("batch_size", batch_size, 1)
    check_int("warmup_batches", warmup, 0)
    check_int("batches", count, 1)


def measure(
    names: Sequence[str],
    *,
    image_size: int,
    batch_size: int,
    warmup: int,
    count: int,
    source_images: int,
    source_size: int,
    step_rate: float,
) -> dict[str, Any]:
    """Times every pipeline of `names`; returns the JSON-ready results."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from mokd_jax.data import tfds_specs

    check_arguments(names, image_size, batch_size, warmup, count)
    check_int("source_images", source_images, 1)
    check_int("source_size", source_size, 8)
    check_positive("step_rate", step_rate)
    cores = host_cores()
    load_before = os.getloadavg()
    sources: dict[str, list[bytes]] = {}
    rows = {}
    for name in names:
        pipeline = PIPELINES[name]
        if pipeline.dataset not in sources:
            log(f"[{pipeline.dataset}] generating {source_images} images")
            sources[pipeline.dataset] = generated_images(
                pipeline.dataset, source_images, source_size
            )
        size = (
            image_size
            if pipeline.dataset == "imagenet2012"
            else tfds_specs.spec(pipeline.dataset).image_size
        )
        log(f"[{name}] timing {count} batches of {batch_size}")
        timing = time_pipeline(pipeline, sources[pipeline.dataset], size, batch_size, warmup, count)
        images_per_s = count * batch_size / timing.wall_s
        images_per_cpu_s = count * batch_size / timing.cpu_s
        rows[name] = {
            **pipeline._asdict(),
            "image_size": size,
            **timing._asdict(),
            "images_per_s": images_per_s,
            "images_per_s_per_core": images_per_s / cores,
            "images_per_cpu_s": images_per_cpu_s,
            "cores_for_step_rate": cores_needed(step_rate, images_per_cpu_s),
        }
        log(f"[{name}] {images_per_s:.1f} images/s")
    return {
        "machine": {**machine_info(load_before), "cores_used": cores},
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "tensorflow_datasets": tfds.__version__,
            "numpy": np.__version__,
        },
        "config": {
            "batch_size": batch_size,
            "warmup_batches": warmup,
            "batches": count,
            "step_rate": step_rate,
        },
        "sources": {
            dataset: {
                "images": len(encoded),
                "mean_bytes": float(np.mean([len(image) for image in encoded])),
                "format": "PNG" if dataset.startswith("cifar") else f"JPEG q{JPEG_QUALITY}",
                "long_side": 32 if dataset.startswith("cifar") else source_size,
            }
            for dataset, encoded in sources.items()
        },
        "pipelines": rows,
    }


def main(argv: Sequence[str]) -> None:
    del argv
    results = measure(
        FLAGS.pipelines,
        image_size=FLAGS.image_size,
        batch_size=FLAGS.batch_size,
        warmup=FLAGS.warmup_batches,
        count=FLAGS.batches,
        source_images=FLAGS.source_images,
        source_size=FLAGS.source_size,
        step_rate=FLAGS.step_rate,
    )
    cli.report(format_table(results), results, FLAGS.json)


def run() -> None:
    """The `mokd-pipeline-benchmark` entry point."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
