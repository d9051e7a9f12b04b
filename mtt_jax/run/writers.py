"""Run outputs: metrics.jsonl, TensorBoard events and the progress line.

Only process 0 writes; other processes get writers that do nothing, so the loop needs no branches.
On a bucket workdir (``gs://``) the files are `ObjectFile`s: an object store cannot append, so each
one's content is kept in memory and uploaded whole, at most every ``URL_FLUSH_SECONDS`` and on `flush`
(which the loop calls before each checkpoint, so that the records a resume keeps are stored first).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from mtt_jax.run import workdir as workdir_lib

URL_FLUSH_SECONDS = 30.0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if hasattr(value, "shape"):  # a jax array fetched late
        return np.asarray(value).tolist()
    return value


class MetricWriter:
    """Appends one JSON object per call to ``metrics.jsonl`` and logs scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True, resume_after_step: int = 0):
        """``resume_after_step``: a resumed run first drops records of steps after its checkpoint,
        which the interrupted attempt wrote but the resumed run will write again."""
        self.enabled = enabled
        self._jsonl = self._tensorboard = None
        if enabled:
            path = workdir_lib.join(workdir, "metrics.jsonl")
            kept = _truncate_after(path, resume_after_step)
            bucket = workdir_lib.is_url(workdir)
            _uploads_stopped.clear()  # a new run's writer
            if bucket:
                self._jsonl = ObjectFile(path, kept.encode(), min_interval=URL_FLUSH_SECONDS)
                _route_tensorboard_to_object_files()
            else:
                self._jsonl = LocalRecordFile(path)
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(workdir_lib.join(workdir, "tensorboard"),
                                              flush_secs=URL_FLUSH_SECONDS if bucket else 10)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write((json.dumps(record) + "\n").encode())
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{key}", value, int(step))

    def write_run_summary(self, config_fields: Mapping[str, Any], final_metrics: Mapping[str, Any],
                          text: str, step: int) -> None:
        """This run in TensorBoard's HParams dashboard (``config_fields``: the flattened config, its
        values as bool, int, float or str; ``final_metrics``' numbers under ``hparam/``, so that they
        do not collide with the eval scalars) and ``text`` (markdown) as its summary in the Text tab."""
        if not self.enabled:
            return
        from tensorboardX.summary import hparams
        metrics = {f"hparam/{k}": float(v) for k, v in final_metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        for summary in hparams(dict(config_fields), metrics):
            self._tensorboard.file_writer.add_summary(summary)
        for key, value in metrics.items():
            self._tensorboard.add_scalar(key, value, int(step))
        self._tensorboard.add_text("summary", text, int(step))

    def flush(self) -> None:
        """Stores the records written so far (a local metrics.jsonl is written unbuffered already)."""
        if self.enabled:
            self._jsonl.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()

    def abandon(self) -> None:
        """Stops every upload of this run's files to a bucket, now and at `close` (the run lost its
        workdir's lease: another run may be writing there). Local files are written as they go."""
        _uploads_stopped.set()


def _truncate_after(path: str, step: int) -> str:
    """Drops the records of steps after ``step`` (and lines cut short by a kill); returns those kept."""
    if not workdir_lib.exists(path):
        return ""
    kept = []
    for line in workdir_lib.read_text(path).splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError):  # a line cut short by a kill
            continue
    workdir_lib.write_text(path, "".join(kept))  # a kill while truncating must not lose the records kept
    return "".join(kept)


