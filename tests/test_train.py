"""The phases end to end on the real digits: summary, events, resume, the CLI, bad input."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import default
from mokd_jax import checkpoint, data, identities, loop, normalization, parallel, state, train
from mokd_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete smoke run (teacher, distillation, evaluation) in its own workdir."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    summary = train.train_and_evaluate(default.get_config("smoke"), workdir)
    return workdir, summary


def tree_digest(directory: str) -> str:
    """A hash of every file's path and bytes under `directory`."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(path.encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.mark.slow
def test_smoke_run_writes_summary_checkpoints_and_events(finished_run):
    workdir, summary = finished_run
    with open(os.path.join(workdir, "summary.json")) as f:
        saved = json.load(f)
    assert saved["method"] == "mokd"
    for role in ("teacher", "student"):
        assert 0.0 <= saved[role]["test_accuracy"] <= saved[role]["test_top5_accuracy"] <= 1.0
    assert saved["student"]["parameters"] * 5 <= saved["teacher"]["parameters"]
    assert saved == json.loads(json.dumps(summary))
    for name in ("teacher", "student", "checkpoints/teacher", "checkpoints/student"):
        assert os.path.isdir(os.path.join(workdir, name)), name
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard", "student"),
        size_guidance={event_accumulator.TENSORS: 0},
    )
    events.Reload()
    for tag in (
        "loss_task",
        "loss_distill",
        "cos_task_distill",
        "norm_ratio_distill",
        "weight_task",
    ):
        assert [event.step for event in events.Tensors(tag)] == list(range(1, 21)), tag
    exported = checkpoint.load_variables(os.path.join(workdir, "student"))
    assert set(exported) == {"params", "batch_stats"}
    assert "projector" not in exported["params"]
    for role in ("teacher", "student"):  # the digits' statistics, as before they were saved
        identity = checkpoint.read_identity(os.path.join(workdir, role))
        assert normalization.from_identity(identity, role) == normalization.UNIT


@pytest.mark.slow
def test_both_phases_evaluate_on_the_way_and_the_summary_has_last_and_best(finished_run):
    """Smoke: 20 steps per phase, eval_every_steps 0 -> 4 evaluations per phase (every 5)."""
    workdir, summary = finished_run
    for phase in ("teacher", "student"):
        events = event_accumulator.EventAccumulator(
            os.path.join(workdir, "tensorboard", phase),
            size_guidance={event_accumulator.TENSORS: 0},
        )
        events.Reload()
        top1 = {event.step: event for event in events.Tensors("test_accuracy")}
        assert sorted(top1) == [5, 10, 15, 20], phase
        assert [e.step for e in events.Tensors("test_top5_accuracy")] == [5, 10, 15, 20]
    student, best = summary["student"], summary["student"]["best"]
    assert student["step"] == 20 and best["step"] in (5, 10, 15, 20)
    assert best["test_accuracy"] >= student["test_accuracy"]
    identity = checkpoint.read_identity(os.path.join(workdir, "student_best"))
    assert {key: identity[key] for key in best} == best
    assert identity["model"] == "cnn_small" and identity["num_classes"] == 10
    assert normalization.from_identity(identity, "student_best") == normalization.UNIT
    best_variables = checkpoint.load_variables(os.path.join(workdir, "student_best"))
    assert jax.tree.structure(best_variables) == jax.tree.structure(
        checkpoint.load_variables(os.path.join(workdir, "student"))
    )


