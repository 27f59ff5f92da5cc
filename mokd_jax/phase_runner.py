"""One training phase of a run, whatever the task: `train_phase(config, workdir, mesh, phase)`.

A phase (the teacher's or the student's, classification's or detection's) opens its
checkpoint manager (WORKDIR/checkpoints/<name>), resumes its state from the newest
checkpoint or creates it, compiles its step over the mesh, runs `loop.run_phase` with
evaluations on the way (`evaluation_interval`) and ends with the metrics of its last step.
What differs between tasks and phases is a `Phase`: the state's constructor, the pure
step, the batches and the evaluation (classification's accuracies or detection's COCO AP;
the best student's export through `BestStudent`).
"""

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import logging
from etils import epath

from mokd_jax import checkpoint, parallel
from mokd_jax.loop import Evaluation, initial_state, phase_writer, run_phase
from mokd_jax.state import TrainState

EVALUATIONS_PER_RUN = 4


def evaluation_interval(config: ml_collections.ConfigDict, role: str) -> int:
    """How often the teacher's or student's (`role`) phase evaluates its network:
    `eval_every_steps` when set; automatically (0), once per epoch where the phase's recipe
    is epoch-based (`steps_per_epoch`, which `config_helpers.set_phase` records: the TFDS
    configs), else `EVALUATIONS_PER_RUN` times per run (digits and npz: their configs count
    steps, not epochs, and an epoch is a few steps, so evaluating every epoch would cost
    more than training)."""
    section = config[role]
    if config.eval_every_steps:
        return config.eval_every_steps
    if section.steps_per_epoch:
        return section.steps_per_epoch
    return max(1, section.num_train_steps // EVALUATIONS_PER_RUN)


class PhaseEvaluation:
    """Evaluates a phase's network (`evaluate(step, state)`, what `loop.Evaluation` runs)
    and keeps the latest result, so the summary reuses the evaluation of the last step
    instead of evaluating the network again; `keep(step, variables, metrics)`, when given,
    sees every result (the best student's export). `evaluator(variables)` gives the
    metrics (classification's accuracies; detection's COCO AP)."""

    def __init__(
        self,
        evaluator: Callable[[dict], dict[str, float]],
        variables_of: Callable[[TrainState], dict],
        keep: Callable[[int, dict, dict], None] | None = None,
    ):
        self.evaluator, self.variables_of, self.keep = evaluator, variables_of, keep
        self.step: int | None = None
        self.metrics: dict[str, float] = {}

    def evaluate(self, step: int, state: TrainState) -> dict[str, float]:
        variables = self.variables_of(state)
        self.step, self.metrics = step, self.evaluator(variables)
        if self.keep is not None:
            self.keep(step, variables, self.metrics)
        return self.metrics

    def at_step(self, step: int, state: TrainState) -> dict[str, float]:
        """The metrics at `step`: the latest result when it is that step's (the loop
        evaluated it), else evaluated now (a resumed phase with no step left to run)."""
        return self.metrics if self.step == step else self.evaluate(step, state)


class BestStudent:
    """The student with the best `metric` so far (classification's top-1, detection's AP),
    exported to `directory` (WORKDIR/student_best) with its step and the `keys` of its
    evaluation in its identity.

    The identity is also the memory: a resumed run reads the best so far from it, so a
    preemption forgets nothing. Only a strictly better metric replaces it (the earliest of
    equals is kept), so a resumed run, which evaluates the steps after its checkpoint
    again with bitwise the same states, exports nothing new until it passes the best, and
    ends with the same best as an uninterrupted run.
    """

    def __init__(
        self,
        directory: str,
        identity: Mapping[str, Any],
        keys: tuple[str, ...],
        metric: str,
    ):
        self.directory, self.identity, self.metric = directory, dict(identity), metric
        saved = checkpoint.read_identity(directory) if epath.Path(directory).is_dir() else None
        self.best = None if saved is None else {key: saved[key] for key in keys}

    def keep(self, step: int, variables: dict, metrics: Mapping[str, float]) -> None:
        """Exports `variables` when their `metric` beats the best so far."""
        if self.best is not None and metrics[self.metric] <= self.best[self.metric]:
            return
        self.best = {"step": step, **metrics}
        checkpoint.export_variables(self.directory, variables, {**self.identity, **self.best}, step)
        logging.info("student: best so far at step %d, exported to %s", step, self.directory)


class Phase(NamedTuple):
    """What one phase trains and how; `train_phase` runs it.

    `name` is 'teacher' or 'student': the config section (`num_train_steps`, the evaluation
    interval) and the folders of its checkpoints and TensorBoard events. `create(key)`
    builds the state (initialised from `seed`); `fingerprint` is checked against a
    checkpoint before it is resumed. `step(state, *constants, *batch)` is the pure step,
    jitted here over the mesh: `constants` are arrays every step reads and none changes
    (the student's teacher variables), `batch_arguments` how many batch pytrees it takes
    (classification's images and labels: 2; detection's `DetectionBatch`: 1).
    `batches(start_step)` yields the global batches from `start_step` on, each the tuple of
    the step's batch arguments. `evaluation` evaluates the network on the way and at the
    end. `prepare(state, shardings)`, when given, sees the created or resumed state before
    the first step (detection starts a fresh state from a converted ImageNet backbone).
    """

    name: str
    seed: int
    fingerprint: Mapping[str, Any]
    create: Callable[[jax.Array], TrainState]
    step: Callable[..., tuple[TrainState, dict]]
    batches: Callable[[int], Iterator[tuple[Any, ...]]]
    evaluation: PhaseEvaluation
    constants: tuple[Any, ...] = ()
    batch_arguments: int = 2
    prepare: Callable[[TrainState, Any], TrainState] | None = None


def train_phase(
    config: ml_collections.ConfigDict, workdir: str, mesh, phase: Phase
) -> tuple[dict, dict[str, float], dict[str, float]]:
    """Runs `phase` to its section's `num_train_steps`, resuming from its checkpoints, and
    returns (the network's variables at the last step, as `phase.evaluation.variables_of`
    reads them; their evaluation metrics, the loop's own when it evaluated that step; the
    means of the step metrics logged here)."""
    manager = checkpoint.open_manager(
        os.path.join(workdir, "checkpoints", phase.name),
        config.checkpoint_every_steps,
        config.max_checkpoints_to_keep,
    )
    state, shardings = initial_state(
        phase.create,
        phase.seed,
        manager,
        phase.fingerprint,
        mesh,
        config.mesh.fsdp_min_size,
        phase.name,
    )
    if phase.prepare is not None:
        state = phase.prepare(state, shardings)
    compiled = parallel.compiled_step(
        phase.step,
        shardings,
        mesh,
        extra_shardings=parallel.variables_sharding(phase.constants),
        batch_arguments=phase.batch_arguments,
    )
    num_steps = config[phase.name].num_train_steps
    writer = phase_writer(workdir, phase.name)
    try:
        state, means = run_phase(
            phase.name,
            state,
            lambda current, *batch: compiled(current, *phase.constants, *batch),
            phase.batches(int(state.step)),
            num_steps,
            manager,
            phase.fingerprint,
            writer,
            config.log_every_steps,
            Evaluation(evaluation_interval(config, phase.name), phase.evaluation.evaluate),
        )
    finally:
        writer.close()
    manager.close()
    metrics = phase.evaluation.at_step(num_steps, state)
    return phase.evaluation.variables_of(state), metrics, means
