"""The diagnostics plot on a real smoke run, and mokd_jax.compare (`mokd-compare`): its
maths, its report, its methods' recipes, and one end-to-end comparison that shares one teacher."""

import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from configs import cifar100, default
from mokd_jax import compare, plots
from mokd_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """`python -m mokd_jax.compare` end to end on the smoke config: kd and mokd, seeds 0
    and 1.

    Its runs are complete `train.train_and_evaluate` smoke runs, so the plot tests read their
    events too: one teacher and one set of compilations serve the whole module.
    """
    workdir = tmp_path_factory.mktemp("compare")
    run = subprocess.run(
        [
            sys.executable, "-m", "mokd_jax.compare", "--config=configs/default.py:smoke",
            "--methods=kd,mokd", "--seeds=0,1", f"--workdir={workdir}",
        ],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir, run.stdout


@pytest.fixture(scope="module")
def student_events(comparison):
    """The student's TensorBoard events of one complete smoke run (mokd, seed 0)."""
    workdir, _ = comparison
    return str(workdir / "mokd" / "seed0" / "tensorboard" / "student")


# ----------------------------------------------------------------------------- plots


@pytest.mark.slow
def test_read_scalars_returns_every_step_of_each_tag(student_events):
    scalars = plots.read_scalars(student_events)
    steps, values = scalars["cos_task_distill"]
    np.testing.assert_array_equal(steps, np.arange(1, 21))
    assert np.all(np.abs(values) <= 1.0)
    for tag in ("loss_task", "loss_distill", "weight_task", "weight_distill"):
        assert len(scalars[tag][0]) == 20, tag
        assert np.all(np.isfinite(scalars[tag][1])), tag


@pytest.mark.slow
def test_plot_diagnostics_writes_a_four_panel_png(student_events, tmp_path):
    path = str(tmp_path / "diagnostics.png")
    assert plots.plot_diagnostics(student_events, path, title="smoke") == path
    assert 20_000 < os.path.getsize(path) < 2_000_000
    height, width, _ = image.imread(path).shape
    assert (width, height) == (1200, 800)


def test_moving_average_is_trailing_and_keeps_the_start():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(plots.moving_average(values, 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(plots.moving_average(values, 1), values)
    assert plots.smoothing_window(20) == 1 and plots.smoothing_window(1000) == 20


# ----------------------------------------------------------------------------- compare


def result(method, seed, accuracy, steps_per_sec=50.0, mean_cos=0.5, conflict=0.0):
    return compare.RunResult(method, seed, accuracy, steps_per_sec, mean_cos, conflict, 1.0)


def test_summarise_gives_mean_and_sample_std_per_method_in_order():
    rows = compare.summarise(
        [
            result("mokd", 0, 0.95, steps_per_sec=float("nan")),
            result("kd", 0, 0.90, steps_per_sec=40.0, conflict=0.1),
            result("kd", 1, 0.92, steps_per_sec=50.0, conflict=0.2),
            result("kd", 2, 0.94, steps_per_sec=60.0, conflict=0.3),
        ]
    )
    assert [row.method for row in rows] == ["mokd", "kd"]
    mokd, kd = rows
    assert mokd.num_seeds == 1 and mokd.accuracy_mean == 0.95 and np.isnan(mokd.accuracy_std)
    assert kd.num_seeds == 3
    np.testing.assert_allclose(
        [kd.accuracy_mean, kd.accuracy_std, kd.steps_per_sec, kd.conflict_fraction],
        [0.92, 0.02, 50.0, 0.2],
    )


def test_markdown_table_formats_percent_and_missing_values():
    rows = compare.summarise(
        [
            result("kd", 0, 0.90, mean_cos=0.6),
            result("kd", 1, 0.94, mean_cos=0.6),
            result("mokd", 0, 0.95, steps_per_sec=float("nan"), conflict=0.25),
        ]
    )
    lines = compare.markdown_table(rows).splitlines()
    assert lines[0].startswith("| method | seeds | student test accuracy (%), mean ± std |")
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| kd | 2 | 92.00 ± 2.83 | 50.0 | 0.600 | 0.000 |"
    assert lines[3] == "| mokd | 1 | 95.00 | n/a | 0.500 | 0.250 |"


def test_method_config_applies_the_recipe_and_seed_to_a_copy():
    base = default.get_config("smoke")
    config = compare.method_config(base, "kd", 3)
    assert config.aggregator == "sum" and tuple(config.aggregation.sum.weights) == (1.0, 1.0)
    assert config.distill.feature_weight == 0.0 and config.seed == 3
    assert base.aggregator == "mokd" and base.distill.feature_weight == 1.0 and base.seed == 0
    assert compare.method_config(base, "pcgrad", 0).aggregator == "pcgrad"


@pytest.mark.parametrize("method", compare.METHODS)
def test_each_method_runs_the_recipe_its_config_arg_selects(method):
    """mokd-compare on a pair's config runs every method as `PAIR,METHOD` would (e.g. dkd
    with the pair's beta 2.0, not the base config's), whatever method the base selected."""
    base = cifar100.get_config("resnet56_resnet20,dkd,smoke")
    expected = cifar100.get_config(f"resnet56_resnet20,{method},smoke")
    expected.seed = 4
    assert compare.method_config(base, method, 4).to_dict() == expected.to_dict()


def test_unknown_method_is_one_clear_error():
    with pytest.raises(InputError, match=r"^methods='nope' is not allowed: one of .*kd_feature"):
        compare.method_config(default.get_config("smoke"), "nope", 0)


def test_a_config_without_recipes_is_one_clear_error():
    base = default.get_config("smoke")
    del base["recipes"]
    with pytest.raises(InputError, match=r"^methods='kd' is not allowed: .*`recipes` section"):
        compare.method_config(base, "kd", 0)


@pytest.mark.parametrize(
    "recipe, named",
    [({"distill.not_yet": 1.0}, "distill.not_yet"), ({"aggregator": "not_yet"}, "not_yet")],
)
def test_recipe_the_config_cannot_take_names_the_method(monkeypatch, recipe, named):
    monkeypatch.setattr(compare.recipes, "method_overrides", lambda recipes, method: recipe)
    with pytest.raises(InputError, match=rf"^methods='kd' is not allowed: .*{named}"):
        compare.method_config(default.get_config("smoke"), "kd", 0)


@pytest.mark.parametrize("method", compare.METHODS)
def test_every_method_builds_on_the_digits_config(method):
    assert compare.method_config(default.get_config("smoke"), method, 1).seed == 1


@pytest.mark.slow
def test_compare_script_shares_one_teacher_and_writes_the_report(comparison):
    workdir, stdout = comparison
    progress = [line for line in stdout.splitlines() if line.startswith("[")]
    assert len(progress) == 4 and progress[-1].startswith("[4/4] mokd seed 1:")
    report = (workdir / "comparison.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| kd |", "| mokd |"))]
    assert len(rows) == 2 and all(" | 2 | " in row and " ± " in row for row in rows)
    assert "Teacher cnn_large: test accuracy" in report
    assert "Command: `mokd-compare --config=configs/default.py:smoke --methods=kd,mokd" in report
    assert "(one checkpoint, shared by every run)" in report
    assert (workdir / "comparison.png").stat().st_size > 1000
    assert (workdir / "teacher" / "checkpoints" / "teacher").is_dir()
    for method in ("kd", "mokd"):
        for seed in (0, 1):
            run_dir = workdir / method / f"seed{seed}"
            assert (run_dir / "summary.json").is_file()
            assert not (run_dir / "checkpoints" / "teacher").exists()  # restored, not trained
