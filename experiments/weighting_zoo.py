"""Every weighting method of the zoo against tuned baselines, with learning rates chosen on validation.

    python -m experiments.weighting_zoo --workdir /tmp/exp/zoo --quick

The protocol follows what the literature found matters most when methods are compared (Xin et al.,
"Do Current Multi-Task Optimization Methods in Deep Learning Even Help?", NeurIPS 2022; Kurin et al.,
"In Defense of the Unitary Scalarization for Deep Multi-Task Learning", NeurIPS 2022): every arm gets
its own learning rate from a grid, chosen on the validation split, and every method is compared with
two tuned baselines, equal weighting (EW) and a sweep of fixed-weight scalarizations.

Arms, each trained for every seed at every learning rate of the grid (seeds x rates in one vmapped
program, `mtt_jax.seed_runs`):

- one single-task model per task (no task encoder or task attention);
- every method of `mtt_jax.weighting.METHODS` but ``fixed``, with its paper defaults
  (`mtt_jax.weighting.DEFAULT_OPTIONS`); the epoch-based methods (DWA, STCH) get ``epoch_steps =
  total_steps / 10``. EW is one of them;
- fixed scalarizations ``sum_t w_t L_t``: for T <= 3 tasks an interior grid on the simplex, for more
  tasks points drawn from a flat Dirichlet (a fixed draw); weights are scaled to sum to T, the sum of
  EW's weights, so that EW is the simplex's centre.

Benchmark: ``seqtasks`` with the three tasks in `TASKS`, chosen so that no task is at ceiling at this
model size and budget: a single-task model is well above the input-blind predictor and well below a
perfect score on each (RESULTS.md prints the margins). ``majority``, ``mean_value``, ``first_group`` and
``last_group_tag`` were left out: a single-task model of this size solves them.

Selection and reporting (`report`, from the archived run records alone, `experiments.archive`):

- the score of a run is the mean over tasks of the gap-normalised main metric (`experiments.stats.
  gap_normalised`: 0 = the input-blind predictor, 1 = the tuned single-task model), on a split, over
  the tasks whose single-task model beats the input-blind predictor beyond its 95% interval on
  validation (a task without that margin has no gap to keep a share of: its ratio would be noise);
- each single-task model's learning rate is chosen by its validation main metric; each multi-task arm's
  by its validation score (mean over seeds); a scalarization sweep's best point by the same;
- the test split is then reported once: the score with its 95% t-interval over seeds, its paired
  difference from tuned EW (same seeds: same initialisation and data), both delta-m% conventions
  (`experiments.delta_m`) and each task's main metric. A dagger marks a delta-m% that one metric carries
  for the most part (`experiments.stats.dominant_metric`).

``--methods`` takes a subset, and variants with options changed from the defaults
(``--methods sdmgrad,sdmgrad:lam=3``; each option's name, type and range is checked before any work).
An interrupted run resumes when the same command is run again: finished arms are read back from
``WORKDIR/runs`` through ``results.partial.json``.

Cost. full: 3 tasks; the single-task models, EW and every other registered method, 8 fixed weightings;
each 5 seeds x 4 learning rates x 500 steps: `FULL_COST`. ``--quick``: 8 methods, 3 fixed weightings,
3 seeds x 2 learning rates x 200 steps, in at most 10 minutes on 2 quiet cores.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys

import numpy as np

from configs import seqtasks as seqtasks_config
from experiments import archive, common, delta_m, stats
from mtt_jax import seed_runs, tasks as tasks_lib
from mtt_jax.weighting import DEFAULT_OPTIONS, METHODS, make_method

NAME = "weighting_zoo"
TASKS = ("majority_parity", "repeat_tag", "distinct_count")
TINY_TASKS = ("majority", "mean_value")
TINY_METHODS = ("ew", "mgda", "db_mtl")        # EW, a Gram method and a per-task-gradient one
QUICK_METHODS = ("ew", "uncertainty", "famo", "mgda", "pcgrad", "cagrad", "nash_mtl", "db_mtl")
ZOO = tuple(m for m in METHODS if m != "fixed")  # "fixed" is the scalarization sweep's
LEARNING_RATES = {"tiny": (1e-3, 3e-3), "quick": (1e-3, 3e-3), "full": (1e-3, 3e-3, 1e-2, 3e-2)}
SCALARIZATIONS = {"tiny": 2, "quick": 3, "full": 8}
EPOCH_BASED = ("dwa", "stch")
FULL_COST = (f"about 140 CPU-minutes, 1.5-2.5 hours on 2 CPU cores ({3 + len(ZOO) + SCALARIZATIONS['full']} arms: "
             f"3 single-task models, EW and the {len(ZOO) - 1} other methods, {SCALARIZATIONS['full']} fixed "
             f"weightings; each 5 seeds x {len(LEARNING_RATES['full'])} learning rates x 500 steps).")


# --- Arms ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """One row family of the table: ``kind`` is single_task, method or scalarization."""
    kind: str
    label: str
    config: object


def tasks_for(size: str) -> tuple[str, ...]:
    return TINY_TASKS if size == "tiny" else TASKS


def base_config(size: str):
    c = seqtasks_config.get_config("")
    c.tasks = tasks_for(size)
    c.total_steps = common.pick(size, 20, 200, 500)
    c.log_every = common.pick(size, 10, 20, 50)
    c.batch_size = common.pick(size, 8, 32, 32)
    c.optimizer.warmup_steps = common.pick(size, 2, 20, 50)
    c.data.options.length = common.pick(size, 16, 16, 24)
    c.data.options.num_eval_examples = common.pick(size, 32, 256, 1024)
    c.eval_batch_size = c.data.options.num_eval_examples
    c.model.d_model = common.pick(size, 16, 32, 32)
    c.model.num_layers = 1
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
    if name not in ZOO:
        raise ValueError(f"unknown --methods {name}; choose from: {', '.join(ZOO)}")
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


def simplex_weights(num_tasks: int, count: int, seed: int = 0) -> list[tuple[float, ...]]:
    """Fixed task weights summing to ``num_tasks``: for T <= 3 the interior points of the simplex grid
    of the smallest resolution with at least ``count`` points (EW's centre included when it lies on the
    grid), spread evenly down to ``count``; for more tasks ``count`` flat-Dirichlet draws."""
    if num_tasks > 3:
        draws = np.random.default_rng(seed).dirichlet(np.ones(num_tasks), size=count)
        return [tuple(float(w) for w in num_tasks * row) for row in draws]
    resolution = num_tasks
    while math.comb(resolution - 1, num_tasks - 1) < count:
        resolution += 1
    points = [p for p in itertools.product(range(1, resolution), repeat=num_tasks) if sum(p) == resolution]
    keep = np.unique(np.linspace(0, len(points) - 1, count).round().astype(int))
    return [tuple(num_tasks * i / resolution for i in points[k]) for k in keep]


def single_task_config(size: str, task: str):
    return seed_runs.single_task_config(base_config(size), task)


def scalarization_config(size: str, weights: tuple[float, ...]):
    c = base_config(size)
    c.weighting.name = "fixed"
    c.weighting.weights = tuple(weights)
    return c


def arms(size: str, methods: list[str]) -> list[Arm]:
    task_names = tasks_for(size)
    weights = simplex_weights(len(task_names), SCALARIZATIONS[size])
    return ([Arm("single_task", task, single_task_config(size, task)) for task in task_names]
            + [Arm("method", entry, method_config(size, entry)) for entry in methods]
            + [Arm("scalarization", "w=" + ",".join(f"{w:.3f}" for w in point),
                   scalarization_config(size, point)) for point in weights])


# --- Training -------------------------------------------------------------------------------------

def train_arm(arm: Arm, seeds: list[int], learning_rates: tuple[float, ...], size: str,
              command: str) -> list[dict]:
    """Every (learning rate, seed) run of ``arm`` in one vmapped program; one record per run."""
    grid = [(lr, seed) for lr in learning_rates for seed in seeds]
    config = arm.config
    runs = seed_runs.train_seeds(config, [s for _, s in grid], learning_rates=[lr for lr, _ in grid],
                                 splits=("validation", "test"), baselines=True)
    records = []
    for r, (lr, seed) in enumerate(grid):
        run_config = config.copy_and_resolve_references()
        run_config.optimizer.learning_rate, run_config.seed = lr, seed
        metrics = common.final_metrics(runs, r, ("validation", "test"))
        curves = {"steps": runs.curve_steps, "train_task_losses": runs.curve_losses[:, r],
                  "task_weights": runs.curve_weights[:, r]}
        records.append(archive.run_record(
            NAME, size, f"{arm.kind}:{arm.label}@lr={lr:g}",
            {"kind": arm.kind, "label": arm.label, "lr": lr}, seed, run_config, metrics, command,
            runs.wall_seconds / len(grid), curves))
    return records


def run(args) -> dict:
    log = common.Log()
    seeds = list(range(common.num_seeds(args, 2, 3, 5)))
    methods = (list(common.pick(args.size, TINY_METHODS, QUICK_METHODS, ZOO)) if args.methods == "all"
               else args.methods.split(","))
    learning_rates = LEARNING_RATES[args.size]
    command = common.command_line()
    identity = {"size": args.size, "seeds": seeds, "methods": methods, "learning_rates": learning_rates}
    records, partial = common.train_arms(
        args, NAME, identity, [(f"{arm.kind}:{arm.label}",
                                lambda arm=arm: train_arm(arm, seeds, learning_rates, args.size, command))
                               for arm in arms(args.size, methods)], log)
    summary = common.write_archived_outputs(args, NAME, records, summarize, report, plot, log, seeds=seeds,
                                            learning_rates=learning_rates)
    partial.discard()
    return summary


# --- Selection on validation, reporting on test ---------------------------------------------------

def _main_metrics(task_names) -> dict[str, str]:
    return {t: tasks_lib.get(t).metric_names[0] for t in task_names}


def _values(records: list[dict], split: str, key: str) -> np.ndarray:
    return np.asarray([r["metrics"][split][key] for r in records], np.float64)


def _signed(metric: str) -> float:
    return 1.0 if delta_m.higher_is_better(metric) else -1.0


def summarize(records: list[dict]) -> dict:
    """Everything the table shows, from the run records: see the module docstring for the protocol."""
    task_names = list(next(r for r in records if r["coordinates"]["kind"] == "method")["config"]["tasks"])
    main = _main_metrics(task_names)
    groups: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        c = r["coordinates"]
        groups.setdefault((c["kind"], c["label"]), {}).setdefault(c["lr"], []).append(r)

    def best_lr(by_lr: dict, objective) -> float:
        return max(by_lr, key=lambda lr: float(np.mean([objective(r) for r in by_lr[lr]])))

    single, single_lr = {}, {}
    for task in task_names:
        key = f"{task}/{main[task]}"
        single_lr[task] = best_lr(groups[("single_task", task)],
                                  lambda r: _signed(main[task]) * r["metrics"]["validation"][key])
        single[task] = groups[("single_task", task)][single_lr[task]]
    reference = {split: {f"{t}/{main[t]}": float(np.mean(_values(single[t], split, f"{t}/{main[t]}")))
                         for t in task_names} for split in ("validation", "test")}
    trivial = {split: {f"{t}/{main[t]}": float(single[t][0]["metrics"][split][f"{t}/baseline_{main[t]}"])
                       for t in task_names} for split in ("validation", "test")}
    margins = {split: {t: _margin(single[t], split, main[t], trivial[split][f"{t}/{main[t]}"])
                       for t in task_names} for split in ("validation", "test")}
    # Only a task the single-task model learned (on validation) has a gap to keep a share of.
    learned = [t for t in task_names if margins["validation"][t].low > 0]
    scored = learned or task_names  # none learned: every score is noise, and the table says so

    def score(record: dict, split: str) -> float:
        keys = {f"{t}/{main[t]}": reference[split][f"{t}/{main[t]}"] for t in scored}
        return stats.mean_gap_normalised({k: record["metrics"][split][k] for k in keys},
                                         trivial[split], keys)

    arms_summary = {}
    for (kind, label), by_lr in groups.items():
        if kind == "single_task":
            continue
        lr = best_lr(by_lr, lambda r: score(r, "validation"))
        arms_summary[(kind, label)] = {"lr": lr, "runs": by_lr[lr],
                                       "validation": float(np.mean([score(r, "validation") for r in by_lr[lr]])),
                                       "test": [score(r, "test") for r in by_lr[lr]]}
    scalarizations = [k for k in arms_summary if k[0] == "scalarization"]
    best_scalarization = max(scalarizations, key=lambda k: arms_summary[k]["validation"])
    ew = arms_summary[("method", "ew")]["test"]
    scal = arms_summary[best_scalarization]["test"]
    all_metrics = {t: tasks_lib.get(t).metric_names for t in task_names}
    single_means = {t: {m: float(np.mean(_values(single[t], "test", f"{t}/{m}"))) for m in all_metrics[t]}
                    for t in task_names}
    rows = {}
    for (kind, label), arm in arms_summary.items():
        per_seed = [delta_m.task_metrics(r["metrics"]["test"], task_names, all_metrics) for r in arm["runs"]]
        rows[f"{kind}:{label}"] = {
            "kind": kind, "label": label, "lr": arm["lr"], "validation_score": arm["validation"],
            "score": arm["test"],
            "vs_ew": (np.asarray(arm["test"]) - np.asarray(ew)).tolist(),
            "vs_scalarization": (np.asarray(arm["test"]) - np.asarray(scal)).tolist(),
            "delta_m_pooled": [delta_m.delta_m_pooled(p, single_means) for p in per_seed],
            "delta_p_per_task": [delta_m.delta_p_per_task(p, single_means) for p in per_seed],
            "dominant": _dominant(per_seed, single_means),
            "main": {t: _values(arm["runs"], "test", f"{t}/{main[t]}").tolist() for t in task_names}}
    return {"tasks": task_names, "main_metrics": main, "rows": rows, "scored_tasks": scored, "learned_tasks": learned,
            "margins": {t: margins["test"][t].format(3) for t in task_names},
            "best_scalarization": f"{best_scalarization[0]}:{best_scalarization[1]}",
            "num_scalarizations": len(scalarizations),
            "single_task": {t: {"lr": single_lr[t], "test": _values(single[t], "test", f"{t}/{main[t]}").tolist()}
                            for t in task_names},
            "trivial": {t: trivial["test"][f"{t}/{main[t]}"] for t in task_names},
            "seeds": sorted({r["seed"] for r in records}),
            "learning_rates": sorted({r["coordinates"]["lr"] for r in records})}


def _margin(single_runs: list[dict], split: str, metric: str, trivial: float) -> stats.Interval:
    """The single-task model's lead over the input-blind predictor, signed so that + = better."""
    task = single_runs[0]["coordinates"]["label"]
    return stats.interval(_signed(metric) * (_values(single_runs, split, f"{task}/{metric}") - trivial))


