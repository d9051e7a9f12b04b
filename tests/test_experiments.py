"""Every experiment runs end to end at its tiny size and writes sane numbers; the delta-m conventions.

Each experiment runs once, as its command (``python -m experiments.<name> --workdir DIR --tiny``, in a
subprocess so that ``--tiny``'s fast-compile XLA flag applies), shared by the tests that read its output.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import delta_m

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("mmoe_correlation", "gradnorm_toy", "pareto_toy", "multimnist", "weighting_zoo",
               "task_grouping", "task_attention", "task_mechanisms", "reference_runs")


def run_experiment(name: str, workdir: str) -> dict:
    result = subprocess.run([sys.executable, "-m", f"experiments.{name}", "--workdir", workdir, "--tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for filename in ("table.md", "results.json"):
        assert os.path.getsize(os.path.join(workdir, filename)) > 0, filename
    pngs = [f for f in os.listdir(workdir) if f.endswith(".png")]
    assert pngs and all(os.path.getsize(os.path.join(workdir, f)) > 1000 for f in pngs), pngs
    with open(os.path.join(workdir, "table.md")) as f:
        table = f.read()
    assert "± " in table and "--tiny" in table
    with open(os.path.join(workdir, "results.json")) as f:
        return {**json.load(f), "workdir": workdir}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_experiment(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]
    return get


# --- delta-m on hand-made numbers ----------------------------------------------------------------------

BASELINE = {"a": {"accuracy": 0.80, "macro_f1": 0.60}, "b": {"mse": 1.0}}


def test_delta_m_conventions_part_when_tasks_have_different_numbers_of_metrics():
    # a: +10% accuracy, +10% macro-F1 (better); b: MSE 1.0 -> 1.2, 20% worse.
    metrics = {"a": {"accuracy": 0.88, "macro_f1": 0.66}, "b": {"mse": 1.2}}
    # Pooled over the 3 metrics: (+10 + 10 - 20) / 3 = 0, so no change either way.
    assert delta_m.delta_m_pooled(metrics, BASELINE) == pytest.approx(0.0, abs=1e-9)
    # Per task first: a +10%, b -20%, mean -5%: LibMTL calls it 5% worse.
    assert delta_m.delta_p_per_task(metrics, BASELINE) == pytest.approx(-5.0)


def test_delta_m_signs_and_exact_negatives_with_equal_metric_counts():
    baseline = {"a": {"accuracy": 0.5}, "b": {"mse": 2.0}}
    better = {"a": {"accuracy": 0.6}, "b": {"mse": 1.0}}         # +20% and +50%
    assert delta_m.delta_m_pooled(better, baseline) == pytest.approx(-35.0)   # negative = better
    assert delta_m.delta_p_per_task(better, baseline) == pytest.approx(35.0)  # positive = better
    assert delta_m.delta_m_pooled(baseline, baseline) == 0.0
    assert delta_m.higher_is_better("token_macro_f1") and not delta_m.higher_is_better("mse")


def test_delta_m_refuses_missing_or_zero_baselines():
    with pytest.raises(KeyError, match="no single-task baseline"):
        delta_m.delta_m_pooled({"c": {"mse": 1.0}}, BASELINE)
    with pytest.raises(ValueError, match="is 0"):
        delta_m.delta_p_per_task({"a": {"accuracy": 1.0}}, {"a": {"accuracy": 0.0}})


def test_every_experiment_documents_its_cost(capsys):
    import importlib
    for name in EXPERIMENTS:
        module = importlib.import_module(f"experiments.{name}")
        with pytest.raises(SystemExit):
            module.main(["--help"])
        help_text = capsys.readouterr().out
        assert "Cost of the full run" in help_text and "--quick" in help_text, name
        usage = help_text.split("\n\n")[0]
        assert "--quick" in usage and "--tiny" not in usage, name  # --tiny is hidden


def test_every_experiment_refuses_a_url_workdir_it_cannot_write_before_any_work(capsys):
    """A URL on no known object store would end, hours later, in a local folder named ``ftp:``.
    (Bucket workdirs that can be written: test_bucket_workdir.py.)"""
    import importlib
    for name in EXPERIMENTS:
        module = importlib.import_module(f"experiments.{name}")
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--workdir", "ftp://host/run", "--tiny"])
        assert exit_info.value.code == 2, name
        assert "unknown URL scheme ftp://" in capsys.readouterr().err, name
    assert not os.path.exists(os.path.join(ROOT, "ftp:"))


def test_every_experiment_refuses_a_workdir_in_use_before_any_work(tmp_path, capsys):
    """A second copy of an experiment (launched twice, or requeued while the first runs) would write
    its partial results among the first one's: it stops in one line, and writes nothing."""
    import importlib
    from mtt_jax.run import workdir
    with workdir.lock(str(tmp_path)):
        for name in EXPERIMENTS:
            module = importlib.import_module(f"experiments.{name}")
            with pytest.raises(SystemExit) as exit_info:
                module.main(["--workdir", str(tmp_path), "--tiny"])
            assert exit_info.value.code == 2, name
            error = capsys.readouterr().err.strip().splitlines()
            assert error[-1].startswith("error: ") and "in use by another run (pid " in error[-1], name
        assert os.listdir(tmp_path) == [".lock"]


