"""The lock of a workdir on an object store (``gs://``), which has no ``flock``: a lease object.

``<workdir>/.lock`` is created only where there is none: fsspec's ``pipe_file(mode="create")``, which
gcsfs sends with GCS's ``ifGenerationMatch=0`` precondition, so of two runs started together exactly
one creates it. The holder renews it every ``RENEW_SECONDS`` from a background thread and removes it
when the run ends (SIGTERM included). A lease not renewed for ``EXPIRE_SECONDS`` was left by a run
that died without ending (SIGKILL, a deleted VM); the next run takes it over with a warning, so a
requeued job waits for at most that long, and the refusal says how long is left.

Taking over is conditional on the version that was judged expired: on GCS every write of an object has
a new generation, and deleting ``path#generation`` (gcsfs with ``version_aware``) removes the object
only while that generation is live. So of two runs that find the same expired lease, one removes it and
creates its own, and the other finds that version gone and is refused. On stores without generations
the removal is unconditional, and two such runs could both take the lease over.

Limits: ages are wall-clock times written by the holder, so hosts need synchronised clocks (NTP, as on
cloud VMs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

import fsspec

RENEW_SECONDS = 60.0
EXPIRE_SECONDS = 300.0


class LeaseHeld(Exception):
    """Another run holds the lease; the message names it and says when it expires."""


@contextlib.contextmanager
def hold(url: str):
    """Holds the lease object ``url`` for the block (`LeaseHeld` if another run holds it)."""
    fs, path = fsspec.core.url_to_fs(url)
    token = uuid.uuid4().hex
    _acquire(fs, path, token)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, token, stop), daemon=True,
                               name="mtt_jax lease")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if _read(fs, path).get("token") == token:
            fs.rm(path)


def _record(token: str) -> bytes:
    return json.dumps({"holder": f"pid {os.getpid()} on {socket.gethostname()}", "token": token,
                       "renewed": time.time()}).encode()


def _read(fs, path: str) -> dict:
    """The lease's record; ``{}`` if there is none or it cannot be parsed (a write cut short)."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return {}


def _acquire(fs, path: str, token: str) -> None:
    for attempt in range(2):
        try:
            fs.pipe_file(path, _record(token), mode="create")
            return
        except FileExistsError:
            generation = _generation(fs, path)
            held = _read(fs, path)
            age = time.time() - float(held.get("renewed", 0.0))
            holder = held.get("holder", "another run")
            if attempt or age < EXPIRE_SECONDS or generation != _generation(fs, path):
                raise LeaseHeld(f"in use by another run ({holder}, lease renewed {age:.0f} s ago); wait "
                                f"for it to end, or, if it died, {max(EXPIRE_SECONDS - age, 0):.0f} s for "
                                f"its lease to expire") from None
            if not _remove_version(fs, path, generation):
                raise LeaseHeld(f"in use by another run (the expired lease of {holder} was just taken "
                                f"over by another run)")
            logging.warning("taking over the lease of a run that stopped renewing it %.0f s ago (%s)",
                            age, holder)


def _generation(fs, path: str) -> str | None:
    """The object's generation where the store has them (GCS), else None (or the lease is gone)."""
    try:
        generation = fs.info(path).get("generation")
    except FileNotFoundError:
        return None
    return str(generation) if generation else None


def _remove_version(fs, path: str, generation: str | None) -> bool:
    """Removes the lease if it is still at ``generation`` (GCS: a delete of that generation fails once
    another write replaced it); False if another run removed or replaced it first. Without a generation
    the removal is unconditional."""
    try:
        if generation is None:
            fs.rm_file(path)
        else:
            versioned = fsspec.filesystem(fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0],
                                          **{**fs.storage_options, "version_aware": True})
            versioned.rm_file(f"{path}#{generation}")
    except FileNotFoundError:
        return False
    return True


def _renew(fs, path: str, token: str, stop: threading.Event) -> None:
    while not stop.wait(RENEW_SECONDS):
        try:
            if _read(fs, path).get("token") != token:
                logging.warning("the lease %s was taken over by another run; this run goes on", path)
                return
            fs.pipe_file(path, _record(token))
        except Exception as e:  # a failed renewal is retried at the next one; the run goes on
            logging.warning("could not renew the lease %s (%s: %s)", path, type(e).__name__, e)
