"""The detection phases end to end (`mokd_jax.detection.phases` through
`train.train_and_evaluate`) on configs/detection.py's smoke run: the shapes set at 32 px,
2 teacher and 2 student steps of the lightest RetinaNets (`detection.shrink_to_smoke`).
The run compiles a teacher step, a distillation step and the evaluation program, so it is
slow; the rerun reuses the run's workdir and, through the session's compilation cache, its
programs. The fast tier checks the configs and the `task` field.
"""

import json
import os

import pytest

from configs import detection
from mokd_jax import config_checks, phase_runner, train
from mokd_jax.detection import coco_eval, phases
from mokd_jax.errors import InputError


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_detection_configs_pass_the_checks(arg):
    config = detection.get_config(arg)
    config_checks.check_config(config)
    assert config.task == "detection"


def test_an_unknown_task_is_refused_before_anything_is_written(tmp_path):
    config = detection.get_config("smoke")
    config.task = "segmentation"
    with pytest.raises(InputError, match=r"task.*'segmentation'.*classification.*detection"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A complete smoke run in its own workdir."""
    workdir = str(tmp_path_factory.mktemp("detection"))
    summary = train.train_and_evaluate(detection.get_config("smoke"), workdir)
    return workdir, summary


@pytest.mark.slow
def test_smoke_run_writes_ap_summary_checkpoints_and_results(finished_run):
    workdir, summary = finished_run
    with open(os.path.join(workdir, "summary.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert saved["task"] == "detection"
    best = saved["student"]["best"]
    assert set(best) == set(phases.BEST_KEYS)
    for figures in (saved["teacher"], saved["student"], best):
        for key in phases.COCO_KEYS:
            assert -1.0 <= figures[key] <= 1.0, key  # COCOeval's -1: no object of that size
    assert best["test_ap"] >= saved["student"]["test_ap"]
    for name in (
        "teacher",
        "student",
        "student_best",
        "checkpoints/teacher",
        "checkpoints/student",
    ):
        assert os.path.isdir(os.path.join(workdir, name)), name

    with open(os.path.join(workdir, phases.RESULTS_FILE)) as f:
        results = json.load(f)
    # After 2 steps a few scores pass the post-processing's 0.05 threshold.
    assert results, "the student detects nothing"
    ground_truth = phases.load_dataset(detection.get_config("smoke")).ground_truth()
    coco_eval.check_results_match(ground_truth, results)  # known image and category ids
    for result in results:
        assert set(result) == {"image_id", "category_id", "bbox", "score"}
        assert len(result["bbox"]) == 4 and result["bbox"][2] >= 0 and result["bbox"][3] >= 0


@pytest.mark.slow
def test_a_rerun_resumes_without_training_again(finished_run, monkeypatch):
    workdir, summary = finished_run
    phases_run = []
    run_phase = phase_runner.run_phase

    def recording_run_phase(name, state, *args, **kwargs):
        phases_run.append((name, int(state.step)))
        return run_phase(name, state, *args, **kwargs)

    monkeypatch.setattr(phase_runner, "run_phase", recording_run_phase)
    again = train.train_and_evaluate(detection.get_config("smoke"), workdir)
    steps = detection.get_config("smoke").student.num_train_steps
    assert phases_run == [("student", steps)]  # the teacher restored, the student finished
    for role in ("teacher", "student"):
        for key in phases.COCO_KEYS:
            assert again[role][key] == summary[role][key], (role, key)
    assert again["student"]["best"] == summary["student"]["best"]
