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

Renewals are conditional too: each rewrites the lease only while it is still at the generation this
run last wrote (GCS's ``ifGenerationMatch``), so a run whose lease was taken over cannot overwrite the
new holder's. A run also judges its own lease from the time of its last successful renewal:
`Lease.state` is `HELD`, then `AT_RISK` once no renewal has succeeded for more than ``EXPIRE_SECONDS -
2 * RENEW_SECONDS`` (180 s), when the lease could expire before the next renewal could succeed but no
other run can have taken it yet (the run saves a last checkpoint and stops), and `LOST` once it was
taken over or removed, or not renewed for ``EXPIRE_SECONDS`` (the run stops without writing anything
more). Neither goes back to `HELD`, and the lease is no longer renewed. `state` is cheap enough to ask
at every step. On stores without generations a renewal falls back to reading the record and writing
only if it still has this run's token: another run's lease written between the two would be
overwritten (GCS's precondition has no such gap).

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

HELD, AT_RISK, LOST = "held", "at risk", "lost"

_clock = time.monotonic  # how long since a renewal, as this run judges it (a test stops it)


class LeaseHeld(Exception):
    """Another run holds the lease; the message names it and says when it expires."""


class AlwaysHeld:
    """What a lock that cannot be lost yields (a local folder's ``flock``, or no lock): the same
    `state` and `reason` as a `Lease`, so that a training loop asks both alike."""
    reason = ""

    def state(self) -> str:
        return HELD


class Lease:
    """The lease a run holds (`hold` yields it). `state` is `HELD`, `AT_RISK` or `LOST` (see the module
    docstring), and `reason` says why in one line once it is not `HELD` (else ``""``). A state other
    than `HELD` is final, and the lease is no longer renewed."""

    def __init__(self, url: str, fs, path: str, token: str, generation: str | None, written: float):
        self.url, self.reason = url, ""
        self._fs, self._path, self._token, self._generation = fs, path, token, generation
        self._renewed = written  # `_clock` before the last successful write of the lease was made
        self._state, self._error = HELD, "no answer"
        self._lock = threading.Lock()

    def state(self) -> str:
        if self._state == LOST:
            return self._state
        since = _clock() - self._renewed
        if since >= EXPIRE_SECONDS:
            self._end(LOST, f"could not renew the lease {self.url} for {since:.0f} s ({self._error}): it "
                            f"has expired, and another run may hold it")
        elif since > EXPIRE_SECONDS - 2 * RENEW_SECONDS:
            self._end(AT_RISK, f"could not renew the lease {self.url} for {since:.0f} s ({self._error}); "
                               f"it expires in {EXPIRE_SECONDS - since:.0f} s")
        return self._state

    def _end(self, state: str, reason: str) -> None:
        with self._lock:
            if self._state == HELD or (state == LOST and self._state == AT_RISK):
                self._state, self.reason = state, reason
                logging.warning("%s", reason)

    def _renew(self) -> None:
        """One renewal, written only while the lease is at the generation this run last wrote (on
        stores without generations: only while its record has this run's token, checked just before);
        a failure is kept for `reason` and retried at the next renewal."""
        started = _clock()
        try:
            if self._generation is None:  # no generations: the token is checked, then the lease written
                held = _read(self._fs, self._path)
                if held.get("token") != self._token:
                    return self._taken_over(held)
                self._fs.pipe_file(self._path, _record(self._token))
            else:
                try:
                    self._generation = _write_if_generation(self._fs, self._path, _record(self._token),
                                                            self._generation)
                except FileExistsError:  # the precondition failed: another generation, or none
                    generation, held = _generation(self._fs, self._path), _read(self._fs, self._path)
                    if held.get("token") != self._token or generation != _generation(self._fs, self._path):
                        return self._taken_over(held)
                    # Ours: an earlier write whose answer was lost (a timeout, a retried request) landed.
                    self._generation = _write_if_generation(self._fs, self._path, _record(self._token),
                                                            generation)
            self._renewed, self._error = started, "no answer"
        except Exception as e:  # retried at the next renewal; `state` judges how long that may go on
            self._error = f"{type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:200]}"
            logging.warning("could not renew the lease %s (%s)", self.url, self._error)

    def _taken_over(self, held: dict) -> None:
        if held:
            self._end(LOST, f"the lease {self.url} was taken over by another run "
                            f"({held.get('holder', 'unnamed')})")
        else:
            self._end(LOST, f"the lease {self.url} was removed by another run")

    def _renew_until(self, stop: threading.Event) -> None:
        while not stop.wait(RENEW_SECONDS) and self.state() == HELD:
            self._renew()

    def _release(self) -> None:
        """Removes the lease if it is still ours: at a generation whose record has our token (GCS: the
        delete of that generation fails once another write replaced it); by the token alone on stores
        without generations."""
        try:
            generation, held = _generation(self._fs, self._path), _read(self._fs, self._path)
            if held.get("token") == self._token and generation == _generation(self._fs, self._path):
                _remove_version(self._fs, self._path, generation)
        except Exception as e:  # left to expire
            logging.warning("could not remove the lease %s (%s: %s); it expires in %.0f s", self.url,
                            type(e).__name__, e, EXPIRE_SECONDS)


@contextlib.contextmanager
def hold(url: str):
    """Holds the lease object ``url`` for the block (`LeaseHeld` if another run holds it) and yields
    its `Lease`, renewed every ``RENEW_SECONDS`` while it is `HELD`."""
    fs, path = fsspec.core.url_to_fs(url)
    token, started = uuid.uuid4().hex, _clock()
    held = Lease(url, fs, path, token, _acquire(fs, path, token), started)
    stop = threading.Event()
    renewer = threading.Thread(target=held._renew_until, args=(stop,), daemon=True, name="mtt_jax lease")
    renewer.start()
    try:
        yield held
    finally:
        stop.set()
        renewer.join()
        held._release()


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _record(token: str) -> bytes:
    return json.dumps({"holder": _holder(), "token": token, "renewed": time.time()}).encode()


def _read(fs, path: str) -> dict:
    """The lease's record; ``{}`` if there is none or it cannot be parsed (a write cut short)."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return {}


def _acquire(fs, path: str, token: str) -> str | None:
    """Creates the lease (taking over an expired one); returns its generation (None without them)."""
    for attempt in range(2):
        try:
            fs.pipe_file(path, _record(token), mode="create")
            return _generation(fs, path)
        except FileExistsError:
            generation = _generation(fs, path)
            held = _read(fs, path)
            age = time.time() - float(held.get("renewed", 0.0))
            holder = held.get("holder", "another run")
            if attempt or age < EXPIRE_SECONDS or generation != _generation(fs, path):
                raise _held(holder, age) from None
            if not _remove_version(fs, path, generation):
                raise LeaseHeld(f"in use by another run (the expired lease of {holder} was just taken "
                                f"over by another run)")
            logging.warning("taking over the lease of a run that stopped renewing it %.0f s ago (%s)",
                            age, holder)


def check_free(url: str) -> None:
    """Raises `LeaseHeld` if the lease object ``url`` is held and not expired; creates nothing (the
    check a run makes before its start-up, which `hold` repeats when it takes the lease)."""
    fs, path = fsspec.core.url_to_fs(url)
    held = _read(fs, path)
    age = time.time() - float(held.get("renewed", 0.0))
    if held and age < EXPIRE_SECONDS:
        raise _held(held.get("holder", "another run"), age)


def _held(holder: str, age: float) -> LeaseHeld:
    return LeaseHeld(f"in use by another run ({holder}, lease renewed {age:.0f} s ago); wait for it to "
                     f"end, or, if it died, {max(EXPIRE_SECONDS - age, 0):.0f} s for its lease to expire")


def _generation(fs, path: str) -> str | None:
    """The object's generation where the store has them (GCS), else None (or the lease is gone)."""
    try:
        generation = fs.info(path).get("generation")
    except FileNotFoundError:
        return None
    return str(generation) if generation else None


def _write_if_generation(fs, path: str, data: bytes, generation: str) -> str:
    """Writes ``data`` to ``path`` only while the object is at ``generation``; returns the new one.
    FileExistsError if it is at another generation or gone (GCS answers 412, which gcsfs raises as
    that). gcsfs's ``pipe_file`` sends no precondition but ``ifGenerationMatch=0`` (its
    ``mode="create"``), so this is the JSON API's single-request media upload, sent through gcsfs's
    ``call`` with ``ifGenerationMatch`` among its query parameters."""
    bucket, _, key = path.split("://")[-1].partition("/")
    response = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", bucket, uploadType="media",
                       name=key, ifGenerationMatch=generation, data=data,
                       headers={"Content-Type": "application/json"}, json_out=True)
    fs.invalidate_cache(path)
    return str(response["generation"])


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
