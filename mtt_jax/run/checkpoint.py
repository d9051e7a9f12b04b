"""Orbax checkpoints that survive preemption.

- The whole train state (step, params, optimizer, weighting state, RNG) is saved every
  ``checkpoint_every`` steps, asynchronously, keeping the newest ``keep``. Every process takes part.
- Restore walks the saved steps from newest to oldest: a partial or corrupt checkpoint is moved aside
  (``<step>.unreadable``) with a warning and the one before it is used. Orbax writes into a temporary
  directory and renames it when the save is committed, so a save cut short by SIGKILL never looks like
  a finished one.
- Every checkpoint carries a fingerprint of each array of the state (`fingerprint`: two 32-bit sums of
  its bits, computed on the devices where the arrays live), stored next to it as the JSON item
  ``checksums``. A restore computes it again on the restored arrays: a difference (a flipped bit in
  the array data, which tensorstore reads without complaint) is corruption like an unreadable file.
  Checkpoints written before the fingerprint (one ``default`` item) restore unverified, with a warning.
- A failed read is corruption (moved aside, the one before is tried) or a storage error (an
  `OSError` such as EIO or a timeout, or a tensorstore status such as UNAVAILABLE or
  PERMISSION_DENIED): that step is tried again a few times, then `CheckpointStorageError` is raised
  with nothing moved aside, because moving every checkpoint aside would restart the run from step 0.
- SIGTERM (preemption notice on Cloud TPU and SLURM) sets a flag; the loop saves at the step it reached
  and exits cleanly (T5X's pattern).
- Because the batch and the dropout RNG of step s are functions of (seed, s), restarting the same
  command continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mtt_jax.run import workdir as workdir_lib

PyTree = Any

# The items of a step: the state and its fingerprint. Steps written before the fingerprint hold one
# item, orbax's ``default``; the manager knows its handler too, so that it can restore them.
STATE, CHECKSUMS, LEGACY = "state", "checksums", "default"
FINGERPRINT_FORMAT = "mtt_jax fingerprint 1: per leaf, uint32 words w_i: (sum w_i, sum w_i (2i+1)) mod 2^32"
# Waits before the second and third tries of a step whose read failed with a storage error.
RETRY_DELAYS_S = (1.0, 2.0)
_sleep = time.sleep  # tests replace it


class CheckpointStorageError(RuntimeError):
    """The checkpoints could not be read for a reason other than their content (an I/O error, storage
    unreachable or refusing access); nothing was moved aside. The message is one line."""


class CheckpointCorruptError(ValueError):
    """A checkpoint that was read whole does not match the fingerprint saved with it."""


class Checkpointer:
    def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
        local = not workdir_lib.is_url(workdir)
        self.directory = workdir_lib.join(os.path.abspath(workdir) if local else workdir, "checkpoints")
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler(),
                           LEGACY: ocp.StandardCheckpointHandler()})
        self._last_saved = self._manager.latest_step()

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `maybe_save` would save at ``step``: a multiple of ``every`` (or ``force``) not yet saved."""
        return step != self._last_saved and (force or step % self.every == 0)

    def maybe_save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Saves if ``step`` is `due`; returns whether it did."""
        if not self.due(step, force):
            return False
        checksums = {"format": FINGERPRINT_FORMAT, "leaves": fingerprint(state)}
        saved = self._manager.save(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), CHECKSUMS: ocp.args.JsonSave(checksums)}), force=True)
        if saved:
            self._last_saved = step
        return saved

    def restore_latest(self, abstract_state: PyTree) -> PyTree | None:
        """The newest readable checkpoint restored into ``abstract_state``'s shapes and shardings.

        An unreadable newer one (a file missing, cut short or undecodable, or arrays that differ from
        their saved fingerprint) is moved aside to ``<step>.unreadable`` (kept for inspection; orbax no
        longer lists it), so that the run saves that step again when it gets there: orbax refuses to
        save over an existing step, and a damaged final checkpoint would otherwise stay the final one.

        A read that fails with a storage error is tried again (`RETRY_DELAYS_S`); if it still fails,
        `CheckpointStorageError` is raised and nothing is moved aside: older steps are not tried, as
        the newest one may be intact.
        """
        restored = None
        for step in sorted(self._manager.all_steps(), reverse=True):
            restored = self._restore_step(step, abstract_state)
            if restored is not None:
                break
            self._move_aside(step)
        self._manager.reload()
        self._last_saved = self._manager.latest_step()
        return restored

    def _restore_step(self, step: int, abstract_state: PyTree) -> PyTree | None:
        """The state at ``step``, or None if it is corrupt; raises `CheckpointStorageError` when every
        try failed with a storage error. All processes reach the same verdict on every try."""
        tries = len(RETRY_DELAYS_S) + 1
        for attempt in range(tries):
            error, restored = None, None
            try:
                restored = self._read(step, abstract_state)
            except Exception as e:  # noqa: BLE001 -- orbax/tensorstore raise many types; classified below
                error = e
            verdict = 0 if error is None else 2 if is_storage_error(error) else 1
            agreed = _agree(verdict)
            if agreed == 0:
                try:  # every process verifies (the fingerprint is computed together), with one result
                    return self._verify(step, restored)
                except CheckpointCorruptError as e:
                    error, agreed = e, 1
            reason = (f"{type(_innermost(error)).__name__}: {describe(_innermost(error))}"
                      if error is not None else "another process could not read it")
            if agreed == 1:
                logging.warning("checkpoint at step %d is unreadable (%s); moved aside to %s.unreadable "
                                "and trying the one before", step, reason, step)
                return None
            if attempt + 1 < tries:
                logging.warning("checkpoint at step %d could not be read (%s), a storage error, not "
                                "corruption; trying again in %g s", step, reason, RETRY_DELAYS_S[attempt])
                _sleep(RETRY_DELAYS_S[attempt])
        raise CheckpointStorageError(
            f"checkpoint at step {step} could not be read in {tries} tries ({reason}); nothing was "
            f"changed; rerun when the storage is reachable")

    def _read(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict | None]:
        """(state, saved checksums) of ``step``; checksums None for a step written without them."""
        step_dir = epath.Path(workdir_lib.join(self.directory, str(step)))
        # Listed first: a folder that cannot be read raises PermissionError here, where orbax would
        # report its contents as missing (corruption).
        names = {path.name for path in step_dir.iterdir()}
        for name in names & {STATE, LEGACY}:
            next(iter((step_dir / name).iterdir()), None)
        if STATE not in names and LEGACY in names:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{LEGACY: ocp.args.StandardRestore(abstract_state)}))
            return restored[LEGACY], None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), CHECKSUMS: ocp.args.JsonRestore()}))
        return restored[STATE], restored[CHECKSUMS]

    def _verify(self, step: int, restored: tuple[PyTree, dict | None]) -> PyTree:
        """The restored state if it matches its saved fingerprint; raises `CheckpointCorruptError`."""
        state, saved = restored
        if saved is None:
            logging.warning("checkpoint at step %d was written without checksums (before they were "
                            "added): restored unverified", step)
            return state
        if not isinstance(saved, dict) or saved.get("format") != FINGERPRINT_FORMAT:
            raise CheckpointCorruptError(f"checksums in an unknown format: {str(saved)[:100]}")
        expected, actual = saved.get("leaves") or {}, fingerprint(state)
        differ = [name for name in actual if list(expected.get(name, ())) != actual[name]]
        extra = sorted(set(expected) - set(actual))
        if differ or extra:
            names = differ or [f"{name} (saved, not restored)" for name in extra]
            raise CheckpointCorruptError(
                f"checksum mismatch in {len(differ) + len(extra)} of {len(actual)} arrays: "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
        return state

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


# Tensorstore and cloud-storage statuses of a read that may succeed later: the storage, not the bytes.
_TRANSIENT_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|PERMISSION_DENIED|"
                               r"UNAUTHENTICATED|ABORTED|CANCELLED)\b")
# OSErrors that say a file is missing or misplaced: the checkpoint is incomplete, not unreachable.
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_MISSING_ERRNOS = frozenset({errno.ENOENT, errno.EISDIR, errno.ENOTDIR})


def is_storage_error(error: BaseException) -> bool:
    """Whether a failed read says the storage failed rather than the checkpoint's content: an
    `OSError` other than a missing file (EIO, EACCES, timeouts, dropped connections), or a
    tensorstore/orbax error whose message carries a transient status code, anywhere in the chain
    of causes. Everything else (DATA_LOSS, decode errors, missing or truncated files, wrong shapes, a
    checksum mismatch) is corruption."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        missing = isinstance(error, _MISSING) or getattr(error, "errno", None) in _MISSING_ERRNOS
        if isinstance(error, OSError) and not missing:
            return True
        if _TRANSIENT_STATUS.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def describe(error: BaseException) -> str:
    """The error's first line without tensorstore's spec; of a longer one, its start (the status code)
    and its end (tensorstore's innermost cause), 300 characters in all."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    text = re.sub(r"\s*\[tensorstore_spec\S*=.*$", "", text)
    return text if len(text) <= 300 else f"{text[:100]} ... {text[-195:]}"


def _innermost(error: BaseException) -> BaseException:
    """The first error of the chain (orbax wraps tensorstore's, whose message says what failed)."""
    seen = {id(error)}
    while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
        error = cause
        seen.add(id(error))
    return error


def _agree(verdict: int) -> int:
    """The worst of every process's verdict (0 read, 1 corrupt, 2 storage error), so that all of them
    retry, move aside or go on together."""
    if jax.process_count() == 1:
        return verdict
    with jax.transfer_guard("allow"):
        return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


# --- Fingerprint ---------------------------------------------------------------------------------------

def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words: one per element of 1, 2 or 4 bytes (widened), two per element
    of 8 bytes (a trailing axis); a PRNG key array by its key data."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    size = jnp.dtype(x.dtype).itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
    return x.astype(jnp.int32).astype(jnp.uint32)  # sub-byte types (int4, ...): losslessly widened


def _leaf_sums(x: jax.Array) -> jax.Array:
    """(sum of words, sum of words * (2 i + 1)) mod 2^32, i the word's row-major index. A changed word
    changes the first sum by a nonzero multiple of its difference below 2^32 (one flipped bit always
    changes it); values exchanged between positions change the second. Built from per-axis iotas, so
    that a sharded array is summed where it lives, without a reshape that would gather it."""
    words = _words(x)
    index = jnp.zeros((), jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    weights = index * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(out_sharding):
    return jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]), out_shardings=out_sharding)


