"""Orbax checkpoints that survive preemption (DESIGN §7).

- The whole train state (step, params, optimizer, weighting state, RNG) is saved every
  ``checkpoint_every`` steps, asynchronously, keeping the newest ``keep``. Every process takes part.
- Restore walks the saved steps from newest to oldest: a partial or corrupt checkpoint is moved aside
  (``<step>.unreadable``) with a warning and the one before it is used. Orbax writes into a temporary
  directory and renames it when the save is committed, so a save cut short by SIGKILL never looks like
  a finished one.
- SIGTERM (preemption notice on Cloud TPU and SLURM) sets a flag; the loop saves at the step it reached
  and exits cleanly (T5X's pattern).
- Because the batch and the dropout RNG of step s are functions of (seed, s), restarting the same
  command continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mtt_jax import workdir as workdir_lib

PyTree = Any


class Checkpointer:
    def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
        local = not workdir_lib.is_url(workdir)
        self.directory = workdir_lib.join(os.path.abspath(workdir) if local else workdir, "checkpoints")
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._last_saved = self._manager.latest_step()

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `maybe_save` would save at ``step``: a multiple of ``every`` (or ``force``) not yet saved."""
        return step != self._last_saved and (force or step % self.every == 0)

    def maybe_save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Saves if ``step`` is `due`; returns whether it did."""
        if not self.due(step, force):
            return False
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        if saved:
            self._last_saved = step
        return saved

    def restore_latest(self, abstract_state: PyTree) -> PyTree | None:
        """The newest readable checkpoint restored into ``abstract_state``'s shapes and shardings.

        An unreadable newer one is moved aside to ``<step>.unreadable`` (kept for inspection; orbax no
        longer lists it), so that the run saves that step again when it gets there: orbax refuses to
        save over an existing step, and a damaged final checkpoint would otherwise stay the final one.
        """
        restored = None
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                break
            except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
                logging.warning("checkpoint at step %d is unreadable (%s: %s); moved aside to %s.unreadable "
                                "and trying the one before", step, type(e).__name__,
                                str(e).splitlines()[0][:200], step)
                self._move_aside(step)
        self._manager.reload()
        self._last_saved = self._manager.latest_step()
        return restored

    def _move_aside(self, step: int) -> None:
        """Process 0 renames the step's directory; the others wait on both sides of the rename, so
        that none is still reading it when it moves and none lists it again after (the manager's
        reload and the next restore see the same steps on every process)."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mtt_jax: checkpoint {step} read")
        if jax.process_index() == 0:
            path = workdir_lib.join(self.directory, str(step))
            epath.Path(path).rename(_free_name(f"{path}.unreadable"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mtt_jax: checkpoint {step} moved aside")

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _free_name(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``, ... if it is taken (a step damaged twice keeps both)."""
    candidate, n = path, 0
    while workdir_lib.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def abstract_like(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


class PreemptionFlag:
    """Set by SIGTERM; the loop polls it once per step and saves before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
