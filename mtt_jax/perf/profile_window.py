"""A window of a training run traced with `jax.profiler`: ``--config.profile.first_step=S``.

The loop's counterpart of the benchmark's ``--profile`` (MaxText's ``profiler_steps``, big_vision's
``xprof``): updates ``S .. S + profile.num_steps - 1`` of the real run, with its data pipeline, its
checkpoints and its evals, are traced into ``WORKDIR/profile``, which TensorBoard's profile plugin
(XProf) opens with ``tensorboard --logdir WORKDIR``. Beside the trace, ``op_times.md`` and
``op_times.json`` give the train step's XLA op time by source op (`mtt_jax.perf.profiling`) and the
window's wall time per update with the profiler on.

The loop waits for the device at the window's two edges only, so that the window's wall time is its
own updates'. Process 0 traces (a trace holds its own host's events). A bucket workdir gets the trace
through a local temporary folder, uploaded when the window ends (`profiling.trace_to`). A resumed run
traces the window only if the window starts after the checkpoint it resumed from; a run stopped inside
its window (SIGTERM, a halt) keeps the trace so far, without the op table.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import jax

from mtt_jax.perf import profiling
from mtt_jax.run import workdir as workdir_lib

DIRECTORY = "profile"


class ProfileWindow:
    """``before_update`` / ``after_update`` around each update of the loop; ``close`` at its end."""

    def __init__(self, workdir: str, first_step: int, num_steps: int, start_step: int,
                 enabled: bool = True):
        """``first_step``: the number of the first traced update (0: no window); ``start_step``: the
        step the run starts from (its checkpoint's on a resume)."""
        self.directory = workdir_lib.join(workdir, DIRECTORY)
        self.first_step, self.num_steps = first_step, num_steps
        self.last_step = first_step + num_steps - 1
        self.enabled = enabled and first_step > start_step
        self.missed = enabled and 0 < first_step <= start_step  # the resumed run starts past it
        self._upload = self._trace = None
        self._start = 0.0

    @property
    def active(self) -> bool:
        return self._trace is not None

    def before_update(self, step: int, state: Any) -> None:
        """Starts the trace before update ``step`` (numbered from 1) if it opens the window."""
        if not self.enabled or step != self.first_step:
            return
        jax.block_until_ready(state)  # the window's time is its own updates'
        self._upload = contextlib.ExitStack()
        local_dir = self._upload.enter_context(profiling.trace_to(self.directory))
        self._trace = contextlib.ExitStack()
        self._trace.enter_context(jax.profiler.trace(local_dir))
        self._local_dir, self._start = local_dir, time.perf_counter()

    def after_update(self, step: int, state: Any, hlo_text: Callable[[], str]) -> str | None:
        """After update ``step`` has been dispatched: if it closes the window, waits for it, stops the
        trace, writes the op tables of the compiled train step (``hlo_text()``, its ``as_text()``) and
        returns a line for the log."""
        if not self.active or step != self.last_step:
            return None
        jax.block_until_ready(state)
        wall_ms = 1e3 * (time.perf_counter() - self._start) / self.num_steps
        self._trace.close()
        self._trace = None
        try:
            rows = profiling.read_op_times(self._local_dir, self.num_steps, hlo_text())
            self._write_tables(rows, wall_ms)
        finally:
            self._upload.close()
        return (f"profile: updates {self.first_step}-{self.last_step} traced into {self.directory} "
                f"({wall_ms:.1f} ms per update with the profiler on); op times in "
                f"{workdir_lib.join(self.directory, 'op_times.md')}")

    def close(self) -> None:
        """Stops a trace the run leaves inside its window; the trace so far is kept."""
        if self.active:
            self._trace.close()
            self._trace = None
            self._upload.close()

    def _write_tables(self, rows: list[profiling.OpTime], wall_ms: float) -> None:
        window = f"updates {self.first_step}-{self.last_step}"
        profiling.write_op_tables(
            self.directory, rows, f"XLA op time of the train step, {window}",
            f"Traced with `--config.profile.first_step={self.first_step} --config.profile.num_steps="
            f"{self.num_steps}`; the trace opens in TensorBoard's profile plugin. Wall time per update "
            f"with the profiler on: {wall_ms:.1f} ms (evals and checkpoints in the window included).",
            first_step=self.first_step, last_step=self.last_step, wall_ms_per_update=wall_ms)