def _dominant(per_seed: list[dict], single_means: dict) -> str | None:
    """The metric that carries most of the mean delta-m%, if one does."""
    changes = {}
    for task, metrics in single_means.items():
        for metric, reference in metrics.items():
            values = np.mean([p[task][metric] for p in per_seed])
            changes[f"{task}/{metric}"] = _signed(metric) * (values - reference) / abs(reference)
    found = stats.dominant_metric(changes)
    return None if found is None else f"{found[0]} ({100 * found[1]:.0f}%)"


def report(records: list[dict]) -> str:
    """The table, its verdict and its provenance, from the run records alone."""
    s = summarize(records)
    tasks_ = s["tasks"]
    main = s["main_metrics"]
    headers = (["arm", "lr", "score (test)", "vs tuned EW (paired)", "vs tuned scalarization (paired)",
                "delta-m% (+ = worse)", "Delta_p% (+ = better)"] + [f"{t} {main[t]}" for t in tasks_])
    table_rows = [["input-blind predictor", "", "0 (definition)", "", "", "", ""]
                  + [f"{s['trivial'][t]:.3f}" for t in tasks_],
                  ["single-task (tuned per task)", "/".join(f"{s['single_task'][t]['lr']:g}" for t in tasks_),
                   "1 (definition)", "", "", "0 (reference)", "0 (reference)"]
                  + [stats.interval(s["single_task"][t]["test"]).format(3) for t in tasks_]]
    order = sorted(s["rows"], key=lambda k: -np.mean(s["rows"][k]["score"]))
    ew, scalarization = s["rows"]["method:ew"], s["rows"][s["best_scalarization"]]
    footnotes = []
    for key in order:
        row = s["rows"][key]
        name = {"method": row["label"], "scalarization": f"scalarization {row['label']}"}[row["kind"]]
        if key == s["best_scalarization"]:
            name = f"**tuned scalarization** ({row['label']})"
        elif key == "method:ew":
            name = "**tuned EW**"
        elif row["kind"] == "scalarization":
            continue  # the sweep's other points: in the archive, not in the table
        dagger = ""
        if row["dominant"]:
            dagger = " †"
            footnotes.append(f"{name}: {row['dominant']}")
        table_rows.append([name, f"{row['lr']:g}", stats.interval(row["score"]).format(3),
                           _paired(row, ew, key == "method:ew"),
                           _paired(row, scalarization, key == s["best_scalarization"]),
                           stats.interval(row["delta_m_pooled"]).format(2) + dagger,
                           stats.interval(row["delta_p_per_task"]).format(2)]
                          + [stats.interval(row["main"][t]).format(3) for t in tasks_])
    text = [common.markdown_table(headers, table_rows), verdict(s), archive.provenance(records)]
    if footnotes:
        text.insert(1, "† one metric carries more than half of this delta-m%'s summed |relative changes|: "
                    + "; ".join(footnotes) + ".")
    return "\n".join(text) + "\n"