def _leaf_names(tree: PyTree) -> tuple[list[str], list[Any]]:
    """Each leaf's path (``params/dense/kernel``) and the leaves, in flattening order."""
    def part(key):
        for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
    names, seen = [], set()
    for i, (path, _) in enumerate(pairs):
        name = "/".join(part(k) for k in path) or "."
        name = name if name not in seen else f"{name}#{i}"
        seen.add(name)
        names.append(name)
    return names, [leaf for _, leaf in pairs]


def fingerprint(tree: PyTree) -> dict[str, list[int]]:
    """``{leaf path: [sum, weighted sum]}`` of every array in ``tree`` (see `_leaf_sums`), computed
    with one jitted program per set of devices the arrays live on, so that a sharded (also a
    multi-host) array is reduced in place; every process gets the same replicated result. Values
    other than jax Arrays (NumPy arrays, Python numbers) are summed on the first local device."""
    names, leaves = _leaf_names(tree)
    groups: dict[Any, list[int]] = {}
    with jax.transfer_guard("allow"):
        arrays = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, jax.Array):
                leaf = jax.device_put(np.asarray(leaf), jax.local_devices()[0])
            arrays.append(leaf)
            sharding = leaf.sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                key = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            elif isinstance(sharding, jax.sharding.SingleDeviceSharding):
                key = sharding
            else:
                key = None  # another kind: the jit's own choice (a fully addressable array only)
            groups.setdefault(key, []).append(i)
        sums: dict[int, list[int]] = {}
        for key, members in groups.items():
            result = np.asarray(_fingerprint_fn(key)([arrays[i] for i in members]))
            sums.update({i: [int(v) for v in row] for i, row in zip(members, result)})
    return {names[i]: sums[i] for i in range(len(leaves))}


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
