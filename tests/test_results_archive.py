"""The statistics of the tables, the run archive, and RESULTS.md rebuilt from it byte for byte."""

import json
import os
import subprocess

import numpy as np
import pytest

from experiments import archive, report, stats, weighting_zoo


# --- stats on hand-checkable numbers --------------------------------------------------------------

def test_interval_is_students_t_over_seeds():
    found = stats.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # s = sqrt(2.5), t_{0.975, 4} = 2.7764
    assert found.mean == 3.0 and found.n == 5
    assert found.half_width == pytest.approx(2.7764451 * np.sqrt(2.5) / np.sqrt(5), rel=1e-6)
    assert found.format(2) == "3.00 ± 1.96"
    single = stats.interval([0.7])
    assert single.format(2) == "0.70 (n = 1)" and not single.excludes_zero()


def test_paired_differences_see_what_the_rows_spread_hides():
    reference = np.array([0.50, 0.60, 0.70, 0.80, 0.90])      # wide spread over seeds
    better = reference + np.array([0.010, 0.012, 0.009, 0.011, 0.010])
    assert not (stats.interval(better).low > stats.interval(reference).high)  # rows overlap
    paired = stats.paired_difference(better, reference)
    assert paired.excludes_zero() and paired.mean == pytest.approx(0.0104)
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_welch_difference_matches_scipys_unequal_variance_t_test():
    from scipy import stats as scipy_stats
    a, b = [0.18, 0.25, 0.11, 0.30, 0.21, 0.16], [0.41, 0.22, 0.35, 0.52, 0.29]
    found = stats.welch_difference(a, b)
    expected = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert found.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (found.low, found.high) == pytest.approx((expected.low, expected.high), rel=1e-9)
    assert found.excludes_zero() and found.n == 5
    assert not stats.welch_difference([0.1, 0.3, 0.2], [0.2, 0.1, 0.3]).excludes_zero()
    with pytest.raises(ValueError, match="two values on each side"):
        stats.welch_difference([1.0], [1.0, 2.0])


def test_gap_normalised_score_for_both_directions_of_metric():
    assert stats.gap_normalised(0.9, trivial=0.5, single_task=0.9) == 1.0
    assert stats.gap_normalised(0.7, trivial=0.5, single_task=0.9) == pytest.approx(0.5)
    # an MSE: trivial 1.0 (the label variance), single-task 0.2; 0.6 keeps half the gain
    assert stats.gap_normalised(0.6, trivial=1.0, single_task=0.2) == pytest.approx(0.5)
    assert np.isnan(stats.gap_normalised(0.6, trivial=0.5, single_task=0.5))


def test_dominant_metric_names_the_metric_that_carries_delta_m():
    assert stats.dominant_metric({"a/accuracy": 0.01, "b/mse": -3.0}) == ("b/mse", pytest.approx(3 / 3.01))
    assert stats.dominant_metric({"a/accuracy": 0.01, "b/mse": -0.011, "c/f1": 0.012}) is None


def test_simplex_weights_sum_to_the_number_of_tasks_and_cover_the_simplex():
    two = weighting_zoo.simplex_weights(2, 3)
    assert two == [(0.5, 1.5), (1.0, 1.0), (1.5, 0.5)]                # EW at the centre
    three = weighting_zoo.simplex_weights(3, 10)
    assert len(three) == 10 and (1.0, 1.0, 1.0) in three
    four = weighting_zoo.simplex_weights(4, 8)
    assert len(four) == 8 and np.allclose(np.sum(four, axis=1), 4.0) and np.min(four) > 0
    assert four == weighting_zoo.simplex_weights(4, 8)                # a fixed draw


# --- the zoo's report from hand-made run records ----------------------------------------------------

TASKS = ("majority", "mean_value")


def record(kind, label, lr, seed, validation, test):
    """A run record whose main metrics (majority accuracy, mean_value MSE) are given per split."""
    def metrics(accuracy, mse):
        return {"majority/accuracy": accuracy, "majority/macro_f1": accuracy,
                "majority/baseline_accuracy": 0.25, "majority/baseline_macro_f1": 0.1,
                "mean_value/mse": mse, "mean_value/pearson": 1 - mse,
                "mean_value/baseline_mse": 1.0, "mean_value/baseline_pearson": 0.0}
    return {"experiment": "weighting_zoo", "size": "tiny", "arm": f"{kind}:{label}@lr={lr:g}",
            "coordinates": {"kind": kind, "label": label, "lr": lr}, "seed": seed,
            "code_version": "abc", "command": "python -m experiments.weighting_zoo --tiny",
            "config": {"tasks": list(TASKS)}, "curves": {}, "wall_seconds": 1.0,
            "metrics": {"validation": metrics(*validation), "test": metrics(*test)}}


