"""The central question: does task attention help? Single-task models vs one shared trunk vs + task
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

Uniform weighting (ew) throughout; nothing is selected, so every model is reported as run.

Splits: every run is scored on the validation and test split of its dataset (both in its record); the
tables report test.

What it reports (`report`, from the archived run records alone, `experiments.archive`; one record per
model and seed, a single-task model per task being its own arm): per dataset, every task's test metrics
and the mean over tasks of the tasks' main metrics (regression: Pearson instead of MSE, so higher is
better throughout), each with its 95% t-interval over seeds; each model's mean minus the shared trunk's,
paired by seed (a seed gives every multi-task model the same train batches); then the central question
one added piece at a time (single-task vs shared trunk, + task encoder vs shared trunk, + task attention
vs + task encoder, + task-MoE FFN vs + task attention) on the paired differences. The learned T x T
task-attention map (eval mean on test, rows: task i's attention over tasks j, seed mean) is plotted in
``task_attention_<dataset>.png``.

An interrupted run resumes when the same command is run again: the finished models are read back
from ``WORKDIR/runs`` through ``results.partial.json`` (`experiments.common.train_arms`).

Cost. full: 2 datasets x (T single-task + 4 multi-task models), 5 seeds x 1500 steps (d_model 64, 2
layers): about 45-70 minutes on 2 CPU cores. ``--quick``: 3 seeds, 300 steps (seqtasks) / 500 steps
(multidigits), d_model 32, 1 layer: about 2-4 minutes. ``--tiny`` runs multidigits only.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import default as digits_config, seqtasks as seqtasks_config
from experiments import archive, common, stats
from mtt_jax import seed_runs, tasks as tasks_lib

NAME = "task_attention"
FULL_COST = "about 45-70 minutes on 2 CPU cores (2 datasets, 5 seeds x 1500 steps, T + 4 models each)."
SPLITS = ("validation", "test")
DATASETS = ("seqtasks", "multidigits")
SINGLE_TASK = "single_task"
REFERENCE = "shared_trunk"   # the row every other is paired against
VARIANTS = {  # arm -> (label, task_encoder, task_attention, ffn)
    "shared_trunk": ("shared trunk", False, "none", "dense"),
    "task_encoder": ("+ task encoder", True, "none", "dense"),
    "task_attention": ("+ task attention", True, "cross", "dense"),
    "task_attention+moe": ("+ task attention + task-MoE FFN", True, "cross", "task_moe"),
}
# the central question, one step at a time: (row, the row it adds to)
STEPS = (("task_encoder", "shared_trunk"), ("task_attention", "task_encoder"),
         ("task_attention+moe", "task_attention"))


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


def dataset_arms(size: str, dataset: str) -> list[tuple[str, dict, object]]:
    """``(arm, coordinates, config)`` of every model trained on ``dataset``: one single-task model per
    task, then the multi-task variants (no task-MoE FFN with ``--tiny``)."""
    base = base_config(size, dataset)
    arms = [(f"{dataset}:{SINGLE_TASK}:{task}", {"dataset": dataset, "model": SINGLE_TASK, "task": task},
             seed_runs.single_task_config(base, task)) for task in base.tasks]
    for key, (_, task_encoder, task_attention, ffn) in VARIANTS.items():
        if size == "tiny" and ffn == "task_moe":
            continue
        c = base.copy_and_resolve_references()
        c.model.task_encoder, c.model.task_attention, c.model.ffn = task_encoder, task_attention, ffn
        arms.append((f"{dataset}:{key}", {"dataset": dataset, "model": key}, c))
    return arms


def run(args) -> dict:
    log = common.Log()
    seeds = list(range(common.num_seeds(args, 2, 3, 5)))
    datasets = ("multidigits",) if args.size == "tiny" else DATASETS
    command = common.command_line()

    def train(arm: str, coordinates: dict, config) -> list[dict]:
        runs = seed_runs.train_seeds(config, seeds, splits=SPLITS)
        log(f"{arm:40s} " + "  ".join(
            f"{t} {stats.interval(runs.metric(f'{t}/{summary_metric(tasks_lib.get(t))}')).format(3)}"
            for t in config.tasks))
        return [_record(args.size, arm, coordinates, seed, runs, r, config, command) for r, seed in enumerate(seeds)]

    records, partial = common.train_arms(
        args, NAME, {"size": args.size, "seeds": seeds, "datasets": datasets},
        [(arm, lambda a=(arm, coordinates, config): train(*a))
         for dataset in datasets for arm, coordinates, config in dataset_arms(args.size, dataset)], log)
    outcome = common.write_archived_outputs(args, NAME, records, summarize, report, plot, log)
    partial.discard()
    return outcome


def _record(size: str, arm: str, coordinates: dict, seed: int, runs, r: int, config, command: str) -> dict:
    """The archive record of run ``r`` (seed ``seed``) of ``arm``, with its task-attention map on test."""
    run_config = config.copy_and_resolve_references()
    run_config.seed = seed
    curves = {**common.train_curves(runs, r), "num_params": runs.num_params}
    final_test = runs.by_split["test"][max(runs.by_split["test"])][r]
    if "task_attention" in final_test:
        curves["task_attention"] = final_test["task_attention"]            # [T, T], eval mean on test
    return archive.run_record(NAME, size, arm, coordinates, seed, run_config,
                              common.final_metrics(runs, r, SPLITS), command,
                              runs.wall_seconds / len(runs.seeds), curves)


def summarize(records: list[dict]) -> dict:
    """Per dataset and model, from the run records alone: every task metric per seed on each split, the
    mean over tasks of the summary metric on test, the parameter count and the task-attention maps. The
    single-task row joins the T single-task models of each seed."""
    datasets = {}
    for dataset in (d for d in DATASETS if any(r["coordinates"]["dataset"] == d for r in records)):
        mine = [r for r in records if r["coordinates"]["dataset"] == dataset]
        arms = archive.by_arm(mine)
        multi = next(r for r in mine if r["coordinates"]["model"] != SINGLE_TASK)
        task_names = list(multi["config"]["tasks"])
        specs = {t: tasks_lib.get(t) for t in task_names}
        metrics = {t: list(specs[t].metric_names) for t in task_names}
        values = lambda runs, task, split: {m: [x["metrics"][split][f"{task}/{m}"] for x in runs]
                                            for m in metrics[task]}
        models = {}
        single = {t: arms[f"{dataset}:{SINGLE_TASK}:{t}"] for t in task_names}
        models[SINGLE_TASK] = {"label": "single-task", "seeds": [x["seed"] for x in single[task_names[0]]],
                               "num_params": sum(single[t][0]["curves"]["num_params"] for t in task_names),
                               **{split: {t: values(single[t], t, split) for t in task_names}
                                  for split in SPLITS}}
        for key in (k for k in VARIANTS if f"{dataset}:{k}" in arms):
            runs = arms[f"{dataset}:{key}"]
            entry = {"label": VARIANTS[key][0], "seeds": [x["seed"] for x in runs],
                     "num_params": runs[0]["curves"]["num_params"],
                     **{split: {t: values(runs, t, split) for t in task_names} for split in SPLITS}}
            if "task_attention" in runs[0]["curves"]:
                maps = np.asarray([x["curves"]["task_attention"] for x in runs])        # [S, T, T]
                entry["task_attention"] = maps.mean(0).tolist()
                entry["task_attention_per_seed"] = maps.tolist()
            models[key] = entry
        chosen = {t: summary_metric(specs[t]) for t in task_names}
        for entry in models.values():
            entry["mean"] = np.mean([entry["test"][t][chosen[t]] for t in task_names], axis=0).tolist()
        datasets[dataset] = {"tasks": task_names, "steps": multi["config"]["total_steps"], "metrics": metrics,
                             "summary_metric": chosen, "models": models}
    return {"datasets": datasets}


def report(records: list[dict]) -> str:
    """One table per dataset and the central question's answer, from the run records alone."""
    s = summarize(records)
    text = ["Same trunk, steps, batch and optimizer for every model; uniform weighting. Test split. 'mean' = "
            "the mean over tasks of each task's main metric (Pearson for regression, so higher is better). "
            f"Paired: per-seed differences from the {VARIANTS[REFERENCE][0]} (a seed gives every multi-task "
            "model the same train batches); ▲/▼: their 95% interval excludes 0.\n"]
    for dataset, r in s["datasets"].items():
        text += [f"**{dataset}** ({r['steps']} steps):\n", _table(r), verdict(r) + "\n"]
    text.append(archive.provenance(records))
    return "\n".join(text) + "\n"


