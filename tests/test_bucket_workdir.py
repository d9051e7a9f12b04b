"""A run on a bucket workdir (``gs://``) writes, resumes and refuses as on a local one.

No bucket can be reached from CI: ``gs://`` is served by fsspec's in-memory filesystem, registered
under the names etils.epath asks fsspec for (what gcsfs serves in real use). Orbax writes its arrays
through tensorstore's own GCS driver, which no fake reaches; these tests put the checkpoints in a local
folder, so orbax's ``gs://`` support (used as is, as MaxText does) is the one part not run here.
"""

import contextlib
import glob
import json
import os
import struct
import tempfile
import threading
import time

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from configs import seqtasks as seqtasks_config
from mtt_jax import train
from mtt_jax.run import checkpoint, lease, workdir, writers

BUCKET = "gs://bucket/run"


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's option; nothing to finalize
        super().__init__(*args, **kwargs)


@pytest.fixture
def bucket(monkeypatch):
    """A fresh in-memory ``gs://``; returns a reader of its objects (``path`` relative to BUCKET)."""
    from etils.epath import gpath
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # the fsspec backend, as without TF
    monkeypatch.setattr(FakeGCS, "store", {})
    monkeypatch.setattr(FakeGCS, "pseudo_dirs", [""])
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    FakeGCS.clear_instance_cache()
    monkeypatch.setattr(workdir, "_checked_urls", set())
    yield lambda path: FakeGCS.store[f"{BUCKET}/{path}"].getvalue()
    FakeGCS.clear_instance_cache()


