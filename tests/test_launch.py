"""Launchers: TPU VM script in --dry-run, SLURM script syntax, local multi-process launcher.

Needs neither gcloud nor jax: the TPU script only prints commands, and the local launcher runs a
small stand-in module written into tmp_path.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest

from launch import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_vm.sh")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
BASH = shutil.which("bash")

needs_bash = pytest.mark.skipif(BASH is None, reason="bash not found")


def tpu(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path is not None:  # e.g. a PATH without gcloud
        env["PATH"] = path
    return subprocess.run([BASH, TPU, *args], capture_output=True, text=True, env=env, timeout=60)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def remote(cmd: list[str]) -> str:
    assert "--command" in cmd, cmd
    return cmd[cmd.index("--command") + 1]


COMMON = ("--dry-run", "--name", "mtt-test", "--zone", "us-central2-b")


# --------------------------------------------------------------------------------------------------
# launch/tpu_vm.sh


@needs_bash
def test_tpu_dry_run_all_prints_every_gcloud_command_and_runs_none(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "gcloud-was-run"
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(f"#!/bin/sh\ntouch {marker}\n")
    gcloud.chmod(0o755)

    r = tpu("all", *COMMON, "--project", "my-proj", "--config", "configs/default.py:tiny",
            "--workdir", "gs://bucket/runs/r1", "--", "--config.total_steps=100",
            path=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    cmds = commands(r.stdout)
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in cmds), r.stdout
    verbs = [c[4] for c in cmds]
    assert verbs[0] == "create" and verbs[-1] == "delete"
    for c in cmds:
        assert "--zone=us-central2-b" in c and "--project=my-proj" in c

    create = cmds[0]
    assert create[5] == "mtt-test"
    assert "--accelerator-type=v4-8" in create and "--version=tpu-ubuntu2204-base" in create

    scp = next(c for c in cmds if c[4] == "scp" and "--recurse" in c)
    assert "--worker=all" in scp
    assert "mtt_jax" in scp and "configs" in scp and "requirements.txt" in scp
    assert "mtt-test:mtt_jax/" in scp
    assert verbs.index("create") < cmds.index(scp) < verbs.index("delete")

    ssh = [c for c in cmds if c[4] == "ssh"]
    assert ssh and all(c[5] == "mtt-test" and "--worker=all" in c for c in ssh)
    setup = [remote(c) for c in ssh if "requirements.txt" in remote(c)]
    assert len(setup) == 1
    assert "venv --allow-existing --python 3.11 .venv" in setup[0]
    assert "install --python .venv/bin/python -r requirements.txt" in setup[0]
    assert "jax[tpu]==0.10.2" in shlex.split(setup[0])
    train = [c for c in ssh if "-m mtt_jax.main" in remote(c)]
    assert len(train) == 1
    words = shlex.split(remote(train[0]).split(".venv/bin/python -m mtt_jax.main", 1)[1])
    assert words[:3] == ["--config=configs/default.py:tiny", "--workdir=gs://bucket/runs/r1",
                         "--config.total_steps=100"]

    logs = [c for c in cmds if c[4] == "scp" and "--recurse" not in c]
    assert len(logs) == 1 and "--worker=0" in logs[0] and "mtt-test:mtt_jax/train.log" in logs[0]
    assert cmds[-1][5] == "mtt-test" and "--quiet" in cmds[-1]


@needs_bash
def test_tpu_dry_run_train_runs_in_background_with_a_log_and_quotes_args():
    r = tpu("train", *COMMON, "--workdir", "/tmp/run dir", "--", "--config.name=it's a test",
            "--config.x=$HOME")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert cmd[4] == "ssh" and "--worker=all" in cmd
    command = remote(cmd)
    assert "nohup .venv/bin/python -m mtt_jax.main" in command and ">> train.log 2>&1" in command
    # The remote shell sees exactly the arguments given here.
    main = command.split("nohup .venv/bin/python -m mtt_jax.main", 1)[1].split(" >> ", 1)[0]
    assert shlex.split(main) == ["--config=configs/default.py", "--workdir=/tmp/run dir",
                                 "--config.name=it's a test", "--config.x=$HOME"]


@needs_bash
def test_tpu_dry_run_create_options_and_step_order():
    r = tpu("create", "delete", *COMMON, "--accelerator-type=v4-32", "--version",
            "tpu-ubuntu2204-base", "--spot")
    assert r.returncode == 0, r.stderr
    create, delete = commands(r.stdout)
    assert create[4] == "create" and "--accelerator-type=v4-32" in create and "--spot" in create
    assert "--project" not in " ".join(create)
    assert delete[4:6] == ["delete", "mtt-test"]


@needs_bash
@pytest.mark.parametrize("args, mentions", [
    (("up", "--dry-run", "--zone", "z", "--workdir", "w"), "--name"),
    (("up", "--dry-run", "--name", "n", "--workdir", "w"), "--zone"),
    (("train", "--dry-run", "--name", "n", "--zone", "z"), "--workdir"),
    (("--dry-run", "--name", "n", "--zone", "z"), "step"),
    (("launch", "--dry-run", "--name", "n", "--zone", "z"), "launch"),
    (("create", "--dry-run", "--name", "n", "--zone"), "--zone"),
    (("create", "--dry-run", "--name", "Bad_Name", "--zone", "z"), "Bad_Name"),
    (("create", "--dry-run", "--name", "n", "--zone", "z", "--bogus"), "--bogus"),
])
def test_tpu_missing_or_bad_args_fail_with_one_line(args, mentions):
    r = tpu(*args)
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "error" in lines[0] and mentions in lines[0]


@needs_bash
def test_tpu_without_gcloud_fails_before_running_anything(tmp_path):
    r = tpu("create", "--name", "n", "--zone", "z", path=str(tmp_path))
    assert r.returncode != 0
    assert "gcloud not found" in r.stderr


@needs_bash
def test_tpu_help():
    r = tpu("--help")
    assert r.returncode == 0
    assert "--dry-run" in r.stdout and "--accelerator-type" in r.stdout and "--workdir" in r.stdout


@needs_bash
def test_scripts_parse():
    for script in (TPU, SBATCH, os.path.join(REPO, "launch", "gpu_check.sh")):
        r = subprocess.run([BASH, "-n", script], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------------
# launch/slurm_gpu.sbatch


def test_sbatch_header_and_srun_line():
    text = open(SBATCH).read()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert any("--ntasks-per-node=" in h for h in header)
    assert any("--gpus-per-task=1" in h for h in header)
    assert 'CONFIG="${CONFIG:-' in text and 'WORKDIR="${WORKDIR:-' in text
    assert "srun" in text and "-m mtt_jax.main" in text and '"$@"' in text


# --------------------------------------------------------------------------------------------------
# launch/local.py

DUMMY = textwrap.dedent("""
    import json, os, sys, time
    args = sys.argv[1:]
    pid = next(a.split("=", 1)[1] for a in args if a.startswith("--process_id="))
    print(json.dumps({"argv": args, "xla": os.environ.get("XLA_FLAGS"),
                      "platforms": os.environ.get("JAX_PLATFORMS")}))
    print("second line")
    sys.stdout.flush()
    fail = os.environ.get("DUMMY_FAIL_ID")
    if fail == pid:
        sys.exit(int(os.environ.get("DUMMY_FAIL_CODE", "3")))
    if fail is not None:
        time.sleep(float(os.environ.get("DUMMY_SLEEP", "0")))
    sys.exit(0)
