"""Ma et al. (KDD 2018), Figures 4-5: MMoE vs OMoE vs Shared-Bottom on synthetic pairs of set correlation.

    python -m experiments.mmoe_correlation --workdir /tmp/exp/mmoe --quick

Data: `mtt_jax.data.mmoe_synthetic` (the paper's §4.1 generator, two regression tasks whose weight
vectors have cosine p), for p = 1.0, 0.9, 0.5; train batches drawn on the device from the same
distribution (`experiments.toys`), loss = the sum of the two MSEs (equal weighting), Adam at a constant
learning rate, fresh data every step (so train and eval losses agree). Models (`mtt_jax.models.variants`,
the paper's sizes): Shared-Bottom (one shared ReLU layer of 113 units), OMoE and MMoE (8 experts of 16
ReLU units), all with task towers of 8 ReLU units; plus our Transformer (`MultiTaskTransformer`, task
encoder + task attention) reading the 100 features as 10 tokens of 10.

What it reports: the final eval MSE averaged over the two tasks (2000 fixed examples) per model and
correlation, mean ± std over seeds; the gap loss(p=0.5) - loss(p=1.0) (the paper: smaller for MMoE than
for Shared-Bottom and OMoE); the spread of final losses over seeds (trainability, Figure 5). Plots:
``loss_curves.png`` (Figure 4) and ``final_loss_histogram.png`` (Figure 5).

Cost. full: 30 seeds x 10^4 steps of batch 128 for the three MLPs and 5 seeds of the Transformer,
at the three correlations: about 40-60 minutes on 2 CPU cores (the MLPs are vmapped over the 30
seeds; the three MLPs alone, ``--models shared_bottom,omoe,mmoe``, took 15 minutes). ``--quick``: 8 seeds x 2000 steps (Transformer: 3 seeds), about 3-5 minutes.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import mmoe_synthetic as mmoe_config
from experiments import common, toys
from mtt_jax import data, seed_runs
from mtt_jax.models import variants
from mtt_jax import tasks as tasks_lib

NAME = "mmoe_correlation"
CORRELATIONS = (1.0, 0.9, 0.5)
MODELS = ("shared_bottom", "omoe", "mmoe", "transformer")
LABELS = {"shared_bottom": "Shared-Bottom", "omoe": "OMoE", "mmoe": "MMoE",
          "transformer": "Transformer (task enc. + task attn.)"}
TASKS = ("mmoe_a1", "mmoe_a2")
FULL_COST = ("about 40-60 minutes on 2 CPU cores (30 seeds x 10^4 steps, 3 MLPs + Transformer, "
             "3 correlations).")


def make_config(size: str, learning_rate: float = 1e-3, steps: int = 0):
    c = mmoe_config.get_config("")
    c.tasks = TASKS
    c.data.options.correlation = 1.0
    c.data.options.num_pairs = 1
    c.data.options.num_eval_examples = common.pick(size, 256, 2000, 2000)
    c.weighting.name = "ew"
    c.batch_size = common.pick(size, 32, 128, 128)
    c.eval_batch_size = c.data.options.num_eval_examples
    c.total_steps = steps or common.pick(size, 40, 2000, 10000)
    c.log_every = common.pick(size, 10, 50, 100)
    common.constant_adam(c, learning_rate)
    common.small_vector_transformer(c, size)
    return c


def build(model_name: str, config):
    if model_name == "transformer":
        return None  # the config's MultiTaskTransformer
    task_specs = tuple(tasks_lib.get(t) for t in config.tasks)
    options = {"shared_bottom": dict(bottom_units=(113,), tower_units=(8,)),
               "omoe": dict(num_experts=8, expert_units=16, tower_units=(8,)),
               "mmoe": dict(num_experts=8, expert_units=16, tower_units=(8,))}[model_name]
    return variants.build_variant(model_name, task_specs, **options)


def run(args) -> dict:
    log = common.Log()
    seeds_mlp = common.num_seeds(args, 2, 8, 30)
    seeds_transformer = min(seeds_mlp, common.pick(args.size, 2, 3, 5))
    results = {"correlations": list(CORRELATIONS), "models": {}}
    config = make_config(args.size, args.learning_rate, args.steps)
    sources = {p: data.make_source(config.data.source, config.tasks, seed=0,
                                   **{**dict(config.data.options), "correlation": p}) for p in CORRELATIONS}
    sampler = toys.mmoe_sampler(config.tasks, config.batch_size)
    for model_name in args.models.split(","):
        num = seeds_transformer if model_name == "transformer" else seeds_mlp
        # One program for every (correlation, seed): run r has correlation r // num and seed r % num, so
        # the runs of one seed share their initialisation and their input draws across correlations.
        correlations = [p for p in CORRELATIONS for _ in range(num)]
        weights = np.stack([toys.mmoe_weights(sources[p].task_weights) for p in correlations])
        runs = seed_runs.train_seeds(config, list(range(num)) * len(CORRELATIONS),
                                  model=build(model_name, config),
                                  sampler=sampler, sampler_args=weights,
                                  eval_sources=[sources[p] for p in correlations], max_chunk=100)
        per_corr = {}
        for k, p in enumerate(CORRELATIONS):
            members = slice(k * num, (k + 1) * num)
            final = np.mean([runs.metric(f"{t}/mse")[members] for t in TASKS], axis=0)       # [S]
            per_corr[str(p)] = {
                "final_loss": final.tolist(),
                "final_loss_per_task": {t: runs.metric(f"{t}/mse")[members].tolist() for t in TASKS},
                "curve_steps": runs.curve_steps.tolist(),
                "curve_loss": runs.curve_losses[:, members].mean(-1).T.tolist(),         # [S][N]
                "num_params": runs.num_params}
            log(f"{LABELS[model_name]:38s} p={p}: final loss {common.fmt(final)} ({num} seeds)")
        per_corr["wall_seconds"] = round(runs.wall_seconds, 1)
        log(f"{LABELS[model_name]}: {runs.wall_seconds:.0f} s")
        results["models"][model_name] = per_corr
    results["seeds"] = {"mlp": seeds_mlp, "transformer": seeds_transformer}
    results["steps"] = config.total_steps
    table = make_table(results)
    results["checks"] = checks(results)
    table += "\n" + "\n".join(f"- {k}: {v}" for k, v in results["checks"].items()) + "\n"
    plot(results, args.workdir)
    common.write_outputs(args.workdir, NAME, args, table, results, log, header=(
        "Ma et al. (KDD 2018) Fig. 4-5 on `mmoe_synthetic`: final eval MSE (mean of the two tasks) after "
        f"{results['steps']} steps, Adam lr {config.optimizer.learning_rate:g}; "
        "gap = loss(p=0.5) - loss(p=1.0), "
        "paired by seed; spread = std over seeds."))
    return results


def make_table(results: dict) -> str:
    headers = ["model", "params", "seeds"] + [f"loss p={p}" for p in CORRELATIONS] + ["gap (0.5 - 1.0)"]
    rows = []
    for model_name, per_corr in results["models"].items():
        losses = {p: np.asarray(per_corr[str(p)]["final_loss"]) for p in CORRELATIONS}
        gap = losses[0.5] - losses[1.0]
        rows.append([LABELS[model_name], per_corr["1.0"]["num_params"], len(losses[1.0])]
                    + [common.fmt(losses[p], 4) for p in CORRELATIONS] + [common.fmt(gap, 4)])
    return common.markdown_table(headers, rows)


def checks(results: dict) -> dict:
    """The paper's qualitative claims, measured (only those whose models were run)."""
    models = results["models"]
    mean = lambda m, p: float(np.mean(models[m][str(p)]["final_loss"]))
    gap = lambda m: mean(m, 0.5) - mean(m, 1.0)
    out = {"loss grows as the correlation falls (every model)": all(
        mean(m, 1.0) <= mean(m, 0.9) <= mean(m, 0.5) for m in models)}
    if {"mmoe", "shared_bottom"} <= set(models):
        out["MMoE gap < Shared-Bottom gap"] = gap("mmoe") < gap("shared_bottom")
        out["MMoE loss < Shared-Bottom loss at p=0.5"] = mean("mmoe", 0.5) < mean("shared_bottom", 0.5)
    if {"mmoe", "omoe"} <= set(models):
        out["MMoE gap < OMoE gap"] = gap("mmoe") < gap("omoe")
        out["MMoE loss < OMoE loss at p=0.5"] = mean("mmoe", 0.5) < mean("omoe", 0.5)
    out["std of the final loss over seeds at p=0.5"] = ", ".join(
        f"{LABELS[m]} {np.std(models[m]['0.5']['final_loss'], ddof=1):.4f}" for m in models)
    return out