@pytest.fixture
def local_checkpoints(monkeypatch, tmp_path):
    """Checkpoints of a bucket run go to a local folder (see the module docstring); returns the
    Checkpointers made, so that a test can wait for their asynchronous saves."""
    made, real_init = [], checkpoint.Checkpointer.__init__

    def init(self, directory, *args, **kwargs):
        real_init(self, str(tmp_path / "checkpoints" / directory.replace("://", "_")), *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(checkpoint.Checkpointer, "__init__", init)
    return made


def records(text: str, split: str) -> list[dict]:
    return [r for r in map(json.loads, text.splitlines()) if r["split"] == split]


def event_tags(events: bytes) -> set[str]:
    """The scalar tags in a TensorBoard event file (TFRecords: length, its CRC, data, the data's CRC)."""
    tags, offset = set(), 0
    while offset < len(events):
        (length,) = struct.unpack_from("Q", events, offset)
        data = events[offset + 12: offset + 12 + length]
        offset += 16 + length
        for tag in (b"train/loss", b"eval/loss"):
            tags |= {tag.decode()} if tag in data else set()
    return tags


def test_a_run_killed_on_a_bucket_resumes_with_every_record_it_had_checkpointed(
        bucket, local_checkpoints, monkeypatch, tmp_path, capsys):
    """Metrics reach the bucket in whole uploads, each before a checkpoint: a run killed between
    uploads resumes from its checkpoint with every record up to it, and ends with the same records,
    summary and plots as an uninterrupted local run. TensorBoard's events are there too, and the
    resumed run's profile of updates 16-17, traced locally and uploaded."""
    config = seqtasks_config.get_config("tiny")  # 20 steps, eval every 10, log every 5
    config.checkpoint_every, config.log_every = 5, 1
    config.profile.first_step, config.profile.num_steps = 16, 2
    reference = tmp_path / "reference"
    train.train_and_evaluate(config, str(reference), quiet=True)

    monkeypatch.setattr(writers, "URL_FLUSH_SECONDS", 3600.0)  # uploads only when the loop asks
    uploaded_before_checkpoint = {}
    real_maybe_save = checkpoint.Checkpointer.maybe_save

    def maybe_save(self, step, state, force=False):
        if self.due(step, force):
            uploaded_before_checkpoint[step] = max(r["step"] for r in records(
                bucket("metrics.jsonl").decode(), "train"))
        return real_maybe_save(self, step, state, force)
    monkeypatch.setattr(checkpoint.Checkpointer, "maybe_save", maybe_save)

    def killed_at(flag, held, step, every):
        if step == 13:  # the process dies here: nothing more reaches the bucket
            writers._uploads_stopped.set()
            raise KeyboardInterrupt
        return ""
    with monkeypatch.context() as patch:
        patch.setattr(train, "stop_requested", killed_at)
        with pytest.raises(KeyboardInterrupt):
            train.train_and_evaluate(config, BUCKET, quiet=True)
    local_checkpoints[-1].wait()
    assert uploaded_before_checkpoint == {5: 5, 10: 10}
    assert [r["step"] for r in records(bucket("metrics.jsonl").decode(), "train")] == list(range(1, 11))
    with pytest.raises(KeyError):
        bucket("summary.md")

    capsys.readouterr()
    state, final = train.train_and_evaluate(config, BUCKET)  # (not quiet: it names the step it resumes at)
    assert "resuming at step 10 of 20 steps" in capsys.readouterr().out  # the newest checkpoint's
    assert int(state.step) == 20 and uploaded_before_checkpoint == {5: 5, 10: 10, 15: 15, 20: 20}
    ours, theirs = bucket("metrics.jsonl").decode(), (reference / "metrics.jsonl").read_text()
    for split in ("train", "eval"):
        assert [r["step"] for r in records(ours, split)] == [r["step"] for r in records(theirs, split)]
    np.testing.assert_allclose([r["loss"] for r in records(ours, "train")],
                               [r["loss"] for r in records(theirs, "train")], rtol=1e-5)
    tables = [[l for l in text.splitlines() if l.startswith("|")]
              for text in (bucket("summary.md").decode(), (reference / "summary.md").read_text())]
    assert tables[0] == tables[1] and len(tables[0]) > 3
    assert bucket("curves.png").startswith(b"\x89PNG")
    assert json.loads(bucket("config.json"))["total_steps"] == 20
    event_files = [k for k in FakeGCS.store if k.startswith(f"{BUCKET}/tensorboard/events.out.tfevents")]
    assert len(event_files) == 2  # one per attempt, as TensorBoard reads them
    assert event_tags(FakeGCS.store[event_files[-1]].getvalue()) == {"train/loss", "eval/loss"}
    assert [k for k in FakeGCS.store if k.startswith(f"{BUCKET}/profile/plugins/profile/")
            and k.endswith(".xplane.pb")]
    assert "# XLA op time of the train step, updates 16-17" in bucket("profile/op_times.md").decode()
    assert json.loads(bucket("profile/op_times.json"))["rows"]

    # The same command again finds the finished run: nothing new, the final eval read back.
    _, again = train.train_and_evaluate(config, BUCKET, quiet=True)
    assert again["loss"] == pytest.approx(final["loss"])


def test_a_bucket_workdir_is_checked_refused_and_cleared_like_a_local_one(bucket, monkeypatch):
    from configs import default
    config = default.get_config("tiny")
    workdir.check_location(BUCKET, urls=True)
    assert not [k for k in FakeGCS.store if ".write-test-" in k]  # the probe object is removed
    with pytest.raises(workdir.WorkdirError, match=r"--profile=gs://bucket/run: URLs are not supported for "
                                                   r"--profile; pass a local path"):
        workdir.check_location(BUCKET, "--profile")
    with pytest.raises(workdir.WorkdirError, match="unknown URL scheme ftp://"):
        workdir.check_location("ftp://host/run", urls=True)
    workdir.check_output_file(f"{BUCKET}/bench.json", "--out")  # the benchmark's results file
    workdir.write_json(f"{BUCKET}/bench.json", {"step": 1})
    assert json.loads(bucket("bench.json")) == {"step": 1}
    with pytest.raises(workdir.WorkdirError, match="--out=gs://bucket/run is a folder; pass a file name"):
        workdir.check_output_file(BUCKET, "--out")
    workdir.remove(f"{BUCKET}/bench.json")
    workdir.write_text("gs://bucket/an_object", "x")
    with pytest.raises(workdir.WorkdirError, match="gs://bucket/an_object is an object, not a folder"):
        workdir.check_location("gs://bucket/an_object", urls=True)

    def unwritable(self, path, mode="rb", **kwargs):
        raise PermissionError("403 caller does not have storage.objects.create access\nmore")
    with monkeypatch.context() as patch:
        patch.setattr(FakeGCS, "_open", unwritable)
        with pytest.raises(workdir.WorkdirError, match=r"^--workdir=gs://bucket/other cannot be written "
                                                       r"\(PermissionError: 403 caller does not have "
                                                       r"storage.objects.create access\)$"):
            workdir.check_location("gs://bucket/other", urls=True)

    assert not workdir.prepare(BUCKET, config)
    workdir.write_config(BUCKET, config)
    workdir.write_text(f"{BUCKET}/metrics.jsonl", '{"step": 1}\n')
    workdir.write_text(f"{BUCKET}/checkpoints/1/state", "x")
    workdir.write_text(f"{BUCKET}/notes.txt", "mine")
    assert workdir.prepare(BUCKET, config)  # the same run: resumed
    config.seed += 1
    with pytest.raises(workdir.WorkdirError, match="holds a run with a different config \\(fields: seed\\)"):
        workdir.prepare(BUCKET, config)
    assert not workdir.prepare(BUCKET, config, overwrite=True)
    assert sorted(FakeGCS.store) == ["gs://bucket/an_object", f"{BUCKET}/notes.txt"]


    # A checkpoint that cannot be read is moved aside under a free name, as on a local disk.
    for name in ("checkpoints/5/state", "checkpoints/5.unreadable/state"):
        workdir.write_text(f"{BUCKET}/{name}", "x")
    damaged = object.__new__(checkpoint.Checkpointer)
    damaged.directory = workdir.join(BUCKET, "checkpoints")
    damaged._move_aside(5)
    assert sorted(k for k in FakeGCS.store if "/checkpoints/" in k) == [
        f"{BUCKET}/checkpoints/5.unreadable.1/state", f"{BUCKET}/checkpoints/5.unreadable/state"]


def test_a_missing_filesystem_package_is_named_in_one_line():
    """``s3://`` without s3fs (not a requirement; gcsfs is): the package to install, before any work."""
    with pytest.raises(workdir.WorkdirError, match=r"^--workdir=s3://bucket/run: s3:// needs the s3fs "
                                                   r"package \(pip install s3fs\) or TensorFlow$"):
        workdir.check_location("s3://bucket/run", urls=True)


def test_an_object_file_uploads_whole_and_only_when_changed(bucket, monkeypatch):
    uploads = []
    real = workdir.write_bytes
    monkeypatch.setattr(workdir, "write_bytes", lambda path, data: (uploads.append(data), real(path, data)))
    clock = iter([0.0, 1.0, 2.0, 40.0, 40.0, 41.0]).__next__
    monkeypatch.setattr(writers.time, "monotonic", clock)
    f = writers.ObjectFile(f"{BUCKET}/log", b"kept\n", min_interval=30.0)  # created at t=0
    f.write(b"a\n")  # t=1: too soon
    f.write(b"b\n")  # t=2
    assert uploads == []
    f.write(b"c\n")  # t=40: the interval has passed
    assert uploads == [b"kept\na\nb\nc\n"]
    f.flush()  # t=41: nothing new
    assert uploads == [b"kept\na\nb\nc\n"] and bucket("log") == b"kept\na\nb\nc\n"


def test_an_experiment_writes_its_table_results_and_plots_to_a_bucket(bucket):
    """The experiments' outputs and their resumable partial results go through the same layer (one
    experiment stands for all: they write through `experiments.common`; the cheapest one at --tiny)."""
    from experiments import common, gradnorm_toy
    experiment = "gs://bucket/run/gradnorm"
    gradnorm_toy.main(["--workdir", experiment, "--tiny"])
    results = json.loads(bucket("gradnorm/results.json"))
    assert results["experiment"] == gradnorm_toy.NAME and results["size"] == "tiny"
    assert bucket("gradnorm/table.md").decode().startswith("# gradnorm_toy")
    pngs = [k for k in FakeGCS.store if k.startswith(experiment) and k.endswith(".png")]
    assert pngs and all(FakeGCS.store[k].getvalue().startswith(b"\x89PNG") for k in pngs)

    partial = common.PartialResults(experiment, {"size": "tiny"})
    assert partial.load() == {}
    partial.save({"methods": {"ew": 1.5}})
    assert common.PartialResults(experiment, {"size": "tiny"}).load() == {"methods": {"ew": 1.5}}
    assert common.PartialResults(experiment, {"size": "quick"}).load() == {}  # another sweep's
    partial.discard()
    assert f"{experiment}/results.partial.json" not in FakeGCS.store


def test_the_benchmark_profile_is_traced_locally_and_uploaded_to_a_bucket(bucket):
    """`jax.profiler` writes local files: a ``--profile gs://...`` trace goes through a temporary folder
    and is uploaded whole, and the op times are read before it is removed."""
    import jax
    import jax.numpy as jnp
    from mtt_jax.perf import profiling
    x = jnp.ones((64, 64))
    compiled = jax.jit(lambda x: jnp.tanh(x @ x)).lower(x).compile()
    temporary = os.path.join(tempfile.gettempdir(), "mtt_jax_trace_*")
    before = set(glob.glob(temporary))
    rows = profiling.op_times(lambda: compiled(x).block_until_ready(), 2, f"{BUCKET}/trace",
                              compiled.as_text())
    assert sum(r.matmul_flops_per_step for r in rows) == 2 * 64**3
    traces = [k for k in FakeGCS.store if k.startswith(f"{BUCKET}/trace/plugins/profile/")]
    assert any(k.endswith(".xplane.pb") for k in traces)
    assert set(glob.glob(temporary)) == before  # the local copy is removed


def test_a_bucket_workdir_is_locked_by_a_lease_that_a_dead_run_leaves_to_expire(bucket, monkeypatch, caplog):
    """No flock on an object store: ``.lock`` is created only where there is none, renewed while the
    run holds it and removed when it ends; one left by a killed run is taken over once it expires."""
    from configs import default
    lock = f"{BUCKET}/.lock"
    monkeypatch.setattr(train, "build", lambda config: 1 / 0)  # refused before the start-up
    with workdir.lock(BUCKET):
        held = json.loads(bucket(".lock"))
        assert held["holder"] == f"pid {os.getpid()} on {__import__('socket').gethostname()}"
        with pytest.raises(workdir.WorkdirError, match=(
                rf"^gs://bucket/run is in use by another run \(pid {os.getpid()} on .+, lease renewed [0-9] s "
                rf"ago\); wait for it to end, or, if it died, (29[1-9]|300) s for its lease to expire$")):
            train.train_and_evaluate(default.get_config("tiny"), BUCKET, quiet=True)
        assert sorted(FakeGCS.store) == [lock]  # nothing written
    assert lock not in FakeGCS.store  # released with the run

    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.05)
    with workdir.lock(BUCKET) as held:
        first = json.loads(bucket(".lock"))["renewed"]
        time.sleep(0.3)
        assert json.loads(bucket(".lock"))["renewed"] > first
        assert held.state() == lease.HELD

    dead = {"holder": "pid 1 on a-deleted-vm", "token": "x", "renewed": time.time() - 400}
    workdir.write_text(lock, json.dumps(dead))
    with workdir.lock(BUCKET):
        assert json.loads(bucket(".lock"))["holder"] != dead["holder"]
    assert "taking over the lease of a run that stopped renewing it 400 s ago (pid 1 on a-deleted-vm)" in caplog.text
    assert lock not in FakeGCS.store


