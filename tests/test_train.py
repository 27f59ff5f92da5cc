"""The trainer end to end on the real digits: one step, the CLI, resume, bad input."""

import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import default
from mokd_jax import aggregation, checkpoint, data, models, parallel, train
from mokd_jax.errors import InputError
from mokd_jax.subspace import SubspaceProjector

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


class StepParts(NamedTuple):
    """A tiny batch and everything a distillation step needs, from the smoke config."""

    images: np.ndarray
    labels: np.ndarray
    teacher: object
    student: object
    projector: SubspaceProjector
    tx: object
    create_state: functools.partial  # key -> a fresh student TrainState


def step_parts(config) -> StepParts:
    dataset = data.load("digits")
    images, labels = dataset.train_images[:16], dataset.train_labels[:16]
    teacher = models.get(config.teacher.model, num_classes=10)
    student = models.get(config.student.model, num_classes=10)
    projector = SubspaceProjector(width=2 * teacher.feature_width)
    tx = train.student_optimizer(config)
    create_state = functools.partial(
        train.create_student_state,
        student, projector, images.shape[1:], teacher.feature_width, tx,
    )  # fmt: skip
    return StepParts(images, labels, teacher, student, projector, tx, create_state)


def test_distill_step_updates_student_and_projector_only():
    config = default.get_config("smoke")
    config.student.warmup_steps = 0  # a non-zero learning rate on the first step
    images, labels, teacher, student, projector, tx, create_state = step_parts(config)
    teacher_variables = train.init_model(teacher, images.shape[1:], jax.random.key(1))
    state = create_state(jax.random.key(2))
    step = jax.jit(
        train.bound_distill_step(
            config, student=student, teacher=teacher, projector=projector, tx=tx
        )
    )
    teacher_before = jax.tree.map(np.array, teacher_variables)
    new_state, metrics = step(state, teacher_variables, images, labels)

    assert int(new_state.step) == 1
    for part in ("student", "projector"):
        before, after = jax.tree.leaves(state.params[part]), jax.tree.leaves(new_state.params[part])
        assert any(not np.array_equal(b, a) for b, a in zip(before, after, strict=True)), part
    jax.tree.map(np.testing.assert_array_equal, teacher_before, jax.device_get(teacher_variables))
    np.testing.assert_array_equal(
        new_state.constants["teacher_lift"], state.constants["teacher_lift"]
    )
    expected = {
        "loss_task", "loss_distill", "loss_kd_logit", "loss_kd_feature", "weight_task",
        "weight_distill", "cos_task_distill", "norm_ratio_distill", "accuracy", "conflict",
    }  # fmt: skip
    assert expected <= set(metrics)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert -1.0 <= float(metrics["cos_task_distill"]) <= 1.0
    assert float(metrics["norm_ratio_distill"]) > 0


def test_teacher_is_an_argument_of_the_step_not_a_constant():
    """Different teacher variables through the same compiled step give different updates."""
    config = default.get_config("smoke")
    images, labels, teacher, student, projector, tx, create = step_parts(config)
    image_shape = images.shape[1:]
    step = jax.jit(
        train.bound_distill_step(
            config, student=student, teacher=teacher, projector=projector, tx=tx
        )
    )
    losses = [
        float(step(create(jax.random.key(0)), train.init_model(teacher, image_shape, key),
                   images, labels)[1]["loss_distill"])
        for key in (jax.random.key(1), jax.random.key(2))
    ]  # fmt: skip
    assert step._cache_size() == 1
    assert losses[0] != losses[1]


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


def test_rerunning_a_finished_workdir_restores_instead_of_training(finished_run):
    workdir, summary = finished_run
    before = tree_digest(workdir + "/checkpoints")
    again = train.train_and_evaluate(default.get_config("smoke"), workdir)
    assert again["student"]["test_accuracy"] == summary["student"]["test_accuracy"]
    assert tree_digest(workdir + "/checkpoints") == before


@pytest.mark.parametrize("stop", ["crash", "preemption"])
def test_resumed_run_ends_bitwise_equal_to_uninterrupted_run(
    finished_run, tmp_path, monkeypatch, stop
):
    """A crash resumes from the newest checkpoint it left; a preemption notice saves the
    step it stops at (14) before raising."""
    reference_dir, _ = finished_run
    config = default.get_config("smoke")
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    real_batches = data.Dataset.train_batches

    def interrupted_batches(*args, **kwargs):
        batches = real_batches(*args, **kwargs)
        for _ in range(13):  # past the step-10 checkpoint, short of the end (20)
            yield next(batches)
        if stop == "crash":
            raise KeyboardInterrupt("simulated crash")
        train.PREEMPTION.set()  # what main's SIGTERM handler does
        yield next(batches)

    monkeypatch.setattr(data.Dataset, "train_batches", interrupted_batches)
    expected = KeyboardInterrupt if stop == "crash" else train.Preempted
    with pytest.raises(expected):
        train.train_and_evaluate(config, str(tmp_path))
    train.PREEMPTION.clear()
    if stop == "preemption":
        student_checkpoints = os.listdir(tmp_path / "checkpoints" / "student")
        assert max(int(name) for name in student_checkpoints if name.isdigit()) == 14
    monkeypatch.setattr(data.Dataset, "train_batches", real_batches)
    train.train_and_evaluate(config, str(tmp_path))

    resumed = checkpoint.load_variables(str(tmp_path / "student"))
    uninterrupted = checkpoint.load_variables(os.path.join(reference_dir, "student"))
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("aggregator", "nope", "aggregator='nope'"),
        ("student.model", "resnet9000", "student.model='resnet9000'"),
        ("teacher.model", "nope", "teacher.model='nope'"),
        ("dataset", "imagenet9", "dataset='imagenet9'"),
        ("student.optimizer", "lion", "student.optimizer='lion'"),
        ("distill.temperature", -1.0, "distill.temperature=-1.0"),
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


