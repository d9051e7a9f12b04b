"""Run N cooperating processes on this machine, as if they were N hosts (standard library only).

    python -m launch.local --num_processes 2 --devices_per_process 4 -- \\
        --config configs/default.py:tiny --workdir /tmp/x

Each child is ``python -m mtt_jax.main --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i MAIN_ARGS...`` on the CPU backend with ``K`` simulated devices
(``JAX_PLATFORMS=cpu``, ``XLA_FLAGS=--xla_force_host_platform_device_count=K``), so the global mesh
has ``N * K`` devices. Every output line of child ``i`` is printed with the prefix ``[i] ``. When
one child fails the others are stopped; the exit status is the first non-zero child status, or 0.
``--huge_pages`` starts the children with their large host allocations on transparent huge pages
(`mtt_jax.perf.huge_pages`), where the kernel and glibc allow it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from mtt_jax.perf import huge_pages  # standard library only

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
TIMEOUT_STATUS = 124
GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(base: Mapping[str, str], devices_per_process: int) -> dict[str, str]:
    """``base`` with the CPU platform and ``devices_per_process`` simulated devices."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    flags.append(f"{DEVICE_COUNT_FLAG}={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    # The children import the repository's packages wherever they are started from.
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if REPO_ROOT not in path:
        path.append(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def _status(returncode: int) -> int:
    """A process exit status as a shell reports it (killed by signal S -> 128 + S)."""
    return 128 - returncode if returncode < 0 else returncode


def _pump(index: int, stream: IO[bytes], out: IO[str] | None, lock: threading.Lock) -> None:
    prefix = f"[{index}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        target = out if out is not None else sys.stdout
        with lock:
            target.write(prefix + line + "\n")
            target.flush()
    stream.close()


def _signal_all(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # each child leads its own process group
            except (ProcessLookupError, PermissionError):
                pass


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM (a checkpoint may be written), then SIGKILL whatever is left after ``grace_s``."""
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_all(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def launch(num_processes: int, devices_per_process: int, main_args: Sequence[str],
           module: str = "mtt_jax.main", env: Mapping[str, str] | None = None,
           timeout: float | None = None, *, out: IO[str] | None = None) -> int:
    """Start ``num_processes`` copies of ``python -m module`` wired to one coordinator; wait.

    ``env`` is added to (and overrides) the current environment of every child. ``timeout`` is in
    seconds for the whole group. ``out`` receives the prefixed output lines (default stdout).
    Returns the first non-zero exit status of a child (128 + S for a signal S), ``124`` on timeout,
    or 0 when all children succeed.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if devices_per_process < 1:
        raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
    base = dict(os.environ)
    base.update(env or {})
    environ = child_env(base, devices_per_process)
    coordinator = f"127.0.0.1:{free_port()}"

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    status = 0
    try:
        for i in range(num_processes):
            cmd = [sys.executable, "-u", "-m", module,
                   f"--coordinator_address={coordinator}",
                   f"--num_processes={num_processes}",
                   f"--process_id={i}",
                   *main_args]
            p = subprocess.Popen(cmd, env=environ, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
            t.start()
            pumps.append(t)

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                status = _status(code)
                if any(c is None for c in codes):
                    _report(out, lock, f"[launch] process {i} exited with status {status}; "
                                       "stopping the others")
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                status = TIMEOUT_STATUS
                _report(out, lock, f"[launch] timed out after {timeout:g} s; "
                                   "stopping all processes")
                break
            time.sleep(0.05)
    finally:
        _stop_all(procs)
        for t in pumps:
            t.join(timeout=GRACE_S)
    return status


def _report(out: IO[str] | None, lock: threading.Lock, message: str) -> None:
    with lock:
        target = out if out is not None else sys.stdout
        target.write(message + "\n")
        target.flush()


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        description="Start N processes of mtt_jax.main on 127.0.0.1 (CPU, K devices each), "
                    "as a multi-host run on one machine. Arguments after -- go to the module.",
        epilog="example: python -m launch.local --num_processes 2 --devices_per_process 4 -- "
               "--config configs/default.py:tiny --workdir /tmp/x")
    parser.add_argument("--num_processes", type=int, default=2, help="processes (hosts), default 2")
    parser.add_argument("--devices_per_process", type=int, default=4,
                        help="simulated CPU devices per process, default 4")
    parser.add_argument("--module", default="mtt_jax.main",
                        help="module to run, default mtt_jax.main")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before all processes are stopped (status 124)")
    parser.add_argument("--huge_pages", action="store_true",
                        help="put the processes' large host allocations on transparent huge pages where the "
                             "kernel and glibc allow (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; faster CPU steps)")
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        ours, main_args = argv[:cut], argv[cut + 1:]
    else:
        ours, main_args = argv, []
    args = parser.parse_args(ours)
    if args.num_processes < 1:
        parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    return args, main_args


def main(argv: Sequence[str] | None = None) -> int:
    args, main_args = _parse(sys.argv[1:] if argv is None else argv)

    def on_term(signum, frame):  # stop the children too when this launcher is stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        return launch(args.num_processes, args.devices_per_process, main_args,
                      module=args.module, timeout=args.timeout,
                      env=huge_pages.this_machine_environment() if args.huge_pages else None)
    except KeyboardInterrupt:
        print("[launch] interrupted; processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