""")


@pytest.fixture
def dummy(tmp_path):
    (tmp_path / "dummy_main.py").write_text(DUMMY)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


def run_local(dummy_env, n=3, k=4, extra_env=None, timeout=60, args=("--config", "c.py")):
    out = io.StringIO()
    env = dict(dummy_env, **(extra_env or {}))
    status = local.launch(n, k, list(args), module="dummy_main", env=env, timeout=timeout, out=out)
    return status, out.getvalue().splitlines()


def reports(lines):
    by_process = {}
    for line in lines:
        if line.startswith("[") and "] {" in line:
            prefix, payload = line.split("] ", 1)
            by_process[int(prefix[1:])] = json.loads(payload)
    return by_process


def test_local_starts_n_processes_with_one_coordinator(dummy):
    status, lines = run_local(dummy, n=3, k=4, args=("--config", "configs/default.py:tiny",
                                                     "--workdir", "/tmp/x"))
    assert status == 0, lines
    got = reports(lines)
    assert sorted(got) == [0, 1, 2]
    coordinators = set()
    for i, rep in got.items():
        argv = rep["argv"]
        assert f"--process_id={i}" in argv and "--num_processes=3" in argv
        coord = next(a for a in argv if a.startswith("--coordinator_address="))
        host, port = coord.split("=", 1)[1].rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        coordinators.add(coord)
        assert argv[-4:] == ["--config", "configs/default.py:tiny", "--workdir", "/tmp/x"]
        assert "--xla_force_host_platform_device_count=4" in rep["xla"].split()
        assert rep["platforms"] == "cpu"
    assert len(coordinators) == 1
    # Every line of every child carries its prefix.
    for i in range(3):
        assert f"[{i}] second line" in lines


def test_local_replaces_an_inherited_device_count(dummy):
    status, lines = run_local(dummy, n=2, k=2, extra_env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"})
    assert status == 0
    for rep in reports(lines).values():
        assert rep["xla"].split() == ["--xla_dump_to=/tmp/d",
                                      "--xla_force_host_platform_device_count=2"]


def test_local_propagates_failure_and_stops_the_others(dummy):
    status, lines = run_local(dummy, n=3, k=1, extra_env={
        "DUMMY_FAIL_ID": "1", "DUMMY_FAIL_CODE": "7", "DUMMY_SLEEP": "60"})
    assert status == 7, lines
    assert any("process 1 exited with status 7" in line for line in lines)


def test_local_single_failure_exit_code(dummy):
    status, _ = run_local(dummy, n=1, k=1, extra_env={"DUMMY_FAIL_ID": "0", "DUMMY_FAIL_CODE": "2"})
    assert status == 2


def test_local_timeout(dummy):
    status, lines = run_local(dummy, n=2, k=1, timeout=1.0, extra_env={
        "DUMMY_FAIL_ID": "none", "DUMMY_SLEEP": "60"})
    assert status == local.TIMEOUT_STATUS
    assert any("timed out" in line for line in lines)


def test_local_cli(dummy, tmp_path):
    env = dict(os.environ, **dummy)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env["PYTHONPATH"]])
    r = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes", "2",
                        "--devices_per_process", "3", "--module", "dummy_main", "--",
                        "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    got = reports(r.stdout.splitlines())
    assert sorted(got) == [0, 1]
    assert got[1]["argv"][-2:] == ["--workdir", str(tmp_path / "w")]

    env["DUMMY_FAIL_ID"] = "0"
    env["DUMMY_FAIL_CODE"] = "5"
    r = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes", "2",
                        "--module", "dummy_main"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 5


def test_local_rejects_bad_counts():
    with pytest.raises(ValueError):
        local.launch(0, 1, [])
    with pytest.raises(ValueError):
        local.launch(1, 0, [])


def test_bucket_check_refuses_a_url_that_is_not_gcs_before_any_work(capsys):
    """`launch/bucket_check.py` runs against a real bucket or an emulator, neither of which CI has
    (its measured output is in the README); its arguments are checked before any work."""
    from launch import bucket_check
    with pytest.raises(SystemExit) as exit_info:
        bucket_check.main(["--bucket", "s3://bucket/path"])
    assert exit_info.value.code == 2
    assert "--bucket=s3://bucket/path: pass a gs://BUCKET/PATH URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bucket_check.main([])  # one of --bucket or --emulator
    assert exit_info.value.code == 2