class GenerationalGCS(FakeGCS):
    """GCS's object generations: every write is a new generation, and deleting ``path#generation``
    (``version_aware``) fails while another generation is live. The conditional write of a renewal is
    answered as GCS answers the request gcsfs sends (`call`), with faults injected before or after it."""
    counter = iter(range(1, 10**9))
    _location = "https://storage.googleapis.com"
    before_write = after_write = None  # called with the record; may raise (unreachable, answer lost)
    refused: list = []  # the records whose ``ifGenerationMatch`` failed
    writing = threading.Lock()

    def call(self, method, path, *args, json_out=False, data=None, headers=None, **params):
        """The JSON API's media upload: written only if ``ifGenerationMatch`` names the live generation
        (else 412, which gcsfs raises as FileExistsError)."""
        assert (method, path, params["uploadType"], json_out) == (
            "POST", f"{self._location}/upload/storage/v1/b/{{}}/o", "media", True)
        record, hooks = json.loads(data), type(self)  # the hooks are plain functions, not methods
        if hooks.before_write:
            hooks.before_write(record)
        key = self._strip_protocol(f"gs://{args[0]}/{params['name']}")
        with self.writing:
            live = self.info(key)["generation"] if key in self.store else None
            if str(params["ifGenerationMatch"]) != live:
                self.refused.append(record)
                raise FileExistsError(key)
            self.pipe_file(key, data)
            self.store[key].generation = next(self.counter)
        if hooks.after_write:
            hooks.after_write(record)
        return {"generation": str(self.store[key].generation)}

    def info(self, path, **kwargs):
        info = super().info(path, **kwargs)
        if info["type"] == "file":
            stored = self.store[self._strip_protocol(path)]
            if not hasattr(stored, "generation"):  # a write stores a new object
                stored.generation = next(self.counter)
            info["generation"] = str(stored.generation)
        return info

    def rm_file(self, path):
        path, _, generation = path.partition("#")
        with self.writing:
            if generation and self.storage_options.get("version_aware"):
                if self.info(path).get("generation") != generation:
                    raise FileNotFoundError(f"{path}#{generation}")
            super().rm_file(path)