def hand_made_records():
    records = []
    for seed in range(3):
        e = 0.01 * seed
        records += [record("single_task", "majority", 1e-3, seed, (0.85, 0), (0.85 + e, 0)),
                    record("single_task", "majority", 3e-3, seed, (0.80, 0), (0.95, 0)),  # test-better
                    record("single_task", "mean_value", 1e-3, seed, (0, 0.2), (0, 0.2 + e)),
                    record("single_task", "mean_value", 3e-3, seed, (0, 0.4), (0, 0.4))]
        for lr, shift in ((1e-3, 0.0), (3e-3, -0.1)):
            records += [record("method", "ew", lr, seed, (0.70 + shift, 0.4), (0.70 + shift + e, 0.4)),
                        record("method", "mgda", lr, seed, (0.80 + shift, 0.3), (0.80 + shift + e, 0.3)),
                        record("scalarization", "w=a", lr, seed, (0.75, 0.4), (0.75 + e, 0.4)),
                        record("scalarization", "w=b", lr, seed, (0.60, 0.6), (0.60 + e, 0.6))]
    return records


def test_the_zoo_report_selects_on_validation_and_reports_test():
    s = weighting_zoo.summarize(hand_made_records())
    # single-task majority: lr 1e-3 wins on validation although 3e-3 is better on test
    assert s["single_task"]["majority"]["lr"] == 1e-3
    assert np.mean(s["single_task"]["majority"]["test"]) == pytest.approx(0.86)
    # ew at lr 1e-3, seed 1: majority (0.71 - 0.25) / (0.86 - 0.25), mean_value (0.4 - 1) / (0.21 - 1)
    ew = s["rows"]["method:ew"]
    assert ew["lr"] == 1e-3
    expected = np.mean([(0.71 - 0.25) / (0.86 - 0.25), (0.4 - 1.0) / (0.21 - 1.0)])
    assert ew["score"][1] == pytest.approx(expected)
    assert s["best_scalarization"] == "scalarization:w=a"
    mgda = s["rows"]["method:mgda"]
    assert np.allclose(mgda["vs_ew"], np.asarray(mgda["score"]) - np.asarray(ew["score"]))
    text = weighting_zoo.report(hand_made_records())
    assert "**tuned EW**" in text and "**tuned scalarization** (w=a)" in text and "w=b" not in text
    assert "**1 of 1 methods score higher beyond the 95% interval of the paired difference** (mgda)" in text
    assert "`abc`" in text and "36 archived runs" in text


def test_the_zoo_report_flags_rates_chosen_at_an_end_of_the_grid():
    rows = {"method:ew": {"kind": "method", "label": "ew", "lr": 1e-2},
            "method:mgda": {"kind": "method", "label": "mgda", "lr": 3e-3},
            "scalarization:w=a": {"kind": "scalarization", "label": "w=a", "lr": 1e-3}}
    s = {"learning_rates": [1e-3, 3e-3, 1e-2], "rows": rows,
         "single_task": {"majority": {"lr": 1e-2}, "mean_value": {"lr": 3e-3}}}
    assert weighting_zoo._grid_edges(s) == [
        "- **Grid edge:** 2 of 5 arms chose the largest learning rate, 0.01, so their best rate may lie "
        "beyond the grid: ew, single-task majority.",
        "- **Grid edge:** 1 of 5 arms chose the smallest learning rate, 0.001, so their best rate may lie "
        "beyond the grid: scalarization w=a."]
    assert weighting_zoo._grid_edges({**s, "learning_rates": [1e-3, 1e-2]}) == []  # no inside to prefer


# --- the archive and RESULTS.md -------------------------------------------------------------------

