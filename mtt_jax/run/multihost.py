"""How the processes of a multi-process run learn that one of them cannot go on, in one line each.

Two situations, two tools:

* A process fails where all the processes are anyway (taking the workdir lock, preparing the
  workdir): every process calls ``agree_on_error(error_or_None, where)`` at that point, and if any
  process has an error, every process raises `JobStopped` naming the lowest failing process and its
  message. The processes meet in the distributed runtime's key-value store (no collective, no device).
* A process stops while the others compute (SIGKILL, out of memory, a crash, an error only it
  raised): inside ``with watch_peers():`` every process keeps a TCP connection to process 0, which
  the kernel closes when a process ends however it ends. Process 0 tells the others which process
  stopped, and every survivor prints ``error: process i of n stopped (why); the job stops: run the
  same command to resume`` on stderr and exits with status 1 at once, instead of waiting in a
  collective for the runtime's heartbeat timeout to abort it with a C++ stack trace. A process that
  leaves with an exception says so first, and the others wait `GRACE_S` (they may be about to raise
  the same error and print their own line), then meet it in the runtime's shutdown barrier, so that
  it too ends with its own error rather than an abort. A host that vanishes closes no connection:
  kernel keepalive probes notice it in about 5 s; a process that hangs (SIGSTOP, a stuck driver) is
  left to the runtime's heartbeat timeout (`mtt_jax.run.cli.initialize_distributed`).

Both are no-ops in a single process (``agree_on_error`` re-raises the error).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import socket
import sys
import threading
import time

import jax

AGREE_TIMEOUT_S = 600  # how long a process waits at an agreement point for the others to arrive
GRACE_S = 3.0  # how long survivors wait after a process left with an error before they stop too
SHUTDOWN_WAIT_S = 10.0  # how long they then wait for it in the runtime's shutdown barrier
RELAY_WAIT_S = 2.0  # how long process 0 waits for the others to hang up after it told them
EXIT_STATUS = 1
UNEXPECTED_END = "killed, crashed or unreachable: see its own output"
_MAX_MESSAGE = 500
_agreements = itertools.count()
_watches = itertools.count()


class JobStopped(RuntimeError):
    """Raised on every process when one of them failed at an agreement point (`agree_on_error`)."""


def one_line(error: BaseException) -> str:
    """An error's first line (``PermissionError: ...`` for a built-in exception type), at most 500
    characters; the type name when it has no message."""
    line = (str(error).strip().splitlines() or [""])[0]
    if not line:
        line = type(error).__name__
    elif type(error).__module__ == "builtins":
        line = f"{type(error).__name__}: {line}"
    return line[:_MAX_MESSAGE]


def _runtime():
    """What ``jax.distributed.initialize`` set up: its ``client`` and ``coordinator_address``."""
    from jax._src import distributed
    if distributed.global_state.client is None:
        raise RuntimeError("several JAX processes but no distributed runtime client: call "
                           "mtt_jax.run.cli.initialize_distributed() (jax.distributed.initialize) first")
    return distributed.global_state


def _client():
    return _runtime().client


def agree_on_error(error: Exception | None, where: str) -> None:
    """Every process calls this at the same point of the program with its own error there, or None.
    One process: raises ``error`` if given. Several: each process puts its one-line message (or
    nothing) into the runtime's key-value store and waits at a barrier for the others; if any has an
    error, all raise ``JobStopped("process i: message")`` for the lowest failing ``i``. A process that
    does not arrive within `AGREE_TIMEOUT_S` is reported as such. The barrier also orders the
    processes: none returns before every one has reached the point."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    client = _client()
    key = f"mtt_jax/agree/{next(_agreements)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "ok" if error is None else "!" + one_line(error))
    try:
        client.wait_at_barrier(key, AGREE_TIMEOUT_S * 1000)
        timed_out = None
    except Exception as e:  # a process that never came: it hangs, or died before the runtime noticed
        timed_out = e
    messages = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(f"{key}/")}
    failed = sorted(i for i, v in messages.items() if v.startswith("!"))
    if failed:
        stopped = JobStopped(f"process {failed[0]}: {messages[failed[0]][1:]}")
    elif timed_out is not None:
        missing = min(set(range(jax.process_count())) - set(messages), default=None)
        who = f"process {missing}" if missing is not None else "a process"
        stopped = JobStopped(f"{who}: still not at {where!r} after {AGREE_TIMEOUT_S} s "
                             f"({one_line(timed_out)[:200]})")
    else:
        return
    raise stopped from error


@contextlib.contextmanager
def watch_peers():
    """Inside the block, a process that stops makes every other process stop at once with one line
    (see the module docstring). Leaving the block normally, or with `JobStopped` (which every process
    raises together), says goodbye; leaving with any other exception tells the others its first line.
    """
    if jax.process_count() == 1:
        yield
        return
    watch = _Watch(next(_watches))
    try:
        yield
    except JobStopped:
        watch.leave("bye")
        raise
    except BaseException as e:
        watch.leave(f"stop {watch.me} {GRACE_S} 1 {one_line(e)}")
        raise
    watch.leave("bye")


