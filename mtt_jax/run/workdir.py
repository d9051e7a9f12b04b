"""The run directory: one run per workdir, resumed by the same command, never silently overwritten.

A workdir that holds ``config.json`` belongs to that run. Starting a different run there (any field
that changes the computation differs) is refused unless ``overwrite`` is given, which clears the old
outputs first. Fields that only change how often things are logged or saved may differ on resume.
Paths the outputs could not be kept at (files, unwritable folders, buckets that cannot be written)
are refused before any work, and results are written whole or not at all (`write_text`, `write_json`).

A run's or an experiment's workdir may be a bucket URL (``gs://bucket/run``; ``s3://`` with s3fs),
as on Cloud TPU VMs whose disks go with the VM: every path here goes through `etils.epath` (gcsfs for
``gs://`` when TensorFlow is absent). An object store replaces an object whole, so a write there is
whole or absent without the local temporary file and rename; it has no ``flock``, so such a workdir
is locked by a lease object (`mtt_jax.run.lease`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import uuid

from etils import epath

from mtt_jax.run import lease

# Fields that do not change the computed trajectory; they may differ between a run and its resumption.
RESUMABLE_FIELDS = frozenset({"log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep",
                              "grad_accum_unroll", "attention_kernel", "profile", "transfer_guard",
                              "nonfinite_skip_window", "nonfinite_skip_limit"})
# Config fields added after runs were first written, each with the value that does what a config
# without it did: a run written before the field existed resumes when the field has that value (as
# config.json holds it: a tuple is a list). ``plugins`` is no resumable field: the modules it imports
# define what the run's method, source and task names compute.
ADDED_FIELDS = {("data", "eval_split"): "test", ("plugins",): [],
                # weighting methods and options added later, at their defaults (mtt_jax.weighting)
                ("weighting", "dualproj"): {"norm_eps": 1e-4, "reg_eps": 1e-4, "preference": []},
                ("weighting", "conflictfree"): {"preference": []},
                ("weighting", "cr_mogm"): {"inner": "mgda", "alpha": 0.9},
                ("weighting", "upgrad", "preference"): [], ("weighting", "blocks"): [],
                ("weighting", "auto_lambda"): {"init": 0.1, "lr": 1e-4, "lookahead_lr": 0.1},
                ("model", "readout"): "mean", ("model", "task_attention_pool"): "positions",
                ("model", "pooler"): False,   # BERT's pooler on the "cls" read-out
                # the trunk's options for pretrained checkpoints (mtt_jax.models.pretrained)
                ("model", "checkpoint"): "", ("model", "norm_position"): "pre", ("model", "token_types"): 0,
                ("model", "embed_norm"): False, ("model", "embed_scale"): True, ("model", "gelu"): "tanh",
                ("model", "layer_norm_eps"): 1e-6,
                # adapters and the frozen encoder (mtt_jax.models.adapters)
                ("model", "adapters"): "none", ("model", "adapter_dim"): 64, ("model", "adapter_hyper_dim"): 8,
                ("optimizer", "freeze"): "none"}
OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "summary.md", "config.json", "curves.png",
           "task_attention.png", "affinity.json", "profile")


class WorkdirError(ValueError):
    """The workdir cannot take this run (another run's, in use, not writable, a URL it cannot use);
    the message is one line."""


# A URL such as gs://bucket/run: os.path would treat it as the relative folder "gs:/bucket/run".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The object stores a workdir may be on, and the package epath reaches each through (without TensorFlow).
URL_PACKAGES = {"gs": "gcsfs", "s3": "s3fs"}
_checked_urls: set[str] = set()


def is_url(path: str) -> bool:
    return bool(_URL.match(str(path)))


def join(workdir: str, *names: str) -> str:
    """``os.path.join`` that keeps a URL's ``//``."""
    return str(epath.Path(workdir).joinpath(*names)) if is_url(workdir) else os.path.join(workdir, *names)


def check_location(workdir: str, flag: str = "--workdir", urls: bool = False) -> None:
    """Refuses a folder the outputs could not be kept in: a path that exists and is not a folder, one
    that cannot be created or written, and a URL unless ``urls`` (callers whose writers are local file
    I/O: the run would land in a local folder named ``gs:`` and be lost with the machine). An accepted
    URL must be on a known object store whose package is installed, and writable (`check_url`)."""
    if not str(workdir).strip():
        raise WorkdirError(f"{flag} is empty; pass a folder (or a gs:// URL) for the run's outputs")
    if is_url(workdir):
        if not urls:
            raise WorkdirError(f"{flag}={workdir}: URLs are not supported for {flag}; pass a local path "
                               "(or a gcsfuse mount of the bucket)")
        check_url(workdir, flag)
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir} exists and is not a folder; pass a folder for {flag}")
    _check_writable(workdir, flag)


def check_output_file(path: str, flag: str) -> None:
    """Refuses a results file that could not be written after the work: an existing folder, one in a
    folder that cannot be created or written, or a URL whose bucket cannot be written (`check_url`)."""
    if is_url(path):
        check_url(path.rstrip("/").rsplit("/", 1)[0], flag)
        if epath.Path(path).is_dir():
            raise WorkdirError(f"{flag}={path} is a folder; pass a file name")
        return
    if os.path.isdir(path):
        raise WorkdirError(f"{flag}={path} is a folder; pass a file name")
    _check_writable(os.path.dirname(os.path.abspath(path)), flag)


