"""Run outputs (DESIGN §8): metrics.jsonl, TensorBoard events and the progress line.

Only process 0 writes; other processes get writers that do nothing, so the loop needs no branches.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

from mtt_jax.workdir import write_text


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
            path = os.path.join(workdir, "metrics.jsonl")
            _truncate_after(path, resume_after_step)
            self._jsonl = open(path, "a", buffering=1)
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{key}", value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _truncate_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by a kill
            continue
    write_text(path, "".join(kept))  # a kill while truncating must not lose the records kept


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


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