def _paired(row: dict, reference: dict, is_reference: bool) -> str:
    return "(reference)" if is_reference else common.paired_cell(row["score"], reference["score"])


def verdict(s: dict) -> str:
    """How many methods beat (or trail) each tuned baseline beyond the paired 95% interval."""
    methods = [row for key, row in s["rows"].items() if row["kind"] == "method" and row["label"] != "ew"]
    lines = []
    for name, field in (("tuned EW", "vs_ew"), ("the tuned scalarization", "vs_scalarization")):
        intervals = [stats.interval(row[field]) for row in methods]
        better = sorted(row["label"] for row, i in zip(methods, intervals) if i.excludes_zero() and i.mean > 0)
        worse = sorted(row["label"] for row, i in zip(methods, intervals) if i.excludes_zero() and i.mean < 0)
        lines.append(f"- Against {name}: **{len(better)} of {len(methods)} methods score higher beyond the "
                     f"95% interval of the paired difference** ({', '.join(better) or 'none'}); "
                     f"{len(worse)} score lower ({', '.join(worse) or 'none'}); the rest are within it.")
    lines.append("- The benchmark's margins, the single-task model's lead over the input-blind predictor on "
                 "test (+ = better): " + ", ".join(f"{t} {m}" for t, m in s["margins"].items()) + ".")
    unscored = [t for t in s["tasks"] if t not in s["scored_tasks"]]
    if not s["learned_tasks"]:
        lines.append("- **No task's single-task model beats the input-blind predictor beyond its interval "
                     "on validation: every score here is noise.**")
    elif unscored:
        lines.append(f"- **Not in the score: {', '.join(unscored)}**: its single-task model does not beat the "
                     "input-blind predictor beyond the 95% interval on validation, so it has no gap to keep "
                     "a share of; its columns are still shown.")
    lines.extend(_grid_edges(s))
    lines.append(f"- Score: the mean over tasks of (M - M_input-blind) / (M_single-task - M_input-blind) "
                 f"on each task's main metric; ± is the 95% t-interval over {len(s['seeds'])} seeds; "
                 f"▲/▼: the paired difference's interval excludes 0. Learning rates chosen on validation "
                 f"from {', '.join(f'{lr:g}' for lr in s['learning_rates'])}; the tuned scalarization is "
                 f"the best of {s['num_scalarizations']} fixed weightings on validation.")
    return "\n".join(lines) + "\n"