def check_url(url: str, flag: str = "--workdir") -> None:
    """A bucket URL the run can keep its outputs at: a known scheme, its filesystem package installed,
    not an object (a file), and writable: a probe object is written and removed, so that missing
    credentials or a missing bucket stop the run before any work, not at its first metrics."""
    if url in _checked_urls:
        return
    scheme = url.split("://", 1)[0].lower()
    if scheme not in URL_PACKAGES:
        raise WorkdirError(f"{flag}={url}: unknown URL scheme {scheme}://; workdirs may be local paths or "
                           f"{', '.join(s + '://' for s in URL_PACKAGES)} URLs")
    target = epath.Path(url)
    try:
        if target.exists() and not target.is_dir():
            raise WorkdirError(f"{flag}={url} is an object, not a folder; pass a folder")
        probe = target / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except WorkdirError:
        raise
    except ImportError:
        raise WorkdirError(f"{flag}={url}: {scheme}:// needs the {URL_PACKAGES[scheme]} package "
                           f"(pip install {URL_PACKAGES[scheme]}) or TensorFlow") from None
    except Exception as e:  # credentials, a missing bucket, permissions: each store has its own types
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise WorkdirError(f"{flag}={url} cannot be written ({type(e).__name__}: {first_line})") from None
    _checked_urls.add(url)


def _check_writable(path: str, flag: str) -> None:
    """``path``, or the nearest folder above it that exists (where it will be created), is writable."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise WorkdirError(f"{flag}={path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"{flag}={path}: {existing} is not writable")


def makedirs(path: str) -> None:
    """Creates the folder; a no-op for a URL (object stores have no folders: a write creates its
    prefixes, and ``mkdir`` at a bucket's top level could try to create the bucket)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def write_text(path: str, text: str) -> None:
    """`write_bytes` of UTF-8 ``text``."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` so that it holds either its previous content or the whole new one, never half
    of it: locally through a temporary file and a rename (creating the folder); an object store's
    upload replaces the object whole by itself."""
    if is_url(path):
        epath.Path(path).write_bytes(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def upload_tree(local_dir: str, target: str) -> None:
    """Copies every file under the local folder ``local_dir`` to the same relative path under
    ``target`` (a folder or a bucket URL), each whole (`write_bytes`)."""
    for folder, _, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, local_dir).split(os.sep)
            with open(path, "rb") as f:
                write_bytes(join(target, *relative), f.read())


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def remove(path: str) -> None:
    """Removes a file or a whole folder; nothing if there is none."""
    target = epath.Path(path)
    if target.is_dir():
        target.rmtree()
    elif target.exists():
        target.unlink()


def write_json(path: str, value, **dump_options) -> None:
    """`write_text` of ``json.dumps(value, **dump_options)``."""
    write_text(path, json.dumps(value, **dump_options))


def run_identity(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in RESUMABLE_FIELDS}


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


# Outputs that are folders; the others are files.
_FOLDERS = ("checkpoints", "tensorboard", "profile")
# The fields every config.json of a run of ours has (configs/default.py's base_config).
_RUN_FIELDS = frozenset({"seed", "total_steps", "tasks", "data", "model", "weighting", "optimizer"})


def prepare(workdir: str, config, overwrite: bool = False) -> bool:
    """Checks (and with ``overwrite`` clears) ``workdir``; returns True if it holds a run to resume.

    Outputs without their ``config.json`` (copied in, or left by another tool) belong to no known run:
    resuming from them, or writing a new run among them, would mix two runs, so they are refused, and
    ``overwrite`` clears only a run of ours (`check_overwrite`).
    """
    check_location(workdir, urls=True)
    if overwrite:
        check_overwrite(workdir)
        for name in OUTPUTS:
            remove(join(workdir, name))
        return False
    present = _present_outputs(workdir)
    if not present:
        return False
    if "config.json" not in present:
        raise WorkdirError(f"{workdir} holds {', '.join(present)} without the config.json of their run; "
                           f"use another --workdir, or move them away if they are not needed")
    previous = run_identity(_read_run_config(workdir))
    current = run_identity(_without_added_defaults(config_dict(config), previous))
    if previous != current:
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        raise WorkdirError(f"{workdir} holds a run with a different config (fields: {', '.join(changed)}); "
                           f"use another --workdir or pass --overwrite to discard it")
    _check_output_kinds(workdir, present)
    return True


def _without_added_defaults(current: dict, previous: dict) -> dict:
    """``current`` less each `ADDED_FIELDS` entry that ``previous`` lacks and ``current`` holds at its
    old-behaviour value (so that an upgrade alone never blocks a resume)."""
    current = json.loads(json.dumps(current))
    for path, value in ADDED_FIELDS.items():
        *parents, name = path
        old, new = previous, current
        for key in parents:
            old, new = old.get(key, {}), new.get(key, {})
        if name not in old and new.get(name) == value:
            new.pop(name, None)
    return current


def check_overwrite(workdir: str) -> None:
    """Refuses ``--overwrite`` of a folder whose outputs are not a run of ours: only a folder whose
    ``config.json`` is an mtt_jax run's may be cleared. Another tool's ``config.json``, checkpoints
    without a config, or a config that cannot be read are never deleted, whatever the flag."""
    check_location(workdir, urls=True)
    present = _present_outputs(workdir)
    if not present:
        return
    refusal = (f"; --overwrite clears only a run of mtt_jax, so nothing was removed: move them away or "
               f"use another --workdir")
    if "config.json" not in present:
        raise WorkdirError(f"{workdir} holds {', '.join(present)} without the config.json of an mtt_jax "
                           f"run{refusal}")
    previous = _read_run_config(workdir, hint=refusal)
    if not isinstance(previous, dict) or not _RUN_FIELDS <= previous.keys():
        raise WorkdirError(f"{join(workdir, 'config.json')} is not an mtt_jax run's config (it lacks "
                           f"{', '.join(sorted(_RUN_FIELDS - set(previous or ())))}){refusal}")


def _present_outputs(workdir: str) -> list[str]:
    return [name for name in OUTPUTS if _holds(join(workdir, name))]


def _read_run_config(workdir: str, hint: str = "; fix or remove it, or pass --overwrite to discard the "
                                                   "run") -> dict:
    path = join(workdir, "config.json")
    try:
        previous = json.loads(read_text(path))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} cannot be read ({type(e).__name__}: {e}){hint}") from None
    if not isinstance(previous, dict):
        raise WorkdirError(f"{path} is not a JSON object{hint}")
    return previous