# --- the experiments at tiny size ------------------------------------------------------------------------

def run_records(workdir: str) -> list[dict]:
    """The run records an experiment wrote to ``WORKDIR/runs`` (`experiments.archive`)."""
    records = []
    for dirpath, _, names in os.walk(os.path.join(workdir, "runs")):
        records += [json.load(open(os.path.join(dirpath, n))) for n in names if n.endswith(".json")]
    return records


def test_mmoe_correlation(results):
    from experiments import mmoe_correlation
    r = results("mmoe_correlation")
    models = r["summary"]["models"]
    assert set(models) == {"shared_bottom", "omoe", "mmoe", "transformer"}
    for model, entry in models.items():
        for p in ("1.0", "0.9", "0.5"):
            losses = np.asarray(entry["by_p"][p]["final"])
            assert losses.shape == (2,) and np.all(np.isfinite(losses)) and np.all(losses > 0), model
            curve = np.asarray(entry["by_p"][p]["curve"])            # [seeds, evals along training]
            assert curve.shape == (2, 20) and np.all(np.isfinite(curve)), (model, p)
            if model in ("shared_bottom", "transformer"):         # (40 steps: the MoEs are still noisy)
                assert curve[:, -1].mean() < curve[:, 0].mean(), (model, p)   # the eval loss falls
    assert models["shared_bottom"]["num_params"] == 13255
    records = run_records(r["workdir"])
    assert len(records) == 4 * 3 * 2 and all(set(x["metrics"]) == {"test"} for x in records)
    assert mmoe_correlation.report(records) in open(os.path.join(r["workdir"], "table.md")).read()


def test_gradnorm_toy(results):
    from experiments import gradnorm_toy
    r = results("gradnorm_toy")
    methods = r["summary"]["methods"]
    assert list(methods) == ["ew", "uncertainty", "gradnorm"]
    weights = np.asarray(methods["gradnorm"]["final_weights"])               # [seeds, 2]
    np.testing.assert_allclose(weights.sum(-1), 2.0, rtol=1e-4)             # GradNorm: sum_i w_i = T
    assert np.all(weights[:, 0] > weights[:, 1])     # the sigma = 1 task gets the larger weight
    np.testing.assert_allclose(methods["ew"]["final_weights"], 1.0)
    curve = np.asarray(methods["ew"]["normalized_curve"])                   # [seeds, evals]
    assert curve.shape == (2, 11)
    np.testing.assert_allclose(curve[:, 0], 1.0)                            # L(0) / L(0)
    np.testing.assert_allclose(curve[:, -1], methods["ew"]["normalized_test_loss"])
    records = run_records(r["workdir"])
    assert len(records) == 3 * 2 and all(set(x["metrics"]) == {"test"} for x in records)
    assert {(x["arm"], x["seed"], x["config"]["seed"]) for x in records} == {
        (m, s, s) for m in methods for s in (0, 1)}
    assert all(len(x["curves"]["train_steps"]) <= 20 for x in records)
    table = gradnorm_toy.report(records)
    assert table in open(os.path.join(r["workdir"], "table.md")).read()
    assert "GradNorm gives the sigma=1 task the larger weight: yes (2/2 seeds" in table


