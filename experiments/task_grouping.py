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

Reported per model and p: the grouping found from the seed-averaged affinity, how many single seeds
recover the pairs, and the mean within-pair and across-pair affinity; ``affinity.png`` plots the
seed-averaged 4 x 4 matrices.

Cost. full: 10 seeds x 3000 steps (Transformer: 5 seeds), about 10-15 minutes on 2 CPU cores.
``--quick``: 5 seeds x 1000 steps (Transformer: 3 seeds), about 2-4 minutes. ``--tiny``: the MLP only.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import mmoe_synthetic as mmoe_config
from experiments import common, toys
from mtt_jax import affinity, data, seed_runs, tasks as tasks_lib
from mtt_jax.models import variants

NAME = "task_grouping"
TASKS = ("mmoe_a1", "mmoe_a2", "mmoe_b1", "mmoe_b2")
PAIRS = [[0, 1], [2, 3]]
CORRELATIONS = (1.0, 0.9, 0.5)
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
    results = {"tasks": list(TASKS), "pairs": PAIRS, "correlations": list(CORRELATIONS), "models": {}}
    for model_name in (("shared_bottom",) if args.size == "tiny" else MODELS):   # --tiny: the MLP only
        n = num[model_name]
        model = (variants.SharedBottomMLP(task_specs, bottom_units=(113,), tower_units=(8,))
                 if model_name == "shared_bottom" else None)
        correlations = [p for p in CORRELATIONS for _ in range(n)]
        weights = np.stack([toys.mmoe_weights(sources[p].task_weights) for p in correlations])
        runs = seed_runs.train_seeds(config, list(range(n)) * len(CORRELATIONS), model=model, sampler=sampler,
                                  sampler_args=weights, eval_sources=[sources[p] for p in correlations],
                                  affinity_every=config.affinity.every, max_chunk=100)
        per_corr = {}
        for k, p in enumerate(CORRELATIONS):
            members = slice(k * n, (k + 1) * n)
            seed_affinities = runs.affinity[members]                              # [S, T, T]
            mean_affinity = seed_affinities.mean(0)
            groups, score = affinity.best_grouping(mean_affinity, 2)
            seed_groups = [affinity.best_grouping(a, 2)[0] for a in seed_affinities]
            within = [np.mean([a[0, 1], a[1, 0], a[2, 3], a[3, 2]]) for a in seed_affinities]
            across = [np.mean([a[i, j] for i in (0, 1) for j in (2, 3)]
                              + [a[j, i] for i in (0, 1) for j in (2, 3)]) for a in seed_affinities]
            per_corr[str(p)] = {
                "affinity_mean": mean_affinity.tolist(), "affinity_per_seed": seed_affinities.tolist(),
                "grouping": groups, "grouping_score": score, "recovered": groups == PAIRS,
                "seed_groupings": seed_groups, "seeds_recovered": int(sum(g == PAIRS for g in seed_groups)),
                "within_pair": [float(w) for w in within], "across_pairs": [float(a) for a in across],
                "final_loss": np.mean([runs.metric(f"{t}/mse")[members] for t in TASKS], axis=0).tolist()}
            log(f"{MODELS[model_name]:38s} p={p}: grouping {[[TASKS[i] for i in g] for g in groups]} "
                f"(recovered in {per_corr[str(p)]['seeds_recovered']}/{n} seeds); "
                f"within {common.fmt(within, 5)}, "
                f"across {common.fmt(across, 5)}")
        per_corr["seeds"] = n
        per_corr["wall_seconds"] = round(runs.wall_seconds, 1)
        results["models"][model_name] = per_corr
    results["steps"] = config.total_steps
    results["affinity_every"] = config.affinity.every
    table = make_table(results)
    plot(results, args.workdir)
    common.write_outputs(args.workdir, NAME, args, table, results, log, header=(
        f"TAG lookahead affinity averaged over {config.total_steps} steps (every {config.affinity.every}); "
        "grouping = `affinity.best_grouping(mean affinity, 2)`; the right answer is "
        "{mmoe_a1, mmoe_a2}, {mmoe_b1, mmoe_b2}. Affinities are ~lr-sized (lookahead step = the "
        "learning rate)."))
    return results


def make_table(results: dict) -> str:
    headers = ["model", "p (within pair)", "grouping (seed-averaged affinity)", "recovered",
               "seeds recovering", "within-pair affinity", "across-pair affinity", "final loss"]
    rows = []
    for model_name, per_corr in results["models"].items():
        for p in CORRELATIONS:
            r = per_corr[str(p)]
            rows.append([MODELS[model_name], p, " / ".join("{" + ", ".join(TASKS[i] for i in g) + "}"
                                                          for g in r["grouping"]),
                         "yes" if r["recovered"] else "no", f"{r['seeds_recovered']}/{per_corr['seeds']}",
                         common.fmt(r["within_pair"], 6), common.fmt(r["across_pairs"], 6),
                         common.fmt(r["final_loss"], 4)])
    return common.markdown_table(headers, rows)


def plot(results: dict, workdir: str) -> None:
    plt = common.pyplot()
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), len(CORRELATIONS),
                             figsize=(5.2 * len(CORRELATIONS), 4.6 * len(models)),
                             squeeze=False, layout="constrained")
    for row, model_name in enumerate(models):
        for col, p in enumerate(CORRELATIONS):
            r = results["models"][model_name][str(p)]
            matrix = np.asarray(r["affinity_mean"])
            scale = float(np.abs(matrix).max()) or 1.0
            common.plot_matrix(axes[row, col], matrix / scale, TASKS, symmetric=True, cmap="RdBu_r",
                               title=f"{MODELS[model_name].split(' (')[0]}, p={p}\n(x {scale:.1e}; "
                                     f"{'recovered' if r['recovered'] else 'NOT recovered'})")
    fig.suptitle("TAG lookahead affinity Z[i -> j] (row i steps, column j's loss), seed mean")
    common.save_figure(fig, workdir, "affinity.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
