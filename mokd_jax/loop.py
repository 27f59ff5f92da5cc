"""The training loop of one phase: steps, TensorBoard, progress, checkpoints, preemption.

This is where the I/O lives (TensorBoard events through `mokd_jax.events`, progress notes
through CLU's `platform`, Orbax's checkpoint manager); the steps it runs are the pure
functions of `mokd_jax.steps`. Nothing here imports TensorFlow: a run whose data needs none
starts without it.
"""

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
from absl import logging
from clu import platform

from mokd_jax import checkpoint, parallel
from mokd_jax.events import EventWriter, NoWriter
from mokd_jax.state import TrainState

PREEMPTION = threading.Event()
"""Set by the SIGTERM handler of `mokd_jax.main`: the loop then saves and stops."""


class Preempted(Exception):
    """Training stopped early on a preemption notice, after saving a checkpoint."""

    def __init__(self, phase: str, step: int):
        super().__init__(f"{phase} preempted at step {step}; its checkpoint is saved")
        self.phase = phase
        self.step = step


def initial_state(
    create: Callable, seed: int, manager, fingerprint, mesh, fsdp_min_size: int, phase: str
) -> tuple[TrainState, Any]:
    """The phase's state, sharded over the mesh: restored from its newest checkpoint, or
    created directly in its shardings (`jit(create, out_shardings=...)`, so no device ever
    holds a full unsharded copy). Returns (state, its shardings)."""
    abstract = jax.eval_shape(create, jax.random.key(0))
    shardings = parallel.tree_shardings(mesh, abstract, fsdp_min_size)
    state = checkpoint.restore_latest(
        manager, parallel.with_shardings(abstract, shardings), fingerprint
    )
    if state is None:
        state = jax.jit(create, out_shardings=shardings)(jax.random.key(seed))
    else:
        logging.info("%s: resuming from step %d", phase, int(state.step))
    return state, shardings


class Evaluation(NamedTuple):
    """What `run_phase` evaluates on the way: `evaluate(step, state)` -> scalars (e.g.
    top-1 / top-5), every `every_steps` steps and at the last step."""

    every_steps: int
    evaluate: Callable[[int, TrainState], Mapping[str, float]]


