"""mokd_jax.events: event files that TensorBoard's own reader reads as scalars, files that
TensorFlow's summary writer wrote read back, a resumed run's steps replaced as TensorBoard
replaces them, a record cut short, damage and non-scalar values."""

import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from mokd_jax import events
from mokd_jax.errors import InputError


def write_run(directory, steps_and_scalars, start: int | None = None) -> None:
    writer = events.EventWriter(str(directory))
    if start is not None:
        writer.start_session(start)
    for step, scalars in steps_and_scalars:
        writer.write_scalars(step, scalars)
    writer.close()


def accumulated(directory) -> dict[str, tuple[list[int], list[float]]]:
    """What TensorBoard's server makes of `directory` (its plugin event accumulator, every
    event kept): each tensor tag's steps and values."""
    accumulator = reader(directory)
    return {
        tag: (
            [event.step for event in accumulator.Tensors(tag)],
            [float(event.tensor_proto.float_val[0]) for event in accumulator.Tensors(tag)],
        )
        for tag in accumulator.Tags()["tensors"]
    }


def reader(directory) -> plugin_event_accumulator.EventAccumulator:
    accumulator = plugin_event_accumulator.EventAccumulator(
        str(directory), tensor_size_guidance={"scalars": 0}
    )
    return accumulator.Reload()


def as_lists(scalars) -> dict[str, tuple[list[int], list[float]]]:
    return {tag: (steps.tolist(), values.tolist()) for tag, (steps, values) in scalars.items()}


def test_scalars_read_back_by_step(tmp_path):
    write_run(tmp_path, [(1, {"loss": 2.5, "cos": -0.25}), (2, {"loss": 1.5}), (3, {"cos": 0.5})])
    scalars = events.read_scalars(str(tmp_path))
    assert as_lists(scalars) == {"loss": ([1, 2], [2.5, 1.5]), "cos": ([1, 3], [-0.25, 0.5])}
    assert scalars["loss"][0].dtype == np.int64 and scalars["loss"][1].dtype == np.float64


def test_tensorboard_reads_our_files_as_scalars(tmp_path):
    write_run(tmp_path, [(step, {"loss": 1.0 / step, "weight_task": 0.5}) for step in (1, 2, 3)])
    accumulator = reader(tmp_path)
    for tag in ("loss", "weight_task"):
        assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
    assert accumulated(tmp_path) == as_lists(events.read_scalars(str(tmp_path)))
    assert accumulated(tmp_path)["loss"] == ([1, 2, 3], [1.0, np.float32(0.5), np.float32(1 / 3)])


def test_files_that_tensorflows_summary_writer_wrote_read_back(tmp_path):
    """The format the trainer wrote through CLU before: TF2 scalar summaries."""
    tf = pytest.importorskip("tensorflow")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for step in (1, 2, 3):
            tf.summary.scalar("loss", 1.0 / step, step=step)
            tf.summary.scalar("steps_per_sec", 10.0 * step, step=step)
    writer.close()
    scalars = events.read_scalars(str(tmp_path))
    np.testing.assert_array_equal(scalars["loss"][0], [1, 2, 3])
    np.testing.assert_allclose(scalars["loss"][1], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(scalars["steps_per_sec"][1], [10.0, 20.0, 30.0])


def test_tf1_simple_values_and_non_scalars(tmp_path):
    """TF1's `simple_value` is a scalar; a rank-1 tensor (a histogram, say) is not one."""
    vector = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0, 2.0])
    vector.tensor_shape.dim.add(size=2)
    summary = summary_pb2.Summary(
        value=[
            summary_pb2.Summary.Value(tag="old", simple_value=3.0),
            summary_pb2.Summary.Value(tag="vector", tensor=vector),
        ]
    )
    with open(tmp_path / "events.out.tfevents.0000000001.host", "wb") as file:
        RecordWriter(file).write(event_pb2.Event(step=7, summary=summary).SerializeToString())
    assert as_lists(events.read_scalars(str(tmp_path))) == {"old": ([7], [3.0])}


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint_as_tensorboard_does(tmp_path):
    """The first run logged steps 1-10 and was saved at 5; the resumed one starts at 6 and
    logs 6-8 of one tag: the first run's steps from 6 on are gone for every tag, as in
    TensorBoard."""
    first = [(step, {"loss": float(step), "cos": -float(step)}) for step in range(1, 11)]
    write_run(tmp_path, first, start=1)
    write_run(tmp_path, [(step, {"loss": 100.0 + step}) for step in range(6, 9)], start=6)
    scalars = events.read_scalars(str(tmp_path))
    assert as_lists(scalars) == {
        "loss": ([1, 2, 3, 4, 5, 6, 7, 8], [1.0, 2.0, 3.0, 4.0, 5.0, 106.0, 107.0, 108.0]),
        "cos": ([1, 2, 3, 4, 5], [-1.0, -2.0, -3.0, -4.0, -5.0]),
    }
    assert accumulated(tmp_path) == as_lists(scalars)


def test_without_a_session_start_a_step_logged_twice_keeps_its_later_value(tmp_path):
    """Files that TensorFlow's writer wrote have no session starts."""
    write_run(tmp_path, [(1, {"loss": 1.0}), (2, {"loss": 2.0})])
    write_run(tmp_path, [(2, {"loss": 20.0})])
    assert as_lists(events.read_scalars(str(tmp_path))) == {"loss": ([1, 2], [1.0, 20.0])}


def test_a_rerun_of_a_finished_phase_changes_nothing(tmp_path):
    """A finished workdir run again trains no step: its session starts past the end."""
    write_run(tmp_path, [(1, {"loss": 1.0}), (2, {"loss": 2.0})], start=1)
    write_run(tmp_path, [], start=3)
    assert as_lists(events.read_scalars(str(tmp_path))) == {"loss": ([1, 2], [1.0, 2.0])}


def test_a_record_cut_short_ends_the_file(tmp_path):
    """A process killed while writing leaves part of a record: the rest is not read."""
    write_run(tmp_path, [(1, {"loss": 1.0}), (2, {"loss": 2.0})])
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:-3])
    assert as_lists(events.read_scalars(str(tmp_path))) == {"loss": ([1], [1.0])}


def test_damage_is_an_input_error_naming_the_file_and_byte(tmp_path):
    write_run(tmp_path, [(1, {"loss": 1.0})])
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # the first record's length no longer matches its checksum
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{path.name}: not a TensorBoard event file, .* byte 0"):
        events.read_scalars(str(tmp_path))


def test_a_missing_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="events_dir=.*nowhere' is not a directory"):
        events.read_scalars(str(tmp_path / "nowhere"))


def test_files_sort_in_the_order_they_were_opened_after_tensorflows_of_that_second():
    names = [events.event_file_name() for _ in range(1000)]
    assert names == sorted(names) and len(set(names)) == len(names)
    seconds = names[0].split(".")[3][:10]
    assert f"events.out.tfevents.{seconds}.host.v2" < names[0]  # TensorFlow's naming


@pytest.mark.slow
def test_the_trainer_imports_no_tensorflow():
    """The loop, the trainer and its CLI start without TensorFlow (about 3 s and 460 MB);
    only the TFDS pipelines import it, when a config asks for them. So does the pipeline
    benchmark's command (its `--help`), which imports them when it runs."""
    code = (
        "import sys, mokd_jax.main, mokd_jax.train, mokd_jax.compare\n"
        "import mokd_jax.pipeline_benchmark\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "assert not bad, bad[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