def test_code_version_marks_changed_code_but_not_the_archive(tmp_path):
    """A fresh archived rerun clears its earlier records first; its code is still the commit's."""
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "experiments" / "results" / "seed0.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    version = archive.code_version.__wrapped__        # uncached: the run's version is computed once
    assert version(str(tmp_path)) == commit
    (tmp_path / "experiments" / "results" / "seed0.json").unlink()      # RunWriter clearing the archive
    assert version(str(tmp_path)) == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    assert version(str(tmp_path)) == commit + "+dirty"
    assert version(str(tmp_path / "experiments" / "missing")) == "unknown"


def test_a_fresh_run_of_one_part_clears_only_that_parts_records(tmp_path):
    """``task_mechanisms --part retrieval`` after ``--part readout``: the readout records stay."""
    from experiments import task_mechanisms
    root = tmp_path / "results"
    def records(part):
        return [{**hand_made_records()[0], "arm": f"{part}:w8:mean_pool@lr=0.002", "seed": seed}
                for seed in range(2)]
    def writer(workdir, part):   # as task_mechanisms.run makes it for --part
        return archive.RunWriter(str(tmp_path / workdir), "task_mechanisms", "tiny", True, False, str(root),
                                 owns=task_mechanisms.parts_folders((part,)))
    for part in ("readout", "retrieval"):
        writer(part, part).write(records(part))
    assert len(archive.load("task_mechanisms", "tiny", str(root))) == 4
    writer("again", "retrieval").write(records("retrieval")[:1])
    arms = [r["arm"] for r in archive.load("task_mechanisms", "tiny", str(root))]
    assert arms == ["readout:w8:mean_pool@lr=0.002"] * 2 + ["retrieval:w8:mean_pool@lr=0.002"]


def test_run_writer_archives_one_file_per_run_and_a_fresh_run_clears_the_old_archive(tmp_path):
    root = tmp_path / "results"
    records = hand_made_records()[:4]
    archive.RunWriter(str(tmp_path / "work"), "weighting_zoo", "tiny", True, False, str(root)).write(records)
    assert len(archive.load("weighting_zoo", "tiny", str(root))) == 4
    assert len(list((tmp_path / "work" / "runs").rglob("seed*.json"))) == 4
    archive.RunWriter(str(tmp_path / "work2"), "weighting_zoo", "tiny", True, True, str(root)).write(
        records[:1])  # a resumed run adds to the archive
    assert len(archive.load("weighting_zoo", "tiny", str(root))) == 4
    archive.RunWriter(str(tmp_path / "work3"), "weighting_zoo", "tiny", True, False, str(root)).write(
        records[:1])  # a fresh one replaces it
    assert len(archive.load("weighting_zoo", "tiny", str(root))) == 1


def test_report_renders_markers_from_the_archive_and_says_when_runs_are_missing(tmp_path):
    root = tmp_path / "results"
    archive.RunWriter(str(tmp_path / "work"), "weighting_zoo", "tiny", True, False, str(root)).write(
        hand_made_records())
    text = report.render("# R\n\n{{ weighting_zoo/tiny }}\n\n{{ gradnorm_toy/full }}\n", str(root))
    assert text.startswith("# R\n\n| arm |") and "**tuned EW**" in text
    assert "No archived runs of `gradnorm_toy` at size `full` yet" in text


def test_results_md_is_what_the_archive_gives_byte_for_byte():
    """No number in RESULTS.md is typed by hand: every table is rendered from experiments/results/."""
    assert report.main(["--check"]) == 0, "run python -m experiments.report and commit RESULTS.md"


def test_every_archived_arm_has_every_seed_and_learning_rate():
    """A row of the zoo's table stands on every (learning rate, seed) run of its arm."""
    for size in ("full", "quick"):
        records = archive.load("weighting_zoo", size)
        if not records:
            continue
        seeds = sorted({r["seed"] for r in records})
        rates = sorted({r["coordinates"]["lr"] for r in records})
        assert len(seeds) >= (5 if size == "full" else 3)
        arms = {}
        for r in records:
            arms.setdefault((r["coordinates"]["kind"], r["coordinates"]["label"]), set()).add(
                (r["coordinates"]["lr"], r["seed"]))
        for arm, runs in arms.items():
            assert runs == {(lr, s) for lr in rates for s in seeds}, arm
        for r in records:
            assert set(r["metrics"]) == {"validation", "test"} and r["code_version"] != "unknown"