def _grid_edges(s: dict) -> list[str]:
    """A protocol check: the arms whose chosen learning rate is an end of the grid, where the best rate
    may lie beyond it. Only a grid of at least three rates has an inside to prefer."""
    rates = s["learning_rates"]
    if len(rates) < 3:
        return []
    chosen = {f"single-task {t}": v["lr"] for t, v in s["single_task"].items()}
    chosen.update({row["label"] if row["kind"] == "method" else f"scalarization {row['label']}": row["lr"]
                   for row in s["rows"].values()})
    lines = []
    for end, rate in (("largest", rates[-1]), ("smallest", rates[0])):
        at_end = sorted(name for name, lr in chosen.items() if lr == rate)
        if at_end:
            lines.append(f"- **Grid edge:** {len(at_end)} of {len(chosen)} arms chose the {end} learning rate, "
                         f"{rate:g}, so their best rate may lie beyond the grid: {', '.join(at_end)}.")
    return lines


def plot(summary: dict, workdir: str) -> None:
    """The test score of every arm with its 95% interval, tuned baselines highlighted."""
    plt = common.pyplot()
    rows = summary["rows"]
    order = sorted(rows, key=lambda k: np.mean(rows[k]["score"]))
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1.5))
    intervals = [stats.interval(rows[k]["score"]) for k in order]
    colors = ["tab:orange" if k == "method:ew" else "tab:green" if rows[k]["kind"] == "scalarization"
              else "tab:blue" for k in order]
    ax.barh(range(len(order)), [i.mean for i in intervals],
            xerr=[0 if i.n < 2 else i.half_width for i in intervals], color=colors)
    ax.set_yticks(range(len(order)), [rows[k]["label"] for k in order], fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--", label="single-task (1)")
    ax.set_xlabel("gap-normalised score on test (0 = input-blind, 1 = single-task)")
    ax.legend(loc="lower right", fontsize=7)
    common.save_figure(fig, workdir, "scores.png")


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--methods", default="all",
                            help="comma-separated subset of the methods; a variant with options changed "
                                 "from the defaults is NAME:OPTION=VALUE[:...], e.g. sdmgrad:lam=3")
    args = common.parse_args(__doc__, FULL_COST, argv, extra)
    try:
        entries = args.methods.split(",") if args.methods != "all" else []
        for entry in entries:
            c = method_config(args.size, entry)  # every entry's method and options, before any work
            make_method(c.weighting, len(c.tasks))  # and the options' ranges
        if entries and "ew" not in entries:
            raise ValueError("--methods must include ew: tuned EW is the reference of every comparison")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
