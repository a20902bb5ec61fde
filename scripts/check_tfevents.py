#!/usr/bin/env python3
# Checked with tensorboard==2.21.0:  pip install tensorboard==2.21.0
"""Check the TensorBoard event files a cpmv run wrote, with TensorBoard's own readers.

    python scripts/check_tfevents.py DIR [DIR ...]

DIR is a run directory (its tb/ folder is read) or a folder of event files. Each event file is
first read strictly, record by record, with TensorBoard's TFRecord reader (length and data CRCs
checked, a truncated record is an error, not a silent stop) and every record parsed as an
`Event` protobuf, the first one carrying file_version "brain.Event:2". Then the folder is loaded
the way TensorBoard shows it, with EventAccumulator (which also applies SessionLog.START purges
of a resumed run), and each scalar tag is printed with its count, step range, last value, and
whether any step repeats. Exits 1 if anything fails to parse, TensorBoard logs a warning (other
than the purge notice of a resume), a tag
has a repeated step, or there is no scalar at all.
Needs: tensorboard (no TensorFlow).
"""
import logging
import pathlib
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def read_strict(path: pathlib.Path) -> int:
    """Reads every record of one event file; returns the number of events."""
    reader = pywrap_tensorflow.PyRecordReader_New(str(path))
    n = 0
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            break
        # DataLossError (bad CRC, truncated record) propagates.
        event = event_pb2.Event.FromString(reader.record())
        if n == 0 and event.file_version != "brain.Event:2":
            raise ValueError(f"{path}: first event has file_version {event.file_version!r}")
        n += 1
    if n == 0:
        raise ValueError(f"{path}: no records")
    return n


def check(arg: str) -> None:
    root = pathlib.Path(arg)
    tb = root / "tb" if (root / "tb").is_dir() else root
    files = sorted(p for p in tb.iterdir() if p.is_file() and "tfevents" in p.name)
    if not files:
        raise ValueError(f"{tb}: no event files")
    for f in files:
        print(f"{f.name}: {read_strict(f)} events")

    collect = _Collect()
    logger = logging.getLogger("tensorboard")
    logger.addHandler(collect)
    try:
        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        acc.Reload()
    finally:
        logger.removeHandler(collect)
    # A resumed run's SessionLog.START makes TensorBoard drop the earlier file's later steps,
    # and it says so at warning level: expected, shown, not a failure.
    purges = [m for m in collect.messages if "Purging expired events" in m]
    for m in purges:
        print(f"  resume purge: {m.split('. ', 1)[-1]}")
    others = [m for m in collect.messages if m not in purges]
    if others:
        raise ValueError(f"{tb}: TensorBoard warned: " + "; ".join(others))
    tags = sorted(acc.Tags()["scalars"])
    if not tags:
        raise ValueError(f"{tb}: no scalar tags")
    for tag in tags:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        dup = len(steps) - len(set(steps))
        print(
            f"  {tag}: {len(events)} scalars, steps {steps[0]}..{steps[-1]}, "
            f"last {events[-1].value:.6g}" + (f", {dup} REPEATED steps" if dup else "")
        )
        if dup:
            raise ValueError(f"{tb}: {tag} has {dup} repeated steps")


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for arg in sys.argv[1:]:
        try:
            check(arg)
        except Exception as e:  # noqa: BLE001 -- any failure to read is the finding
            print(f"FAIL {arg}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"OK {arg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
