"""Checkpoint integrity: a flipped bit in a checkpoint's array data is caught by the fingerprint saved
with it and the run falls back to the checkpoint before; a checkpoint written before the fingerprint
still restores; a storage error is retried and then reported, with nothing moved aside."""

import errno
import logging
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mtt_jax.run import checkpoint

# After a failed read, orbax's restore leaves callbacks for tensorstore reads to an event loop it has
# closed ("Event loop is closed", reported as unraisable): noise of the failure these tests cause.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
SPECS = {"params": {"kernel": P("data", "model"), "embed": P("model", None)},
         "opt": {"count": P(), "mu": P("data")}, "rng": P(), "step": P()}


def make_state(seed: int):
    """A small sharded train-state-like tree: float32, bfloat16 and int32 arrays and a typed PRNG key."""
    r = np.random.default_rng(seed)
    leaves = {"params": {"kernel": r.normal(size=(256, 128)).astype(np.float32),
                         "embed": jnp.asarray(r.normal(size=(128, 64)), jnp.bfloat16)},
              "opt": {"count": np.int32(seed), "mu": r.normal(size=(256,)).astype(np.float32)},
              "rng": jax.random.key(seed), "step": np.int32(seed)}
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(MESH, spec)), leaves, SPECS)


def abstract(specs=SPECS):
    return jax.tree.map(lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=NamedSharding(MESH, spec)),
                        make_state(0), specs)


def host(tree):
    """The tree's leaves as NumPy arrays of their bits, to compare bit for bit."""
    unkey = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return [np.atleast_1d(np.asarray(unkey(x))).view(np.uint8) for x in jax.tree.leaves(tree)]


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(host(a), host(b)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir whose checkpoints hold steps 1 and 2 (distinct values), written by the Checkpointer."""
    workdir = tmp_path_factory.mktemp("saved")
    checkpointer = checkpoint.Checkpointer(str(workdir), every=1, keep=3)
    for step in (1, 2):
        assert checkpointer.maybe_save(step, make_state(step))
    checkpointer.close()
    return workdir


def copy_of(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def data_files(step_dir):
    """The array data files of a step (tensorstore OCDBT's ``d/`` folders), largest first."""
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state")
             if os.path.basename(root) == "d" for name in names]
    return sorted(files, key=os.path.getsize, reverse=True)


def flip(path, position, bit):
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ (1 << bit)]))


def test_fingerprint_is_independent_of_sharding_and_catches_one_bit():
    state = make_state(1)
    fingerprint = checkpoint.fingerprint(state)
    assert sorted(fingerprint) == ["opt/count", "opt/mu", "params/embed", "params/kernel", "rng", "step"]
    # A NumPy reference of the definition: uint32 words w_i, (sum w_i, sum w_i (2i+1)) mod 2^32.
    words = np.asarray(state["params"]["kernel"]).view(np.uint32).ravel().astype(np.uint64)
    weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
    assert fingerprint["params/kernel"] == [int(words.sum() % 2**32), int((words * weights).sum() % 2**32)]
    words = np.asarray(state["params"]["embed"]).view(np.uint16).ravel().astype(np.uint64)
    assert fingerprint["params/embed"][0] == int(words.sum() % 2**32)
    assert fingerprint["rng"] == [int(np.asarray(jax.random.key_data(state["rng"])).sum()),
                                  int(np.asarray(jax.random.key_data(state["rng"])) @ [1, 3])]
    elsewhere = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(MESH, P())), state)
    on_host = {**state, "params": {k: np.asarray(v) for k, v in state["params"].items()}}
    assert checkpoint.fingerprint(elsewhere) == checkpoint.fingerprint(on_host) == fingerprint
    for leaf, index, bit in (("kernel", (255, 127), 31), ("kernel", (0, 0), 0), ("embed", (3, 5), 15)):
        bits = np.asarray(state["params"][leaf]).copy()
        view = bits.view(np.uint32 if leaf == "kernel" else np.uint16)
        view[index] ^= view.dtype.type(1 << bit)
        flipped = checkpoint.fingerprint({**state, "params": {**state["params"], leaf: bits}})
        assert flipped[f"params/{leaf}"][0] != fingerprint[f"params/{leaf}"][0]


