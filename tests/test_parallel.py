"""Sharding on a device mesh (8 simulated CPU devices, in a subprocess), multi-host start-up
detection, and preemption of a real training process by SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
from jax.sharding import PartitionSpec
from processes import free_port, two_process_environment, xla_flags

from mokd_jax import parallel
from mokd_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_checks_on_eight_simulated_devices():
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         os.path.join(REPO, "tests", "multidevice_checks.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.parametrize(
    "shape, fsdp, min_size, expected",
    [
        ((3, 3, 64, 128), 2, 0, PartitionSpec(None, None, None, "fsdp")),
        ((512, 10), 2, 0, PartitionSpec("fsdp")),
        ((10,), 2, 0, PartitionSpec("fsdp")),
        ((7, 9), 2, 0, PartitionSpec()),  # nothing divisible by 2
        ((3, 3, 64, 128), 2, 10**6, PartitionSpec()),  # below the size threshold
        ((3, 3, 64, 128), 1, 0, PartitionSpec()),  # no fsdp axis
    ],
)
def test_leaf_spec_splits_the_largest_divisible_dimension(shape, fsdp, min_size, expected):
    assert parallel.leaf_spec(shape, fsdp, min_size) == expected


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),  # a pod slice
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ],
)
def test_multi_process_launch_is_detected_from_the_environment(environ, expected):
    assert parallel.is_multi_process_launch(environ) is expected


def test_single_process_mesh_covers_the_local_devices():
    mesh = parallel.make_mesh(1)
    assert mesh.size == jax.device_count()
    assert mesh.axis_names == parallel.AXES


def wait_for_student_phase(workdir: str, process, timeout_s: float = 300) -> None:
    """Polls until the student phase has opened its checkpoint directory."""
    directory = os.path.join(workdir, "checkpoints", "student")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.isdir(directory):
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before the student phase: {process.stderr.read()}")
        time.sleep(0.2)
    pytest.fail("the student phase did not start")


PREEMPTED_STUDENT_STEPS = 100
"""The student steps of the SIGTERM test's run. The signal is sent within a poll (0.2 s)
of the student phase opening its checkpoint directory, before its state is created and its
step compiled, so it lands within the first steps; the rest, about 3 s of smoke steps on 2
cores, is margin, and the resumed launch runs them all (400 steps took 10 s more)."""


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_the_next_launch_resumes(tmp_path):
    """A real `python -m mokd_jax.main` process gets SIGTERM during distillation: it saves
    the step it is at and exits with 143; the same command then resumes and finishes."""
    workdir = str(tmp_path / "run")
    command = [
        sys.executable, "-m", "mokd_jax.main", "--config=configs/default.py:smoke",
        f"--workdir={workdir}", f"--config.student.num_train_steps={PREEMPTED_STUDENT_STEPS}",
        "--config.checkpoint_every_steps=1000",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_student_phase(workdir, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "student preempted at step" in stderr
    stopped_at = int(stderr.split("student preempted at step ")[1].split(";")[0])
    assert 0 < stopped_at < PREEMPTED_STUDENT_STEPS
    saved = os.listdir(os.path.join(workdir, "checkpoints", "student"))
    assert str(stopped_at) in saved
    assert not os.path.exists(os.path.join(workdir, "summary.json"))

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"student: resuming from step {stopped_at}" in resumed.stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["student"]["test_accuracy"] > 0


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, {}),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, {}),  # JAX detects a pod slice itself
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            {"num_processes": 2, "process_id": 1},
        ),
    ],
)
def test_distributed_arguments_of_a_launch_by_hand(environ, expected):
    assert parallel.distributed_arguments(environ) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES=''"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            "JAX_PROCESS_ID=2.*below JAX_NUM_PROCESSES=2",
        ),
    ],
)
def test_incomplete_launch_by_hand_names_the_variable(environ, message):
    with pytest.raises(InputError, match=message):
        parallel.distributed_arguments(environ)


def launch_two_processes(workdir: str, port: int) -> list[str]:
    """Runs the smoke config as one job of two processes with 2 CPU devices each
    (jax.distributed over localhost); returns their stderr after both exit with 0."""
    processes = []
    for index in range(2):
        env = two_process_environment(index, port)
        command = [
            sys.executable, "-m", "mokd_jax.main", "--config=configs/default.py:smoke",
            f"--workdir={workdir}", "--config.teacher.num_train_steps=6",
            "--config.student.num_train_steps=6", "--config.checkpoint_every_steps=3",
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    stderrs = [process.communicate(timeout=600)[1] for process in processes]
    for process, stderr in zip(processes, stderrs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return stderrs


@pytest.mark.slow
def test_two_processes_train_one_job_together_and_restore_it(tmp_path):
    """Two processes form one 4-device job: each feeds its half of every batch, the Orbax
    saves are collective, and only process 0 writes the summary. A second launch restores
    the exported teacher and the finished student state on both processes."""
    workdir = str(tmp_path / "run")
    launch_two_processes(workdir, free_port())
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["devices"] == 4
    assert 0 < summary["student"]["test_accuracy"] <= 1
    saved = os.listdir(os.path.join(workdir, "checkpoints", "student"))
    assert {"3", "6"} <= set(saved)

    stderrs = launch_two_processes(workdir, free_port())
    for stderr in stderrs:
        assert "teacher: restored from" in stderr and "student: resuming from step 6" in stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        again = json.load(f)
    assert again["student"]["test_accuracy"] == summary["student"]["test_accuracy"]
