"""mokd_jax.phase_runner: one phase with a trivial step on one device (a real checkpoint
manager, compiled step and TensorBoard writer): the constants reach the step, the loop's
last evaluation is the phase's metrics, a finished phase resumes without stepping; the
evaluation interval rule; the best student kept and remembered."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from test_loop import counting_state

from configs import default
from mokd_jax import checkpoint, parallel, phase_runner
from mokd_jax.state import TrainState


def zero_state(key) -> TrainState:
    """A state of one parameter w = 0 (the key unused)."""
    return counting_state()


def scaled_step(state, scale, images, labels):
    """Adds `scale` times the batch's mean to w; the metric is the new w."""
    w = state.params["w"] + scale * jnp.mean(images)
    return state.replace(step=state.step + 1, params={"w": w}), {"w": w}


def batches_from(start_step: int):
    """Step s's batch is all s (steps count from 1), so a resumed phase sees the same."""
    for step in itertools.count(start_step + 1):
        yield np.full((2,), step, np.float32), np.zeros((2,), np.int32)


def counting_phase(evaluated: list) -> phase_runner.Phase:
    """A 'teacher' phase of `scaled_step` with scale 2, its evaluation recording each w."""

    def evaluator(variables):
        evaluated.append(float(variables["w"]))
        return {"test_accuracy": float(variables["w"])}

    return phase_runner.Phase(
        name="teacher",
        seed=0,
        fingerprint={"k": 1},
        create=zero_state,
        step=scaled_step,
        batches=batches_from,
        evaluation=phase_runner.PhaseEvaluation(evaluator, lambda state: dict(state.params)),
        constants=(jnp.float32(2.0),),
    )


def phase_config():
    config = default.get_config("smoke")
    config.teacher.num_train_steps = 6
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    return config


def test_a_phase_returns_its_last_evaluation_and_a_finished_one_resumes_without_steps(tmp_path):
    config, mesh, evaluated = phase_config(), parallel.make_mesh(1), []
    w_after = 2.0 * np.cumsum(np.arange(1.0, 7.0))  # scale 2 times the batches 1..6
    variables, metrics, means = phase_runner.train_phase(
        config, str(tmp_path), mesh, counting_phase(evaluated)
    )
    assert float(variables["w"]) == w_after[-1]
    assert evaluated == [w_after[2], w_after[5]]  # steps 3 and 6; the last one not repeated
    assert metrics == {"test_accuracy": w_after[-1]}
    assert means["w"] == pytest.approx(w_after.mean())

    evaluated.clear()
    variables, metrics, means = phase_runner.train_phase(
        config, str(tmp_path), mesh, counting_phase(evaluated)
    )
    assert evaluated == [w_after[-1]]  # restored at step 6 and evaluated once, no step run
    assert metrics == {"test_accuracy": w_after[-1]} and means == {}


def test_evaluation_interval_rule():
    config = default.get_config("smoke")  # 20 steps per phase
    assert phase_runner.evaluation_interval(config, "student") == 5  # 4 times per run
    config.student.num_train_steps = 3
    assert phase_runner.evaluation_interval(config, "student") == 1
    config.teacher.steps_per_epoch = 7  # an epoch-based recipe: once per epoch
    assert phase_runner.evaluation_interval(config, "teacher") == 7
    config.eval_every_steps = 2
    assert phase_runner.evaluation_interval(config, "teacher") == 2


def test_the_best_student_is_replaced_only_by_a_better_one_and_remembered(tmp_path):
    directory = str(tmp_path / "student_best")
    keys = ("step", "test_ap")

    def best_student():
        return phase_runner.BestStudent(directory, {"model": "m"}, keys, metric="test_ap")

    best = best_student()
    for step, ap in ((1, 0.2), (2, 0.5), (3, 0.5), (4, 0.1)):
        best.keep(step, {"params": {"w": np.full((2,), float(step))}}, {"test_ap": ap})
    assert best.best == {"step": 2, "test_ap": 0.5}  # the earliest of equals
    assert best_student().best == best.best  # a resumed run reads it from the identity
    assert checkpoint.read_identity(directory) == {"model": "m", "step": 2, "test_ap": 0.5}
    exported = checkpoint.load_variables(directory)["params"]["w"]
    np.testing.assert_array_equal(exported, [2.0, 2.0])
