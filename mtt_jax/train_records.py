"""The train records of a run: each update's metrics, read one step late, checked for non-finite losses
and written every ``log_every`` updates (`metrics.jsonl`, TensorBoard, the progress line).

`train_record` is a pure function of the step's fetched metrics and the loop's timings, so what a record
holds can be read (and tested) apart from the loop; `TrainLog` holds the step still on the device.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from mtt_jax.perf import flops
from mtt_jax.run.writers import MetricWriter, Progress, StepTimer


class NonFiniteLossError(RuntimeError):
    """A run halted on non-finite losses (``nonfinite = "halt"``, or too many skipped updates)."""


class SkipWindow:
    """The updates skipped for a non-finite loss among the last ``window`` (``nonfinite='skip'``): more
    than ``limit * window`` of them halt the run, which would otherwise end "successfully" having
    applied almost nothing."""

    def __init__(self, window: int, limit: float):
        self.window, self.limit = window, limit
        self._skipped = collections.deque(maxlen=window)

    @property
    def count(self) -> int:
        return sum(self._skipped)

    def add(self, skipped: bool) -> bool:
        """Records one update; whether the skipped ones now exceed the limit."""
        self._skipped.append(bool(skipped))
        return self.count > self.limit * self.window


@dataclasses.dataclass(frozen=True)
class Throughput:
    """What converts an update's time into throughput figures (`flops.throughput`)."""
    training_flops: float
    sequences: int
    tokens: int
    num_devices: int
    peak_flops: float | None


def train_record(metrics: dict, task_names, *, learning_rate: float, steps_per_second: float,
                 timing: tuple[float, float] | None, throughput: Throughput,
                 peak_memory_mib: float | None, gradient_diagnostics: bool,
                 cosine_matrix: bool, block_names: Sequence[str] = ()) -> dict:
    """The record of one update from its fetched ``metrics``: loss, gradient norm, learning rate,
    rate; with ``timing`` (seconds per update and input-wait share of the window) the step time and
    throughput; per-task losses and weights; with ``gradient_diagnostics`` the per-task gradient norms
    and the conflict figures (and with ``cosine_matrix`` the T x T cosines)."""
    record = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
              "learning_rate": learning_rate, "steps_per_second": steps_per_second,
              "skipped": int(not metrics["finite"])}
    if timing is not None:
        step_seconds, record["input_wait_fraction"] = timing
        record["step_ms"] = 1e3 * step_seconds
        record.update({k: v for k, v in flops.throughput(
            throughput.training_flops, throughput.sequences, throughput.tokens, step_seconds,
            throughput.num_devices, throughput.peak_flops).items() if v is not None})
    if peak_memory_mib is not None:
        record["peak_memory_mib_per_device"] = peak_memory_mib
    for i, name in enumerate(task_names):
        record[f"{name}/loss"] = float(metrics["task_losses"][i])
        record[f"weight/{name}"] = float(metrics["weights"][i])
    if block_names and "block_weights" in metrics:  # per-block aggregation: each group's own weights
        for b, group in enumerate(block_names):
            for i, name in enumerate(task_names):
                record[f"weight/{group}/{name}"] = float(metrics["block_weights"][b][i])
    if "task_grad_norms" in metrics and gradient_diagnostics:
        for i, name in enumerate(task_names):
            record[f"grad_norm/{name}"] = float(metrics["task_grad_norms"][i])
        for key in ("cosine_mean", "cosine_min", "conflict_fraction"):
            record[key] = float(metrics[key])
        if cosine_matrix:
            record["grad_cosine"] = np.round(metrics["grad_cosine"], 4).tolist()
    return record


class TrainLog:
    """Reads each update's metrics one step late (the host never waits on the device in the loop),
    halts on non-finite losses as the config says, and writes the logged records."""

    def __init__(self, config, task_names, writer: MetricWriter, progress: Progress, timer: StepTimer,
                 first_step: int, learning_rate: Callable[[int], float], throughput: Throughput,
                 gradient_method: bool, peak_memory_mib: Callable[[], float | None], halt_note: str,
                 block_names: Sequence[str] = ()):
        self.config, self.task_names, self.block_names = config, task_names, tuple(block_names)
        self.writer, self.progress, self.timer = writer, progress, timer
        self.first_step, self.learning_rate, self.throughput = first_step, learning_rate, throughput
        self.gradient_method, self.peak_memory_mib, self.halt_note = gradient_method, peak_memory_mib, halt_note
        self.skips = SkipWindow(config.nonfinite_skip_window, config.nonfinite_skip_limit)
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        """Logs the previous update's metrics, and keeps these (still on the device) for later."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Logs the update whose metrics are still on the device."""
        if self._pending is not None:
            step, metrics = self._pending
            self._pending = None
            self._log(step, jax.device_get(metrics))

    def _log(self, step: int, metrics: dict) -> None:
        self._check_finite(step, bool(metrics["finite"]))
        timing = self.timer.window(step)  # update `step` has just finished
        diagnostics_every = self.config.weighting.diagnostics_every
        diagnostics_step = bool(diagnostics_every) and step % diagnostics_every == 0
        logged = (not step % self.config.log_every or step == self.config.total_steps
                  or diagnostics_step)
        if logged or step == self.first_step + 1:  # a record's rate is of the updates since the record
            self.timer.mark(step)                  # before; the first update's time is the compile's
        if not logged:
            return
        record = train_record(
            metrics, self.task_names, learning_rate=self.learning_rate(step - 1),
            steps_per_second=self.progress.steps_per_second(step), timing=timing,
            throughput=self.throughput, peak_memory_mib=self.peak_memory_mib(),
            gradient_diagnostics=self.gradient_method or diagnostics_step, cosine_matrix=diagnostics_step,
            block_names=self.block_names)
        self.writer.write(step, "train", record)
        self.progress.update(step, record["loss"], force_line=True)

    def _check_finite(self, step: int, finite: bool) -> None:
        if self.config.nonfinite == "halt" and not finite:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step}; halted without applying it ({self.halt_note}; "
                f"nonfinite='skip' steps over such batches)")
        if self.skips.add(not finite):
            raise NonFiniteLossError(
                f"{self.skips.count} of the last {self.skips.window} updates up to step {step} had a "
                f"non-finite loss or gradient and were skipped, more than nonfinite_skip_limit="
                f"{self.skips.limit}; halted ({self.halt_note}; lower the learning rate, or raise "
                f"nonfinite_skip_limit)")
