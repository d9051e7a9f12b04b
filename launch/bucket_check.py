"""A bucket workdir end to end, through the real gcsfs: a run killed between uploads, then resumed.

    python -m launch.bucket_check --bucket gs://BUCKET/PATH   # your bucket, checkpoints included
    python -m launch.bucket_check --emulator                  # no GCP: gcp-storage-emulator on 127.0.0.1

A tiny run (``configs/seqtasks.py:tiny``, 20 steps, a checkpoint every 5) is trained once in a local
folder as the reference. The same run on the bucket is then stopped at step 13 by an exception that
skips closing its writers, as a kill would, with metrics uploaded only when the loop asks (before
each checkpoint), and started again with the same command. It checks: the stopped run left every
train record up to its checkpoint (steps 1-10) and released its lease; the resumed
run's records equal the reference's, loss for loss; ``summary.md``'s tables are the same; the plots,
``config.json`` and TensorBoard events are there, and so is the resumed run's ``jax.profiler`` trace of
updates 16-17 with its op table (traced locally, uploaded). Each check prints one line; the exit status is 1 if
any failed. The run goes to a new ``check-<time>`` folder under the URL; the check removes it at the
end (``--keep`` leaves it).

``--emulator`` needs ``pip install gcp-storage-emulator`` (not a requirement of the project). It
serves gcsfs, but not tensorstore's OCDBT checkpoints (it returns object generations that tensorstore
rejects), so with it the checkpoints go to a local folder. With ``--bucket`` everything goes to GCS,
with the machine's credentials, as a real run's would. What the emulator does not check: GCS's
``ifGenerationMatch=0`` precondition and its delete of one generation, which the lease relies on (the
emulator ignores both; ``tests/test_bucket_workdir.py`` checks the lease on in-memory filesystems that
honour them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

KILLED_AT, CHECKPOINT_EVERY, PROFILED = 13, 5, 16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bucket", help="gs://BUCKET/PATH that this machine's credentials can write")
    where.add_argument("--emulator", action="store_true", help="a local gcp-storage-emulator instead")
    parser.add_argument("--keep", action="store_true", help="leave the check's run in the bucket")
    args = parser.parse_args(argv)
    if args.bucket and not args.bucket.startswith("gs://"):
        parser.error(f"--bucket={args.bucket}: pass a gs://BUCKET/PATH URL")
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(tempfile.TemporaryDirectory(prefix="mtt_jax_bucket_check_"))
        if args.emulator:
            base = stack.enter_context(emulator(os.path.join(local, "emulator")))
        else:
            base = args.bucket.rstrip("/")
        return run_checks(f"{base}/check-{int(time.time())}", local, local_checkpoints=args.emulator,
                          keep=args.keep)


@contextlib.contextmanager
def emulator(data_dir: str):
    """gcp-storage-emulator on a free local port with a bucket named ``bucket``; yields ``gs://bucket``.
    gcsfs is pointed at it (``STORAGE_EMULATOR_HOST``), as its plain filesystem: the default one first
    asks GCS's storage-control gRPC service for the bucket's layout, which the emulator does not serve."""
    try:
        import gcp_storage_emulator  # noqa: F401
    except ImportError:
        sys.exit("error: --emulator needs gcp-storage-emulator (pip install gcp-storage-emulator)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--in-memory", "--default-bucket", "bucket"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.time() > deadline or server.poll() is not None:
                sys.exit("error: gcp-storage-emulator did not start")
            time.sleep(0.2)
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        import fsspec
        import gcsfs.core

        class EmulatedGCS(gcsfs.core.GCSFileSystem):
            def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath's option for gcsfs
                super().__init__(*args, token="anon", **kwargs)
        for name in ("gs", "gcs"):
            fsspec.register_implementation(name, EmulatedGCS, clobber=True)
        yield "gs://bucket"
    finally:
        server.terminate()
        server.wait()


def run_checks(url: str, local: str, local_checkpoints: bool, keep: bool) -> int:
    import fsspec

    from configs import seqtasks as seqtasks_config
    from mtt_jax import train
    from mtt_jax.run import checkpoint, writers

    made, real_init = [], checkpoint.Checkpointer.__init__

    def init(self, workdir, *args, **kwargs):  # kept, to wait for the killed run's last save
        if local_checkpoints:
            workdir = os.path.join(local, "checkpoints", workdir.replace("://", "_"))
        real_init(self, workdir, *args, **kwargs)
        made.append(self)
    checkpoint.Checkpointer.__init__ = init

    fs, _ = fsspec.core.url_to_fs(url)
    config = seqtasks_config.get_config("tiny")
    config.checkpoint_every, config.log_every = CHECKPOINT_EVERY, 1
    config.profile.first_step, config.profile.num_steps = PROFILED, 2  # traced by the resumed run
    start = time.time()
    print(f"bucket check in {url}{' (checkpoints local)' if local_checkpoints else ''}", flush=True)
    train.train_and_evaluate(config, os.path.join(local, "reference"), quiet=True)
    reference = lambda name: open(os.path.join(local, "reference", name)).read()

    writers.URL_FLUSH_SECONDS = 3600.0  # uploads only when the loop asks: before each checkpoint
    resumable = train.preemption_requested

    def killed(flag, step, every):
        if step == KILLED_AT:
            raise KeyboardInterrupt  # the run dies here; its writers are never closed
        return resumable(flag, step, every)
    train.preemption_requested = killed
    try:
        train.train_and_evaluate(config, url, quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        train.preemption_requested = resumable
    made[-1].wait()
    read = lambda name: fs.cat_file(f"{url}/{name}").decode()
    steps = lambda text, split: [r["step"] for r in records(text, split)]
    last_saved = KILLED_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    results = [check(f"stopped at step {KILLED_AT}: train records 1-{last_saved} kept",
                     steps(read("metrics.jsonl"), "train") == list(range(1, last_saved + 1)),
                     steps(read("metrics.jsonl"), "train")),
               check("the stopped run released its lease", not fs.exists(f"{url}/.lock"))]

    train.train_and_evaluate(config, url, quiet=True)
    ours, theirs = read("metrics.jsonl"), reference("metrics.jsonl")
    for split in ("train", "eval"):
        results.append(check(f"resumed: {split} steps equal the reference's",
                             steps(ours, split) == steps(theirs, split), steps(ours, split)))
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(records(ours, "train"), records(theirs, "train"))]
    results.append(check("resumed: train losses equal the reference's", max(differences) < 1e-5,
                         f"max difference {max(differences):.2e}"))
    table = lambda text: [line for line in text.splitlines() if line.startswith("|")]
    results.append(check("summary.md's tables equal the reference's",
                         table(read("summary.md")) == table(reference("summary.md"))))
    names = {path.rsplit("/", 1)[-1] for path in fs.find(url)}
    results.append(check("config.json, curves.png and TensorBoard events are there",
                         {"config.json", "curves.png"} <= names and
                         any(n.startswith("events.out.tfevents") for n in names), sorted(names)))
    results.append(check(f"the resumed run's profile of updates {PROFILED}-{PROFILED + 1} was uploaded",
                         f"updates {PROFILED}-{PROFILED + 1}" in read("profile/op_times.md") and
                         any(n.endswith(".xplane.pb") for n in names)))
    if not keep:
        fs.rm(url, recursive=True)
    print(f"{sum(results)}/{len(results)} checks passed in {time.time() - start:.0f} s")
    return 0 if all(results) else 1


def records(text: str, split: str) -> list[dict]:
    return [r for r in map(json.loads, text.splitlines()) if r["split"] == split]


def check(name: str, ok: bool, detail="") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{'' if ok or detail == '' else f'  ({detail})'}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