@pytest.fixture
def generations(bucket, monkeypatch):
    """The bucket with GCS's generations (`GenerationalGCS`); returns (fs, path) of the lease."""
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, GenerationalGCS, clobber=True)
    GenerationalGCS.clear_instance_cache()
    monkeypatch.setattr(GenerationalGCS, "refused", [])
    return fsspec.core.url_to_fs(f"{BUCKET}/.lock")


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_lease_whose_renewals_fail_is_at_risk_then_lost_and_no_longer_renewed(generations, monkeypatch):
    """Its state is judged from the last successful renewal (a stopped clock here): `AT_RISK` once the
    lease could expire before the next renewal, `LOST` once it could have expired; after that the
    lease is not renewed even where the store answers again, and it is removed at the end (still ours)."""
    fs, path = generations
    now = [1000.0]
    monkeypatch.setattr(lease, "_clock", lambda: now[0])
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.01)
    monkeypatch.setattr(lease, "EXPIRE_SECONDS", 10.0)  # at risk after 10 - 2 * 0.01 s without a renewal
    attempts = []

    def unreachable(record):
        attempts.append(record)
        raise OSError("503 Service Unavailable\nretry later")
    with lease.hold(f"{BUCKET}/.lock") as held:
        created = fs.info(path)["generation"]
        wait_for(lambda: fs.info(path)["generation"] != created)  # renewed
        monkeypatch.setattr(GenerationalGCS, "before_write", unreachable)
        wait_for(lambda: len(attempts) >= 3)
        now[0] = 1009.97
        assert (held.state(), held.reason) == (lease.HELD, "")
        now[0] = 1009.99
        assert held.state() == lease.AT_RISK
        assert held.reason == (f"could not renew the lease {BUCKET}/.lock for 10 s (OSError: 503 Service "
                               f"Unavailable); it expires in 0 s")
        time.sleep(0.05)  # a renewal under way when the state changed ends
        tried, generation = len(attempts), fs.info(path)["generation"]
        monkeypatch.setattr(GenerationalGCS, "before_write", None)  # the store answers again
        time.sleep(0.1)  # ten renewal periods
        assert len(attempts) == tried and fs.info(path)["generation"] == generation  # none tried
        now[0] = 1010.0
        assert held.state() == lease.LOST
        assert held.reason == (f"could not renew the lease {BUCKET}/.lock for 10 s (OSError: 503 Service "
                               f"Unavailable): it has expired, and another run may hold it")
        now[0] = 1000.0
        assert held.state() == lease.LOST  # final
    assert path not in FakeGCS.store


