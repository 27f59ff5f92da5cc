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
    """The parts of `events.EventWriter` that the loop and its progress report use."""

    def __init__(self):
        self.scalars: dict[str, dict[int, float]] = {}
        self.session_starts: list[int] = []

    def start_session(self, step):
        self.session_starts.append(int(step))

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
    assert writer.session_starts == [1]


def test_a_resumed_phase_marks_where_it_starts_again(tmp_path):
    """Run to step 6, then again to 8 from the newest checkpoint: the second session starts
    at step 7, so readers drop whatever the first logged from there on."""
    run(tmp_path, counting_state(), RecordingWriter())
    manager = checkpoint.open_manager(str(tmp_path / "ckpt"), save_every_steps=2, max_to_keep=5)
    resumed = checkpoint.restore_latest(manager, counting_state(), {"k": 1})
    manager.close()
    writer = RecordingWriter()
    run(tmp_path, resumed, writer, num_steps=8)
    assert writer.session_starts == [7] and sorted(writer.scalars["w"]) == [7, 8]


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


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_reports_every_n_steps_after_a_quiet_spell_and_at_the_end():
    """The first call starts the clock (its step compiled: not timed). Steps 2-4 take 1 s
    each; step 5 is not due; step 6 comes 40 s later (over every_secs); step 7 is the
    last."""
    clock, writer = Clock(), RecordingWriter()
    report = loop.ProgressReport(7, writer, every_steps=4, every_secs=30.0, clock=clock)
    reported = []
    for step, seconds in [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1), (6, 40), (7, 2)]:
        clock.now += seconds
        reported.append(report(step))
    assert reported == [False, False, False, True, False, True, True]
    assert writer.scalars["steps_per_sec"] == pytest.approx({4: 1.0, 6: 2 / 41, 7: 0.5})
    assert writer.scalars["uptime"] == pytest.approx({4: 3.0, 6: 44.0, 7: 46.0})


def test_progress_note_has_the_rate_the_share_done_and_the_time_left(monkeypatch):
    notes = []
    monkeypatch.setattr(loop.platform, "work_unit", lambda: type("Unit", (), {
        "set_notes": staticmethod(notes.append)})())  # fmt: skip
    clock = Clock()
    report = loop.ProgressReport(
        1000, RecordingWriter(), every_steps=10, every_secs=30.0, clock=clock
    )
    report(0)
    clock.now += 5.0
    report(10)
    assert notes == ["2.0 steps/s, 1.0% (10/1000), ETA: 0:08:15"]


def test_format_duration():
    assert loop.format_duration(0.4) == "0:00:00"
    assert loop.format_duration(3723.4) == "1:02:03"
