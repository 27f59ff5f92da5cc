"""TensorBoard event files of scalars, written and read without TensorFlow.

An event file is a sequence of records, each a serialized `Event` proto framed as TFRecord
frames it: its length (uint64, little-endian), a masked CRC-32C of those 8 bytes, the
bytes, and a masked CRC-32C of the bytes. The first event names the format version; each
later one carries a step, a wall time and a `Summary` of tagged values. TensorBoard reads
every file whose name contains `tfevents` in a run directory.

Why the trainer writes them itself: CLU's `metric_writers` and TensorBoard's own reader
(`EventAccumulator`) both import TensorFlow whenever it is installed (CLU's package imports
its TF summary writer; TensorBoard reaches its file system through `tensorboard.compat.tf`).
That cost every training process about 3 s of start-up and 460 MB of memory (`import
mokd_jax.train` with and without TensorFlow, 2 CPU cores, /usr/bin/time), even when its
data needs no TensorFlow (the embedded digits, `.npz` arrays). The protos and the
record framing come from the `tensorboard` package, which imports no TensorFlow for them.

Scalars are written the way TF2's `tf.summary.scalar` (and so CLU) wrote them: a float32
tensor of rank 0, with the `scalars` plugin named in the metadata of a tag's first value
in a file. Runs written by the earlier CLU writer and by this one read the same, and
TensorBoard shows both as scalars. Paths go through `etils.epath`, so a run directory may
be a URL such as gs://.
"""

import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping

import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from mokd_jax.errors import InputError

FILE_VERSION = "brain.Event:2"
SCALARS_PLUGIN = "scalars"
_HEADER = struct.Struct("<QI")  # the record's length and the masked CRC of its 8 bytes
_FOOTER_SIZE = 4  # the masked CRC of the record's bytes
_last_micros = 0  # the time in the newest file name this process gave (`event_file_name`)

Series = tuple[np.ndarray, np.ndarray]


def event_file_name() -> str:
    """events.out.tfevents.<microseconds>.<host>.<pid>.v2: TensorFlow's naming, with the time
    in microseconds (16 digits) instead of seconds, so that the files of one directory sort
    by name in the order they were opened even when a resumed run starts within the second
    its predecessor stopped (`read_scalars` relies on that order; so does TensorBoard). A
    file TensorFlow named in the same second (10 digits, then '.') sorts before. Within a
    process the times strictly increase, so no two names are equal."""
    global _last_micros
    _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
    return f"events.out.tfevents.{_last_micros:016d}.{socket.gethostname()}.{os.getpid()}.v2"


def scalar_value(tag: str, value: float, first: bool) -> summary_pb2.Summary.Value:
    """`value` as a rank-0 float32 tensor; the `scalars` plugin is named on a tag's first
    value in a file only, as TensorFlow writes it (TensorBoard keeps a tag's first
    metadata)."""
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[float(value)])
    tensor.tensor_shape.SetInParent()  # rank 0
    summary_value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    if first:
        summary_value.metadata.plugin_data.plugin_name = SCALARS_PLUGIN
    return summary_value


class EventWriter:
    """Writes the scalars of one run directory into a new event file in it.

    Each `write_scalars(step, scalars)` is one event (all its tags at that step). Writes are
    synchronous and buffered by the file; `flush` makes them visible to TensorBoard (the
    trainer flushes at each log line and evaluation). A directory that holds earlier files
    (a resumed run) keeps them: this one sorts after them, and the run marks where it
    starts again with `start_session`.
    """

    def __init__(self, directory: str):
        path = epath.Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._records = RecordWriter((path / event_file_name()).open("wb"))
        self._tags_seen: set[str] = set()
        self._write(event_pb2.Event(wall_time=time.time(), file_version=FILE_VERSION))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def start_session(self, step: int) -> None:
        """Marks a run (re)starting at `step`: readers drop what earlier events logged from
        `step` on (`read_scalars`; TensorBoard does the same)."""
        session_log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._write(event_pb2.Event(wall_time=time.time(), step=step, session_log=session_log))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [
            scalar_value(tag, value, tag not in self._tags_seen) for tag, value in scalars.items()
        ]
        self._tags_seen.update(scalars)
        summary = summary_pb2.Summary(value=values)
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class NoWriter:
    """Writes nothing: the writer of every process but the first of a multi-host job."""

    def start_session(self, step: int) -> None:
        del step

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_records(path: epath.Path) -> Iterator[bytes]:
    """The records of one event file, in order.

    A record cut short at the end of the file (one being written, or the last one of a
    process that was killed) ends the reading there, as TensorBoard does. A header whose
    CRC does not match is damage, not a partial write: an InputError names the file and
    the byte. The records' own CRCs are not recomputed (pure Python, about 0.1 s per MB);
    a damaged record body fails to parse instead.
    """
    data = path.read_bytes()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, header_crc = _HEADER.unpack_from(data, offset)
        if header_crc != masked_crc32c(data[offset : offset + 8]):
            raise InputError(
                f"{path}: not a TensorBoard event file, or damaged at byte {offset} "
                "(its record header's checksum does not match)"
            )
        start = offset + _HEADER.size
        end = start + length + _FOOTER_SIZE
        if end > len(data):
            return
        yield data[start : start + length]
        offset = end


def scalar_of(value: summary_pb2.Summary.Value) -> float | None:
    """The number a summary value holds if it is a scalar (a rank-0 tensor, or TF1's
    `simple_value`); None for anything else (images, histograms, text)."""
    if value.HasField("tensor"):
        array = tensor_util.make_ndarray(value.tensor)
        if array.ndim == 0 and np.issubdtype(array.dtype, np.number):
            return float(array)
        return None
    if value.HasField("simple_value"):
        return float(value.simple_value)
    return None


def event_files(events_dir: str) -> list[epath.Path]:
    """The event files of `events_dir` in the order they were written (by name)."""
    directory = epath.Path(events_dir)
    if not directory.is_dir():
        raise InputError(f"events_dir={events_dir!r} is not a directory of TensorBoard events")
    return sorted(
        (path for path in directory.iterdir() if "tfevents" in path.name), key=lambda p: p.name
    )


def read_scalars(events_dir: str) -> dict[str, Series]:
    """Every scalar tag in `events_dir` as (steps, values), sorted by step, each step once.

    A session start at step s (`EventWriter.start_session`, written when a phase begins or
    resumes) drops what earlier events hold from step s on, for every tag: what an
    interrupted run logged past its last checkpoint is stale once the resumed run starts
    again from there. TensorBoard's reader drops it the same way. Otherwise a step logged
    twice keeps its later value.
    """
    series: dict[str, dict[int, float]] = {}
    for path in event_files(events_dir):
        for record in read_records(path):
            event = event_pb2.Event.FromString(record)
            if event.session_log.status == event_pb2.SessionLog.START:
                for steps in series.values():
                    for stale in [step for step in steps if step >= event.step]:
                        del steps[stale]
            for value in event.summary.value:
                scalar = scalar_of(value)
                if scalar is not None:
                    series.setdefault(value.tag, {})[event.step] = scalar
    return {
        tag: (
            np.array(sorted(steps), np.int64),
            np.array([steps[step] for step in sorted(steps)], np.float64),
        )
        for tag, steps in series.items()
        if steps
    }