def test_a_run_whose_lease_was_taken_over_is_refused_its_renewal_and_leaves_the_new_lease(
        generations, monkeypatch, caplog):
    """The first run cannot reach the store for longer than the expiry but has not noticed (its clock
    is stopped here: the precondition is the last defence); a second run takes the lease over. When
    the first run's renewal reaches the store again, its ``ifGenerationMatch`` fails: the second run's
    record stays, the first run's lease is `LOST` naming the new holder, and its end leaves that lease."""
    fs, path = generations
    monkeypatch.setattr(lease, "_clock", lambda: 1000.0)
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.01)
    monkeypatch.setattr(lease, "EXPIRE_SECONDS", 0.2)
    with contextlib.ExitStack() as second_run:
        with lease.hold(f"{BUCKET}/.lock") as first:
            mine = json.loads(fs.cat_file(path))["token"]

            def partitioned(record):
                if record["token"] == mine:
                    raise OSError("503 Service Unavailable")
            monkeypatch.setattr(GenerationalGCS, "before_write", partitioned)
            wait_for(lambda: time.time() - json.loads(fs.cat_file(path))["renewed"] > 0.25)
            with monkeypatch.context() as patch:
                patch.setattr(lease, "_holder", lambda: "pid 2 on host-b")
                second = second_run.enter_context(lease.hold(f"{BUCKET}/.lock"))
                theirs = json.loads(fs.cat_file(path))
                assert theirs["holder"] == "pid 2 on host-b" and theirs["token"] != mine
                assert first.state() == lease.HELD  # it has not noticed
                monkeypatch.setattr(GenerationalGCS, "before_write", None)  # the first run's renewal arrives
                wait_for(lambda: first.state() == lease.LOST)
            assert first.reason == f"the lease {BUCKET}/.lock was taken over by another run (pid 2 on host-b)"
            assert GenerationalGCS.refused and {r["token"] for r in GenerationalGCS.refused} == {mine}
            assert json.loads(fs.cat_file(path))["token"] == theirs["token"]  # not overwritten
        assert json.loads(fs.cat_file(path))["token"] == theirs["token"]  # not removed by the first run
        assert second.state() == lease.HELD
    assert path not in FakeGCS.store
    assert "taking over the lease of a run that stopped renewing it" in caplog.text


