"""The founding question: does task attention help? Single-task models vs one shared trunk vs + task
encoder vs + task attention, at the same budget, on `seqtasks` and `multidigits`.

    python -m experiments.task_attention --workdir /tmp/exp/task_attention --quick

Models (`MultiTaskTransformer`), all with the same trunk size, steps, batch and optimizer:

- single-task: one model per task (no task encoder, no task attention);
- shared trunk: hard parameter sharing (``task_encoder = False``, ``task_attention = "none"``);
- + task encoder: the task identity enters the trunk (multi-input: features added to every position;
  single-input: one task token per task);
- + task attention: task encoder and cross-task attention (``task_attention = "cross"``), here with
  ``task_attention_self = True`` (a task also attends to its own stream; without it, with two tasks all of
  a task's attention would go to the other one and the map would say nothing);
- + task attention + task-MoE FFN: the same with the task-gated mixture-of-experts feed-forward
  (`mtt_jax.models.moe`, 4 experts); not in ``--tiny``.

Uniform weighting (ew) throughout. Reported: every task's metrics (mean ± std over seeds), the mean of the
tasks' main metrics (regression: Pearson instead of MSE, so higher is better throughout), and the learned
T x T task-attention map (eval mean, rows: task i's attention over tasks j), plotted in
``task_attention_<dataset>.png``.

Cost. full: 2 datasets x (T single-task + 4 multi-task models), 5 seeds x 1500 steps (d_model 64, 2
layers): about 45-70 minutes on 2 CPU cores. ``--quick``: 3 seeds, 300 steps (seqtasks) / 500 steps
(multidigits), d_model 32, 1 layer: about 2-4 minutes. ``--tiny`` runs multidigits only.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import default as digits_config, seqtasks as seqtasks_config
from experiments import common
from mtt_jax import seed_runs, tasks as tasks_lib

NAME = "task_attention"
FULL_COST = "about 45-70 minutes on 2 CPU cores (2 datasets, 5 seeds x 1500 steps, T + 4 models each)."
VARIANTS = {  # name -> (task_encoder, task_attention, ffn)
    "shared trunk": (False, "none", "dense"),
    "+ task encoder": (True, "none", "dense"),
    "+ task attention": (True, "cross", "dense"),
    "+ task attention + task-MoE FFN": (True, "cross", "task_moe"),
}


def base_config(size: str, dataset: str):
    if dataset == "seqtasks":
        c = seqtasks_config.get_config("")
        c.data.options.length = common.pick(size, 16, 16, 32)
        c.data.options.num_eval_examples = common.pick(size, 32, 512, 1024)
        c.eval_batch_size = c.data.options.num_eval_examples
        c.batch_size = common.pick(size, 8, 32, 32)
        c.total_steps = common.pick(size, 20, 300, 1500)
    else:
        c = digits_config.get_config("")
        c.data.options.num_eval_pairs = common.pick(size, 128, 2000, 2000)
        c.eval_batch_size = 500
        c.model.patch_size = 4
        c.batch_size = common.pick(size, 32, 64, 128)
        c.total_steps = common.pick(size, 20, 500, 1500)
    c.model.d_model = common.pick(size, 16, 32, 64)
    c.model.num_layers = common.pick(size, 1, 1, 2)
    c.model.mlp_dim = 4 * c.model.d_model
    c.model.num_experts = 4
    c.model.task_attention_self = True       # the map then shows self vs other tasks (T = 2 would be trivial)
    c.optimizer.warmup_steps = common.pick(size, 2, 30, 100)
    c.log_every = common.pick(size, 10, 50, 100)
    c.weighting.name = "ew"
    c.weighting.diagnostics_every = 0
    return c


def summary_metric(spec: tasks_lib.TaskSpec) -> str:
    """The metric averaged across tasks: the main one, with Pearson for regression (higher = better)."""
    return "pearson" if spec.kind == "regression" else spec.main_metric


def run_dataset(args, dataset: str, seeds: list[int], log) -> dict:
    base = base_config(args.size, dataset)
    task_names = list(base.tasks)
    specs = {t: tasks_lib.get(t) for t in task_names}
    out = {"tasks": task_names, "steps": base.total_steps,
           "metrics": {t: list(specs[t].metric_names) for t in task_names},
           "summary_metric": {t: summary_metric(specs[t]) for t in task_names}, "models": {}}
    single = {t: {} for t in task_names}
    wall = 0.0
    for task in task_names:
        runs = seed_runs.train_seeds(seed_runs.single_task_config(base, task), seeds)
        single[task] = {m: runs.metric(f"{task}/{m}").tolist() for m in specs[task].metric_names}
        wall += runs.wall_seconds
        log(f"[{dataset}] single-task {task}: {summary_metric(specs[task])} "
            f"{common.fmt(single[task][summary_metric(specs[task])])} ({runs.wall_seconds:.0f} s)")
    out["models"]["single-task"] = {"metrics": single, "num_params": None, "wall_seconds": round(wall, 1)}
    variants = [v for v in VARIANTS if not (args.size == "tiny" and "MoE" in v)]
    for variant in variants:
        task_encoder, task_attention, ffn = VARIANTS[variant]
        c = base.copy_and_resolve_references()
        c.model.task_encoder, c.model.task_attention, c.model.ffn = task_encoder, task_attention, ffn
        runs = seed_runs.train_seeds(c, seeds)
        entry = {"metrics": {t: {m: runs.metric(f"{t}/{m}").tolist() for m in specs[t].metric_names}
                             for t in task_names},
                 "num_params": runs.num_params, "wall_seconds": round(runs.wall_seconds, 1)}
        if "task_attention" in runs.final[0]:
            maps = np.asarray([r["task_attention"] for r in runs.final])          # [S, T, T]
            entry["task_attention"] = maps.mean(0).tolist()
            entry["task_attention_per_seed"] = maps.tolist()
        out["models"][variant] = entry
        log(f"[{dataset}] {variant:32s} " + "  ".join(
            f"{t} {common.fmt(entry['metrics'][t][summary_metric(specs[t])])}" for t in task_names)
            + f" ({runs.wall_seconds:.0f} s)")
    return out


def run(args) -> dict:
    log = common.Log()
    seeds = list(range(common.num_seeds(args, 2, 3, 5)))
    datasets = ("multidigits",) if args.size == "tiny" else ("seqtasks", "multidigits")
    results = {"seeds": seeds, "datasets": {}}
    for dataset in datasets:
        results["datasets"][dataset] = run_dataset(args, dataset, seeds, log)
    table = "".join(make_table(dataset, r) for dataset, r in results["datasets"].items())
    plot(results, args.workdir)
    common.write_outputs(args.workdir, NAME, args, table, results, log, header=(
        "Same trunk, steps, batch and optimizer for every model; uniform weighting. 'mean' = mean over tasks "
        "of each task's main metric (Pearson for regression). Task-attention maps: "
        "`task_attention_<dataset>.png`."))
    return results


def make_table(dataset: str, r: dict) -> str:
    tasks = r["tasks"]
    headers = (["model", "params"] + [f"{t} {m}" for t in tasks for m in r["metrics"][t]] + ["mean"])
    rows = []
    for model, entry in r["models"].items():
        metrics = entry["metrics"]
        mean = np.mean([metrics[t][r["summary_metric"][t]] for t in tasks], axis=0)
        rows.append([model, entry["num_params"] or "T separate models"]
                    + [common.fmt(metrics[t][m], 3) for t in tasks for m in r["metrics"][t]]
                    + [common.fmt(mean, 3)])
    return f"\n## {dataset} ({r['steps']} steps)\n\n" + common.markdown_table(headers, rows)


def plot(results: dict, workdir: str) -> None:
    plt = common.pyplot()
    for dataset, r in results["datasets"].items():
        maps = {m: e["task_attention"] for m, e in r["models"].items() if "task_attention" in e}
        if not maps:
            continue
        fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 4.8), squeeze=False,
                                 layout="constrained")
        for ax, (model, matrix) in zip(axes[0], maps.items()):
            common.plot_matrix(ax, np.asarray(matrix), r["tasks"], title=f"{dataset}: {model}",
                               cmap="viridis")
        fig.suptitle("learned task attention: row i = how task i's attention splits over tasks j (seed mean)")
        common.save_figure(fig, workdir, f"task_attention_{dataset}.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