def run_phase(
    name: str,
    state: TrainState,
    step_fn: Callable[..., tuple[TrainState, dict]],
    batches: Iterator[tuple[Any, ...]],
    num_steps: int,
    manager,
    fingerprint: Mapping[str, Any],
    writer,
    log_every_steps: int,
    evaluation: Evaluation | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Runs `step_fn` from `state.step` to `num_steps`, saving and logging on the way.

    Each item of `batches` is the tuple of the step's batch arguments, whatever the task:
    classification's (images, labels), detection's (DetectionBatch,); the loop only passes
    them on, `step_fn(state, *batch)`.

    Every step's metrics go to `writer` with their own step number, but they are fetched
    from the device once per `log_every_steps`, so the loop never waits on the device each
    step; the log gets one line per `log_every_steps` and a progress note (steps/s, ETA;
    `ProgressReport`). A preemption notice (SIGTERM in a single-process run, see `PREEMPTION`; on
    several hosts Orbax's `reached_preemption`, which every host agrees on) saves the
    state at the current step and raises `Preempted`. Returns the final state and the mean
    of each metric over the steps run here.

    With an `evaluation`, its `evaluate(step, state)` runs every `every_steps` steps and at
    `num_steps`, after the step and before the checkpoint (so a preemption never skips
    one); its results go to `writer` and the log (`report_evaluation`). It reads the state
    and changes nothing, so the trajectory is the same with or without it. It first waits
    for a checkpoint still being written: an evaluation opens an input pipeline and may
    export the best student, neither of which should race a save in the background (TFDS's
    mock data, for one, swaps the process's file system while it opens a pipeline); there
    are a few evaluations per run, so the wait costs little.
    """
    first_step = int(state.step)
    writer.start_session(first_step + 1)
    report = ProgressReport(num_steps, writer, log_every_steps, every_secs=30.0)
    pending: list[tuple[int, dict]] = []
    sums: dict[str, float] = {}
    for step in range(first_step + 1, num_steps + 1):
        state, metrics = step_fn(state, *next(batches))
        pending.append((step, metrics))
        report(step)
        if step % log_every_steps == 0 or step == num_steps:
            for logged_step, logged in jax.device_get(pending):
                writer.write_scalars(logged_step, logged)
                for key, value in logged.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
            logging.info("%s step %d/%d: %s", name, step, num_steps, format_metrics(logged))
            writer.flush()
            pending = []
        if evaluation is not None and (step % evaluation.every_steps == 0 or step == num_steps):
            manager.wait_until_finished()
            report_evaluation(writer, name, step, num_steps, evaluation.evaluate(step, state))
        preempted = preemption_noticed(manager, step)
        checkpoint.save(manager, step, state, fingerprint, force=step == num_steps or preempted)
        if preempted:
            manager.wait_until_finished()
            writer.flush()
            raise Preempted(name, step)
    manager.wait_until_finished()
    writer.flush()
    steps_run = max(num_steps - first_step, 1)
    return state, {key: total / steps_run for key, total in sums.items()}


def report_evaluation(
    writer, name: str, step: int, num_steps: int, results: Mapping[str, float]
) -> None:
    """An evaluation's results as TensorBoard scalars at `step` and one line of the log."""
    writer.write_scalars(step, results)
    writer.flush()
    logging.info("%s step %d/%d evaluation: %s", name, step, num_steps, format_metrics(results))


def preemption_noticed(manager, step: int) -> bool:
    if jax.process_count() > 1:
        return manager.reached_preemption(step)
    return PREEMPTION.is_set()


def phase_writer(workdir: str, phase: str) -> EventWriter | NoWriter:
    """TensorBoard events of one phase in WORKDIR/tensorboard/<phase> (process 0 only)."""
    if jax.process_index() > 0:
        return NoWriter()
    return EventWriter(os.path.join(workdir, "tensorboard", phase))


class ProgressReport:
    """Steps per second and the time left, every `every_steps` steps, after `every_secs`
    seconds without a report, and at the last step.

    Each report covers the steps since the previous one: the first call only starts the
    clock, so the first step's compilation is left out of every rate. A report is a CLU
    work-unit note (a log line when run locally, the job's status on a cluster that shows
    notes) and the scalars `steps_per_sec` and `uptime` (seconds since the first call) at
    that step, the tags CLU's `ReportProgress` wrote before.
    """

    def __init__(
        self,
        num_steps: int,
        writer,
        every_steps: int,
        every_secs: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.num_steps = num_steps
        self.writer = writer
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.clock = clock
        self.started: float | None = None
        self.last: tuple[int, float] | None = None

    def due(self, step: int, now: float) -> bool:
        last_step, last_time = self.last
        if step == last_step:
            return False
        return (
            step % self.every_steps == 0
            or now - last_time > self.every_secs
            or step == self.num_steps
        )

    def __call__(self, step: int) -> bool:
        """Reports at `step` if one is due; returns whether it did."""
        now = self.clock()
        if self.last is None:
            self.started, self.last = now, (step, now)
            return False
        if not self.due(step, now):
            return False
        last_step, last_time = self.last
        rate = (step - last_step) / max(now - last_time, 1e-9)
        left = (self.num_steps - step) / rate
        platform.work_unit().set_notes(
            f"{rate:.1f} steps/s, {100 * step / self.num_steps:.1f}% ({step}/{self.num_steps}),"
            f" ETA: {format_duration(left)}"
        )
        self.writer.write_scalars(step, {"steps_per_sec": rate, "uptime": now - self.started})
        self.last = (step, now)
        return True


def format_duration(seconds: float) -> str:
    """h:mm:ss, e.g. 1:02:03."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={float(value):.4g}" for key, value in sorted(metrics.items()))
