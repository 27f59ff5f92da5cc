"""mokd_jax.checkpoint: resuming past a damaged newest checkpoint, the configuration
fingerprint, exported variables and paths."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from processes import free_port, two_process_environment

from configs import default
from mokd_jax import checkpoint, train
from mokd_jax.errors import InputError

# A read that TensorStore fails leaves a callback that finds Orbax's event loop closed when
# it runs (Python reports it as unraisable, harmless): the damage tests provoke it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINGERPRINT = {"dataset": "digits", "image_shape": (8, 8, 1), "student": {"lr": 0.1}}
ABSTRACT = {
    "w": jax.ShapeDtypeStruct((6,), jnp.float32),
    "nested": {"b": jax.ShapeDtypeStruct((2, 3), jnp.float32)},
}


def state_at(step: int) -> dict:
    return {
        "w": jnp.arange(6.0, dtype=jnp.float32) * step,
        "nested": {"b": jnp.full((2, 3), float(step), jnp.float32)},
    }


def save_steps(directory, steps, fingerprint=FINGERPRINT, max_to_keep=5):
    manager = checkpoint.open_manager(str(directory), save_every_steps=1, max_to_keep=max_to_keep)
    for step in steps:
        checkpoint.save(manager, step, state_at(step), fingerprint)
    manager.wait_until_finished()
    manager.close()


def reopen(directory):
    return checkpoint.open_manager(str(directory), save_every_steps=1, max_to_keep=5)


def tree_digest(directory) -> str:
    """A hash of every file's relative path and bytes under `directory`."""
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def damage_arrays(step_dir) -> int:
    """Overwrites the array data of a step (the OCDBT manifests and data files under
    `state/`; the JSON metadata is left alone) with garbage; returns the files damaged."""
    damaged = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), step_dir)
            if "ocdbt" in name or f"{os.sep}d{os.sep}" in f"{os.sep}{relative}":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"\x00not an array\xff" * 3)
                damaged += 1
    return damaged


def assert_state(state, step):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), state_at(step))


@pytest.fixture
def absl_warnings(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    return caplog


def ours(caplog) -> list[logging.LogRecord]:
    """The records logged by mokd_jax, not by Orbax (which warns, e.g., when a save waits
    on a loaded machine)."""
    package = os.path.dirname(checkpoint.__file__)
    return [r for r in caplog.records if r.pathname.startswith(package)]


def test_damage_makes_orbax_fail_on_that_step(tmp_path):
    """The damage the other tests use really breaks the restore (else they prove nothing)."""
    save_steps(tmp_path, [1, 2])
    assert damage_arrays(tmp_path / "2") >= 2
    manager = reopen(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - whatever Orbax raises
        manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(ABSTRACT)))
    restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(ABSTRACT)))
    assert_state(restored.state, 1)


def test_empty_directory_restores_nothing(tmp_path):
    assert checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT) is None


def test_newest_step_is_restored(tmp_path, absl_warnings):
    save_steps(tmp_path, [1, 2])
    assert_state(checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT), 2)
    assert not [r for r in ours(absl_warnings) if r.levelno >= logging.WARNING]
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_damaged_newest_step_resumes_from_the_older_one(tmp_path, absl_warnings):
    save_steps(tmp_path, [1, 2, 3])
    damage_arrays(tmp_path / "3")
    damaged_digest = tree_digest(tmp_path / "3")
    manager = reopen(tmp_path)

    assert_state(checkpoint.restore_latest(manager, ABSTRACT, FINGERPRINT), 2)

    warnings = [r.getMessage() for r in absl_warnings.records if r.levelno == logging.WARNING]
    skipped = [m for m in warnings if "cannot be read" in m]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert f"step 3 in {tmp_path}" in skipped[0]
    assert "Error" in skipped[0].split("skipping it:")[1]  # the reason
    resumed = [m for m in warnings if m.startswith("resumed from")]
    assert resumed == [
        f"resumed from checkpoint step 2 in {tmp_path} instead of the unreadable step(s) 3, "
        "moved aside to 3.corrupt"
    ]
    # The damaged step is kept, byte for byte, where Orbax no longer sees a step.
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.corrupt"]
    assert tree_digest(tmp_path / "3.corrupt") == damaged_digest
    assert manager.all_steps() == [1, 2]
    assert reopen(tmp_path).all_steps() == [1, 2]