def test_a_renewal_whose_answer_was_lost_is_recognised_as_ours(generations, monkeypatch):
    """A renewal written but not answered (a timeout; gcsfs retrying it) moves the generation on: the
    next one's precondition fails, the record read back is this run's own, and the lease stays held."""
    fs, path = generations
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.01)
    lost = []

    def answer_lost(record):
        if not lost:
            lost.append(record)
            raise TimeoutError("no answer")
    with lease.hold(f"{BUCKET}/.lock") as held:
        monkeypatch.setattr(GenerationalGCS, "after_write", answer_lost)
        wait_for(lambda: lost and GenerationalGCS.refused)
        refused_at = fs.info(path)["generation"]
        wait_for(lambda: fs.info(path)["generation"] != refused_at)  # renewed again
        assert (held.state(), held.reason) == (lease.HELD, "")
    assert path not in FakeGCS.store


def test_without_generations_a_taken_over_lease_is_found_by_its_token(bucket, monkeypatch):
    """A store without generations: a renewal first reads the record, and another run's token there
    ends the lease (`LOST`) without writing over it or removing it."""
    monkeypatch.setattr(lease, "RENEW_SECONDS", 0.01)
    other = {"holder": "pid 2 on host-b", "token": "theirs", "renewed": time.time()}
    with lease.hold(f"{BUCKET}/.lock") as held:
        workdir.write_text(f"{BUCKET}/.lock", json.dumps(other))
        wait_for(lambda: held.state() == lease.LOST)
        assert held.reason == f"the lease {BUCKET}/.lock was taken over by another run (pid 2 on host-b)"
    assert json.loads(bucket(".lock")) == other


