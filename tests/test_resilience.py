"""Reliability: resume after SIGKILL equals an uninterrupted run, SIGTERM saves and exits 0,
a damaged latest checkpoint falls back to the one before, non-finite losses skip or halt, and several
processes compute what one does."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import seqtasks as seqtasks_config
from launch import local
from mtt_jax import data, train
from mtt_jax.run import checkpoint
from tests import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/seqtasks.py:tiny", "--config.total_steps=60", "--config.checkpoint_every=10",
        "--config.eval_every=30", "--config.log_every=5", "--quiet"]


def cli(workdir, *extra, devices=2):
    env = local.child_env(os.environ, devices)  # the test process's XLA flags, with its device count
    return subprocess.Popen([sys.executable, "-m", "mtt_jax.main", f"--workdir={workdir}", *ARGS, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def wait_for_step(workdir, step, process, timeout=240):
    """Polls metrics.jsonl until a train record at ``step`` or later appears."""
    deadline = time.time() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(l)["step"] for l in f if l.strip().endswith("}")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def wait_for_checkpoint(workdir, step, process, timeout=120):
    """Polls until checkpoint ``step`` is committed (orbax renames its folder to the step when done)."""
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, f"checkpoint {step} not saved"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    process = cli(workdir)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return workdir


def test_sigkill_then_same_command_matches_uninterrupted_run(uninterrupted, tmp_path):
    process = cli(tmp_path)
    wait_for_step(tmp_path, 25, process)
    wait_for_checkpoint(tmp_path, 20, process)  # two to choose from (saves are asynchronous)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(tmp_path / "summary.md")
    newest = max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    resumed = cli(tmp_path, "--noquiet")  # (the progress lines name the step it resumes at)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    # From the newest checkpoint: an older one would recompute the same numbers, only later.
    assert f"resuming at step {newest} of 60 steps" in out, out[-2000:]
    ours, reference = records(tmp_path, "eval")[-1], records(uninterrupted, "eval")[-1]
    assert ours["step"] == reference["step"] == 60
    for key, value in reference.items():
        if isinstance(value, float):
            np.testing.assert_allclose(ours[key], value, rtol=1e-5, err_msg=key)
    # The log holds each step once: records the killed attempt wrote after its checkpoint were dropped.
    steps = [r["step"] for r in records(tmp_path, "train")]
    assert steps == sorted(set(steps)) == list(range(5, 61, 5))


def test_sigterm_saves_at_the_step_reached_and_exits_zero(tmp_path):
    process = cli(tmp_path, "--config.checkpoint_every=1000")
    wait_for_step(tmp_path, 12, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 12 <= saved[0] < 60
    assert not os.path.exists(tmp_path / "summary.md")  # an interrupted run is not presented as done
    resumed = cli(tmp_path, "--config.checkpoint_every=1000", "--noquiet")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and os.path.exists(tmp_path / "summary.md"), err[-2000:]
    assert f"resuming at step {saved[0]} of 60 steps" in out, out[-2000:]


def test_truncated_latest_checkpoint_falls_back_to_the_previous(uninterrupted, caplog):
    config = seqtasks_config.get_config("tiny")
    config.total_steps, config.checkpoint_every = 60, 10
    setup = train.build(config)
    ckpt_dir = os.path.join(uninterrupted, "checkpoints")
    latest = max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    truncate_files(os.path.join(ckpt_dir, str(latest)))
    checkpointer = checkpoint.Checkpointer(str(uninterrupted), 10, 3)
    abstract = checkpoint.abstract_like(jax.tree.map(lambda x: x, train.nn.unbox(setup.abstract_state)),
                                        setup.state_shardings)
    state = checkpointer.restore_latest(abstract)
    assert state is not None and int(state.step) == latest - 10
    assert any("unreadable" in r.message for r in caplog.records)
    # Moved aside, kept for inspection, and no longer in the way of saving that step again (orbax
    # refuses to save over an existing step: the damaged final checkpoint would stay the final one).
    assert os.path.isdir(os.path.join(ckpt_dir, f"{latest}.unreadable")) and latest not in checkpointer.steps()
    assert checkpointer.maybe_save(latest, state, force=True)
    checkpointer.close()
    caplog.clear()
    checkpointer = checkpoint.Checkpointer(str(uninterrupted), 10, 3)
    assert max(checkpointer.steps()) == latest
    assert checkpointer.restore_latest(abstract) is not None and not caplog.records
    checkpointer.close()


def test_interruptions_lose_no_record_eval_or_affinity_measurement(monkeypatch, tmp_path, capsys):
    """SIGTERM at a log step keeps that step's train record; TAG's affinity.json after a resume averages
    every measurement, as an uninterrupted run's does; an eval lost between its step's checkpoint and
    its record is run when the run resumes."""
    config = seqtasks_config.get_config("tiny")  # 20 steps, eval every 10, log every 5
    config.affinity.every, config.checkpoint_every = 4, 1000
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    train.train_and_evaluate(config, str(reference), quiet=True)
    monkeypatch.setattr(train, "stop_requested",
                        lambda flag, held, step, every: "sigterm" if step == 15 else "")
    state, _ = train.train_and_evaluate(config, str(interrupted), quiet=True)
    assert int(state.step) == 15 and not os.path.exists(interrupted / "summary.md")
    monkeypatch.undo()
    capsys.readouterr()
    train.train_and_evaluate(config, str(interrupted))  # (not quiet: it names the step it resumes at)
    assert "resuming at step 15 of 20 steps" in capsys.readouterr().out
    for split in ("train", "eval", "affinity"):
        assert ([r["step"] for r in records(interrupted, split)] ==
                [r["step"] for r in records(reference, split)]), split
    assert [r["step"] for r in records(interrupted, "train")] == [5, 10, 15, 20]
    assert [r["step"] for r in records(interrupted, "affinity")] == [4, 8, 12, 16, 20]
    ours, theirs = (json.loads((d / "affinity.json").read_text()) for d in (interrupted, reference))
    assert ours["measurements"] == theirs["measurements"] == 5
    np.testing.assert_allclose(ours["affinity"], theirs["affinity"], atol=1e-6)
    # Killed after step 20's checkpoint was committed, before its eval was written: rerun.
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (reference / "metrics.jsonl").write_text("".join(
        l for l in lines if not (json.loads(l)["split"] == "eval" and json.loads(l)["step"] == 20)))
    summary_before = (reference / "summary.md").read_text()
    (reference / "summary.md").unlink()
    _, final = train.train_and_evaluate(config, str(reference))
    assert "resuming at step 20 of 20 steps" in capsys.readouterr().out
    assert [r["step"] for r in records(reference, "eval")] == [10, 20] and final
    tables = [[l for l in text.splitlines() if l.startswith("|")]  # the metrics, not the wall time
              for text in ((reference / "summary.md").read_text(), summary_before)]
    assert tables[0] == tables[1] and len(tables[0]) > 3


def inject_nan_at(monkeypatch, bad_step):
    steps.inject_nan(monkeypatch, lambda step: step == bad_step)


def test_injected_nan_is_skipped(monkeypatch, tmp_path):
    inject_nan_at(monkeypatch, bad_step=7)
    config = seqtasks_config.get_config("tiny")
    config.log_every = 1
    state, final = train.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert int(state.skipped_steps) == 1 and int(state.step) == config.total_steps
    skipped = [r["step"] for r in records(tmp_path, "train") if r["skipped"]]
    assert skipped == [8]  # the update of batch 7 is step 8's record
    assert np.isfinite(final["mean_value/mse"])


def test_injected_nan_halts_with_checkpoint_kept(monkeypatch, tmp_path):
    inject_nan_at(monkeypatch, bad_step=13)
    config = seqtasks_config.get_config("tiny")
    config.nonfinite, config.checkpoint_every = "halt", 10
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss or gradient at step 14"):
        train.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [10]


def truncate_files(directory):
    """Every data file under ``directory`` cut to half its size, as a write interrupted mid-file."""
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def test_two_processes_resume_a_damaged_run_and_match_one_process_with_eight_devices(tmp_path):
    """One process of 8 devices trains 20 steps, saving at 10 and 20; its final checkpoint is then cut
    short. Two processes of 4 devices launched on that workdir move it aside together, resume from
    step 10, save step 20 again, and compute steps 11-20 and the final eval as the one process did."""
    import shutil
    config = seqtasks_config.get_config("tiny")
    config.checkpoint_every = 10
    _, single = train.train_and_evaluate(config, str(tmp_path / "one"), quiet=True)
    assert len(jax.devices()) == 8
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    checkpoints = tmp_path / "two" / "checkpoints"
    truncate_files(checkpoints / "20")
    os.remove(tmp_path / "two" / "summary.md")
    out = io.StringIO()
    status = local.launch(2, 4, ["--config=configs/seqtasks.py:tiny", "--quiet", "--config.checkpoint_every=10",
                                 f"--workdir={tmp_path / 'two'}"], timeout=300, out=out)
    assert status == 0, out.getvalue()[-3000:]
    assert "checkpoint at step 20 is unreadable" in out.getvalue()
    assert sorted(os.listdir(checkpoints)) == ["10", "20", "20.unreadable"]
    assert os.path.exists(tmp_path / "two" / "summary.md")
    two = records(tmp_path / "two", "eval")[-1]
    for key, value in single.items():
        if isinstance(value, float):
            np.testing.assert_allclose(two[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    trained = {r["step"]: r["loss"] for r in records(tmp_path / "two", "train")}
    assert sorted(trained) == [5, 10, 15, 20]  # steps 15 and 20 by the two processes, each once
    np.testing.assert_allclose([trained[s] for s in sorted(trained)],
                               [r["loss"] for r in records(tmp_path / "one", "train")], rtol=1e-4)