def test_pareto_toy(results):
    from experiments import pareto_toy
    r = results("pareto_toy")
    methods = r["summary"]["methods"]
    assert set(methods) == {"ew", "pcgrad", "mgda", "cagrad", "nash_mtl", "famo", "upgrad"}
    assert len(r["front"]) > 50
    mgda = methods["mgda"]
    assert max(mgda["min_norm"]) < 0.05          # MGDA ends Pareto-stationary from every start
    assert sum(mgda["reached"]) >= 4
    front = np.asarray(r["front"])
    assert np.all(np.diff(front[:, 0]) >= 0) and np.all(np.diff(front[:, 1]) < 0)   # non-dominated
    records = run_records(r["workdir"])            # one per method and starting point (its "seed")
    assert len(records) == 7 * 5 and all(set(x["metrics"]) == {"objective"} for x in records)
    assert {(x["seed"], tuple(x["config"]["start"])) for x in records} == {
        (k, tuple(start)) for k, start in enumerate(pareto_toy.STARTS.tolist())}
    for x in records:
        theta = np.asarray(x["curves"]["theta"])
        assert theta.shape == (21, 2) and np.allclose(theta[0], x["config"]["start"])
        final = x["metrics"]["objective"]
        np.testing.assert_allclose(theta[-1], [final["x1"], final["x2"]])
    table = pareto_toy.report(records)
    assert table in open(os.path.join(r["workdir"], "table.md")).read()
    assert f"| MGDA | {sum(mgda['reached'])}/5 |" in table


def test_multimnist(results):
    from experiments import multimnist
    r = results("multimnist")
    summary = r["summary"]
    assert summary["source"] == "multidigits" and summary["tasks"] == ["left_digit", "right_digit"]
    assert list(summary["rows"]) == ["single_task", "ew", "mgda_ub"]
    for row in summary["rows"].values():
        for split in ("validation", "test"):
            for task in ("left_digit", "right_digit"):
                accuracy = np.asarray(row[split][task])
                assert accuracy.shape == (2,) and np.all((0 <= accuracy) & (accuracy <= 1))
        np.testing.assert_allclose(row["mean"], np.mean([row["test"][t] for t in summary["tasks"]], axis=0))
    np.testing.assert_allclose(np.sum(summary["rows"]["mgda_ub"]["final_weights"], -1), 1.0, rtol=1e-4)
    records = run_records(r["workdir"])    # (2 single-task models + 2 rows) x 2 seeds
    assert len(records) == 4 * 2 and all(set(x["metrics"]) == {"validation", "test"} for x in records)
    assert {x["arm"] for x in records} == {"single_task:left_digit", "single_task:right_digit", "ew", "mgda_ub"}
    assert all(x["config"]["seed"] == x["seed"] for x in records)
    table = multimnist.report(records)
    assert table in open(os.path.join(r["workdir"], "table.md")).read()
    assert "| uniform (ew) |" in table and "(reference)" in table


def test_weighting_zoo(results):
    """Every arm at every (learning rate, seed), selection on validation, the table from the records."""
    from experiments import weighting_zoo
    r = results("weighting_zoo")
    rows = r["summary"]["rows"]
    assert {"method:ew", "method:mgda", "method:db_mtl"} <= set(rows)
    assert sum(row["kind"] == "scalarization" for row in rows.values()) == 2
    for row in rows.values():
        # two metrics per task: the two conventions are exact negatives
        np.testing.assert_allclose(row["delta_m_pooled"], -np.asarray(row["delta_p_per_task"]), atol=1e-9)
        assert len(row["score"]) == 2 and np.all(np.isfinite(row["score"]))
        assert row["lr"] in r["learning_rates"]
    records = run_records(r["workdir"])
    assert len(records) == (2 + 3 + 2) * 2 * 2     # (single-task + methods + scalarizations) x lrs x seeds
    assert all(set(x["metrics"]) == {"validation", "test"} for x in records)
    assert weighting_zoo.report(records) in open(os.path.join(r["workdir"], "table.md")).read()


