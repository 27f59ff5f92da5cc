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

PEER_RUN = [
    "--teacher=resnet18",
    "--student=resnet18",
    "--image_size=32",
    "--batch_size=2",
    "--steps=1",
    "--num_classes=10",
    "--modes=kd_1bwd,mokd",
]


@pytest.fixture(scope="module")
def torch_peer():
    pytest.importorskip("torch")
    from mokd_jax import torch_peer

    return torch_peer


def run_benchmark(path, *arguments) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mokd_jax.benchmark", *arguments, f"--json={path}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_peer_modes_are_the_peer_steps(torch_peer):
    from mokd_jax import benchmark_peer

    assert benchmark_peer.PEER_MODES == tuple(torch_peer.PEER_STEPS) == torch_peer.PEER_MODES


def test_an_unknown_peer_architecture_is_refused(torch_peer):
    from mokd_jax.errors import InputError

    with pytest.raises(InputError, match="student='cnn_small'.*resnet18"):
        torch_peer.peer_models("resnet18", "cnn_small", 10, 0)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "both"])
def test_the_peer_frameworks_write_every_section(tmp_path, torch_peer, framework):
    result = run_benchmark(tmp_path / "bench.json", *PEER_RUN, f"--framework={framework}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "bench.json") as f:
        results = json.load(f)
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
    assert "peer mokd" in result.stdout
    if framework == "both":
        assert {"modes", "ratios", "aggregation", "ratios_vs_peer"} <= set(results)
        for mode, ratio in results["ratios_vs_peer"].items():
            ours = results["modes"][mode]["step_time_s"]
            assert ratio == pytest.approx(ours / results["peer"]["modes"][mode]["step_time_s"])
    else:
        assert "modes" not in results and "ratios_vs_peer" not in results


@pytest.mark.slow
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--framework=tf"], "framework='tf' is not allowed: one of jax, torch, both"),
        (["--framework=torch", "--modes=ce"], "with --framework=torch, at least one of"),
    ],
)
def test_a_bad_framework_request_is_refused_in_one_line(tmp_path, arguments, message):
    result = run_benchmark(tmp_path / "bench.json", *arguments)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "bench.json").exists()


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "mode_names, framework, message",
    [
        (["kd"], "both", "framework='both' is not allowed: jax with --task=detection"),
        (["kd_1bwd"], "jax", "modes='kd_1bwd' is not allowed: with --task=detection, one of"),
    ],
)
def test_a_detection_request_takes_its_own_modes_and_no_peer(mode_names, framework, message):
    from mokd_jax import benchmark
    from mokd_jax.errors import InputError

    with pytest.raises(InputError, match=message):
        benchmark.check_request("detection", mode_names, framework)


@pytest.fixture(scope="module")
def detection_results(tmp_path_factory) -> dict:
    """A tiny RetinaNet pair (64 px, batch 1, 8-channel heads one conv deep), one step."""
    path = tmp_path_factory.mktemp("detection") / "bench.json"
    tiny = ["--image_size=64", "--batch_size=1", "--fpn_width=8", "--head_depth=1"]
    pair = ["--teacher=resnet18", "--student=resnet18", "--num_classes=3", "--steps=1"]
    result = run_benchmark(path, "--task=detection", *tiny, *pair)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_the_detection_task_writes_the_classification_json_shape(detection_results):
    results = detection_results
    for key in ("machine", "jax", "devices", "config", "modes", "flop_floor_ratio", "ratios"):
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
