"""The quick check the README offers, ``python -m mtt_jax.main --config configs/default.py:tiny``: it
learns within its 40 steps, and its console is the run's progress, not the libraries' INFO logs."""

import json
import logging
import os
import subprocess
import sys

import orbax.checkpoint
from absl import flags, logging as absl_logging

from mtt_jax import evaluation
from mtt_jax.run import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_learns_and_its_console_is_readable(tmp_path):
    """The README's command as a user runs it (absl sets up the logging), on the suite's 8 CPU devices."""
    result = subprocess.run([sys.executable, "-m", "mtt_jax.main", "--config=configs/default.py:tiny",
                             f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r["split"] == "train"]
    final = [r for r in records if r["split"] == "eval"][-1]
    assert final["step"] == 40 and train[-1]["loss"] < 0.95 * train[0]["loss"]
    for task in ("left_digit", "right_digit"):  # chance 0.1; the eval set's majority class 0.13 (0.35 here)
        assert final[f"{task}/accuracy"] > final[f"{task}/baseline_accuracy"] + 0.08, final
    console = (result.stdout + result.stderr).strip().splitlines()
    assert "eval @ 40:" in result.stdout
    assert not [line for line in console if "orbax" in line or "checkpoint_manager" in line], console
    assert len(console) <= 20, console  # 17: progress and evals; 84 with orbax's INFO lines


def test_library_info_lines_show_only_when_asked_for(monkeypatch):
    handler = absl_logging.get_absl_handler()

    def shown(path: str, level: int) -> bool:
        return bool(handler.filter(logging.LogRecord("absl", level, path, 1, "message", None, None)))

    orbax_module, own_module = orbax.checkpoint.__file__, evaluation.__file__
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 0)
    cli.quiet_library_logs()
    assert not shown(orbax_module, logging.INFO)
    assert shown(orbax_module, logging.WARNING) and shown(own_module, logging.INFO)
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 1)  # --verbosity=0 on the command line
    cli.quiet_library_logs()
    assert shown(orbax_module, logging.INFO)