def test_a_renewal_is_sent_through_gcsfs_with_the_generation_precondition(monkeypatch):
    """The request gcsfs itself sends (its HTTP session replaced): a media upload with
    ``ifGenerationMatch``; GCS's 412 reaches the lease as FileExistsError."""
    import gcsfs
    import gcsfs.retry
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    sent, answers = [], [(200, b'{"generation": "8"}'), (412, b'{"error": {"message": "conditionNotMet"}}')]

    async def request(method, path, *args, headers=None, json=None, data=None, **params):
        sent.append((method, fs._format_path(path, args), fs._get_params(params), data))
        status, contents = answers.pop(0)
        gcsfs.retry.validate_response(status, contents, path, args)
        return status, {}, None, contents
    monkeypatch.setattr(fs, "_request", request)
    assert lease._write_if_generation(fs, "bucket/run/.lock", b"{}", "7") == "8"
    assert sent == [("POST", "https://storage.googleapis.com/upload/storage/v1/b/bucket/o",
                     {"uploadType": "media", "name": "run/.lock", "ifGenerationMatch": "7"}, b"{}")]
    with pytest.raises(FileExistsError):
        lease._write_if_generation(fs, "bucket/run/.lock", b"{}", "7")


def test_a_local_or_unlocked_workdir_yields_a_lock_that_is_always_held(tmp_path):
    """The loop asks every lock alike: a local folder's (``flock``) and a disabled one are never lost."""
    for enabled in (True, False):
        with workdir.lock(str(tmp_path), enabled=enabled) as held:
            assert (held.state(), held.reason) == (lease.HELD, "")


def test_of_two_runs_that_find_the_same_expired_lease_only_one_takes_it(bucket, monkeypatch):
    """Both read the dead run's lease; the first removes that generation and creates its own; the
    second's removal of the same generation fails, and it is refused instead of removing the first's
    new lease and running beside it."""
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, GenerationalGCS, clobber=True)
    GenerationalGCS.clear_instance_cache()
    fs, path = fsspec.core.url_to_fs(f"{BUCKET}/.lock")
    fs.pipe_file(path, json.dumps({"holder": "pid 1 on a-deleted-vm", "token": "x",
                                   "renewed": time.time() - 400}).encode())
    real_remove = lease._remove_version

    def first_run_overtakes(fs, path, generation):  # between the second run's read and its removal
        monkeypatch.setattr(lease, "_remove_version", real_remove)
        lease._acquire(fs, path, "first")
        return real_remove(fs, path, generation)
    monkeypatch.setattr(lease, "_remove_version", first_run_overtakes)
    with pytest.raises(lease.LeaseHeld, match=r"^in use by another run \(the expired lease of pid 1 on "
                                              r"a-deleted-vm was just taken over by another run\)$"):
        lease._acquire(fs, path, "second")
    assert json.loads(fs.cat_file(path))["token"] == "first"
    # An unconditional removal (a store without generations) would have let both run.
    monkeypatch.setattr(lease, "_remove_version", first_run_overtakes)
    fs.pipe_file(path, json.dumps({"holder": "pid 1", "token": "x", "renewed": time.time() - 400}).encode())
    monkeypatch.setattr(lease, "_generation", lambda fs, path: None)
    lease._acquire(fs, path, "second")
    assert json.loads(fs.cat_file(path))["token"] == "second"


def test_a_tfds_data_dir_on_a_bucket_is_cached_on_the_local_disk(bucket, monkeypatch, tmp_path):
    """TFDS reads a bucket's data_dir through epath; the arrays made from it are cached in a local
    folder named after the URL (memory maps and renames need a local disk), not in a folder ``gs:``."""
    from mtt_jax import data
    from mtt_jax.data import tfds_io
    monkeypatch.setenv("MTT_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with tfds_io.mock_data(16):
        source = data.make_source("multimnist", ("mnist_left", "mnist_right"), seed=1,
                                  data_dir="gs://bucket/tfds")
    assert source.train_batch(0, 4)["inputs"].shape[0] == 4
    cached = tmp_path / "cache" / "gs" / "bucket" / "tfds" / "mnist"
    assert sorted(p.name for p in cached.rglob("*.npz")) == ["test.npz", "train.npz"]
    assert not (tmp_path / "gs:").exists()
    assert tfds_io.cache_path("/data/tfds", "mnist") == "/data/tfds/mtt_jax_cache/mnist"