def test_the_resumed_run_saves_the_damaged_steps_number_again(tmp_path):
    """What moving the damaged step aside is for: the periodic saves after the resumed step
    and the save at the damaged step's own number both happen."""
    save_steps(tmp_path, [1, 2])
    damage_arrays(tmp_path / "2")
    manager = reopen(tmp_path)
    assert_state(checkpoint.restore_latest(manager, ABSTRACT, FINGERPRINT), 1)

    new_state = jax.tree.map(lambda x: x + 100, state_at(2))
    checkpoint.save(manager, 2, new_state, FINGERPRINT)  # periodic (every step), not forced
    manager.wait_until_finished()
    manager.close()

    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt"]
    again = checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), new_state)


def test_a_damaged_step_left_in_place_would_block_the_saves(tmp_path):
    """Why restore_latest moves the damaged step aside (Orbax's behaviour; if it changes,
    leaving the damaged step in place may become an option)."""
    save_steps(tmp_path, [1, 2])
    damage_arrays(tmp_path / "2")
    manager = reopen(tmp_path)
    checkpoint.save(manager, 2, state_at(2), FINGERPRINT)  # silently skipped: not newer than 2
    manager.wait_until_finished()
    assert tree_digest(tmp_path / "2") != tree_digest(tmp_path / "1")
    with pytest.raises(ocp.checkpoint_manager.StepAlreadyExistsError):
        checkpoint.save(manager, 2, state_at(2), FINGERPRINT, force=True)


def test_several_damaged_steps_are_all_skipped_and_kept(tmp_path, absl_warnings):
    save_steps(tmp_path, [1, 2, 3])
    damage_arrays(tmp_path / "3")
    (tmp_path / "2" / "fingerprint" / "metadata").write_text("{not json")
    assert_state(checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT), 1)
    messages = " | ".join(r.getMessage() for r in absl_warnings.records)
    assert "step 3 in" in messages and "step 2 in" in messages
    assert "unreadable step(s) 3, 2, moved aside to 3.corrupt, 2.corrupt" in messages
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt", "3.corrupt"]


def test_an_earlier_set_aside_is_not_overwritten(tmp_path):
    save_steps(tmp_path, [1, 2])
    (tmp_path / "2.corrupt").mkdir()
    (tmp_path / "2.corrupt" / "earlier.txt").write_text("kept")
    damage_arrays(tmp_path / "2")
    assert_state(checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT), 1)
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt", "2.corrupt-2"]
    assert (tmp_path / "2.corrupt" / "earlier.txt").read_text() == "kept"
    assert reopen(tmp_path).all_steps() == [1]


def test_no_readable_step_names_the_directory_and_changes_nothing(tmp_path):
    save_steps(tmp_path, [1, 2])
    damage_arrays(tmp_path / "1")
    damage_arrays(tmp_path / "2")
    before = tree_digest(tmp_path)
    with pytest.raises(InputError) as raised:
        checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT)
    message = str(raised.value)
    assert message.startswith(f"workdir={str(tmp_path)!r} is not allowed: ")
    assert "steps (2, 1) can be read" in message and "\n" not in message
    assert tree_digest(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_other_configuration_is_refused_and_nothing_changes(tmp_path):
    save_steps(tmp_path, [1, 2])
    before = tree_digest(tmp_path)
    other = {**FINGERPRINT, "student": {"lr": 0.2}}
    with pytest.raises(InputError, match=r"different configuration \(student\.lr: 0\.1 -> 0\.2\)"):
        checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, other)
    assert tree_digest(tmp_path) == before


def test_other_configuration_behind_a_damaged_step_is_refused_and_nothing_moves(tmp_path):
    save_steps(tmp_path, [1], fingerprint={**FINGERPRINT, "dataset": "npz"})
    save_steps(tmp_path, [2])
    damage_arrays(tmp_path / "2")
    before = tree_digest(tmp_path)
    with pytest.raises(InputError, match=r"step 1\) of a different configuration"):
        checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT)
    assert tree_digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_a_failed_set_aside_is_one_line_input_error(tmp_path, monkeypatch):
    save_steps(tmp_path, [1, 2])
    damage_arrays(tmp_path / "2")

    def read_only(self, target):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(type(checkpoint.epath.Path(str(tmp_path))), "rename", read_only)
    with pytest.raises(InputError, match=r"step 2 can be moved aside to 2\.corrupt.*read-only"):
        checkpoint.restore_latest(reopen(tmp_path), ABSTRACT, FINGERPRINT)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_one_line_collapses_and_cuts_the_reason():
    error = ValueError("DATA_LOSS:\n  bad\tmanifest " + "x" * 500)
    text = checkpoint.one_line(error, limit=60)
    assert text.startswith("ValueError: DATA_LOSS: bad manifest xxx")
    assert len(text) == 60 and text.endswith("...") and "\n" not in text