def test_weighting_zoo_resumes_an_interrupted_run(results, tmp_path):
    """With the single-task models and mgda finished before an interruption, a rerun trains the rest."""
    r = results("weighting_zoo")
    arms = {}
    for record in run_records(r["workdir"]):
        arms.setdefault(f"{record['coordinates']['kind']}:{record['coordinates']['label']}", []).append(record)
    done = {k: v for k, v in arms.items() if k.startswith("single_task:") or k == "method:mgda"}
    identity = {"size": "tiny", "seeds": r["seeds"], "methods": ["ew", "mgda", "db_mtl"],
                "learning_rates": r["learning_rates"]}
    with open(tmp_path / "results.partial.json", "w") as f:
        json.dump({"identity": identity, "results": {"arms": done}}, f)
    result = subprocess.run([sys.executable, "-m", "experiments.weighting_zoo", "--workdir", str(tmp_path),
                             "--tiny"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 arms finished" in result.stderr
    assert "single_task:majority:" not in result.stderr and "method:mgda:" not in result.stderr
    with open(tmp_path / "results.json") as f:
        resumed = json.load(f)["summary"]["rows"]
    assert resumed["method:mgda"]["score"] == r["summary"]["rows"]["method:mgda"]["score"]
    np.testing.assert_allclose(resumed["method:db_mtl"]["score"], r["summary"]["rows"]["method:db_mtl"]["score"],
                               rtol=1e-4)
    assert not (tmp_path / "results.partial.json").exists()


def test_weighting_zoo_rejects_an_unknown_method_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.weighting_zoo", "--workdir",
                             str(tmp_path / "never"), "--tiny", "--methods", "mgda,magic"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown --methods magic" in result.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("entry,expected", [
    ("sdmgrad:lambda=3", "'lambda=3' is not option=value with an option of sdmgrad (lam, inner_steps"),
    ("sdmgrad:lam=three", "lam=three is not a float"),
    ("sdmgrad:lam=-1", "weighting.sdmgrad.lam=-1.0 must be in [0.0, inf]"),
])
def test_weighting_zoo_method_variants_are_checked_before_any_work(tmp_path, capsys, entry, expected):
    """``NAME:OPTION=VALUE`` runs a method with options changed from its defaults (a sensitivity sweep);
    every entry's option name, type and range is checked before the first model trains."""
    from experiments import weighting_zoo
    assert weighting_zoo.parse_method("sdmgrad:lam=3:inner_steps=10") == ("sdmgrad", {"lam": 3.0,
                                                                                       "inner_steps": 10})
    assert weighting_zoo.method_config("tiny", "sdmgrad:lam=3").weighting.sdmgrad.lam == 3.0
    with pytest.raises(SystemExit) as exit_info:
        weighting_zoo.main(["--workdir", str(tmp_path / "never"), "--tiny", "--methods", f"ew,{entry}"])
    assert expected in str(exit_info.value)
    assert not (tmp_path / "never").exists()


def test_task_grouping_recovers_the_pairs(results):
    from experiments import task_grouping
    r = results("task_grouping")
    models = r["summary"]["models"]
    assert list(models) == ["shared_bottom"] and list(models["shared_bottom"]) == ["1.0", "0.9", "0.5"]
    for p in ("1.0", "0.9"):
        shared_bottom = models["shared_bottom"][p]
        assert shared_bottom["grouping"] == [[0, 1], [2, 3]], p
        assert np.mean(shared_bottom["within_pair"]) > np.mean(shared_bottom["across_pairs"])
        affinity = np.asarray(shared_bottom["affinity_mean"])
        assert affinity.shape == (4, 4) and np.all(np.isfinite(affinity))
        np.testing.assert_allclose(affinity, np.mean(shared_bottom["affinity_per_seed"], axis=0))
    records = run_records(r["workdir"])        # 3 correlations x 3 seeds of the MLP
    assert len(records) == 3 * 3 and all(set(x["metrics"]) == {"validation", "test"} for x in records)
    assert all(x["config"]["data"]["options"]["correlation"] == x["coordinates"]["correlation"]
               and x["config"]["seed"] == x["seed"] for x in records)
    assert all(np.asarray(x["curves"]["affinity"]).shape == (4, 4) for x in records)
    table = task_grouping.report(records)
    assert table in open(os.path.join(r["workdir"], "table.md")).read()
    assert "| Shared-Bottom MLP | 1.0 | 3 | {mmoe_a1, mmoe_a2} / {mmoe_b1, mmoe_b2} | yes |" in table