def test_flipped_bytes_in_array_data_are_caught_and_fall_back(saved, tmp_path, caplog):
    """Each of several flipped bits in the data files of the newest step either leaves the restored
    values as saved (bytes the read does not use) or is caught, and the restore falls back to step 1:
    never a different value. Without the fingerprint some of these restored wrong values silently."""
    step_dir = saved / "checkpoints" / "2"
    files = data_files(step_dir)
    largest = files[0]
    rng = random.Random(0)
    # The middle of the largest file is in the kernel's values (which tensorstore reads unchecked);
    # the others are anywhere in any data file (b-tree nodes included, which carry their own CRC).
    flips = [(largest, os.path.getsize(largest) // 2, 3)]
    for _ in range(7):
        path = rng.choice(files)
        flips.append((path, rng.randrange(os.path.getsize(path)), rng.randrange(8)))
    caught = {"checksum": 0, "orbax": 0}
    for i, (path, position, bit) in enumerate(flips):
        run = tmp_path / str(i)
        shutil.copytree(saved, run)
        flip(run / os.path.relpath(path, saved), position, bit)
        caplog.clear()
        checkpointer = checkpoint.Checkpointer(str(run), every=1, keep=3)
        restored = checkpointer.restore_latest(abstract())
        checkpointer.close()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if same(restored, make_state(2)):
            assert not os.path.exists(run / "checkpoints" / "2.unreadable"), warnings
            continue
        assert same(restored, make_state(1)), f"flip {i} restored values that were never saved"
        assert os.path.isdir(run / "checkpoints" / "2.unreadable")
        assert checkpointer.steps() == [1]
        [warning] = [w for w in warnings if "step 2 is unreadable" in w]
        if "checksum mismatch" in warning:
            caught["checksum"] += 1
            if i == 0:
                assert "params/kernel" in warning, warning
        else:
            caught["orbax"] += 1
    assert caught["checksum"] >= 1, caught  # the flip in the kernel's values at least


def test_a_deleted_data_file_falls_back(saved, tmp_path, caplog):
    run = copy_of(saved, tmp_path)
    os.remove(run / os.path.relpath(data_files(saved / "checkpoints" / "2")[0], saved))
    checkpointer = checkpoint.Checkpointer(str(run), every=1, keep=3)
    assert same(checkpointer.restore_latest(abstract()), make_state(1))
    assert checkpointer.steps() == [1] and "step 2 is unreadable" in caplog.text
    checkpointer.close()


def test_a_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
    """A step written before the fingerprint (orbax's single ``default`` item) restores, once with a
    warning; the next save adds a verified step beside it. Restored into another sharding too."""
    directory = tmp_path / "checkpoints"
    manager = ocp.CheckpointManager(str(directory))
    manager.save(1, args=ocp.args.StandardSave(make_state(1)))
    manager.wait_until_finished()
    manager.close()
    assert "default" in os.listdir(directory / "1") and "state" not in os.listdir(directory / "1")
    checkpointer = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
    resharded = {**SPECS, "params": {"kernel": P("model", "data"), "embed": P()}}
    restored = checkpointer.restore_latest(abstract(resharded))
    assert same(restored, make_state(1))
    assert restored["params"]["kernel"].sharding.spec == P("model", "data")
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint at step 1 was written without checksums (before they were added): restored unverified"]
    assert checkpointer.maybe_save(2, make_state(2))
    checkpointer.close()
    caplog.clear()
    checkpointer = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
    assert checkpointer.steps() == [1, 2]
    assert same(checkpointer.restore_latest(abstract(resharded)), make_state(2)) and not caplog.records
    checkpointer.close()


def fail_reads(monkeypatch, error, times=None):
    """Tensorstore's open (each array read of a restore starts with one) raises ``error``: every
    time, or the first ``times`` times. Returns the list of sleeps the retries asked for."""
    real_open, calls, sleeps = tensorstore.open, [0], []

    def open_(*args, **kwargs):
        calls[0] += 1
        if times is None or calls[0] <= times:
            raise error
        return real_open(*args, **kwargs)
    monkeypatch.setattr(tensorstore, "open", open_)
    monkeypatch.setattr(checkpoint, "_sleep", sleeps.append)
    return sleeps


def test_an_io_error_on_every_read_is_reported_with_nothing_moved_aside(saved, tmp_path, monkeypatch,
                                                                         caplog):
    run = copy_of(saved, tmp_path)
    before = sorted(os.listdir(run / "checkpoints"))
    sleeps = fail_reads(monkeypatch, OSError(errno.EIO, "Input/output error"))
    checkpointer = checkpoint.Checkpointer(str(run), every=1, keep=3)
    with pytest.raises(checkpoint.CheckpointStorageError) as raised:
        checkpointer.restore_latest(abstract())
    message = str(raised.value)
    assert "\n" not in message and message.startswith("checkpoint at step 2 could not be read in 3 tries")
    assert "Input/output error" in message and message.endswith(
        "nothing was changed; rerun when the storage is reachable")
    assert sleeps == [1.0, 2.0]
    assert sorted(os.listdir(run / "checkpoints")) == before == ["1", "2"]
    assert checkpointer.steps() == [1, 2] and "unreadable" not in caplog.text
    monkeypatch.undo()
    assert same(checkpointer.restore_latest(abstract()), make_state(2))  # the storage is back
    checkpointer.close()


def test_a_transient_error_that_passes_restores_the_newest_step(saved, tmp_path, monkeypatch, caplog):
    run = copy_of(saved, tmp_path)
    sleeps = fail_reads(monkeypatch, ValueError("UNAVAILABLE: Error reading local file: try again"), times=1)
    checkpointer = checkpoint.Checkpointer(str(run), every=1, keep=3)
    assert same(checkpointer.restore_latest(abstract()), make_state(2))
    assert sleeps == [1.0] and checkpointer.steps() == [1, 2]
    assert "a storage error, not corruption; trying again in 1 s" in caplog.text
    checkpointer.close()


@pytest.mark.parametrize("error, storage", [
    (OSError(errno.EIO, "Input/output error"), True),
    (PermissionError(errno.EACCES, "Permission denied"), True),
    (TimeoutError("read timed out"), True),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
    (ValueError('PERMISSION_DENIED: Error reading "w/.zarray" in OCDBT database'), True),
    (ValueError("DEADLINE_EXCEEDED: GCS request timed out"), True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
    (OSError(errno.ENOENT, "No such file or directory"), False),
    (ValueError('DATA_LOSS: Error reading "b/.zarray": CRC-32C checksum verification failed'), False),
    (ValueError('NOT_FOUND: Metadata at "b/.zarray" does not exist'), False),
    (ValueError("Error decoding b-tree node: ZSTD_decompressStream() failed"), False),
    (KeyError('Item "checksums" was not found in the checkpoint'), False),
    (checkpoint.CheckpointCorruptError("checksum mismatch in 1 of 6 arrays: params/kernel"), False),
])
def test_storage_errors_are_told_from_corruption(error, storage):
    assert checkpoint.is_storage_error(error) is storage
    try:  # found anywhere in the chain of causes
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("restore failed") from cause
    except RuntimeError as wrapped:
        assert checkpoint.is_storage_error(wrapped) is storage