def test_one_line_drops_tensorstores_spec():
    error = ValueError('OUT_OF_RANGE: Error reading "w/.zarray" [tensorstore_spec=\'{"a":\n1}\']')
    assert checkpoint.one_line(error) == 'ValueError: OUT_OF_RANGE: Error reading "w/.zarray"'


# --- the fingerprint's comparison --------------------------------------------------------


def test_differing_fields_names_each_nested_difference():
    saved = {"a": 1, "s": {"lr": 0.1, "steps": 10, "only_saved": 1}, "same": [1, 2]}
    current = {"a": 2, "s": {"lr": 0.2, "steps": 10, "only_now": "x"}, "same": [1, 2]}
    assert checkpoint.differing_fields(saved, current) == [
        "a: 1 -> 2",
        "s.lr: 0.1 -> 0.2",
        "s.only_now: None -> 'x'",
        "s.only_saved: 1 -> None",
    ]
    assert checkpoint.differing_fields(saved, saved) == []
    # A section against a plain value is one difference, not a crash.
    assert checkpoint.differing_fields({"s": {"x": 1}}, {"s": 3}) == ["s: {'x': 1} -> 3"]


def test_normalize_json_is_what_json_reads_back():
    value = {"shape": (8, 8, 1), 3: {"boundaries": ((1, 2), [3])}, "lr": 0.1, "s": "x"}
    normalized = checkpoint.normalize_json(value)
    assert normalized == json.loads(json.dumps(value))
    assert normalized == {
        "shape": [8, 8, 1],
        "3": {"boundaries": [[1, 2], [3]]},
        "lr": 0.1,
        "s": "x",
    }


def test_a_configuration_with_tuples_matches_its_own_checkpoint(tmp_path):
    """Tuples (image shapes, decay boundaries) come back from JSON as lists: no mismatch."""
    save_steps(tmp_path, [1], fingerprint={"shape": (8, 8, 1), "boundaries": ()})
    manager = reopen(tmp_path)
    checkpoint.check_fingerprint(manager, 1, {"shape": (8, 8, 1), "boundaries": ()})
    with pytest.raises(InputError, match=r"shape: \[8, 8, 1\] -> \[8, 8, 3\]"):
        checkpoint.check_fingerprint(manager, 1, {"shape": (8, 8, 3), "boundaries": ()})


# --- exported variables --------------------------------------------------------------------


def variables(scale: float) -> dict:
    return {
        "params": {"dense": {"kernel": np.full((3, 2), scale, np.float32)}},
        "batch_stats": {"bn": {"mean": np.arange(2, dtype=np.float32) * scale}},
    }


def test_exported_variables_and_identity_read_back(tmp_path):
    directory = str(tmp_path / "student")
    identity = {"model": "cnn_small", "num_classes": 10}
    checkpoint.export_variables(directory, variables(1.0), identity, step=20)
    assert checkpoint.read_identity(directory) == identity
    loaded = checkpoint.load_variables(directory)
    assert set(loaded) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, loaded, variables(1.0))


def test_exporting_the_same_step_again_is_a_no_op_and_a_new_step_replaces_it(tmp_path):
    directory = str(tmp_path / "student")
    identity = {"model": "cnn_small", "num_classes": 10}
    checkpoint.export_variables(directory, variables(1.0), identity, step=20)
    before = tree_digest(directory)
    checkpoint.export_variables(directory, variables(2.0), identity, step=20)
    assert tree_digest(directory) == before
    checkpoint.export_variables(directory, variables(3.0), {**identity, "model": "x"}, step=30)
    jax.tree.map(
        np.testing.assert_array_equal, checkpoint.load_variables(directory), variables(3.0)
    )
    assert checkpoint.read_identity(directory)["model"] == "x"
    assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["30"]  # keeps one


def test_an_empty_export_directory(tmp_path):
    assert checkpoint.read_identity(str(tmp_path)) is None
    with pytest.raises(InputError, match=r"checkpoint_dir=.* a directory holding an exported"):
        checkpoint.load_variables(str(tmp_path))


