"""mokd_jax.loop: one phase's loop with a trivial step, a real checkpoint manager and a
recording writer: every step's metrics written at its own step, means returned, periodic
saves, a preemption notice saving the current step before stopping, and evaluations on the
way that see the state after their step and change nothing."""

import jax.numpy as jnp
import numpy as np
import pytest

from mokd_jax import checkpoint, loop
from mokd_jax.state import TrainState


class RecordingWriter:
    """The parts of a CLU metric writer that the loop and CLU's progress report use."""

    def __init__(self):
        self.scalars: dict[str, dict[int, float]] = {}

    def write_scalars(self, step, scalars):
        for key, value in scalars.items():
            self.scalars.setdefault(key, {})[int(step)] = float(value)

    def flush(self):
        pass


def counting_state() -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={"w": jnp.zeros(())},
        batch_stats={},
        constants={},
        opt_state=(),
    )


def counting_step(state, images, labels):
    """Adds the batch's mean to w; the metric is the new w."""
    w = state.params["w"] + jnp.mean(images)
    return state.replace(step=state.step + 1, params={"w": w}), {"w": w}


def batches():
    value = 0.0
    while True:
        value += 1.0
        yield np.full((2,), value, np.float32), np.zeros((2,), np.int32)


def run(tmp_path, state, writer, num_steps=6):
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), save_every_steps=2, max_to_keep=5)
    try:
        return loop.run_phase(
            "test", state, counting_step, batches(), num_steps, manager, {"k": 1}, writer, 4
        ), manager.all_steps()
    finally:
        manager.close()


def test_every_step_is_written_at_its_own_step_and_the_means_returned(tmp_path):
    writer = RecordingWriter()
    (state, means), saved = run(tmp_path, counting_state(), writer)
    expected = np.cumsum(np.arange(1.0, 7.0))  # w after each step
    assert writer.scalars["w"] == dict(zip(range(1, 7), expected.tolist(), strict=True))
    assert means["w"] == pytest.approx(expected.mean())
    assert int(state.step) == 6 and {2, 4, 6} <= set(saved)


def test_a_preemption_notice_saves_the_current_step_and_raises(tmp_path):
    loop.PREEMPTION.set()
    try:
        with pytest.raises(loop.Preempted, match="test preempted at step 1"):
            run(tmp_path, counting_state(), RecordingWriter())
    finally:
        loop.PREEMPTION.clear()
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), 2, 5)
    assert manager.all_steps() == [1]
    manager.close()


def test_format_metrics_is_sorted_and_short():
    assert loop.format_metrics({"b": 0.123456, "a": 2}) == "a=2 b=0.1235"


def run_with_evaluation(tmp_path, every_steps, evaluated):
    """`run` with an evaluation appending the step and the w it saw to `evaluated`;
    returns (state, writer)."""

    def evaluate(step, state):
        evaluated.append((step, float(state.params["w"])))
        return {"test_accuracy": step / 10}

    writer = RecordingWriter()
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), save_every_steps=2, max_to_keep=5)
    try:
        state, _ = loop.run_phase(
            "test", counting_state(), counting_step, batches(), 6, manager, {"k": 1},
            writer, 4, loop.Evaluation(every_steps, evaluate),
        )  # fmt: skip
    finally:
        manager.close()
    return state, writer


def test_evaluation_runs_every_n_steps_and_at_the_end_without_changing_the_state(tmp_path):
    (plain, _), _ = run(tmp_path / "plain", counting_state(), RecordingWriter())
    evaluated = []
    state, writer = run_with_evaluation(tmp_path / "evaluated", 4, evaluated)
    w_after = np.cumsum(np.arange(1.0, 7.0))
    assert evaluated == [(4, w_after[3]), (6, w_after[5])]  # the state after that step
    assert writer.scalars["test_accuracy"] == {4: 0.4, 6: 0.6}
    assert float(state.params["w"]) == float(plain.params["w"])


def test_a_preemption_at_an_evaluation_step_evaluates_before_stopping(tmp_path):
    evaluated = []
    loop.PREEMPTION.set()
    try:
        with pytest.raises(loop.Preempted, match="at step 1"):
            run_with_evaluation(tmp_path, 1, evaluated)
    finally:
        loop.PREEMPTION.clear()
    assert evaluated == [(1, 1.0)]
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), 2, 5)
    assert manager.all_steps() == [1]
    manager.close()
