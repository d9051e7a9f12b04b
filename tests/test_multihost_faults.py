"""Two processes started by hand (no launcher): when one of them cannot go on, every process learns why
in one ``error:`` line and exits non-zero at once (`mtt_jax.run.multihost`), instead of a gloo timeout
traceback after 30 s or a runtime abort after the heartbeat timeout."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from launch import local
from mtt_jax.run import multihost
from mtt_jax.run import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One config for both runs (total_steps too: it is in the compiled schedule), so that the second
# compiles nothing new (the tests' persistent compilation cache).
ARGS = ["--config=configs/seqtasks.py:tiny", "--config.eval_every=100000", "--config.total_steps=100000",
        "--config.checkpoint_every=100000", "--config.log_every=2", "--quiet"]


class Process:
    """``python -m mtt_jax.main`` as process ``index`` of two; its stderr lines are collected as they come."""

    def __init__(self, index, port, workdir, *extra):
        env = local.child_env(os.environ, 2)  # JAX_PLATFORMS=cpu, two devices, the repository importable
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mtt_jax.main", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={index}", f"--workdir={workdir}", *ARGS, *extra],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.popen.stderr:
            self.lines.append(line.rstrip("\n"))

    def errors(self):
        return [line for line in self.lines if line.startswith("error: ")]


@pytest.fixture
def started():
    """The processes a test starts; any still running at its end is killed."""
    processes = []
    yield processes
    for p in processes:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()


def start_pair(started, workdir, *extra):
    port = local.free_port()
    started.extend(Process(i, port, workdir, *extra) for i in range(2))
    return started


def exit_times(processes, timeout):
    """Waits up to ``timeout`` s for every process to exit; returns the time.monotonic() at which each
    was seen to have exited. One that is still running then is killed and the test fails."""
    ended, deadline = {}, time.monotonic() + timeout
    while len(ended) < len(processes) and time.monotonic() < deadline:
        for i, p in enumerate(processes):
            if i not in ended and p.popen.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.05)
    for p in processes:
        if p.popen.poll() is None:
            p.popen.kill()
        p.popen.wait()
        p.reader.join(10)
    if missing := [i for i in range(len(processes)) if i not in ended]:
        pytest.fail(f"process {missing[0]} did not exit within {timeout} s; its stderr ends:\n"
                    + "\n".join(processes[missing[0]].lines[-30:]))
    return [ended[i] for i in range(len(processes))]


def test_a_locked_workdir_stops_both_processes_with_the_same_line_at_once(tmp_path, started):
    """Process 0 cannot take the lock; process 1 (which never takes it) says so too, in the same
    moment, instead of a gloo timeout traceback 30 s later."""
    with workdir_lib.lock(str(tmp_path)):  # another run holds the workdir
        processes = start_pair(started, tmp_path)
        ended = exit_times(processes, timeout=240)  # start-up: imports, build, compile on 2 shared cores
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    for p in processes:
        assert p.popen.returncode == 2, "\n".join(p.lines[-30:])
        assert p.errors() == [f"error: process 0: {tmp_path} is in use by another run ({holder}); wait for it "
                              f"to end or use another --workdir"], p.lines[-30:]
        assert not any("Traceback" in line for line in p.lines), p.lines[-30:]
    assert abs(ended[0] - ended[1]) < 5.0
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_killed_process_stops_the_other_at_once_in_one_line(tmp_path, started):
    """SIGKILL of process 1 mid-run: process 0 reports it and exits within seconds (measured 0.1-0.2 s),
    not by the runtime's abort after the heartbeat timeout (a C++ stack trace)."""
    processes = start_pair(started, tmp_path)
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and any(json.loads(l)["split"] == "train"
                                        for l in metrics.read_text().splitlines() if l.endswith("}"))):
        assert all(p.popen.poll() is None for p in processes), "\n".join(processes[0].lines[-30:])
        assert time.monotonic() < deadline, "no train record within 240 s"
        time.sleep(0.1)
    processes[1].popen.kill()
    killed = time.monotonic()
    ended = exit_times(processes, timeout=60)
    survivor = processes[0]
    assert survivor.popen.returncode == multihost.EXIT_STATUS, "\n".join(survivor.lines[-30:])
    assert survivor.errors() == [f"error: process 1 of 2 stopped ({multihost.UNEXPECTED_END}); the job stops: "
                                 f"run the same command to resume"], survivor.lines[-30:]
    assert ended[0] - killed < 5.0  # the runtime's heartbeat timeout alone takes 5-11 s (10 s setting)
    assert not any("Check failure" in line or "Fatal Python error" in line for line in survivor.lines)


def test_agree_on_error_in_one_process_raises_the_error_itself():
    error = OSError("disk full")
    with pytest.raises(OSError) as raised:
        multihost.agree_on_error(error, "a test")
    assert raised.value is error
    multihost.agree_on_error(None, "a test")  # nothing to agree on
    assert multihost.one_line(OSError("first\nsecond")) == "OSError: first"
    assert multihost.one_line(KeyError()) == "KeyError"
    assert multihost.one_line(multihost.JobStopped("process 1: x")) == "process 1: x"
