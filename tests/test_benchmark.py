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
    keys = ("machine", "jax", "devices", "config", "modes", "flop_floor_ratio", "ratios", "memory")
    for key in keys:
        assert key in results
    assert set(results["modes"]) == set(MODES.split(","))
    assert results["config"]["student"] == "cnn_small"
    assert results["config"]["like_peer"] is False  # no peer: the config's recipe


@pytest.mark.slow
def test_step_times_are_positive(results):
    for row in results["modes"].values():
        assert row["step_time_s"] > 0
        assert row["images_per_s"] == pytest.approx(8 / row["step_time_s"])
        assert row["peak_bytes"] is None or row["peak_bytes"] > 0
        assert row["compiled_memory"]["peak_bytes"] >= row["compiled_memory"]["argument_bytes"]


@pytest.mark.slow
def test_memory_section_reads_mokd_against_kd_1bwd_in_gradient_copies(results):
    memory = results["memory"]
    assert memory["gradient_copy_bytes"] > 0 and memory["baseline"] == "kd_1bwd"
    for mode, extra_objectives in (("mokd", 1), ("mokd_separate", 2)):
        row = memory[mode]
        assert row["extra_objectives"] == extra_objectives
        assert row["extra_gradient_copies"] == pytest.approx(
            row["extra_bytes"] / memory["gradient_copy_bytes"]
        )


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


# ----------------------------------------------------------------------------- PyTorch peer
# In-process (`benchmark.measure`, `benchmark_detection.measure_detection`): the command line
# around them is the same as the classification run's above, and a fresh interpreter per run
# would pay JAX's, TensorFlow's and torch's imports again.

PEER_SETTINGS = {"teacher": "resnet18", "student": "resnet18", "batch_size": 2, "num_classes": 10}


@pytest.fixture(scope="module")
def torch_peer():
    pytest.importorskip("torch")
    from mokd_jax import torch_peer

    return torch_peer


@pytest.fixture
def brief_timing(monkeypatch):
    """One warm-up call per step and one timed call of the aggregation instead of
    `measurement`'s 2 and 20: these tests check the sections and the ratios the JSON is
    made of, not how steady the medians are, and on two ResNet-18 students the 20 timed
    `mokd` updates (K = 2 and 3, unoptimised test builds) took half the test's minute."""
    from mokd_jax import measurement

    monkeypatch.setattr(measurement, "WARMUP_STEPS", 1)
    monkeypatch.setattr(measurement, "AGGREGATION_REPEATS", 1)


def measured(framework: str, settings=PEER_SETTINGS, modes=("kd_1bwd", "mokd")) -> dict:
    """The run of `measure` on 16 px images: the ResNets' smallest input that still reaches
    their last stage (1 x 1), so that each framework's steps cost the least they can."""
    from mokd_jax import benchmark

    return benchmark.measure(benchmark.benchmark_base(settings, "float32"), 16, 1, modes, framework)


def test_the_peer_modes_are_the_peer_steps(torch_peer):
    from mokd_jax import benchmark_peer

    assert benchmark_peer.PEER_MODES == tuple(torch_peer.PEER_STEPS) == torch_peer.PEER_MODES


def test_an_unknown_peer_architecture_is_refused(torch_peer):
    from mokd_jax.errors import InputError

    with pytest.raises(InputError, match="student='cnn_small'.*resnet18"):
        torch_peer.peer_models("resnet18", "cnn_small", 10, 0, 16)


def check_peer_section(results: dict) -> None:
    assert {"machine", "config", "peer"} <= set(results)
    assert results["config"]["like_peer"] is True  # ours ran the peer's losses and optimizer
    assert results["config"]["student_optimizer"]["optimizer"] == "sgd"
    assert results["peer"]["options"] == {
        "device": "cpu",
        "bf16": False,
        "channels_last": False,
        "compile": False,
    }
    assert set(results["peer"]["modes"]) == {"kd_1bwd", "mokd"}
    for row in results["peer"]["modes"].values():
        assert row["step_time_s"] > 0
        assert row["images_per_s"] == pytest.approx(2 / row["step_time_s"])


@pytest.mark.slow
def test_the_torch_framework_times_the_peer_alone(torch_peer, brief_timing):
    results = measured("torch")
    check_peer_section(results)
    assert "modes" not in results and "ratios_vs_peer" not in results


@pytest.mark.slow
def test_both_frameworks_write_every_section_and_their_ratios(torch_peer, brief_timing):
    from mokd_jax.benchmark_report import format_table

    results = measured("both")
    check_peer_section(results)
    assert {"modes", "ratios", "aggregation", "ratios_vs_peer"} <= set(results)
    for mode, ratio in results["ratios_vs_peer"].items():
        ours = results["modes"][mode]["step_time_s"]
        assert ratio == pytest.approx(ours / results["peer"]["modes"][mode]["step_time_s"])
    assert "peer mokd" in format_table(results)
    assert set(results["aggregation"]) == {"K2"}  # mokd_separate, K = 3's step, did not run


@pytest.mark.slow
def test_a_bad_request_is_refused_in_one_line(tmp_path):
    command = [sys.executable, "-m", "mokd_jax.benchmark", "--framework=tf"]
    result = subprocess.run(
        [*command, f"--json={tmp_path / 'bench.json'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == "error: framework='tf' is not allowed: one of jax, torch, both"
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize(
    "task, mode_names, framework, message",
    [
        ("classification", ["ce"], "torch", "with --framework=torch, at least one of"),
        ("detection", ["kd"], "both", "framework='both' is not allowed: jax with --task=detection"),
        (
            "detection",
            ["kd_1bwd"],
            "jax",
            "modes='kd_1bwd' is not allowed: with --task=detection, one of",
        ),
    ],
)
def test_a_request_the_task_or_framework_cannot_run_is_refused(
    task, mode_names, framework, message
):
    from mokd_jax import benchmark
    from mokd_jax.errors import InputError

    with pytest.raises(InputError, match=message):
        benchmark.check_request(task, mode_names, framework)


# ----------------------------------------------------------------------------- detection


@pytest.mark.slow
def test_the_detection_task_writes_the_classification_json_shape(brief_timing):
    """A tiny RetinaNet pair (64 px, batch 1, 8-channel heads with no conv before their
    outputs), one step."""
    from mokd_jax import benchmark
    from mokd_jax.benchmark_detection import measure_detection

    settings = {"teacher": "resnet18", "student": "resnet18", "batch_size": 1, "num_classes": 3}
    base = benchmark.benchmark_base(settings, "float32")
    results = measure_detection(base, 64, 1, ["kd", "mokd"], fpn_width=8, head_depth=0)
    for key in ("jax", "devices", "config", "modes", "flop_floor_ratio", "ratios"):
        assert key in results
    assert results["config"]["task"] == "detection" and results["config"]["fpn_width"] == 8
    assert set(results["modes"]) == {"kd", "mokd"}
    for row in results["modes"].values():
        assert row["images_per_s"] == pytest.approx(1 / row["step_time_s"])
        assert row["compiled_memory"]["peak_bytes"] > 0
    assert 1 < results["flop_floor_ratio"] < 5 / 3
    assert results["ratios"]["mokd_over_kd"] > 0
    assert (
        results["memory"]["baseline"] == "kd"
        and "extra_gradient_copies" in (results["memory"]["mokd"])
    )
