"""`experiments.reference_runs`: the shipped configs run as `python -m mtt_jax.main` commands, archived.

One ``--tiny`` run end to end (a subprocess that runs ``mtt_jax.main`` on ``configs/default.py:tiny``);
the full plan's resume and tables with the command replaced by a stand-in (no training).
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import archive, common, reference_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_is_the_main_command_and_its_record_holds_its_final_eval(tmp_path):
    # The command as a user runs it: one device (the suite's simulated eight are for sharded code paths).
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""))
    result = subprocess.run([sys.executable, "-m", "experiments.reference_runs", "--workdir", str(tmp_path),
                             "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "runs").rglob("seed0.json")
    record = json.loads(path.read_text())
    assert record["curves"]["main_command"] == (
        "python -m mtt_jax.main --config configs/default.py:tiny --workdir WORKDIR/main/default_f32/seed0")
    # the record's metrics are the run's last eval record, as the command printed them
    metrics = [json.loads(line) for line in
               (tmp_path / "main" / "default_f32" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["split"] == "eval"][-1]
    assert last["step"] == record["config"]["total_steps"] == 40
    for task in ("left_digit", "right_digit"):
        for name in ("accuracy", "macro_f1", "baseline_accuracy"):
            assert record["metrics"]["eval"][f"{task}/{name}"] == last[f"{task}/{name}"]
    line = reference_runs.eval_line(record)
    assert line.startswith("eval @ 40: left_digit/accuracy ") and line in result.stderr
    assert record["seed"] == 0 and record["config"]["seed"] == 0 and record["code_version"] != "unknown"
    assert record["wall_seconds"] > record["curves"]["training_wall_seconds"] > 0
    table = (tmp_path / "table.md").read_text()
    assert line in table and reference_runs.seed0_table(record) in table
    assert not (tmp_path / "results.partial.json").exists()


def fake_train(calls, stop_after=None):
    """A stand-in for `reference_runs.train`: metrics from the arm and seed, no command run."""
    def train(size, arm, seed, workdir, environment, log):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append((arm, seed))
        tasks = ("majority", "mean_value") if arm == "seqtasks" else ("left_digit", "right_digit")
        shift = (-0.01 if arm == "default_bf16" else 0.0) + 0.002 * seed
        metrics = {}
        for i, task in enumerate(tasks):
            metrics.update({f"{task}/accuracy": 0.95 + shift + 0.01 * i, f"{task}/macro_f1": 0.94 + shift,
                            f"{task}/baseline_accuracy": 0.12, f"{task}/baseline_macro_f1": 0.02})
        return {"config": {"seed": seed, "tasks": list(tasks), "total_steps": 1500,
                           "data": {"eval_split": "test"}},
                "wall_seconds": 150.0 + seed, "metrics": {"eval": metrics},
                "curves": {"main_command": " ".join(reference_runs.main_command(size, arm, seed, "WORKDIR/x")),
                           "final_step": 1500, "main_metric": {t: "accuracy" for t in tasks},
                           "metric_names": {t: ["accuracy", "macro_f1"] for t in tasks},
                           "kinds": {t: "classification" for t in tasks}, "eval_steps": [1500],
                           "eval_main_metric": {t: [metrics[f"{t}/accuracy"]] for t in tasks},
                           "training_wall_seconds": 130.0, "steps_per_second": 1500 / 130.0,
                           "cpu": "test CPU", "cores": 2, "load_average_at_start": 1.0, "environment": {}}}
    return train


def test_full_plan_resumes_after_an_interruption_and_reports_bf16_against_f32(tmp_path, monkeypatch):
    assert reference_runs.plan("full") == (
        [("default_f32", s) for s in range(5)] + [("default_bf16", s) for s in range(5)] + [("seqtasks", 0)])
    assert reference_runs.plan("quick") == [("default_f32", 0)]
    assert reference_runs.main_command("full", "default_bf16", 3, "W") == [
        "python", "-m", "mtt_jax.main", "--config", "configs/default.py", "--workdir", "W",
        "--config.dtype=bfloat16", "--config.seed=3"]
    args = common.argparse.Namespace(workdir=str(tmp_path), size="full", seeds=0, archive=True)
    root = tmp_path / "archive"
    monkeypatch.setattr(archive, "ARCHIVE", str(root))
    calls = []
    monkeypatch.setattr(reference_runs, "train", fake_train(calls, stop_after=4))
    with pytest.raises(KeyboardInterrupt):
        reference_runs.run(args, {})
    assert calls == [("default_f32", s) for s in range(4)]
    monkeypatch.setattr(reference_runs, "train", fake_train(calls))
    reference_runs.run(args, {})
    assert calls[4:] == reference_runs.plan("full")[4:]              # none trained twice
    records = archive.load("reference_runs", "full", str(root))
    assert len(records) == 11 and not (tmp_path / "results.partial.json").exists()
    text = reference_runs.report(records)
    # bf16 is 1 point below f32 on every seed: the paired difference is -1.00 points, beyond its interval
    assert "| left_digit | accuracy | 0.9540 ± 0.0039 | 0.9440 ± 0.0039 | -1.00 ± 0.00 ▼ |" in text
    assert "| 3 | 0.9560 | 0.9660 | 0.9460 | 0.9560 | -1.00 | -1.00 |" in text
    assert "eval @ 1500: left_digit/accuracy 0.9500  right_digit/accuracy 0.9600" in text
    assert "| left_digit | 0.9500 | 0.9400 | 0.1200 |" in text
    assert "`python -m mtt_jax.main --config configs/seqtasks.py --workdir DIR`" in text
    assert "11 archived runs" in text and "test CPU (2 cores)" in text


def test_help_gives_the_cost_and_a_url_workdir_it_cannot_write_is_refused(capsys):
    with pytest.raises(SystemExit):
        reference_runs.main(["--help"])
    help_text = capsys.readouterr().out
    assert "Cost of the full run" in help_text and "--tiny" not in help_text.split("\n\n")[0]
    with pytest.raises(SystemExit) as exit_info:
        reference_runs.main(["--workdir", "ftp://host/run", "--tiny"])
    assert exit_info.value.code == 2 and "unknown URL scheme ftp://" in capsys.readouterr().err