# --- the trainer end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_trainer_resumes_past_a_damaged_final_checkpoint(tmp_path, absl_warnings):
    """A finished smoke run whose final student checkpoint (step 20) is then damaged: the
    same command resumes from step 10, trains to 20 again, saves it and writes the summary;
    the damaged step is kept as 20.corrupt. (Changing the step count would change the
    fingerprint, so the rerun uses the same configuration.)"""

    def config():
        smoke = default.get_config("smoke")
        smoke.teacher.num_train_steps, smoke.teacher.warmup_steps = 2, 1  # time, in both runs
        return smoke

    workdir = str(tmp_path)
    first = train.train_and_evaluate(config(), workdir)
    student_dir = tmp_path / "checkpoints" / "student"
    assert sorted(n for n in os.listdir(student_dir) if n.isdigit()) == ["10", "20"]
    assert damage_arrays(student_dir / "20")
    damaged_digest = tree_digest(student_dir / "20")
    os.remove(tmp_path / "summary.json")
    absl_warnings.clear()

    second = train.train_and_evaluate(config(), workdir)

    with open(tmp_path / "summary.json") as f:
        written = json.load(f)
    assert written["student"]["test_accuracy"] == second["student"]["test_accuracy"]
    # The run resumed at 10 and retraced steps 11-20 exactly (the trainer is deterministic).
    assert second["student"]["test_accuracy"] == first["student"]["test_accuracy"]
    messages = [r.getMessage() for r in absl_warnings.records]
    assert any(f"step 20 in {student_dir} cannot be read" in m for m in messages)
    assert any(m.startswith("resumed from checkpoint step 10") for m in messages)
    assert "student: resuming from step 10" in messages
    assert sorted(os.listdir(student_dir)) == ["10", "20", "20.corrupt"]
    assert tree_digest(student_dir / "20.corrupt") == damaged_digest
    saved = ocp.CheckpointManager(str(student_dir), item_names=checkpoint.ITEMS).restore(
        20, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )
    exported = checkpoint.load_variables(str(tmp_path / "student"))
    jax.tree.map(
        np.testing.assert_array_equal, saved.state["params"]["student"], exported["params"]
    )


TWO_PROCESS_SCRIPT = """
import os, sys
import numpy as np
from mokd_jax import checkpoint, parallel
parallel.initialize_distributed()
import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

directory = sys.argv[1]
sharding = NamedSharding(parallel.make_mesh(1), PartitionSpec("data"))  # a shard per device

def state(step):
    host = np.arange(8.0, dtype=np.float32) * step
    return {"w": jax.make_array_from_callback((8,), sharding, lambda index: host[index])}

manager = checkpoint.open_manager(directory, 1, 5)
for step in (1, 2):
    checkpoint.save(manager, step, state(step), {"a": 1})
manager.wait_until_finished()
manager.close()
if jax.process_index() == 0:
    os.makedirs(os.path.join(directory, "2.corrupt"))  # taken: the name must be agreed on
    for root, _, files in os.walk(os.path.join(directory, "2", "state")):
        for name in files:
            if "ocdbt" in name:
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
ocp.multihost.sync_global_processes("damaged")
manager = checkpoint.open_manager(directory, 1, 5)
abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)}
restored = checkpoint.restore_latest(manager, abstract, {"a": 1})
local = np.concatenate([np.asarray(s.data) for s in restored["w"].addressable_shards])
print("RESTORED", sorted(local.tolist()), flush=True)
checkpoint.save(manager, 2, state(20), {"a": 1})
manager.wait_until_finished()
print("STEPS", manager.all_steps(), flush=True)
"""


@pytest.mark.slow
def test_two_processes_set_the_damaged_step_aside_together(tmp_path):
    """Two processes (2 CPU devices each) with a damaged newest step: both resume from the
    older one and agree on the name it is moved to (process 0 moves it), and the step's
    number is saved again collectively."""
    port = free_port()
    processes = []
    for index in range(2):
        env = two_process_environment(index, port)
        command = [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(tmp_path)]
        processes.append(
            subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [process.communicate(timeout=300)[0].decode() for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
        assert "moved aside to 2.corrupt-2" in output
        assert "STEPS [1, 2]" in output
    assert "RESTORED [0.0, 1.0, 2.0, 3.0]" in outputs[0]  # step 1's values, process 0's half
    assert "RESTORED [4.0, 5.0, 6.0, 7.0]" in outputs[1]
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.corrupt", "2.corrupt-2"]


def test_checkpoint_paths_keep_urls_and_absolutize_local_dirs():
    assert checkpoint.resolve("gs://bucket/runs/r18") == "gs://bucket/runs/r18"
    assert checkpoint.resolve("runs/x") == os.path.abspath("runs/x")
