"""mokd_jax.benchmark (`mokd-benchmark`) end to end on tiny models: the JSON it writes, not
its speed."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modes the ratios and both aggregation shares need; the rest compile the same steps.
MODES = "kd_1bwd,mokd,mokd_amortized,mokd_separate"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("benchmark") / "bench.json"
    command = [
        sys.executable,
        "-m",
        "mokd_jax.benchmark",
        "--teacher=cnn_large",
        "--student=cnn_small",
        "--image_size=8",
        "--batch_size=8",
        "--steps=2",
        "--num_classes=10",
        f"--modes={MODES}",
        f"--json={path}",
    ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=300)
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_json_has_every_section(results):
    for key in ("machine", "jax", "devices", "config", "modes", "flop_floor_ratio", "ratios"):
        assert key in results
    assert set(results["modes"]) == set(MODES.split(","))
    assert results["config"]["student"] == "cnn_small"


@pytest.mark.slow
def test_step_times_are_positive(results):
    for row in results["modes"].values():
        assert row["step_time_s"] > 0
        assert row["images_per_s"] == pytest.approx(8 / row["step_time_s"])
        assert row["peak_bytes"] is None or row["peak_bytes"] > 0


@pytest.mark.slow
def test_flop_floor_ratio_lies_between_one_and_five_thirds(results):
    assert 1 < results["flop_floor_ratio"] < 5 / 3
    assert results["ratios"]["mokd_over_kd_1bwd"] > 0


@pytest.mark.slow
def test_aggregation_shares_are_fractions(results):
    for k in ("K2", "K3"):
        assert results["aggregation"][k]["time_s"] > 0
        assert 0 < results["aggregation"][k]["share"] < 1
        assert results["aggregation"][k]["in_step_share"] is None  # kd modes were not run
