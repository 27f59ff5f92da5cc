"""mokd_jax.pipeline_benchmark (`mokd-pipeline-benchmark`) on a tiny setting: the sections
and arithmetic of its results, the generated source images and the argument checks, not its
speed."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from mokd_jax import pipeline_benchmark
from mokd_jax.errors import InputError

BATCH = 4
BATCHES = 2
STEP_RATE = 1000.0
TINY = dict(
    image_size=16,
    batch_size=BATCH,
    warmup=1,
    count=BATCHES,
    source_images=4,
    source_size=40,
    step_rate=STEP_RATE,
)


@pytest.fixture(scope="module")
def results() -> dict:
    return pipeline_benchmark.measure(list(pipeline_benchmark.PIPELINES), **TINY)


def test_results_have_every_section_and_are_json(results):
    assert set(results) == {"machine", "versions", "config", "sources", "pipelines"}
    assert results["machine"]["cores_used"] >= 1
    assert {"tensorflow", "tensorflow_datasets", "numpy", "python"} <= set(results["versions"])
    assert results["config"]["step_rate"] == STEP_RATE
    assert json.loads(json.dumps(results)) == results


def test_every_pipeline_has_its_rate_per_core_and_cores_needed(results):
    cores = results["machine"]["cores_used"]
    assert list(results["pipelines"]) == list(pipeline_benchmark.PIPELINES)
    for row in results["pipelines"].values():
        assert row["wall_s"] > 0 and row["cpu_s"] > 0
        assert row["images_per_s"] == pytest.approx(BATCH * BATCHES / row["wall_s"])
        assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / cores)
        assert row["images_per_cpu_s"] == pytest.approx(BATCH * BATCHES / row["cpu_s"])
        assert row["cores_for_step_rate"] == math.ceil(STEP_RATE / row["images_per_cpu_s"])
    assert results["pipelines"]["imagenet_eval"]["image_size"] == 16
    assert results["pipelines"]["cifar_train"]["image_size"] == 32  # CIFAR's own side


def test_sources_record_the_generated_images(results):
    imagenet, cifar = results["sources"]["imagenet2012"], results["sources"]["cifar100"]
    assert imagenet["images"] == cifar["images"] == 4
    assert imagenet["format"] == "JPEG q90" and cifar["format"] == "PNG"
    assert imagenet["mean_bytes"] > 0 and cifar["mean_bytes"] > 0


def test_table_has_a_row_per_pipeline(results):
    table = pipeline_benchmark.format_table(results)
    assert f"cores needed for {STEP_RATE:.0f} images/s" in table
    for name in pipeline_benchmark.PIPELINES:
        assert name in table


def test_cores_needed_rounds_up():
    assert pipeline_benchmark.cores_needed(5576.0, 200.0) == 28  # 27.88
    assert pipeline_benchmark.cores_needed(400.0, 200.0) == 2


def test_generated_images_are_jpegs_of_both_orientations_and_cifar_pngs():
    jpegs = pipeline_benchmark.generated_images("imagenet2012", 2, 500)
    opened = [Image.open(io.BytesIO(encoded)) for encoded in jpegs]
    assert [image.format for image in opened] == ["JPEG", "JPEG"]
    assert [image.size for image in opened] == [(500, 375), (375, 500)]  # (width, height)
    pixels = np.asarray(opened[0], np.float32)
    assert 20 < pixels.std() < 100  # neither flat nor noise-saturated
    (png,) = pipeline_benchmark.generated_images("cifar10", 1, 500)
    assert Image.open(io.BytesIO(png)).size == (32, 32)


@pytest.mark.parametrize(
    ("names", "changes", "expected"),
    [
        (["imagenet_train"], {}, "pipelines='imagenet_train' is not allowed"),
        (["cifar_eval"], {"batch_size": 0}, "batch_size=0"),
        (["cifar_eval"], {"step_rate": -1.0}, "step_rate=-1.0"),
    ],
)
def test_bad_arguments_are_named(names, changes, expected):
    with pytest.raises(InputError, match=expected):
        pipeline_benchmark.measure(names, **{**TINY, **changes})