def test_task_attention(results):
    from experiments import task_attention
    r = results("task_attention")
    digits = r["summary"]["datasets"]["multidigits"]
    assert list(r["summary"]["datasets"]) == ["multidigits"]
    assert list(digits["models"]) == ["single_task", "shared_trunk", "task_encoder", "task_attention"]
    attention = np.asarray(digits["models"]["task_attention"]["task_attention"])
    assert attention.shape == (2, 2)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-3)
    assert "task_attention" not in digits["models"]["shared_trunk"]
    for entry in digits["models"].values():
        accuracy = np.asarray(entry["test"]["left_digit"]["accuracy"])
        assert accuracy.shape == (2,) and np.all((0 <= accuracy) & (accuracy <= 1))
        assert len(entry["mean"]) == 2
    records = run_records(r["workdir"])        # (2 single-task models + 3 multi-task models) x 2 seeds
    assert len(records) == 5 * 2 and all(set(x["metrics"]) == {"validation", "test"} for x in records)
    assert {x["arm"] for x in records} == {f"multidigits:{arm}" for arm in (
        "single_task:left_digit", "single_task:right_digit", "shared_trunk", "task_encoder", "task_attention")}
    table = task_attention.report(records)
    assert table in open(os.path.join(r["workdir"], "table.md")).read()
    assert "- + task attention vs + task encoder: " in table


def test_task_mechanisms(results):
    """A corner of each part at --tiny: the pipeline from arms to records to the three tables."""
    from experiments import task_mechanisms
    r = results("task_mechanisms")
    records = run_records(r["workdir"])
    # readout: 2 models; retrieval: 2 models + the single-task reference; multiview: 2 models + aligned
    # on shuffled rows; 2 seeds each
    assert len(records) == (2 + 3 + 3) * 2
    assert all(set(x["metrics"]) == {"validation", "test"} for x in records)
    assert all(len(x["curves"]["eval_steps"]) == task_mechanisms.EVALS_ALONG_THE_CURVE for x in records)
    table = task_mechanisms.report(records)
    assert table in open(os.path.join(r["workdir"], "table.md")).read()
    for part in ("Readout vs conditioning vs compute", "Task-selective retrieval", "Aligned multi-view"):
        assert part in table
    assert "| shuffled | aligned |" in table


# --- the vmapped runner is the library's loop ----------------------------------------------------------

RUNNER_VS_LOOP = """
import json, sys
import numpy as np
from configs import default as default_config
from mtt_jax import seed_runs, train
config = default_config.get_config("tiny")
config.total_steps, config.eval_every, config.log_every, config.checkpoint_every = 6, 6, 3, 100
config.mesh.num_devices = 1
config.weighting.name = "pcgrad"          # a Gram method: per-task gradients inside the vmap
runs = seed_runs.train_seeds(config, [0, 3])
config.seed = 3                           # the second run of the vmap
_, final = train.train_and_evaluate(config, sys.argv[1], quiet=True)
keys = ("loss", "left_digit/loss", "right_digit/loss", "right_digit/accuracy")
print(json.dumps({"runner": [{k: r[k] for k in keys} for r in runs.final],
                  "loop": {k: final[k] for k in keys}}))
"""