def _table(r: dict) -> str:
    task_names = r["tasks"]
    models = r["models"]
    headers = (["model", "params", "seeds"] + [f"{t} {m}" for t in task_names for m in r["metrics"][t]]
               + ["mean", f"mean vs {VARIANTS[REFERENCE][0]} (paired)"])
    rows = []
    for key, entry in models.items():
        versus = ("(reference)" if key == REFERENCE else
                  common.paired_cell(entry["mean"], models[REFERENCE]["mean"], 3) if REFERENCE in models
                  else "")
        params = (f"{entry['num_params']} ({len(task_names)} models)" if key == SINGLE_TASK
                  else entry["num_params"])
        rows.append([entry["label"], params, len(entry["seeds"])]
                    + [stats.interval(entry["test"][t][m]).format(3)
                       for t in task_names for m in r["metrics"][t]]
                    + [stats.interval(entry["mean"]).format(3), versus])
    return common.markdown_table(headers, rows)


def verdict(r: dict) -> str:
    """The central question, one added piece at a time, on the paired mean over tasks."""
    models = r["models"]
    lines = []
    for added, base in [(SINGLE_TASK, REFERENCE)] + list(STEPS):
        if added not in models or base not in models:
            continue
        found = stats.paired_difference(models[added]["mean"], models[base]["mean"])
        answer = ("higher beyond the interval" if found.excludes_zero() and found.mean > 0 else
                  "lower beyond the interval" if found.excludes_zero() else "within the interval")
        lines.append(f"- {models[added]['label']} vs {models[base]['label']}: {found.format(3)}, {answer}.")
    return "\n".join(lines)


def plot(s: dict, workdir: str) -> None:
    plt = common.pyplot()
    for dataset, r in s["datasets"].items():
        maps = {e["label"]: e["task_attention"] for e in r["models"].values() if "task_attention" in e}
        if not maps:
            continue
        fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 4.8), squeeze=False,
                                 layout="constrained")
        for ax, (label, matrix) in zip(axes[0], maps.items()):
            common.plot_matrix(ax, np.asarray(matrix), r["tasks"], title=f"{dataset}: {label}", cmap="viridis")
            ax.set(xlabel="task j (attended to)", ylabel="task i (attending)")
        fig.suptitle("learned task attention on test: row i = how task i's attention splits over tasks j "
                     "(seed mean)")
        common.save_figure(fig, workdir, f"task_attention_{dataset}.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
