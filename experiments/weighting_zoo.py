"""Every weighting method of the zoo (`mtt_jax.weighting.METHODS`) on one offline benchmark, with delta-m%.

    python -m experiments.weighting_zoo --workdir /tmp/exp/zoo --quick

Benchmark: `seqtasks` (multi-input, four tasks of three kinds: ``majority`` and ``majority_parity``
(classification), ``mean_value`` (regression), ``repeat_tag`` (token tagging)); our Transformer with task
encoder and task attention; the same optimizer, learning rate and steps for every method (Adam is close to
invariant to the methods' different scales, sum vs mean, see each method's docstring; the global-norm clip
at 1.0 is not). Each method's options are the paper defaults (`mtt_jax.weighting.DEFAULT_OPTIONS`), except
that the epoch-based methods (DWA, STCH) get ``epoch_steps = total_steps / 10``, so that a short run has
ten "epochs". Single-task baselines: one model per task (no task encoder or task attention), same steps.

Both delta-m conventions (`experiments.delta_m`) are reported side by side, per seed against the
single-task metrics averaged over seeds, over every task's two metrics (classification: accuracy and
macro-F1; regression: MSE and Pearson; tagging: token accuracy and token macro-F1): Nash-MTL/FAMO's pooled
delta-m% (positive = worse) and LibMTL's per-task Delta_p% (positive = better). With two metrics per task,
the two are exact negatives here; `tests/test_experiments.py` shows on hand-made numbers where they part.

Both are relative changes, so a metric whose single-task value is near 0 swamps them: ``mean_value``'s
MSE, which a single-task model drives to ~1e-5, turns an MSE of 0.01 into +10^5 %. The table therefore
adds the pooled delta-m% over the bounded metrics only (accuracies, F1s, Pearson; every metric but MSE)
and is sorted by it; the per-task columns show each task's main metric.
``--methods`` takes a subset, and variants with options changed from the defaults for sensitivity
sweeps: ``--methods sdmgrad,sdmgrad:lam=3,sdmgrad:lam=10`` (rows named as given; each option's name,
type and range is checked before any work).
``--from_results`` rebuilds ``table.md`` and the plot from an existing ``results.json`` without training.
An interrupted run resumes when the same command is run again: each finished single-task model and
method is kept in ``results.partial.json`` (`common.PartialResults`).

Cost. full: 24 methods + 4 single-task models, 5 seeds x 1500 steps (d_model 64, 2 layers): about
6400 s on the 2-core Zen 5 CI machine (5780 s for the first 22 methods in one run; 230-377 s per method,
52-57 s per single-task model). ``--quick``: 3
seeds x 300 steps, d_model 32, 1 layer, sequences of 16: about 6-9 minutes.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from configs import seqtasks as seqtasks_config
from experiments import common, delta_m
from mtt_jax import seed_runs, tasks as tasks_lib
from mtt_jax.run import workdir as workdir_lib
from mtt_jax.weighting import DEFAULT_OPTIONS, METHODS, make_method

NAME = "weighting_zoo"
TASKS = ("majority", "majority_parity", "mean_value", "repeat_tag")
TINY_TASKS = ("majority", "mean_value")            # --tiny: two tasks and two methods, for the tests
TINY_METHODS = ("mgda", "db_mtl")                  # (a Gram method and a per-task-gradient one)
FULL_COST = ("about 1.8 hours on 2 CPU cores (24 methods + 4 single-task models, 5 seeds x 1500 "
             "steps).")
EPOCH_BASED = ("dwa", "stch")


def tasks_for(size: str) -> tuple[str, ...]:
    return TINY_TASKS if size == "tiny" else TASKS


def base_config(size: str):
    c = seqtasks_config.get_config("")
    c.tasks = tasks_for(size)
    c.total_steps = common.pick(size, 20, 300, 1500)
    c.log_every = common.pick(size, 10, 50, 100)
    c.batch_size = common.pick(size, 8, 32, 32)
    c.optimizer.warmup_steps = common.pick(size, 2, 30, 100)
    c.data.options.length = common.pick(size, 16, 16, 32)
    c.data.options.num_eval_examples = common.pick(size, 32, 512, 1024)
    c.eval_batch_size = c.data.options.num_eval_examples
    c.model.d_model = common.pick(size, 16, 32, 64)
    c.model.num_layers = common.pick(size, 1, 1, 2)
    c.model.mlp_dim = 4 * c.model.d_model
    c.weighting.diagnostics_every = 0
    return c


def method_config(size: str, entry: str):
    """The config of a ``--methods`` entry: a method name, or a variant ``name:option=value[:...]``."""
    method, options = parse_method(entry)
    c = base_config(size)
    c.weighting.name = method
    if method in EPOCH_BASED:
        c.weighting[method].epoch_steps = max(1, c.total_steps // 10)
    if METHODS[method].requires == "sampled_gram":  # three equal samples of the batch: 33 rows for 32
        c.batch_size = 3 * math.ceil(c.batch_size / 3)
    for key, value in options.items():
        c.weighting[method][key] = value
    return c


def parse_method(entry: str) -> tuple[str, dict]:
    """``"sdmgrad:lam=3:inner_lr=1"`` -> ``("sdmgrad", {"lam": 3.0, "inner_lr": 1.0})``: a method with
    some options changed from its defaults (`mtt_jax.weighting.DEFAULT_OPTIONS`), each value of its
    default's type. Raises ValueError with one line for an unknown method, option or value."""
    name, *assignments = entry.split(":")
    if name not in METHODS:
        raise ValueError(f"unknown --methods {name}; choose from: {', '.join(METHODS)}")
    options = {}
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        defaults = DEFAULT_OPTIONS[name]
        if key not in defaults or not text:
            raise ValueError(f"--methods {entry}: {assignment!r} is not option=value with an option of "
                             f"{name} ({', '.join(defaults) or 'none'})")
        kind = type(defaults[key])
        try:
            options[key] = (text.lower() in ("1", "true")) if kind is bool else kind(text)
        except (TypeError, ValueError):
            raise ValueError(f"--methods {entry}: {key}={text} is not a {kind.__name__}") from None
    return name, options