def test_runner_matches_the_training_loop(tmp_path):
    """Seed s of `seed_runs.train_seeds` is the run `train.train_and_evaluate` makes with config.seed = s.

    In a subprocess with XLA's fast-compile flag (as the experiments run), which halves the compile time.
    """
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0")
    result = subprocess.run([sys.executable, "-c", RUNNER_VS_LOOP, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    for key, value in values["loop"].items():
        np.testing.assert_allclose(values["runner"][1][key], value, rtol=2e-3, atol=1e-5, err_msg=key)
    assert abs(values["runner"][0]["loss"] - values["loop"]["loss"]) > 1e-4   # seed 0 is another run


def retrieval_records(label: str, coordinates: dict, tasks: tuple, accuracies: list, blind: float) -> list:
    """Hand-made task_mechanisms records of one retrieval arm, one per seed."""
    return [{"arm": f"{label}@lr=0.002", "seed": seed, "coordinates": {**coordinates, "part": "retrieval",
                                                                       "lr": 0.002},
             "config": {"tasks": list(tasks)},
             "metrics": {"test": {k: v for t in tasks for k, v in ((f"{t}/accuracy", accuracy),
                                                                  (f"{t}/baseline_accuracy", blind))}}}
            for seed, accuracy in enumerate(accuracies)]


@pytest.mark.parametrize("single_accuracies,reads_widths", [([0.60, 0.61, 0.62], True),
                                                            ([0.19, 0.20, 0.21], False)])
def test_retrieval_widths_are_read_only_against_a_learned_single_task_reference(single_accuracies,
                                                                                 reads_widths):
    """The smallest width reaching 95% of the single-task model's accuracy means nothing when that model
    is at the input-blind predictor's level (0.2 here): the report then gives no width."""
    from experiments import task_mechanisms
    arms = {}
    for width, accuracies in ((8, [0.2, 0.2, 0.2]), (32, [0.7, 0.72, 0.74])):
        label = f"retrieval:T2:w{width}:task_tokens"
        arms[label] = retrieval_records(label, {"num_tasks": 2, "width": width, "model": "task_tokens"},
                                        ("retrieve_0", "retrieve_1"), accuracies, 0.2)
        label = f"retrieval:w{width}:single"
        arms[label] = retrieval_records(label, {"width": width, "model": "single_task"}, ("retrieve_0",),
                                        single_accuracies if width == 32 else [0.2, 0.2, 0.2], 0.2)
    text = task_mechanisms.retrieval_report(arms)
    if reads_widths:   # 0.95 x 0.61 = 0.5795: width 32 reaches it, width 8 does not
        assert "accuracy (0.580; its lead over the input-blind predictor: 0.410 ± 0.025)" in text
        assert "| task_tokens | 32 |" in text
    else:
        assert "**No smallest width is given" in text and "0.000 ± 0.025), so it is no reference" in text
        assert "| task_tokens | 32 |" not in text
    assert "| task_tokens | 2 | 0.200 ± 0.000 | 0.720 ± 0.050 |" in text


def test_train_arms_resumes_an_interrupted_sweep_arm_by_arm(tmp_path):
    """The finished arms of an interrupted attempt are read back, not retrained; another identity (a
    changed command) starts afresh."""
    import argparse
    from experiments import common
    args = argparse.Namespace(workdir=str(tmp_path), size="tiny", archive=False)
    trained = []

    def arm(label, interrupted=False):
        def train():
            trained.append(label)
            if interrupted:
                raise KeyboardInterrupt
            return [{"arm": label, "seed": seed, "wall_seconds": 1.0} for seed in range(2)]
        return label, train
    log = common.Log()
    with pytest.raises(KeyboardInterrupt):
        common.train_arms(args, "demo", {"seeds": 2}, [arm("a"), arm("b", interrupted=True)], log)
    records, partial = common.train_arms(args, "demo", {"seeds": 2}, [arm("a"), arm("b")], log)
    assert trained == ["a", "b", "b"]
    assert [(r["arm"], r["seed"]) for r in records] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert sorted(os.listdir(tmp_path / "runs")) == ["a", "b"]
    common.train_arms(args, "demo", {"seeds": 3}, [arm("a")], log)
    assert trained == ["a", "b", "b", "a"]
    partial.discard()
    assert not (tmp_path / "results.partial.json").exists()
