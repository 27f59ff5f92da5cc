"""Orbax checkpoints that know which configuration wrote them.

Each checkpoint step holds two items: `state` (the train state pytree) and `fingerprint`
(a JSON dict of the configuration fields that shape the trajectory). Resuming compares the
fingerprint first and refuses a workdir written by a different configuration, before
anything is restored or saved, so saved work is never overwritten by an unrelated run.
The teacher and the student each have a manager (a directory) of their own: the teacher is
never written into the student's checkpoints.
"""

import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from mokd_jax.errors import InputError, invalid

ITEMS = ("state", "fingerprint")


def resolve(directory: str) -> str:
    """A local directory made absolute (Orbax needs that); a URL such as gs://bucket/dir
    (a TPU pod's shared workdir, which Orbax and TensorFlow's file system read) unchanged."""
    return directory if "://" in directory else os.path.abspath(directory)


def open_manager(directory: str, save_every_steps: int, max_to_keep: int) -> ocp.CheckpointManager:
    """A manager that saves every `save_every_steps` steps and keeps the newest few."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every_steps, max_to_keep=max_to_keep, create=True
    )
    return ocp.CheckpointManager(resolve(directory), options=options, item_names=ITEMS)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    fingerprint: Mapping[str, Any],
    force: bool = False,
) -> None:
    """Saves `state` with its configuration fingerprint (when the interval is due or forced)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), fingerprint=ocp.args.JsonSave(dict(fingerprint))
        ),
        force=force,
    )


def differing_fields(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields whose values differ, e.g. ['student.learning_rate: 0.1 -> 0.2']."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += [f"{key}.{d}" for d in differing_fields(old, new)]
        elif old != new:
            differences.append(f"{key}: {old!r} -> {new!r}")
    return differences


def check_fingerprint(
    manager: ocp.CheckpointManager, step: int, current: Mapping[str, Any]
) -> None:
    """Raises InputError when checkpoint `step` was written by a different configuration."""
    saved = manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
    differences = differing_fields(saved.fingerprint, normalize_json(current))
    if differences:
        raise InputError(
            f"workdir={str(manager.directory)!r} is not allowed: it holds a checkpoint "
            f"(step {step}) of a different configuration ({'; '.join(differences[:5])}); "
            "use a new --workdir or the configuration that wrote it"
        )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, fingerprint: Mapping[str, Any]
) -> Any | None:
    """The newest state in `manager` (None when empty), after checking its fingerprint."""
    step = manager.latest_step()
    if step is None:
        return None
    check_fingerprint(manager, step, fingerprint)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored.state


def normalize_json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, keys strings)."""
    if isinstance(value, Mapping):
        return {str(k): normalize_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalize_json(v) for v in value]
    return value


def export_variables(
    directory: str, variables: Mapping[str, Any], identity: Mapping[str, Any], step: int
) -> None:
    """Writes model variables ({'params', 'batch_stats'}) and what they are (`identity`:
    model name, class count) as a checkpoint of their own, at `step` (the training steps
    that made them). Exporting the same step again is a no-op."""
    manager = open_manager(directory, save_every_steps=1, max_to_keep=1)
    if manager.latest_step() != step:
        save(manager, step, dict(variables), identity, force=True)
        manager.wait_until_finished()
    manager.close()


def read_identity(directory: str) -> dict | None:
    """The identity dict saved with exported variables, or None when there is no checkpoint."""
    with ocp.CheckpointManager(resolve(directory), item_names=ITEMS) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        return manager.restore(
            step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())
        ).fingerprint


def load_variables(directory: str) -> dict:
    """The exported variables in `directory`: a dict with `params` (and `batch_stats`)."""
    with ocp.CheckpointManager(resolve(directory), item_names=ITEMS) as manager:
        step = manager.latest_step()
        if step is None:
            raise invalid("checkpoint_dir", directory, "a directory holding an exported checkpoint")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return dict(restored.state)
