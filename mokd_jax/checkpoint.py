"""Orbax checkpoints that know which configuration wrote them.

Each checkpoint step holds two items: `state` (the train state pytree) and `fingerprint`
(a JSON dict of the configuration fields that shape the trajectory). Resuming compares the
fingerprint first and refuses a workdir written by a different configuration, before
anything is restored or saved, so saved work is never overwritten by an unrelated run.
The teacher and the student each have a manager (a directory) of their own: the teacher is
never written into the student's checkpoints. A newest step that cannot be read (damaged
files) does not end the run: the next older one is restored and the damaged one is kept
aside as `<step>.corrupt` (see `restore_latest`).
"""

import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mokd_jax.errors import InputError, invalid

ITEMS = ("state", "fingerprint")
_SET_ASIDE_CALLS = itertools.count()  # every process calls set_aside in the same order


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
    """The newest readable state in `manager` (None when it holds no step), after checking
    that the configuration that wrote it is the current one (`fingerprint`).

    Steps are tried newest first. A step whose fingerprint or state cannot be read (damaged
    or truncated files: any exception but the InputError of a different configuration,
    which is raised as before, with nothing written) is logged as a warning, one line
    naming the step, the directory and the reason, and the next older step is tried.

    The damaged steps newer than the one restored are moved aside, not deleted: step
    directory `<step>` becomes `<step>.corrupt` (`<step>.corrupt-2`, ... when taken) in the
    same directory, where the user can inspect it and Orbax no longer sees a step. Leaving
    it in place would break the run that follows: Orbax's manager skips every periodic save
    at or below its newest step (so nothing would be saved from the resumed step up to the
    damaged one), and the forced save at the damaged step's number raises
    StepAlreadyExistsError. Nothing is moved when no step is readable: that raises
    InputError naming the directory. A rename that fails raises InputError too, naming the
    step to move by hand. On several processes only process 0 moves the directories and
    the others wait for it; every process must see the same damage (shared storage): a step
    that one process reads and another cannot leaves the first waiting in Orbax's restore
    barrier until it times out.
    """
    directory = str(manager.directory)
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            check_fingerprint(manager, step, fingerprint)
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except InputError:
            raise
        except Exception as error:  # any unreadable step: try an older one
            logging.warning(
                "checkpoint step %d in %s cannot be read, skipping it: %s",
                step,
                directory,
                one_line(error),
            )
            damaged.append(step)
            continue
        if damaged:
            moved = set_aside(manager, damaged)
            logging.warning(
                "resumed from checkpoint step %d in %s instead of the unreadable step(s) %s, "
                "moved aside to %s",
                step,
                directory,
                ", ".join(map(str, damaged)),
                ", ".join(moved),
            )
        return restored.state
    if damaged:
        raise invalid(
            "workdir",
            directory,
            "a directory with a readable checkpoint, but none of its steps "
            f"({', '.join(map(str, damaged))}) can be read (the warnings above say why): "
            "move them out of it to start afresh, or use a new --workdir",
        )
    return None


def one_line(error: BaseException, limit: int = 500) -> str:
    """`Type: message` on one line, cut at `limit` characters, without the TensorStore spec
    (a long JSON tail) that TensorStore's read errors end with."""
    message = " ".join(str(error).split())
    message = re.sub(r"\s*\[tensorstore_spec=.*$", "", message)
    text = f"{type(error).__name__}: {message}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
    """Renames each step directory to `<step>.corrupt` (or `<step>.corrupt-N` when taken)
    and makes `manager` forget the steps; returns the new names.

    On several processes every process picks the same names (all of them look before
    process 0 renames anything), process 0 renames, and the others wait until it is done.
    """
    root = epath.Path(manager.directory)
    barrier = f"mokd_jax_set_aside_{next(_SET_ASIDE_CALLS)}"  # unique, the same everywhere
    moved = []
    for step in steps:
        target = root / f"{step}.corrupt"
        suffix = 2
        while target.exists():
            target = root / f"{step}.corrupt-{suffix}"
            suffix += 1
        moved.append(target)
    ocp.multihost.sync_global_processes(barrier + "_named")  # all looked: now process 0 moves
    if ocp.multihost.process_index() == 0:
        for step, target in zip(steps, moved, strict=True):
            try:
                (root / str(step)).rename(target)
            except Exception as error:
                raise invalid(
                    "workdir",
                    str(root),
                    f"a directory where the unreadable checkpoint step {step} can be moved "
                    f"aside to {target.name} ({one_line(error)}): move it out by hand",
                ) from error
    ocp.multihost.sync_global_processes(barrier + "_moved")
    manager.reload()
    return [target.name for target in moved]


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
