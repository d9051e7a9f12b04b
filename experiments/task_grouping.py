"""TAG task affinities (Fifty et al., NeurIPS 2021) on four tasks made of two MMoE pairs: does the grouping
search recover the pairs?

    python -m experiments.task_grouping --workdir /tmp/exp/grouping --quick

Tasks: ``mmoe_a1, mmoe_a2`` (pair a) and ``mmoe_b1, mmoe_b2`` (pair b) of `mtt_jax.data.mmoe_synthetic`:
within a pair the weight vectors have cosine p, across pairs 0 (disjoint orthonormal directions), so the
right answer is {a1, a2}, {b1, b2}. Train batches are drawn on the device (`experiments.toys`). One
multi-task model per seed, equal weighting, trained while the lookahead affinity
``Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta)`` (TAG eq. 3, `mtt_jax.affinity`, lr = the current
learning rate) is measured every few steps and averaged over the run; then `affinity.best_grouping`
searches every split into two groups. Models: the Shared-Bottom MLP (113 units, towers of 8) and our
Transformer (task encoder + task attention). Correlations p = 1.0, 0.9, 0.5 (all in one vmapped program
per model, paired by seed).

Splits: the grouping is TAG's own choice from the affinity measured on train batches (the method, not a
hyper-parameter chosen on held-out data); every run is also scored on the validation and test examples
of its correlation (both in its record), and the table reports the test loss.

What it reports (`report`, from the archived run records alone, `experiments.archive`; one record per
model, correlation and seed, holding the run's 4 x 4 affinity): per model and p, the grouping found from
the seed-averaged affinity, how many single seeds recover the pairs, the within-pair and across-pair
affinity and their difference (paired: both from the same run), each with its 95% t-interval over
seeds, and the final test loss; then, per model, the correlations at which the pairs are recovered and
at which the within-pair affinity is above the across-pair one beyond the interval. ``affinity.png``
plots the seed-averaged 4 x 4 matrices.

Cost. full: 10 seeds x 3000 steps (Transformer: 5 seeds), about 10-15 minutes on 2 CPU cores.
``--quick``: 5 seeds x 1000 steps (Transformer: 3 seeds), about 2-4 minutes. ``--tiny``: the MLP only.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import mmoe_synthetic as mmoe_config
from experiments import archive, common, stats, toys
from mtt_jax import affinity, data, seed_runs, tasks as tasks_lib
from mtt_jax.models import variants

NAME = "task_grouping"
TASKS = ("mmoe_a1", "mmoe_a2", "mmoe_b1", "mmoe_b2")
PAIRS = [[0, 1], [2, 3]]
CORRELATIONS = (1.0, 0.9, 0.5)
SPLITS = ("validation", "test")
MODELS = {"shared_bottom": "Shared-Bottom MLP", "transformer": "Transformer (task enc. + task attn.)"}
FULL_COST = "about 10-15 minutes on 2 CPU cores (10 seeds x 3000 steps, 2 models, 3 correlations)."


def make_config(size: str):
    c = mmoe_config.get_config("")
    c.tasks = TASKS
    c.data.options.num_pairs = 2
    c.data.options.correlation = 1.0
    c.data.options.num_eval_examples = common.pick(size, 128, 1000, 2000)
    c.eval_batch_size = c.data.options.num_eval_examples
    c.weighting.name = "ew"
    c.batch_size = common.pick(size, 64, 128, 128)
    c.total_steps = common.pick(size, 60, 1000, 3000)
    c.log_every = common.pick(size, 10, 50, 100)
    c.affinity.every = common.pick(size, 10, 20, 50)
    c.affinity.lr = 0.0                      # the current learning rate (TAG)
    common.constant_adam(c, 1e-3)
    common.small_vector_transformer(c, size)
    return c


def run(args) -> dict:
    log = common.Log()
    num = {"shared_bottom": common.num_seeds(args, 3, 5, 10)}
    num["transformer"] = min(num["shared_bottom"], common.pick(args.size, 2, 3, 5))
    config = make_config(args.size)
    sources = {p: data.make_source(config.data.source, config.tasks, seed=0,
                                   **{**dict(config.data.options), "correlation": p}) for p in CORRELATIONS}
    sampler = toys.mmoe_sampler(config.tasks, config.batch_size)
    task_specs = tuple(tasks_lib.get(t) for t in TASKS)
    writer = archive.RunWriter(args.workdir, NAME, args.size, args.archive, resumed=False)
    command, records = common.command_line(), []
    for model_name in (("shared_bottom",) if args.size == "tiny" else MODELS):   # --tiny: the MLP only
        n = num[model_name]
        model = (variants.SharedBottomMLP(task_specs, bottom_units=(113,), tower_units=(8,))
                 if model_name == "shared_bottom" else None)
        # One program for every (correlation, seed): run r has correlation r // n and seed r % n, so the
        # runs of one seed share their initialisation and their input draws across correlations.
        correlations = [p for p in CORRELATIONS for _ in range(n)]
        weights = np.stack([toys.mmoe_weights(sources[p].task_weights) for p in correlations])
        runs = seed_runs.train_seeds(config, list(range(n)) * len(CORRELATIONS), model=model, sampler=sampler,
                                     sampler_args=weights, eval_sources=[sources[p] for p in correlations],
                                     affinity_every=config.affinity.every, max_chunk=100, splits=SPLITS)
        model_records = [_record(args.size, model_name, p, r % n, runs, r, config, command)
                         for r, p in enumerate(correlations)]
        writer.write(model_records)
        records += model_records
        log(f"{MODELS[model_name]}: {runs.wall_seconds:.0f} s")
    return common.write_archived_outputs(args, NAME, records, summarize, report, plot, log)


def _record(size: str, model_name: str, p: float, seed: int, runs, r: int, config, command: str) -> dict:
    """The archive record of run ``r`` (``model_name`` at correlation ``p``): its final metrics on both
    splits and its TAG affinity (averaged over the run)."""
    run_config = config.copy_and_resolve_references()
    run_config.seed, run_config.data.options.correlation = seed, p
    curves = {"affinity": runs.affinity[r], **common.train_curves(runs, r), "num_params": runs.num_params}
    return archive.run_record(NAME, size, f"{model_name}@p={p:g}", {"model": model_name, "correlation": p},
                              seed, run_config, common.final_metrics(runs, r, SPLITS), command,
                              runs.wall_seconds / len(runs.seeds), curves)


def _within(a: np.ndarray) -> float:
    """The mean affinity inside the two pairs (off the diagonal)."""
    return float(np.mean([a[i, j] for pair in PAIRS for i in pair for j in pair if i != j]))


def _across(a: np.ndarray) -> float:
    """The mean affinity from a task of one pair to a task of the other."""
    first, second = PAIRS
    return float(np.mean([a[i, j] for i in first for j in second] + [a[j, i] for i in first for j in second]))


def summarize(records: list[dict]) -> dict:
    """Per model and correlation, from the run records alone: the affinity per seed and its seed mean,
    the grouping each gives (`affinity.best_grouping`), the within- and across-pair affinity per seed and
    the final loss (mean MSE of the four tasks) per seed on each split."""
    models = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        model, p = record["coordinates"]["model"], record["coordinates"]["correlation"]
        entry = models.setdefault(model, {}).setdefault(str(p), {"seeds": [], "affinity_per_seed": [],
                                                                 "final_loss": {s: [] for s in SPLITS}})
        entry["seeds"].append(record["seed"])
        entry["affinity_per_seed"].append(record["curves"]["affinity"])
        for split in SPLITS:
            entry["final_loss"][split].append(
                float(np.mean([record["metrics"][split][f"{t}/mse"] for t in TASKS])))
    for per_p in models.values():
        for entry in per_p.values():
            seed_affinities = np.asarray(entry["affinity_per_seed"])                  # [S, T, T]
            mean_affinity = seed_affinities.mean(0)
            groups, score = affinity.best_grouping(mean_affinity, 2)
            seed_groups = [affinity.best_grouping(a, 2)[0] for a in seed_affinities]
            entry.update({"affinity_mean": mean_affinity.tolist(), "grouping": groups, "grouping_score": score,
                          "recovered": groups == PAIRS, "seed_groupings": seed_groups,
                          "seeds_recovered": int(sum(g == PAIRS for g in seed_groups)),
                          "within_pair": [_within(a) for a in seed_affinities],
                          "across_pairs": [_across(a) for a in seed_affinities]})
    config = records[0]["config"]
    return {"tasks": list(TASKS), "pairs": PAIRS, "correlations": list(CORRELATIONS),
            "steps": config["total_steps"], "affinity_every": config["affinity"]["every"],
            "models": {m: {str(p): models[m][str(p)] for p in CORRELATIONS if str(p) in models[m]}
                       for m in MODELS if m in models}}


def report(records: list[dict]) -> str:
    """The grouping table and the recovery checks, from the run records alone."""
    s = summarize(records)
    values = [abs(v) for per_p in s["models"].values() for r in per_p.values()
              for v in r["within_pair"] + r["across_pairs"]]
    exponent = int(np.floor(np.log10(max(values)))) if max(values, default=0) > 0 else 0
    unit = f" (x 1e{exponent})"                  # affinities are ~lr-sized: one power of ten for all
    headers = ["model", "p (within pair)", "seeds", "grouping (seed-averaged affinity)", "recovered",
               "seeds recovering", "within-pair affinity" + unit, "across-pair affinity" + unit,
               "within - across (paired)" + unit, "final test loss"]
    rows = []
    for model_name, per_p in s["models"].items():
        for p, r in per_p.items():
            grouping = " / ".join("{" + ", ".join(TASKS[i] for i in g) + "}" for g in r["grouping"])
            rows.append([MODELS[model_name], p, len(r["seeds"]), grouping, "yes" if r["recovered"] else "no",
                         f"{r['seeds_recovered']}/{len(r['seeds'])}",
                         stats.interval(r["within_pair"]).format(3, 10.0 ** -exponent),
                         stats.interval(r["across_pairs"]).format(3, 10.0 ** -exponent),
                         common.paired_cell(r["within_pair"], r["across_pairs"], 3, 10.0 ** -exponent),
                         stats.interval(r["final_loss"]["test"]).format(4)])
    checks = []
    for model_name, per_p in s["models"].items():
        recovered = [p for p, r in per_p.items() if r["recovered"]]
        separated = [p for p, r in per_p.items()
                     if stats.paired_difference(r["within_pair"], r["across_pairs"]).excludes_zero()
                     and np.mean(r["within_pair"]) > np.mean(r["across_pairs"])]
        checks.append(f"- {MODELS[model_name]}: the pairs recovered from the seed-averaged affinity at p = "
                      f"{', '.join(recovered) or 'none'}; within-pair affinity above across-pair beyond the "
                      f"paired interval at p = {', '.join(separated) or 'none'}.")
    text = [f"TAG lookahead affinity averaged over {s['steps']} steps (every {s['affinity_every']}; the "
            "lookahead step is the current learning rate, so affinities are ~lr-sized); grouping = "
            "`affinity.best_grouping(affinity, 2)`, the right answer {mmoe_a1, mmoe_a2} / {mmoe_b1, mmoe_b2}. "
            "Within - across: per run, paired; ▲/▼: its 95% interval excludes 0. Final test loss: the mean "
            "MSE of the four tasks.\n", common.markdown_table(headers, rows), "\n".join(checks) + "\n",
            archive.provenance(records)]
    return "\n".join(text) + "\n"


def plot(s: dict, workdir: str) -> None:
    plt = common.pyplot()
    models = list(s["models"])
    fig, axes = plt.subplots(len(models), len(CORRELATIONS),
                             figsize=(5.2 * len(CORRELATIONS), 4.6 * len(models)),
                             squeeze=False, layout="constrained")
    for row, model_name in enumerate(models):
        for col, p in enumerate(CORRELATIONS):
            ax = axes[row, col]
            r = s["models"][model_name].get(str(p))
            if r is None:
                ax.axis("off")
                continue
            matrix = np.asarray(r["affinity_mean"])
            scale = float(np.abs(matrix).max()) or 1.0
            common.plot_matrix(ax, matrix / scale, TASKS, symmetric=True, cmap="RdBu_r",
                               title=f"{MODELS[model_name].split(' (')[0]}, p={p}\n(x {scale:.1e}; "
                                     f"{'recovered' if r['recovered'] else 'NOT recovered'})")
            ax.set(xlabel="task j (its loss after the step)", ylabel="task i (the step)")
    fig.suptitle("TAG lookahead affinity Z[i -> j] (row i steps, column j's loss), seed mean")
    common.save_figure(fig, workdir, "affinity.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