def _check_output_kinds(workdir: str, present: list[str]) -> None:
    """An output where the run expects a folder is a file, or the reverse (e.g. ``checkpoints`` made
    a file by hand): the run could neither resume from it nor write it."""
    for name in present:
        path = epath.Path(join(workdir, name))
        if (name in _FOLDERS) != path.is_dir():
            kind, expected = ("file", "folder") if name in _FOLDERS else ("folder", "file")
            raise WorkdirError(f"{path} is a {kind}, but the run keeps its {name} in a {expected} there; "
                               f"move it away (or pass --overwrite to discard the run)")


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True):
    """Holds ``workdir/.lock`` (``flock``) for a run, so that a second run started in the same workdir
    (the command launched twice, a requeued job whose first copy still runs) stops with one line
    instead of writing metrics and checkpoints among the first one's. It is released when the block
    ends (or the process does). On an object store, which has no ``flock``, ``.lock`` is a lease
    (`mtt_jax.run.lease`); where a filesystem has no ``flock`` (some network and FUSE mounts) the run goes
    on unlocked. A location `check_location` refuses is not created.

    Yields what the run asks at every step: its `lease.Lease` on an object store, which can be lost
    (``state()`` is ``lease.HELD``, ``lease.AT_RISK`` or ``lease.LOST``, and ``reason`` says why);
    elsewhere a `lease.AlwaysHeld`, with the same ``state()`` (always ``HELD``) and ``reason``."""
    if not enabled:
        yield lease.AlwaysHeld()
        return
    if is_url(workdir):
        check_url(workdir)
        try:
            with lease.hold(join(workdir, ".lock")) as held:
                yield held
        except lease.LeaseHeld as e:
            raise WorkdirError(f"{workdir} is {e}") from None
        return
    check_location(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise _in_use(workdir, f.read().strip()) from None
        except OSError:  # no flock on this filesystem
            pass
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield lease.AlwaysHeld()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_free(workdir: str) -> None:
    """Raises `WorkdirError`, as `lock` would, if another run holds ``workdir``'s lock now; creates and
    changes nothing. A run checks this before its start-up (building and compiling can take minutes),
    then takes the lock itself when it is ready to write."""
    if is_url(workdir):
        check_url(workdir)
        try:
            lease.check_free(join(workdir, ".lock"))
        except lease.LeaseHeld as e:
            raise WorkdirError(f"{workdir} is {e}") from None
        return
    try:
        f = open(os.path.join(workdir, ".lock"))
    except OSError:  # no lock file (or no folder): nobody holds it
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(workdir, f.read().strip()) from None
        except OSError:  # no flock on this filesystem
            return
        fcntl.flock(f, fcntl.LOCK_UN)


def _in_use(workdir: str, holder: str) -> WorkdirError:
    """The refusal of a local workdir whose ``.lock`` another process holds (``holder``: its line)."""
    return WorkdirError(f"{workdir} is in use by another run ({holder or 'another process'}); wait for it "
                        f"to end or use another --workdir")


def _holds(path: str) -> bool:
    """A file, or a folder with anything in it (an empty one is what a run stopped at its start left)."""
    target = epath.Path(path)
    return target.is_file() or (target.is_dir() and any(True for _ in target.iterdir()))


def write_config(workdir: str, config) -> None:
    write_json(join(workdir, "config.json"), config_dict(config), indent=2, sort_keys=True)