@pytest.mark.slow
def test_a_restored_teacher_at_chance_level_is_warned_about(tmp_path, monkeypatch):
    """An untrained cnn_large (the smoke teacher) restored as the teacher: one warning that
    names its directory and the likely causes; its accuracy is returned for the summary.
    Slow: it compiles the teacher's evaluation (about 15 s on 2 shared cores)."""
    config = default.get_config("smoke")
    dataset = data.load_configured(config)
    model = identities.dataset_model(config, "teacher", dataset)
    variables = state.init_model(model, dataset.image_shape, jax.random.key(0))
    directory = str(tmp_path / "untrained")
    identity = identities.exported_identity(
        config.teacher.model, dataset.num_classes, normalization.UNIT
    )
    checkpoint.export_variables(directory, variables, identity, step=0)
    config.teacher.checkpoint_dir = directory
    warnings = []
    monkeypatch.setattr(train.logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    _, _, accuracy = train.obtain_teacher(config, str(tmp_path), dataset, parallel.make_mesh(1))
    assert len(warnings) == 1, warnings
    assert directory in warnings[0] and "chance level" in warnings[0]
    assert all(cause in warnings[0] for cause in ("normalisation", "checkpoint", "dataset"))
    assert accuracy["test_accuracy"] < 0.15


@pytest.mark.slow
def test_rerunning_a_finished_workdir_restores_instead_of_training(finished_run):
    workdir, summary = finished_run
    before = tree_digest(workdir + "/checkpoints")
    again = train.train_and_evaluate(default.get_config("smoke"), workdir)
    for role in ("teacher", "student"):
        assert again[role]["test_accuracy"] == summary[role]["test_accuracy"]
    assert again["student"]["best"] == summary["student"]["best"]
    assert tree_digest(workdir + "/checkpoints") == before


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["crash", "preemption"])
def test_resumed_run_ends_bitwise_equal_to_uninterrupted_run(
    finished_run, tmp_path, monkeypatch, stop
):
    """A crash resumes from the newest checkpoint it left; a preemption notice saves the
    step it stops at (14) before raising."""
    reference_dir, _ = finished_run
    config = default.get_config("smoke")
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    real_batches = data.InMemoryDataset.train_batches

    def interrupted_batches(*args, **kwargs):
        batches = real_batches(*args, **kwargs)
        for _ in range(13):  # past the step-10 checkpoint, short of the end (20)
            yield next(batches)
        if stop == "crash":
            raise KeyboardInterrupt("simulated crash")
        loop.PREEMPTION.set()  # what main's SIGTERM handler does
        yield next(batches)

    monkeypatch.setattr(data.InMemoryDataset, "train_batches", interrupted_batches)
    expected = KeyboardInterrupt if stop == "crash" else loop.Preempted
    with pytest.raises(expected):
        train.train_and_evaluate(config, str(tmp_path))
    loop.PREEMPTION.clear()
    if stop == "preemption":
        student_checkpoints = os.listdir(tmp_path / "checkpoints" / "student")
        assert max(int(name) for name in student_checkpoints if name.isdigit()) == 14
    monkeypatch.setattr(data.InMemoryDataset, "train_batches", real_batches)
    train.train_and_evaluate(config, str(tmp_path))

    for exported in ("student", "student_best"):  # the best so far survives the stop
        resumed = checkpoint.load_variables(str(tmp_path / exported))
        uninterrupted = checkpoint.load_variables(os.path.join(reference_dir, exported))
        jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
        assert checkpoint.read_identity(str(tmp_path / exported)) == checkpoint.read_identity(
            os.path.join(reference_dir, exported)
        )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("aggregator", "nope", "aggregator='nope'"),
        ("student.model", "resnet9000", "student.model='resnet9000'"),
        ("teacher.model", "nope", "teacher.model='nope'"),
        ("dataset", "imagenet9", "dataset='imagenet9'"),
        ("student.optimizer", "lion", "student.optimizer='lion'"),
        ("distill.temperature", -1.0, "distill.temperature=-1.0"),
        ("teacher.input_normalization", "imagenet1k", "teacher.input_normalization='imagenet1k'"),
    ],
)
def test_bad_config_names_field_and_value(tmp_path, field, value, message):
    config = default.get_config("smoke")
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(InputError, match=message.replace(".", r"\.") + ".*allowed"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def write_npz(directory, labels, num_examples=64, shape=(8, 8, 1)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        images = rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8)
        np.savez(directory / f"{split}.npz", image=images, label=labels(num_examples))


def test_missing_npz_file_names_the_file(tmp_path):
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    with pytest.raises(InputError, match="train.npz"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_labels_out_of_range(tmp_path):
    write_npz(tmp_path, lambda n: np.arange(n) % 12)
    config = default.get_config("smoke")
    config.dataset, config.data_dir, config.num_classes = "npz", str(tmp_path), 10
    with pytest.raises(InputError, match="num_classes=10.*max label is 11"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_teacher_with_other_class_count_is_refused(finished_run, tmp_path):
    reference_dir, _ = finished_run
    write_npz(tmp_path, lambda n: np.arange(n) % 12)
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    with pytest.raises(InputError, match="teacher.num_classes=10.*class count 12"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_teacher_for_other_image_channels_is_refused(finished_run, tmp_path):
    """The digits teacher (1 channel) on RGB images: a clear error, not a Flax shape error."""
    reference_dir, _ = finished_run
    write_npz(tmp_path, lambda n: np.arange(n) % 10, shape=(8, 8, 3))
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    with pytest.raises(InputError, match=r"teacher.checkpoint_dir=.*images of shape \(8, 8, 3\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_npz_data_trains_end_to_end(tmp_path):
    """Bring-your-own data of another size and channel count (12x12 RGB, 3 classes)."""
    write_npz(tmp_path, lambda n: np.arange(n) % 3, shape=(12, 12, 3))
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    config.teacher.num_train_steps = config.student.num_train_steps = 3
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["dataset"] == "npz"
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_workdir_of_another_configuration_is_refused_and_kept(finished_run):
    workdir, _ = finished_run
    before = tree_digest(workdir)
    config = default.get_config("smoke")
    config.student.learning_rate = 0.5
    with pytest.raises(InputError, match="workdir=.*student.learning_rate: 0.003 -> 0.5"):
        train.train_and_evaluate(config, workdir)
    assert tree_digest(workdir) == before


@pytest.mark.slow
def test_cli_runs_and_reports_bad_input_in_one_line(tmp_path):
    command = [sys.executable, "-m", "mokd_jax.main", "--config=configs/default.py:smoke"]
    run = subprocess.run(
        [*command, f"--workdir={tmp_path}/ok"], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "student cnn_small" in run.stdout and "test accuracy" in run.stdout
    with open(tmp_path / "ok" / "summary.json") as f:
        assert json.load(f)["method"] == "mokd"
    assert "steps/s" in run.stderr or "ETA" in run.stderr

    bad = subprocess.run(
        [*command, f"--workdir={tmp_path}/bad", "--config.aggregator=nope"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2
    error_lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "aggregator='nope'" in error_lines[0]


def teacher_checkpoint(directory, **identity):
    """An exported cnn_large digits teacher whose identity is the smoke config's, changed
    by `identity` (the variables are never read: the identity is checked first)."""
    saved = {"model": "cnn_large", "num_classes": 10, **identity}
    checkpoint.export_variables(str(directory), {"params": {"w": np.zeros(1)}}, saved, step=1)
    return str(directory)


def obtain_teacher_from(directory, workdir, input_normalization=""):
    config = default.get_config("smoke")
    config.teacher.checkpoint_dir = directory
    config.teacher.input_normalization = input_normalization
    return train.obtain_teacher(config, str(workdir), data.load("digits"), parallel.make_mesh(1))


def test_a_teacher_checkpoint_without_input_statistics_is_refused(tmp_path):
    directory = teacher_checkpoint(tmp_path / "teacher")
    with pytest.raises(InputError) as raised:
        obtain_teacher_from(directory, tmp_path / "run")
    message = str(raised.value)
    assert message.startswith("input_normalization=None is not allowed")
    assert f"checkpoint at {directory}" in message and "mokd-convert" in message
    assert "\n" not in message


def test_a_teacher_trained_on_other_statistics_than_the_config_says_is_refused(tmp_path):
    directory = teacher_checkpoint(
        tmp_path / "teacher", **normalization.to_identity(normalization.CIFAR10)
    )
    with pytest.raises(InputError) as raised:
        obtain_teacher_from(directory, tmp_path / "run", input_normalization="unit")
    assert str(raised.value) == (
        "teacher.input_normalization='unit' is not allowed: '' or 'cifar10': the teacher "
        f"checkpoint at {directory} was trained on inputs normalised with cifar10"
    )


def test_statistics_that_do_not_fit_the_images_are_refused(tmp_path):
    config = default.get_config("smoke")
    config.student.input_normalization = "imagenet"  # three channels; the digits have one
    with pytest.raises(InputError, match="student.input_normalization='imagenet'.*1-channel"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