def test_teacher_with_other_class_count_is_refused(finished_run, tmp_path):
    reference_dir, _ = finished_run
    write_npz(tmp_path, lambda n: np.arange(n) % 12)
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    with pytest.raises(InputError, match="teacher.num_classes=10.*class count 12"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_teacher_for_other_image_channels_is_refused(finished_run, tmp_path):
    """The digits teacher (1 channel) on RGB images: a clear error, not a Flax shape error."""
    reference_dir, _ = finished_run
    write_npz(tmp_path, lambda n: np.arange(n) % 10, shape=(8, 8, 3))
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    with pytest.raises(InputError, match=r"teacher.checkpoint_dir=.*images of shape \(8, 8, 3\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_npz_data_trains_end_to_end(tmp_path):
    """Bring-your-own data of another size and channel count (12x12 RGB, 3 classes)."""
    write_npz(tmp_path, lambda n: np.arange(n) % 3, shape=(12, 12, 3))
    config = default.get_config("smoke")
    config.dataset, config.data_dir = "npz", str(tmp_path)
    config.teacher.num_train_steps = config.student.num_train_steps = 3
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["dataset"] == "npz"
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0


def test_workdir_of_another_configuration_is_refused_and_kept(finished_run):
    workdir, _ = finished_run
    before = tree_digest(workdir)
    config = default.get_config("smoke")
    config.student.learning_rate = 0.5
    with pytest.raises(InputError, match="workdir=.*student.learning_rate: 0.003 -> 0.5"):
        train.train_and_evaluate(config, workdir)
    assert tree_digest(workdir) == before


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


def short_student_run(reference_dir, workdir, **overrides):
    """Three distillation steps with the reference run's teacher; returns the summary."""
    config = default.get_config("smoke")
    config.teacher.checkpoint_dir = os.path.join(reference_dir, "teacher")
    config.student.num_train_steps = 3
    config.update_from_flattened_dict(overrides)
    return train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("name", aggregation.NAMES)
def test_every_aggregator_trains_end_to_end(finished_run, tmp_path, name):
    overrides = {"aggregator": name}
    if name == "dot":
        overrides["student.optimizer"] = "sgd"
    summary = short_student_run(finished_run[0], str(tmp_path), **overrides)
    assert summary["method"] == name
    assert all(np.isfinite(value) for value in summary["training_diagnostics"].values())


def test_three_objectives_with_dkd_train_end_to_end(finished_run, tmp_path):
    summary = short_student_run(
        finished_run[0],
        str(tmp_path),
        **{"distill.objectives": "separate", "distill.logit_loss": "dkd"},
    )
    diagnostics = summary["training_diagnostics"]
    assert {"weight_logit", "weight_feature", "cos_task_logit", "cos_task_feature"} <= set(
        diagnostics
    )


def test_dot_refuses_adamw(tmp_path):
    config = default.get_config("smoke")
    config.aggregator = "dot"
    with pytest.raises(InputError, match="student.optimizer='adamw'.*sgd"):
        train.train_and_evaluate(config, str(tmp_path))


def test_representation_path_with_everything_kept_equals_the_plain_sum():
    """GradDrop's two pullbacks (head, then encoder with the combined representation
    gradient) reproduce the one-pullback gradient of the summed losses when nothing is
    dropped: the plumbing of `representation_gradients` is exact."""
    config = default.get_config("smoke")
    images, labels, teacher, student, projector, tx, create_state = step_parts(config)
    teacher_variables = train.init_model(teacher, images.shape[1:], jax.random.key(1))
    state = create_state(jax.random.key(2))

    encode, head_objectives = train.student_functions(
        state, teacher_variables, images, labels,
        student=student, teacher=teacher, projector=projector, distill=config.distill,
    )  # fmt: skip

    def summed(params):
        pooled, _ = encode(params["student"])
        return head_objectives(params, pooled)[0].sum()

    rows, _, _, _ = train.representation_gradients(
        encode, head_objectives, state.params, lambda g: (g.sum(0), jnp.ones(2))
    )
    expected = jax.grad(summed)(state.params)
    jax.tree.map(
        lambda row, want: np.testing.assert_allclose(row[0], want, rtol=2e-4, atol=1e-6),
        rows, expected,
    )  # fmt: skip


def test_evaluate_counts_top1_and_top5_over_every_example_once():
    dataset = data.load("digits")
    images, labels = dataset.test_images[:37], dataset.test_labels[:37]  # padded last batch
    model = models.get("cnn_small", num_classes=10)
    variables = train.init_model(model, images.shape[1:], jax.random.key(3))
    logits = np.asarray(model.apply(variables, data.normalize(images)))
    ranks = (logits > logits[np.arange(37), labels][:, None]).sum(-1)
    subset = dataclasses.replace(dataset, test_images=images, test_labels=labels)
    mesh = parallel.make_mesh(fsdp=1)
    result = train.evaluate(model, variables, subset, batch_size=16, mesh=mesh)
    assert result["test_accuracy"] == pytest.approx(np.mean(ranks == 0))
    assert result["test_top5_accuracy"] == pytest.approx(np.mean(ranks < 5))


def test_checkpoint_paths_keep_urls_and_absolutize_local_dirs():
    assert checkpoint.resolve("gs://bucket/runs/r18") == "gs://bucket/runs/r18"
    assert checkpoint.resolve("runs/x") == os.path.abspath("runs/x")