def plot(results: dict, workdir: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(CORRELATIONS), figsize=(5 * len(CORRELATIONS), 4), sharey=True)
    for ax, p in zip(axes, CORRELATIONS):
        for model_name, per_corr in results["models"].items():
            curve = np.asarray(per_corr[str(p)]["curve_loss"])       # [S, N]
            steps = np.asarray(per_corr[str(p)]["curve_steps"])
            mean, std = curve.mean(0), curve.std(0)
            ax.plot(steps, mean, label=LABELS[model_name])
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(f"correlation {p}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("train loss (mean of 2 tasks)")
    axes[-1].legend(fontsize=8)
    common.save_figure(fig, workdir, "loss_curves.png")

    fig, axes = plt.subplots(1, len(CORRELATIONS), figsize=(5 * len(CORRELATIONS), 3.5))
    for ax, p in zip(axes, CORRELATIONS):
        values = {m: np.asarray(per_corr[str(p)]["final_loss"]) for m, per_corr in results["models"].items()}
        low, high = min(v.min() for v in values.values()), max(v.max() for v in values.values())
        bins = np.linspace(low, high + 1e-9, 20)
        for model_name, v in values.items():
            ax.hist(v, bins=bins, alpha=0.5, label=LABELS[model_name])
        ax.set_title(f"final loss, correlation {p}")
        ax.set_xlabel("eval loss")
    axes[0].set_ylabel("runs")
    axes[-1].legend(fontsize=8)
    common.save_figure(fig, workdir, "final_loss_histogram.png")


def main(argv=None) -> None:
    def extra(parser):
        parser.add_argument("--learning_rate", type=float, default=1e-3,
                            help="Adam's (constant) learning rate")
        parser.add_argument("--steps", type=int, default=0, help="train steps (default: per size)")
        parser.add_argument("--models", default=",".join(MODELS),
                            help="comma-separated subset of " + ", ".join(MODELS))
    args = common.parse_args(__doc__, FULL_COST, argv, extra)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