# --- a learning-rate sweep in one vmapped program ------------------------------------------------

def test_a_learning_rate_sweep_in_one_program_equals_separate_runs():
    """Run r at ``learning_rates[r]`` is the run of a config with that peak learning rate (the factor on
    AdamW's update is exact), on both held-out splits."""
    from mtt_jax import seed_runs
    config = weighting_zoo.method_config("tiny", "ew")
    config.total_steps, config.log_every, config.optimizer.warmup_steps = 6, 3, 2
    swept = seed_runs.train_seeds(config, [0, 0, 1], learning_rates=[1e-3, 1e-2, 1e-2],
                                  splits=("validation", "test"), baselines=True)
    for r, (seed, lr) in enumerate([(0, 1e-3), (0, 1e-2), (1, 1e-2)]):
        alone_config = config.copy_and_resolve_references()
        alone_config.optimizer.learning_rate = lr
        alone = seed_runs.train_seeds(alone_config, [seed], splits=("validation", "test"))
        for split in ("validation", "test"):
            got, want = swept.by_split[split][6][r], alone.by_split[split][6][0]
            for key, value in want.items():
                np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert swept.metric("majority/loss")[0] != pytest.approx(swept.metric("majority/loss")[1])
    assert "majority/baseline_accuracy" in swept.final[0]
    with pytest.raises(ValueError, match="learning_rates has 1 entries for 2 runs"):
        seed_runs.train_seeds(config, [0, 1], learning_rates=[1e-3])


# --- the README quotes the archive ------------------------------------------------------------------

def test_readme_main_job_quotes_the_archived_seed0_float32_run():
    """The README's ``eval @ 1500`` line, its table and its wall time are the archived record of its own
    command (`experiments.reference_runs`, arm default_f32, seed 0), formatted as the README prints them:
    a README that drifts from the archive fails here."""
    import re

    from experiments import reference_runs
    (record,) = [r for r in archive.load("reference_runs", "full") if r["arm"] == "default_f32" and r["seed"] == 0]
    assert record["curves"]["main_command"].startswith(
        "python -m mtt_jax.main --config configs/default.py --workdir ")
    assert "--config." not in record["curves"]["main_command"]      # the README's command, no override
    with open(os.path.join(archive.REPOSITORY, "README.md")) as f:
        section = f.read().split("## Run the main job")[1].split("\n## ")[0]
    metrics = record["metrics"]["eval"]
    line = (f"eval @ 1500: left_digit/accuracy {metrics['left_digit/accuracy']:.4f}  "
            f"right_digit/accuracy {metrics['right_digit/accuracy']:.4f}")
    assert line == reference_runs.eval_line(record)
    assert f"\n{line}\n" in section
    rows = {task: values.split(" | ") for task, values in
            re.findall(r"^\| (left_digit|right_digit) \| (.*) \|$", section, re.MULTILINE)}
    assert rows == {task: [f"{metrics[f'{task}/{name}']:.4f}" for name in ("accuracy", "macro_f1",
                                                                          "baseline_accuracy")]
                    for task in ("left_digit", "right_digit")}
    walls = re.findall(r"Wall time of the whole command: \*\*(\d+) s\*\*", section)
    assert walls == [f"{record['wall_seconds']:.0f}"]
    loads = re.findall(r"load average\s+([0-9.]+) at the start", section)
    assert loads == [f"{record['curves']['load_average_at_start']:.1f}"]


def test_readme_zoo_summary_quotes_the_archived_full_zoo():
    """The README's one-line summary of the weighting zoo gives the archived full run's two counts."""
    import re

    from experiments import weighting_zoo
    verdict = weighting_zoo.verdict(weighting_zoo.summarize(archive.load("weighting_zoo", "full")))
    (ew_better, methods), (scal_better, _) = [
        (int(a), int(b)) for a, b in re.findall(r"\*\*(\d+) of (\d+) methods score higher", verdict)]
    with open(os.path.join(archive.REPOSITORY, "README.md")) as f:
        readme = " ".join(f.read().split())
    scalarization = "no method beats" if scal_better == 0 else f"{scal_better} of {methods} beat"
    assert (f"the archived full run (RESULTS §5): {scalarization} the tuned scalarization, "
            f"{ew_better} of {methods} beat tuned EW") in readme
