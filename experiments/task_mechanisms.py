"""When do a task encoder and task attention help? Three benchmarks built so that each mechanism can.

    python -m experiments.task_mechanisms --workdir /tmp/exp/mechanisms --quick [--part readout]

This library conditions one Transformer on the task in two ways: a task encoder (task identity
-> Dense -> task features entering the trunk) and task attention (one task's stream reads another's).
On the earlier benchmarks (`experiments.task_attention`) neither could help: no example carried
information for another task, and every task sat at ceiling. Each part below has a known answer.

- ``readout`` (`multidigits`, and its heavy-overlap variant): is a gain due to a task-specific readout,
  to conditioning inside the trunk, or to extra compute? Models: the plain shared trunk with one
  mean-pooled vector (``mean_pool``), per-task attention-pool heads on the same trunk
  (``attention_pool``: a task-specific readout and nothing else), T task tokens (``task_tokens``), the
  same plus task attention (``task_tokens+attention``), the additive task encoder
  (``additive``: task features added to every position, one trunk pass per task, T times the trunk's
  FLOPs), its FLOP-matched control (``flop_matched``: the plain trunk with T times the layers), and one
  single-task model per task; on heavy overlap at widths 16 and 64 (one layer), with test accuracy
  along training.
- ``retrieval`` (`mtt_jax.data.retrieval`): under a width bottleneck a task-agnostic pooled state must
  hold every queried group's value (about V T dimensions), a task-conditioned one only its own group's
  (V). For T in the grid and widths from narrow to wide: the smallest width whose test accuracy reaches
  95% of the widest single-task model's, per model and T.
- ``multiview`` (`mtt_jax.data.multiview`, rows aligned across tasks): task t sees its own noisy view of
  one instance; one task's own view is pure noise. Models: no cross-task path (``no_cross_task``),
  today's task attention to learned memory (``memory_attention``), aligned task attention over the other
  tasks' positions of the row (``aligned``) or their pooled vectors (``aligned_pooled``), and
  single-task models. Reported as each task's share of the gap between the Bayes rule's accuracy from
  its own view and from all views of the row, both on the test rows the models are scored on (the exact
  expectations are listed beside them). Negative control: the same models on the same data with each
  task's rows shuffled independently (``shuffle_rows``), where the all-view accuracy equals the
  own-view one, so a real cross-task gain must vanish.

Every arm is trained with 5 seeds at each learning rate of a small grid (one vmapped program per arm,
`mtt_jax.seed_runs`), and keeps the rate whose mean validation accuracy (over tasks) is highest; the
test split is reported once. The grid is 1e-3 and 3e-3, except in retrieval, whose 52 arms all train
at 2e-3. Runs are archived (`experiments.archive`) and `report` renders the tables
from the records alone.

An interrupted run resumes when the same command is run again: the finished models are read back
from ``WORKDIR/runs`` through ``results.partial.json`` (`experiments.common.train_arms`).

Cost. full: see `FULL_COST` (measured on a shared machine: readout about 4.5 hours, its first 13 of
16 arms 62 minutes alone; retrieval 2.2 hours; multiview half an hour). To fit, the grid first planned
was cut: no depth-2 or standard-overlap readout cells, no width 128 or second learning rate in
retrieval, width 32 in multiview. ``--quick``, a smoke check of each part: one readout cell (heavy
overlap, width 32, one layer), retrieval at T = 2 and widths 8 and 32, multiview without the memory
and pooled variants; 3 seeds, one learning rate, 200 steps (300 for retrieval, whose single-task
reference learns nothing in 200): 78 runs, about 9 CPU-minutes, so under 10 minutes on 2 cores
(`--part` runs one).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from configs import default as default_config
from configs import multiview as multiview_config
from configs import retrieval as retrieval_config
from experiments import archive, common, stats
from mtt_jax import data, seed_runs
from mtt_jax.run import config_check

NAME = "task_mechanisms"
PARTS = ("readout", "retrieval", "multiview")
FULL_COST = ("measured on 2 CPU cores shared with 1-3 other jobs, wall time summed over each part's arms: "
             "readout 16 arms x 10 runs, about 4.5 hours (alone on the machine, its first 13 arms took 62 "
             "minutes; the other 3 arms, cheaper, were not timed alone); retrieval 52 arms x 5 runs, 2.2 "
             "hours (its last 40 arms 84 minutes, 115 CPU-minutes; one early arm took 28 minutes while paused for another job); multiview 12 arms x 10 runs, "
             "33 minutes.")
EVALS_ALONG_THE_CURVE = 5

READOUT_MODELS = {
    "mean_pool": dict(task_encoder="none", task_attention="none", readout="mean"),
    "attention_pool": dict(task_encoder="none", task_attention="none", readout="attention_pool"),
    "task_tokens": dict(task_encoder="tokens", task_attention="none"),
    "task_tokens+attention": dict(task_encoder="tokens", task_attention="cross"),
    "additive": dict(task_encoder="add", task_attention="none"),
    "flop_matched": dict(task_encoder="none", task_attention="none", readout="mean"),  # T x the layers
}
RETRIEVAL_MODELS = ("mean_pool", "attention_pool", "task_tokens", "additive")
MULTIVIEW_MODELS = {
    "no_cross_task": dict(task_attention="none"),
    "memory_attention": dict(task_attention="cross"),
    "aligned": dict(task_attention="aligned", task_attention_pool="positions"),
    "aligned_pooled": dict(task_attention="aligned", task_attention_pool="pooled"),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    part: str
    label: str            # the arm's name in the archive and the tables
    coordinates: dict
    config: object


def grid(size: str) -> dict:
    """Every size-dependent choice in one place."""
    return {
        "seeds": common.pick(size, 2, 3, 5),
        # full: retrieval's 52 arms train at one rate, the other parts' arms keep the better of two on
        # validation (the cost cut, see FULL_COST)
        "learning_rates": {"readout": common.pick(size, (2e-3,), (2e-3,), (1e-3, 3e-3)),
                           "retrieval": (2e-3,),
                           "multiview": common.pick(size, (2e-3,), (2e-3,), (1e-3, 3e-3))},
        "readout_cells": common.pick(size, (("heavy", 16, 1),), (("heavy", 32, 1),),
                                     (("heavy", 16, 1), ("heavy", 64, 1))),
        "readout_steps": common.pick(size, 20, 200, 1000),
        "retrieval_tasks": common.pick(size, (2,), (2,), (2, 4, 8)),
        "retrieval_widths": common.pick(size, (8,), (8, 32), (8, 16, 32, 64)),
        "retrieval_steps": common.pick(size, 20, 300, 1000),
        "multiview_steps": common.pick(size, 20, 200, 1000),
        "multiview_width": common.pick(size, 16, 32, 32),
        # --tiny (the tests): a corner of each part, to check the pipeline in seconds
        "readout_models": common.pick(size, ("mean_pool", "additive"), tuple(READOUT_MODELS),
                                      tuple(READOUT_MODELS)),
        "retrieval_models": common.pick(size, ("mean_pool", "task_tokens"), RETRIEVAL_MODELS, RETRIEVAL_MODELS),
        "multiview_models": common.pick(size, ("no_cross_task", "aligned"), ("no_cross_task", "aligned"),
                                        tuple(MULTIVIEW_MODELS)),
        "single_task": size != "tiny",
    }


def _set_model(c, options: dict, width: int, depth: int) -> None:
    c.model.d_model, c.model.num_layers = width, depth
    c.model.num_heads = 2 if width < 32 else 4
    c.model.mlp_dim = 4 * width
    for key, value in options.items():
        c.model[key] = value


def _shorten(c, size: str, steps: int) -> None:
    c.total_steps = steps
    c.log_every = max(1, steps // 10)
    c.optimizer.warmup_steps = max(1, steps // 10)
    c.weighting.name = "ew"
    c.weighting.diagnostics_every = 0


def readout_arms(size: str) -> list[Arm]:
    g, arms = grid(size), []
    for overlap, width, depth in g["readout_cells"]:
        base = default_config.get_config("")
        base.data.options.overlap = overlap
        base.data.options.num_eval_pairs = common.pick(size, 64, 1000, 2000)
        base.eval_batch_size = 500 if size != "tiny" else 64
        base.batch_size = common.pick(size, 16, 64, 128)
        _shorten(base, size, g["readout_steps"])
        cell = {"overlap": overlap, "width": width, "depth": depth}
        for model in g["readout_models"]:
            options = READOUT_MODELS[model]
            c = base.copy_and_resolve_references()
            layers = depth * len(c.tasks) if model == "flop_matched" else depth
            _set_model(c, options, width, layers)
            arms.append(Arm("readout", f"readout:{overlap}:w{width}:d{depth}:{model}", {**cell, "model": model},
                            c))
        for task in base.tasks if g["single_task"] else ():
            c = seed_runs.single_task_config(base, task)
            _set_model(c, {}, width, depth)
            arms.append(Arm("readout", f"readout:{overlap}:w{width}:d{depth}:single:{task}",
                            {**cell, "model": "single_task", "task": task}, c))
    return arms


def retrieval_arms(size: str) -> list[Arm]:
    g, arms = grid(size), []
    for num_tasks in g["retrieval_tasks"]:
        for width in g["retrieval_widths"]:
            for model in g["retrieval_models"]:
                c = _retrieval_config(size, num_tasks)
                _set_model(c, READOUT_MODELS[model], width, 1)
                arms.append(Arm("retrieval", f"retrieval:T{num_tasks}:w{width}:{model}",
                                {"num_tasks": num_tasks, "width": width, "model": model}, c))
    for width in g["retrieval_widths"]:  # the single-task reference: task retrieve_0 alone
        c = seed_runs.single_task_config(_retrieval_config(size, 2), "retrieve_0")
        _set_model(c, {}, width, 1)
        arms.append(Arm("retrieval", f"retrieval:w{width}:single", {"width": width, "model": "single_task"}, c))
    return arms


def _retrieval_config(size: str, num_tasks: int):
    c = retrieval_config.get_config("")
    c.data.options.num_tasks = num_tasks
    c.tasks = tuple(f"retrieve_{t}" for t in range(num_tasks))
    c.data.options.num_eval_examples = common.pick(size, 64, 512, 2048)
    c.eval_batch_size = c.data.options.num_eval_examples
    c.batch_size = common.pick(size, 16, 64, 64)
    _shorten(c, size, grid(size)["retrieval_steps"])
    return c


def multiview_arms(size: str) -> list[Arm]:
    g, arms = grid(size), []
    for shuffled in (False, True):
        base = multiview_config.get_config("shuffled" if shuffled else "")
        base.data.options.num_eval_examples = common.pick(size, 64, 512, 2048)
        base.eval_batch_size = base.data.options.num_eval_examples
        base.batch_size = common.pick(size, 8, 32, 32)
        _shorten(base, size, g["multiview_steps"])
        rows = "shuffled" if shuffled else "aligned"
        for model in g["multiview_models"] if not shuffled or size != "tiny" else ("aligned",):
            c = base.copy_and_resolve_references()
            _set_model(c, MULTIVIEW_MODELS[model], g["multiview_width"], 1)
            arms.append(Arm("multiview", f"multiview:{rows}:{model}", {"rows": rows, "model": model}, c))
        if not shuffled and g["single_task"]:  # one view only: shuffling the others' rows changes nothing
            for task in base.tasks:
                c = seed_runs.single_task_config(base, task)
                _set_model(c, {}, g["multiview_width"], 1)
                arms.append(Arm("multiview", f"multiview:single:{task}",
                                {"rows": rows, "model": "single_task", "task": task}, c))
    return arms


ARMS = {"readout": readout_arms, "retrieval": retrieval_arms, "multiview": multiview_arms}


# --- Training -------------------------------------------------------------------------------------

def train_arm(arm: Arm, size: str, command: str) -> list[dict]:
    """Every (learning rate, seed) run of ``arm`` in one program; one record per run."""
    g = grid(size)
    runs_grid = [(lr, seed) for lr in g["learning_rates"][arm.part] for seed in range(g["seeds"])]
    c = arm.config
    runs = seed_runs.train_seeds(c, [s for _, s in runs_grid], learning_rates=[lr for lr, _ in runs_grid],
                                 splits=("validation", "test"), baselines=True,
                                 eval_every=c.total_steps // EVALS_ALONG_THE_CURVE)
    records = []
    for r, (lr, seed) in enumerate(runs_grid):
        run_config = c.copy_and_resolve_references()
        run_config.optimizer.learning_rate, run_config.seed = lr, seed
        curve_steps = sorted(runs.by_split["test"])
        curves = {"eval_steps": curve_steps,
                  "test_accuracy": [[runs.by_split["test"][step][r][f"{t}/accuracy"] for t in c.tasks]
                                    for step in curve_steps],
                  **common.train_curves(runs, r)}
        if "task_attention" in runs.final[r]:
            curves["task_attention"] = runs.final[r]["task_attention"]
        records.append(archive.run_record(
            NAME, size, f"{arm.label}@lr={lr:g}", {**arm.coordinates, "part": arm.part, "lr": lr}, seed,
            run_config, common.final_metrics(runs, r, ("validation", "test")), command,
            runs.wall_seconds / len(runs_grid), curves))
    return records


def parts_folders(parts: tuple[str, ...]):
    """Which archive folders an invocation for ``parts`` replaces: its parts' arms (named ``<part>_...``,
    `archive.file_name`), so that ``--part retrieval`` keeps the archived readout records."""
    return lambda arm_folder: arm_folder.split("_")[0] in parts


def run(args) -> dict:
    log = common.Log()
    parts = PARTS if args.part == "all" else (args.part,)
    arms = [arm for part in parts for arm in ARMS[part](args.size)]
    command = common.command_line()
    records, partial = common.train_arms(
        args, NAME, {"size": args.size, "parts": parts},
        [(arm.label, lambda arm=arm: train_arm(arm, args.size, command)) for arm in arms], log,
        owns=parts_folders(parts))
    plot(_chosen(records), args.workdir)
    common.write_outputs(args.workdir, NAME, args, report(records), {"parts": list(parts)}, log,
                         header=f"Archived runs: {args.workdir}/runs.", spread="mean ± 95% t-interval over seeds")
    partial.discard()
    return {}


def plot(chosen: dict[str, list[dict]], workdir: str) -> None:
    """``curves.png``: test accuracy along training per readout model (first cell); accuracy against
    width per retrieval model (largest T); each multiview model's accuracy on the blind task."""
    plt = common.pyplot()
    by_part = {part: {k: v for k, v in chosen.items() if v[0]["coordinates"]["part"] == part} for part in PARTS}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    readout = by_part["readout"]
    if readout:
        cell = sorted(readout)[0].rsplit(":", 1)[0]
        for label, runs in sorted(readout.items()):
            if label.startswith(cell + ":") and ":single:" not in label:
                steps = runs[0]["curves"]["eval_steps"]
                accuracy = np.asarray([np.mean(r["curves"]["test_accuracy"], axis=1) for r in runs])
                axes[0].plot(steps, accuracy.mean(0), "o-", label=label.rsplit(":", 1)[1])
        axes[0].set(title=f"readout, {cell.split(':', 1)[1]}", xlabel="step", ylabel="mean test accuracy")
        axes[0].legend(fontsize=7)
    retrieval = {k: v for k, v in by_part["retrieval"].items() if "num_tasks" in v[0]["coordinates"]}
    if retrieval:
        most = max(v[0]["coordinates"]["num_tasks"] for v in retrieval.values())
        for model in RETRIEVAL_MODELS:
            points = sorted((v[0]["coordinates"]["width"], float(np.mean(_accuracies(v))))
                            for v in retrieval.values()
                            if v[0]["coordinates"]["model"] == model and v[0]["coordinates"]["num_tasks"] == most)
            if points:
                axes[1].plot(*zip(*points), "o-", label=model)
        axes[1].set(title=f"retrieval, T = {most}", xlabel="width (d_model)", ylabel="mean test accuracy",
                    xscale="log")
        axes[1].legend(fontsize=7)
    multiview = {k: v for k, v in by_part["multiview"].items() if v[0]["coordinates"]["model"] != "single_task"}
    if multiview:
        labels = sorted(multiview)
        axes[2].barh(range(len(labels)), [float(np.mean(_accuracies(multiview[k], "test", "view_blind")))
                                          for k in labels])
        axes[2].set_yticks(range(len(labels)), [k.split(":", 1)[1] for k in labels], fontsize=7)
        exact = data.multiview.reference_accuracies()["view_blind"]
        axes[2].axvline(exact["own"], color="gray", linestyle="--", label="Bayes, own view (chance)")
        axes[2].axvline(exact["all"], color="black", linestyle="--", label="Bayes, all views of the row")
        axes[2].legend(fontsize=7)
        axes[2].set(title="multiview: the task whose own view is noise", xlabel="view_blind test accuracy")
    common.save_figure(fig, workdir, "curves.png")