def single_task_config(size: str, task: str):
    c = base_config(size)
    c.tasks = (task,)
    c.model.task_encoder = False
    c.model.task_attention = "none"
    return c


def run(args) -> dict:
    log = common.Log()
    seeds = list(range(common.num_seeds(args, 2, 3, 5)))
    methods = (list(TINY_METHODS if args.size == "tiny" else METHODS) if args.methods == "all"
               else args.methods.split(","))
    task_names = tasks_for(args.size)
    metric_names = {t: tasks_lib.get(t).metric_names for t in task_names}
    # An interrupted run resumes: the finished single-task models and methods are read back.
    partial = common.PartialResults(args.workdir, {"size": args.size, "seeds": seeds, "tasks": task_names})
    done = partial.load()
    single, finished = done.get("single_task", {}), done.get("methods", {})
    if single or finished:
        log(f"resuming from {partial.path}: {len(single)} single-task models, {len(finished)} methods")

    for task in task_names:
        if task in single:
            continue
        runs = seed_runs.train_seeds(single_task_config(args.size, task), seeds)
        single[task] = {m: runs.metric(f"{task}/{m}").tolist() for m in metric_names[task]}
        log(f"single-task {task}: " + ", ".join(f"{m} {common.fmt(v)}" for m, v in single[task].items())
            + f" ({runs.wall_seconds:.0f} s)")
        partial.save({"single_task": single, "methods": finished})
    baseline = {t: {m: float(np.mean(v)) for m, v in single[t].items()} for t in task_names}

    results = {"tasks": list(task_names), "seeds": seeds, "single_task": single, "methods": {}}
    for method in methods:
        if method in finished:
            results["methods"][method] = finished[method]
            continue
        runs = seed_runs.train_seeds(method_config(args.size, method), seeds)
        per_seed = [delta_m.task_metrics(final, task_names, metric_names) for final in runs.final]
        results["methods"][method] = {
            "metrics": {t: {m: [p[t][m] for p in per_seed] for m in metric_names[t]} for t in task_names},
            "delta_m_pooled": [delta_m.delta_m_pooled(p, baseline) for p in per_seed],
            "delta_p_per_task": [delta_m.delta_p_per_task(p, baseline) for p in per_seed],
            "final_weights": runs.curve_weights[-1].tolist(),
            "wall_seconds": round(runs.wall_seconds, 1)}
        r = results["methods"][method]
        log(f"{method:12s} delta-m% {common.fmt(r['delta_m_pooled'], 2)}  "
            f"Delta_p% {common.fmt(r['delta_p_per_task'], 2)} ({runs.wall_seconds:.0f} s)")
        finished[method] = r
        partial.save({"single_task": single, "methods": finished})
    config = base_config(args.size)
    results["steps"] = config.total_steps
    table = make_table(results, metric_names)
    plot(results, args.workdir)
    common.write_outputs(args.workdir, NAME, args, table, results, log, header=table_header(results))
    partial.discard()
    return results


