"""The run directory: one run per workdir, resumed by the same command, never silently overwritten.

A workdir that holds ``config.json`` belongs to that run. Starting a different run there (any field
that changes the computation differs) is refused unless ``overwrite`` is given, which clears the old
outputs first. Fields that only change how often things are logged or saved may differ on resume.
Paths the outputs could not be kept at (URLs, files, unwritable folders) are refused before any work,
and results are written whole or not at all (`write_text`, `write_json`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket

# Fields that do not change the computed trajectory; they may differ between a run and its resumption.
RESUMABLE_FIELDS = frozenset({"log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep",
                              "grad_accum_unroll", "attention_kernel"})
OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "summary.md", "config.json", "curves.png",
           "task_attention.png", "affinity.json")


class WorkdirError(ValueError):
    """The workdir cannot take this run (another run's, a URL, not writable); the message is one line."""


# A URL such as gs://bucket/run: os.path would treat it as the relative folder "gs:/bucket/run".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_location(workdir: str, flag: str = "--workdir") -> None:
    """Refuses a folder the outputs could not be kept in: a URL (``gs://``, ``s3://``: the writers use
    local file I/O, so the run would land in a local folder named ``gs:`` and be lost with the machine),
    a path that exists and is not a folder, or one that cannot be created or written."""
    _refuse_url(workdir, flag)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir} exists and is not a folder; pass a folder for {flag}")
    _check_writable(workdir, flag)


def check_output_file(path: str, flag: str) -> None:
    """Refuses a results file that could not be written after the work: a URL, an existing folder, or
    one in a folder that cannot be created or written."""
    _refuse_url(path, flag)
    if os.path.isdir(path):
        raise WorkdirError(f"{flag}={path} is a folder; pass a file name")
    _check_writable(os.path.dirname(os.path.abspath(path)), flag)


def _check_writable(path: str, flag: str) -> None:
    """``path``, or the nearest folder above it that exists (where it will be created), is writable."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"{flag}={path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"{flag}={path}: {existing} is not writable")


def _refuse_url(path: str, flag: str) -> None:
    if _URL.match(path):
        raise WorkdirError(f"{flag}={path}: URLs are not supported yet (outputs are written as local "
                           "files); mount the bucket with gcsfuse and pass its local path "
                           "(launch/README.md)")


def write_text(path: str, text: str) -> None:
    """Writes ``path`` through a temporary file and a rename (creating the folder), so that ``path``
    holds either its previous content or the whole new one, never half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, value, **dump_options) -> None:
    """`write_text` of ``json.dumps(value, **dump_options)``."""
    write_text(path, json.dumps(value, **dump_options))


def run_identity(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in RESUMABLE_FIELDS}


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def prepare(workdir: str, config, overwrite: bool = False) -> bool:
    """Checks (and with ``overwrite`` clears) ``workdir``; returns True if it holds a run to resume.

    Outputs without their ``config.json`` (copied in, or left by another tool) belong to no known run:
    resuming from them, or writing a new run among them, would mix two runs, so they are refused too.
    """
    check_location(workdir)
    if overwrite:
        for target in (os.path.join(workdir, name) for name in OUTPUTS):
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        return False
    present = [name for name in OUTPUTS if _holds(os.path.join(workdir, name))]
    if not present:
        return False
    if "config.json" not in present:
        raise WorkdirError(f"{workdir} holds {', '.join(present)} without the config.json of their run; "
                           f"use another --workdir or pass --overwrite to discard them")
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            previous = run_identity(json.load(f))
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON that is not an object
        raise WorkdirError(f"{path} cannot be read ({type(e).__name__}: {e}); fix or remove it, or pass "
                           f"--overwrite to discard the run") from None
    current = run_identity(config_dict(config))
    if previous != current:
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        raise WorkdirError(f"{workdir} holds a run with a different config (fields: {', '.join(changed)}); "
                           f"use another --workdir or pass --overwrite to discard it")
    return True


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True):
    """Holds ``workdir/.lock`` (``flock``) for a run, so that a second run started in the same workdir
    (the command launched twice, a requeued job whose first copy still runs) stops with one line
    instead of writing metrics and checkpoints among the first one's. It is released when the block
    ends (or the process does). Where the filesystem has no ``flock`` (some network and FUSE mounts)
    the run goes on unlocked. A location `check_location` refuses is not created."""
    if not enabled:
        yield
        return
    check_location(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkdirError(f"{workdir} is in use by another run ({holder}); wait for it to end or "
                               f"use another --workdir") from None
        except OSError:  # no flock on this filesystem
            pass
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _holds(path: str) -> bool:
    """A file, or a folder with anything in it (an empty one is what a run stopped at its start left)."""
    return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def write_config(workdir: str, config) -> None:
    write_json(os.path.join(workdir, "config.json"), config_dict(config), indent=2, sort_keys=True)