class LocalRecordFile:
    """``metrics.jsonl`` on a local disk, appended unbuffered, so each record reaches the file in one
    write. If the file is deleted or replaced while the run goes on (a clean-up script, a user), the
    next write or `close` puts it back whole, with a warning: its content is still readable through this
    process's open handle, which keeps the deleted file alive. So no record is lost, and the summary at
    the end finds every one."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "a+b", buffering=0)

    def write(self, data: bytes) -> None:
        self._restore_if_gone()
        self._file.write(data)

    def flush(self) -> None:
        self._restore_if_gone()

    def close(self) -> None:
        self._restore_if_gone()
        self._file.close()

    def _restore_if_gone(self) -> None:
        try:
            if os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path)):
                return
        except FileNotFoundError:
            pass
        self._file.seek(0)
        content = self._file.read()
        logging.warning("%s was deleted or replaced while the run was writing it; restored its %d records",
                        self.path, content.count(b"\n"))
        workdir_lib.write_bytes(self.path, content)
        self._file.close()
        self._file = open(self.path, "a+b", buffering=0)


# Set by `MetricWriter.abandon`: `ObjectFile`s upload nothing more.
_uploads_stopped = threading.Event()


class ObjectFile:
    """A file on an object store, which replaces objects whole and cannot append: the content is kept
    in memory, and each upload writes all of it (`workdir.write_bytes`). ``write`` uploads when the
    last upload is ``min_interval`` seconds old; ``flush`` and ``close`` upload what has changed. A
    kill loses what was written since the last upload, never what was uploaded before it. Thread-safe
    (tensorboardX writes from its own thread while the loop may flush)."""

    def __init__(self, path: str, content: bytes = b"", min_interval: float = 0.0):
        self.path, self.min_interval = path, min_interval
        self._content = bytearray(content)
        self._uploaded_size = len(content)
        self._uploaded_at = time.monotonic()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._content += data
        if time.monotonic() - self._uploaded_at >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if _uploads_stopped.is_set():
                return
            content = bytes(self._content)
            if len(content) != self._uploaded_size:
                workdir_lib.write_bytes(self.path, content)
                self._uploaded_size = len(content)
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        self.flush()


class _ObjectFileFactory:
    """tensorboardX's writer factory for a URL scheme: event files as `ObjectFile`s through epath
    (tensorboardX's own ``gs://`` writer needs google-cloud-storage and does not reach other stores)."""

    def open(self, path: str) -> ObjectFile:  # uploaded by tensorboardX's flushes, not per event
        return ObjectFile(path, min_interval=URL_FLUSH_SECONDS)

    def directory_check(self, path: str) -> None:  # object stores have no folders to create
        pass


def _route_tensorboard_to_object_files() -> None:
    from tensorboardX import record_writer
    for scheme in workdir_lib.URL_PACKAGES:
        record_writer.register_writer_factory(scheme, _ObjectFileFactory())


class Progress:
    """One status line: step, steps/s, ETA and the latest loss.

    On a terminal the line is redrawn in place; otherwise (logs, CI) a full line is printed only when
    asked (every ``log_every`` steps), so redirected output has no progress-bar spam.
    """

    def __init__(self, total_steps: int, first_step: int = 0, enabled: bool = True, stream=None):
        self.total_steps, self.enabled = total_steps, enabled
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._t0, self._step0 = time.perf_counter(), first_step

    def steps_per_second(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        return (step - self._step0) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, loss: float, force_line: bool = False) -> None:
        if not self.enabled or not (self.interactive or force_line):
            return
        rate = self.steps_per_second(step)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        line = (f"step {step}/{self.total_steps}  {rate:.1f} steps/s  ETA {_duration(eta)}"
                f"  loss {loss:.4f}")
        end = "\n" if force_line or not self.interactive else ""
        self.stream.write(("\r" + line.ljust(78) if self.interactive else line) + end)
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.interactive else "") + text + "\n")
            self.stream.flush()


class StepTimer:
    """Seconds per update since the loop's last mark, a window of train updates alone, and the share of
    it that the loop spent waiting for its next batch (`timed`). The loop marks it after the first
    update (the compile's), after every logged record (so each record's rate is of the updates since the
    one before), and after evals, checkpoints and affinity measurements."""

    def __init__(self):
        self._mark: tuple[float, int] | None = None
        self._waited = 0.0

    def mark(self, step: int) -> None:
        """Update ``step`` has just finished on the device."""
        self._mark, self._waited = (time.perf_counter(), step), 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, with the time each ``next`` blocks counted as waiting for input."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._waited += time.perf_counter() - start
            yield item

    def window(self, step: int) -> tuple[float, float] | None:
        """Seconds per update and the input-wait share over the updates after the mark up to ``step``
        (finished now); None if there are none."""
        if self._mark is None or step <= self._mark[1]:
            return None
        elapsed = time.perf_counter() - self._mark[0]
        return elapsed / (step - self._mark[1]), min(self._waited / elapsed, 1.0)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