UNBOUNDED = ("mse",)  # metrics left out of the bounded delta-m% (their baselines can be ~0)


def bounded_delta_m(results: dict, method: str) -> list[float]:
    """Per seed, the pooled delta-m% over every metric but `UNBOUNDED` (positive = worse)."""
    keep = lambda metrics: {m: v for m, v in metrics.items() if m not in UNBOUNDED}
    baseline = {t: keep({m: float(np.mean(v)) for m, v in results["single_task"][t].items()})
                for t in results["tasks"]}
    metrics = results["methods"][method]["metrics"]
    return [delta_m.delta_m_pooled({t: keep({m: v[seed] for m, v in metrics[t].items()})
                                    for t in results["tasks"]}, baseline)
            for seed in range(len(results["seeds"]))]


def method_order(results: dict) -> list[str]:
    return sorted(results["methods"], key=lambda m: np.mean(bounded_delta_m(results, m)))


def make_table(results: dict, metric_names: dict) -> str:
    TASKS = results["tasks"]
    main = {t: metric_names[t][0] for t in TASKS}
    headers = (["method", "delta-m% without MSE (+ = worse)", "delta-m% (pooled, + = worse)",
                "Delta_p% (LibMTL, + = better)"] + [f"{t} {main[t]}" for t in TASKS])
    rows = [["single-task", "0 (reference)", "0 (reference)", "0 (reference)"]
            + [common.fmt(results["single_task"][t][main[t]], 3) for t in TASKS]]
    for method in method_order(results):
        r = results["methods"][method]
        rows.append([method, common.fmt(bounded_delta_m(results, method), 2),
                     common.fmt(r["delta_m_pooled"], 2), common.fmt(r["delta_p_per_task"], 2)]
                    + [common.fmt(r["metrics"][t][main[t]], 3) for t in TASKS])
    return common.markdown_table(headers, rows)


def table_header(results: dict) -> str:
    return (f"{len(results['methods'])} weighting methods on `seqtasks` ({', '.join(results['tasks'])}), "
            f"{results['steps']} steps, {len(results['seeds'])} seeds. delta-m% (Nash-MTL/FAMO; pooled "
            f"over the {2 * len(results['tasks'])} metrics vs single-task; **positive = worse**) beside "
            "Delta_p% (LibMTL; per-task average; **positive = better**), and delta-m% without the MSE "
            "(whose near-0 single-task baseline swamps both; see the module docstring). Columns per "
            "task: the task's main metric. Sorted by delta-m% without MSE.")


def rebuild_outputs(workdir: str) -> None:
    """``table.md`` and the plot again from ``workdir/results.json`` (its command and wall time kept)."""
    path = workdir_lib.join(workdir, "results.json")
    if not workdir_lib.exists(path):
        raise SystemExit(f"error: {path} does not exist; run the experiment first")
    results = json.loads(workdir_lib.read_text(path))
    metric_names = {t: tasks_lib.get(t).metric_names for t in results["tasks"]}
    plot(results, workdir)
    common.write_table(workdir, NAME, table_header(results), results, make_table(results, metric_names))


def plot(results: dict, workdir: str) -> None:
    plt = common.pyplot()
    order = method_order(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(order) + 1.5), sharey=True)
    for ax, key, title in ((axes[0], "delta_m_pooled", "delta-m% (Nash-MTL/FAMO), + = worse"),
                           (axes[1], "delta_p_per_task", "Delta_p% (LibMTL), + = better")):
        stats = [common.mean_std(results["methods"][m][key]) for m in order]
        ax.barh(range(len(order)), [s[0] for s in stats], xerr=[s[1] for s in stats], color="tab:blue")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(title)
    axes[0].set_yticks(range(len(order)), order)
    axes[0].invert_yaxis()
    common.save_figure(fig, workdir, "delta_m.png")


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--methods", default="all",
                            help="comma-separated subset of the methods; a variant with options changed "
                                 "from the defaults is NAME:OPTION=VALUE[:...], e.g. sdmgrad:lam=3")
        parser.add_argument("--from_results", action="store_true",
                            help="rebuild table.md and the plot from WORKDIR/results.json (no training)")
    args = common.parse_args(__doc__, FULL_COST, argv, extra)
    try:
        for entry in args.methods.split(",") if args.methods != "all" else []:
            c = method_config(args.size, entry)  # every entry's method and options, before any work
            make_method(c.weighting, len(c.tasks))  # and the options' ranges
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.from_results:
        common.run_locked(lambda a: rebuild_outputs(a.workdir), args)
        return
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