class _Watch:
    """Process 0 accepts one connection from every other process and relays what it hears; the others
    read theirs. Lines: ``hello <i>``, ``bye``, ``stop <i> <grace_s> <farewell> <why>`` (farewell 1:
    process i exits through Python, and so waits in the runtime's shutdown barrier)."""

    def __init__(self, index: int):
        self.me, self.n = jax.process_index(), jax.process_count()
        self.leaving = False
        self.lock = threading.Lock()
        self.peers: dict[socket.socket, int | None] = {}  # process 0: connection -> process index
        self.conn: socket.socket | None = None  # the others: the connection to process 0
        key = f"mtt_jax/watch/{index}"
        if self.me == 0:
            family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
            self.server = socket.create_server(("", 0), family=family, backlog=self.n,
                                               dualstack_ipv6=family == socket.AF_INET6)
            _client().key_value_set(key, str(self.server.getsockname()[1]))
            target = self._serve
        else:
            target = lambda: self._follow(key)
        threading.Thread(target=target, name="mtt_jax.run.multihost.watch", daemon=True).start()

    def leave(self, line: str) -> None:
        with self.lock:
            self.leaving = True
            connections = list(self.peers) if self.me == 0 else [self.conn]
        for conn in connections:
            _send(conn, line)

    def _stop(self, process: int, why: str, grace_s: float, farewell: bool) -> None:
        """Ends this process with the one line, after ``grace_s`` unless it has left the block."""
        if grace_s > 0:
            time.sleep(grace_s)
        with self.lock:
            if self.leaving:
                return
            self.leaving = True
        print(f"error: process {process} of {self.n} stopped ({why}); the job stops: run the same command "
              f"to resume", file=sys.stderr, flush=True)
        if farewell:
            _meet_at_shutdown(SHUTDOWN_WAIT_S)
        if self.me == 0:  # the others have read the relay when they hang up (process 0 serves the runtime)
            _await_hang_ups([c for c, p in self.peers.items() if p != process], RELAY_WAIT_S)
        os._exit(EXIT_STATUS)

    # --- process 0 ----------------------------------------------------------------------------------
    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.server, selectors.EVENT_READ)
        pending: dict[socket.socket, bytes] = {}
        done: set[socket.socket] = set()  # said bye or stop: their end is expected
        while True:
            for event, _ in selector.select():
                if event.fileobj is self.server:
                    conn, _ = self.server.accept()
                    _keep_alive(conn)
                    with self.lock:
                        self.peers[conn] = None
                    pending[conn] = b""
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                conn = event.fileobj
                data = _recv(conn)
                if not data:
                    selector.unregister(conn)
                    with self.lock:
                        process = self.peers.pop(conn)
                    if conn not in done and process is not None:
                        self._relay(process, f"stop {process} 0 0 {UNEXPECTED_END}")
                    continue
                pending[conn] += data
                while b"\n" in pending[conn]:
                    line, pending[conn] = pending[conn].split(b"\n", 1)
                    line = line.decode("utf-8", "replace")
                    if line.startswith("hello "):
                        with self.lock:
                            self.peers[conn] = int(line.split()[1])
                            if self.leaving:  # finished before this process connected
                                _send(conn, "bye")
                    elif line == "bye":
                        done.add(conn)
                    elif line.startswith("stop "):
                        done.add(conn)
                        self._relay(self.peers[conn], line)

    def _relay(self, process: int, line: str) -> None:
        with self.lock:
            if self.leaving:
                return
            others = [c for c, p in self.peers.items() if p != process]
        for conn in others:
            _send(conn, line)
        _, _, grace_s, farewell, why = line.split(" ", 4)
        self._stop(process, why, float(grace_s), farewell == "1")

    # --- every other process ------------------------------------------------------------------------
    def _follow(self, key: str) -> None:
        try:
            port = int(_client().blocking_key_value_get(key, AGREE_TIMEOUT_S * 1000))
            host = _runtime().coordinator_address.rsplit(":", 1)[0].strip("[]")
            conn = socket.create_connection((host, port), timeout=60)
            conn.settimeout(None)
            _keep_alive(conn)
        except Exception as e:  # no watch then; the runtime's heartbeat timeout still ends the job
            print(f"warning: process {self.me} cannot watch process 0 ({one_line(e)})", file=sys.stderr)
            return
        _send(conn, f"hello {self.me}")
        with self.lock:
            self.conn = conn
            if self.leaving:  # left the block before the connection was made
                _send(conn, "bye")
        pending = b""
        while data := _recv(conn):
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                line = line.decode("utf-8", "replace")
                if line == "bye":
                    return
                if line.startswith("stop "):
                    _, process, grace_s, farewell, why = line.split(" ", 4)
                    self._stop(int(process), why, float(grace_s), farewell == "1")
        self._stop(0, UNEXPECTED_END, 0, False)


def _meet_at_shutdown(timeout_s: float) -> None:
    """Joins the runtime's shutdown barrier, where a process that left with an error waits at its exit
    (jax's atexit hook), so that it exits with its own status instead of aborting once we are gone."""
    def shutdown():
        state = _runtime()
        with contextlib.suppress(Exception):
            if state.preemption_sync_manager is not None:
                state.preemption_sync_manager.shutdown()
            state.client.shutdown()
    thread = threading.Thread(target=shutdown, daemon=True)
    thread.start()
    thread.join(timeout_s)


def _await_hang_ups(connections: list[socket.socket], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for conn in connections:
        with contextlib.suppress(OSError):
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            while conn.recv(4096):
                pass


def _keep_alive(conn: socket.socket) -> None:
    """Kernel keepalive probes: a peer whose host vanished (no FIN) is noticed in about 5 s, before the
    runtime's heartbeat timeout aborts the process."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _send(conn: socket.socket | None, line: str) -> None:
    if conn is None:
        return
    try:
        conn.sendall((line.replace("\n", " ") + "\n").encode("utf-8"))
    except OSError:
        pass


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(4096)
    except OSError:
        return b""
