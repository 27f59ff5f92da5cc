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
    assert results["config"]["like_peer"] is False  # no peer: the config's recipe


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
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


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