# --- Selection on validation, reporting on test ---------------------------------------------------

def _chosen(records: list[dict]) -> dict[str, list[dict]]:
    """Per arm (its label without the learning rate), the runs of the learning rate with the highest
    mean validation accuracy over the arm's tasks."""
    by_arm: dict[str, dict[float, list[dict]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        by_arm.setdefault(r["arm"].rsplit("@", 1)[0], {}).setdefault(r["coordinates"]["lr"], []).append(r)
    return {arm: max(by_lr.values(), key=lambda runs: np.mean([_mean_accuracy(r, "validation") for r in runs]))
            for arm, by_lr in by_arm.items()}


def _tasks(record: dict) -> list[str]:
    return list(record["config"]["tasks"])


def _mean_accuracy(record: dict, split: str) -> float:
    return float(np.mean([record["metrics"][split][f"{t}/accuracy"] for t in _tasks(record)]))


def _accuracies(runs: list[dict], split: str = "test", task: str | None = None) -> np.ndarray:
    if task is None:
        return np.asarray([_mean_accuracy(r, split) for r in runs])
    return np.asarray([r["metrics"][split][f"{task}/accuracy"] for r in runs])


def report(records: list[dict]) -> str:
    chosen = _chosen(records)
    text = []
    for part, render in (("readout", readout_report), ("retrieval", retrieval_report),
                         ("multiview", multiview_report)):
        arms = {k: v for k, v in chosen.items() if v[0]["coordinates"]["part"] == part}
        if arms:
            text.append(render(arms))
    text.append(archive.provenance(records))
    return "\n".join(text) + "\n"


def readout_report(arms: dict[str, list[dict]]) -> str:
    cells = sorted({(r[0]["coordinates"]["overlap"], r[0]["coordinates"]["width"], r[0]["coordinates"]["depth"])
                    for r in arms.values()})
    models = list(READOUT_MODELS) + ["single_task"]
    out = ["**Readout vs conditioning vs compute** (`multidigits`; mean test accuracy of the two digits; "
           "± 95% t-interval; the paired difference from `mean_pool` at the end, ▲/▼ beyond its interval; "
           "accuracy at 20/40/100% of training from the same runs):\n"]
    for overlap, width, depth in cells:
        prefix = f"readout:{overlap}:w{width}:d{depth}:"
        reference = arms[prefix + "mean_pool"]
        rows = []
        for model in models:
            runs = _single_task_runs(arms, prefix) if model == "single_task" else arms.get(prefix + model)
            if not runs:
                continue
            curve = np.asarray([np.mean(r["curves"]["test_accuracy"], axis=1) for r in runs])  # [S, N]
            points = [curve[:, i] for i in (0, 1, -1)] if curve.shape[1] >= 3 else [curve[:, -1]] * 3
            rows.append([model, f"{runs[0]['coordinates']['lr']:g}"]
                        + [stats.interval(p).format(3) for p in points[:2]]
                        + [stats.interval(_accuracies(runs)).format(3),
                           "(reference)" if model == "mean_pool" else
                           common.paired_cell(_accuracies(runs), _accuracies(reference))])
        steps = reference[0]["curves"]["eval_steps"]
        at = [steps[0], steps[1], steps[-1]] if len(steps) >= 3 else [steps[-1]] * 3
        out.append(f"*{overlap} overlap, width {width}, depth {depth}*\n")
        out.append(common.markdown_table(["model", "lr", f"step {at[0]}", f"step {at[1]}",
                                          f"step {at[2]} (end)", "vs mean_pool (paired)"], rows))
    return "\n".join(out)


def _single_task_runs(arms: dict, prefix: str) -> list[dict] | None:
    """The single-task models of a cell as one row: per seed, the mean of the tasks' own models."""
    singles = [runs for label, runs in arms.items() if label.startswith(prefix + "single:")]
    if not singles:
        return None
    merged = []
    for seed_runs_ in zip(*singles):
        task_acc = {t: run["metrics"]["test"][f"{t}/accuracy"] for run in seed_runs_ for t in _tasks(run)}
        curve = np.concatenate([np.asarray(run["curves"]["test_accuracy"]) for run in seed_runs_], axis=1)
        merged.append({**seed_runs_[0], "config": {**seed_runs_[0]["config"], "tasks": list(task_acc)},
                       "metrics": {"test": {f"{t}/accuracy": a for t, a in task_acc.items()}},
                       "curves": {**seed_runs_[0]["curves"], "test_accuracy": curve.tolist()}})
    return merged


def retrieval_report(arms: dict[str, list[dict]]) -> str:
    widths = sorted({r[0]["coordinates"]["width"] for r in arms.values()})
    counts = sorted({r[0]["coordinates"]["num_tasks"] for r in arms.values() if "num_tasks" in r[0]["coordinates"]})
    single = arms.get(f"retrieval:w{widths[-1]}:single")
    target = 0.95 * float(np.mean(_accuracies(single))) if single else float("nan")
    lead = _lead_over_input_blind(single) if single else None
    rows, smallest = [], []
    for model in [m for m in RETRIEVAL_MODELS if any(r[0]["coordinates"]["model"] == m for r in arms.values())]:
        row_smallest = [model]
        for num_tasks in counts:
            reached = [w for w in widths if (runs := arms.get(f"retrieval:T{num_tasks}:w{w}:{model}"))
                       and stats.interval(_accuracies(runs)).mean >= target]
            row_smallest.append(str(reached[0]) if reached else f"> {widths[-1]}")
            rows.append([model, num_tasks] + [
                stats.interval(_accuracies(arms[f"retrieval:T{num_tasks}:w{w}:{model}"])).format(3)
                if f"retrieval:T{num_tasks}:w{w}:{model}" in arms else "" for w in widths])
        smallest.append(row_smallest)
    single_row = ["single-task (retrieve_0)", 1] + [
        stats.interval(_accuracies(arms[f"retrieval:w{w}:single"])).format(3)
        if f"retrieval:w{w}:single" in arms else "" for w in widths]
    if lead is None or lead.low <= 0:  # no learned reference: no width can be read against it
        return "\n".join([
            "**Task-selective retrieval under a width bottleneck** (mean test accuracy over tasks). **No "
            "smallest width is given: the widest single-task model does not beat the input-blind predictor "
            f"beyond its 95% interval** (its lead: {lead.format(3) if lead else 'no runs'}), so it is no "
            "reference.\n",
            "Accuracy by width (± 95% t-interval):\n",
            common.markdown_table(["model", "T"] + [f"width {w}" for w in widths], rows + [single_row])])
    return "\n".join([
        f"**Task-selective retrieval under a width bottleneck** (mean test accuracy over tasks). The "
        f"smallest width whose mean reaches 95% of the widest single-task model's accuracy "
        f"({target:.3f}; its lead over the input-blind predictor: {lead.format(3)}):\n",
        common.markdown_table(["model"] + [f"T = {t}" for t in counts], smallest),
        "Accuracy by width (± 95% t-interval):\n",
        common.markdown_table(["model", "T"] + [f"width {w}" for w in widths], rows + [single_row])])


def _lead_over_input_blind(runs: list[dict]) -> stats.Interval:
    """The runs' test accuracy minus the input-blind predictor's (each run's own ``baseline_accuracy``),
    mean over tasks, as a 95% interval over seeds."""
    blind = [float(np.mean([r["metrics"]["test"][f"{t}/baseline_accuracy"] for t in _tasks(r)])) for r in runs]
    return stats.interval(_accuracies(runs) - np.asarray(blind))


def _multiview_bayes_rule(runs: list[dict]) -> dict[str, dict[str, float]]:
    """The Bayes rule's accuracy on the aligned test rows the runs were scored on (fixed for every run
    seed; shuffling moves each task's rows within whole blocks, so its own-view accuracy is the same),
    rebuilt from the first run's data options."""
    options = {**runs[0]["config"]["data"]["options"], "shuffle_rows": False}
    return data.make_source("multiview", data.multiview.TASK_NAMES, seed=0, **options).bayes_rule_accuracies()


def multiview_report(arms: dict[str, list[dict]]) -> str:
    reference = data.multiview.reference_accuracies()
    tasks = list(reference)
    some_runs = next(runs for key, runs in arms.items() if key.startswith("multiview:"))
    on_rows = _multiview_bayes_rule(some_runs)
    rows = []
    for rows_kind in ("aligned", "shuffled"):
        models = list(MULTIVIEW_MODELS) + (["single_task"] if rows_kind == "aligned" else [])
        for model in models:
            runs = _single_task_runs(arms, "multiview:") if model == "single_task" else \
                arms.get(f"multiview:{rows_kind}:{model}")
            if not runs:
                continue
            cells = []
            for t in tasks:
                own, all_views = on_rows[t]["own"], on_rows[t]["all"]  # shuffling keeps each task's own rows
                share = [(a - own) / (all_views - own) if all_views > own else float("nan")
                         for a in _accuracies(runs, "test", t)]
                cells.append(f"{stats.interval(_accuracies(runs, 'test', t)).format(3)} "
                             f"({stats.interval(share).format(2)})")
            rows.append([rows_kind, model, f"{runs[0]['coordinates']['lr']:g}"] + cells)
    listed = lambda values: ", ".join(f"{t} {v['own']:.3f} -> {v['all']:.3f}" for t, v in values.items())
    return "\n".join([
        "**Aligned multi-view evidence** (test accuracy, and in brackets its share of the gap between the "
        "Bayes rule's accuracy on the same test rows from the task's own view and from all views of the "
        "row; ± 95% t-interval). Exact Bayes accuracies, own view -> all views (expectations over rows): "
        f"{listed(reference)}. The Bayes rule on the {some_runs[0]['config']['data']['options']['num_eval_examples']} "
        f"test rows every seed is scored on: {listed(on_rows)}; a share of 0 is the own view's Bayes rule, 1 "
        "all views'. With shuffled rows the other views are other instances, so the reachable accuracy is "
        "the own view's: a share above 0 there would be a leak, not cross-task evidence.\n",
        common.markdown_table(["rows", "model", "lr"] + tasks, rows)])


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--part", choices=PARTS + ("all",), default="all",
                            help="which benchmark to run (default: all three)")
    args = common.parse_args(__doc__, FULL_COST, argv, extra)
    try:
        for part in PARTS if args.part == "all" else (args.part,):
            for arm in ARMS[part](args.size):  # every arm's config checked before any work
                config_check.validate(arm.config, num_devices=1)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
