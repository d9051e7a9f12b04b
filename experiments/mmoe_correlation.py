"""Ma et al. (KDD 2018), Figures 4-5: MMoE vs OMoE vs Shared-Bottom on synthetic pairs of set correlation.

    python -m experiments.mmoe_correlation --workdir /tmp/exp/mmoe --quick

Data: `mtt_jax.data.mmoe_synthetic` (the paper's §3.2 generator, two regression tasks whose weight
vectors have cosine p), for p = 1.0, 0.9, 0.5; train batches drawn on the device from the same
distribution (`experiments.toys`), loss = the sum of the two MSEs (equal weighting), Adam at a constant
learning rate, fresh data every step (so train and eval losses agree). Models (`mtt_jax.models.variants`,
the paper's sizes): Shared-Bottom (one shared ReLU layer of 113 units), OMoE and MMoE (8 experts of 16
ReLU units), all with task towers of 8 ReLU units; plus our Transformer (`MultiTaskTransformer`, task
encoder + task attention) reading the 100 features as 10 tokens of 10.

What it reports (`report`, from the archived run records alone, `experiments.archive`): the final test
MSE averaged over the two tasks (2000 fixed examples) per model and correlation, mean with its 95%
t-interval over seeds; the gap loss(p=0.5) - loss(p=1.0), paired by seed (the paper: smaller for MMoE
than for Shared-Bottom and OMoE), at the end and along training (20 evals), so that a gap that opens
early and closes at convergence is seen; the spread of final losses over seeds (trainability, Figure 5).
Plots: ``loss_curves.png`` (Figure 4, and the gap along training) and ``final_loss_histogram.png``
(Figure 5). There is no selection, so only the test split is scored: the learning rate is the paper's
setting for the MLPs, kept for the Transformer.

Cost. full: 30 seeds x 10^4 steps of batch 128 for the three MLPs and 5 seeds of the Transformer,
at the three correlations: about 40-60 minutes on 2 CPU cores (the MLPs are vmapped over the 30
seeds; the three MLPs alone, ``--models shared_bottom,omoe,mmoe``, took 15 minutes). ``--quick``: 8 seeds x 2000 steps (Transformer: 3 seeds), about 3-5 minutes.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import mmoe_synthetic as mmoe_config
from experiments import archive, common, stats, toys
from mtt_jax import data, seed_runs
from mtt_jax.data import mmoe_synthetic
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
    config = make_config(args.size, args.learning_rate, args.steps)
    sources = {p: data.make_source(config.data.source, config.tasks, seed=0,
                                   **{**dict(config.data.options), "correlation": p}) for p in CORRELATIONS}
    sampler = toys.mmoe_sampler(config.tasks, config.batch_size)
    writer = archive.RunWriter(args.workdir, NAME, args.size, args.archive, resumed=False)
    command, records = common.command_line(), []
    for model_name in args.models.split(","):
        num = seeds_transformer if model_name == "transformer" else seeds_mlp
        # One program for every (correlation, seed): run r has correlation r // num and seed r % num, so
        # the runs of one seed share their initialisation and their input draws across correlations.
        correlations = [p for p in CORRELATIONS for _ in range(num)]
        weights = np.stack([toys.mmoe_weights(sources[p].task_weights) for p in correlations])
        runs = seed_runs.train_seeds(config, list(range(num)) * len(CORRELATIONS),
                                     model=build(model_name, config), sampler=sampler, sampler_args=weights,
                                     eval_sources=[sources[p] for p in correlations], max_chunk=100,
                                     eval_every=config.total_steps // EVALS_ALONG_THE_CURVE)
        model_records = [_record(args.size, model_name, p, r % num, runs, r, config, command)
                         for r, p in enumerate(correlations)]
        writer.write(model_records)
        records += model_records
        log(f"{LABELS[model_name]}: {runs.wall_seconds:.0f} s")
    return common.write_archived_outputs(args, NAME, records, summarize, report, plot, log)


EVALS_ALONG_THE_CURVE = 20


def _record(size: str, model_name: str, p: float, seed: int, runs, r: int, config, command: str) -> dict:
    """The archive record of run ``r`` (model ``model_name`` at correlation ``p``)."""
    eval_steps = sorted(runs.evals)
    mean_mse = lambda metrics: float(np.mean([metrics[f"{t}/mse"] for t in TASKS]))
    run_config = config.copy_and_resolve_references()
    run_config.seed, run_config.data.options.correlation = seed, p
    return archive.run_record(
        NAME, size, f"{model_name}@p={p:g}", {"model": model_name, "correlation": p}, seed, run_config,
        {"test": {k: v for k, v in runs.final[r].items() if not isinstance(v, (list, dict))}}, command,
        runs.wall_seconds / len(runs.seeds),
        {"eval_steps": eval_steps, "eval_mse": [mean_mse(runs.evals[step][r]) for step in eval_steps],
         "train_steps": runs.curve_steps, "train_loss": runs.curve_losses[:, r].mean(-1),
         "num_params": runs.num_params})


def summarize(records: list[dict]) -> dict:
    """Per model: the final test MSE (mean of the two tasks) per correlation and seed, and the eval MSE
    along training, from the run records alone."""
    models = {}
    for record in sorted(records, key=lambda r: r["seed"]):
        model, p = record["coordinates"]["model"], record["coordinates"]["correlation"]
        entry = models.setdefault(model, {"num_params": record["curves"]["num_params"], "by_p": {}})
        by_p = entry["by_p"].setdefault(str(p), {"final": [], "curve": []})
        by_p["final"].append(float(np.mean([record["metrics"]["test"][f"{t}/mse"] for t in TASKS])))
        by_p["curve"].append(record["curves"]["eval_mse"])
        entry["eval_steps"] = record["curves"]["eval_steps"]
    order = [m for m in MODELS if m in models]
    return {"models": {m: models[m] for m in order}, "correlations": list(CORRELATIONS),
            "steps": records[0]["config"]["total_steps"],
            "learning_rate": records[0]["config"]["optimizer"]["learning_rate"]}


def gap_along_curve(entry: dict) -> tuple[list[int], list[stats.Interval]]:
    """The paired gap loss(p=0.5) - loss(p=1.0) at every eval step, over seeds."""
    low, high = np.asarray(entry["by_p"]["0.5"]["curve"]), np.asarray(entry["by_p"]["1.0"]["curve"])
    return entry["eval_steps"], [stats.paired_difference(low[:, i], high[:, i])
                                 for i in range(low.shape[1])]


def report(records: list[dict]) -> str:
    """The final-loss table, the gap along training and the paper's claims checked, from the records."""
    s = summarize(records)
    headers = ["model", "params", "seeds"] + [f"test MSE p = {p}" for p in CORRELATIONS] + [
        "gap (p = 0.5 - 1.0), paired"]
    rows = []
    for model, entry in s["models"].items():
        final = {p: entry["by_p"][str(p)]["final"] for p in CORRELATIONS}
        rows.append([LABELS[model], entry["num_params"], len(final[1.0])]
                    + [stats.interval(final[p]).format(4) for p in CORRELATIONS]
                    + [stats.paired_difference(final[0.5], final[1.0]).format(4)])
    fractions = (0.05, 0.1, 0.25, 0.5, 1.0)
    along_headers = ["model"] + [f"step {int(f * s['steps'])}" for f in fractions]
    along_rows = []
    for model, entry in s["models"].items():
        steps, gaps = gap_along_curve(entry)
        cells = []
        for f in fractions:
            i = int(np.argmin(np.abs(np.asarray(steps) - f * s["steps"])))
            cells.append(gaps[i].format(4) + (" ▲" if gaps[i].excludes_zero() and gaps[i].mean > 0 else ""))
        along_rows.append([LABELS[model]] + cells)
    correlations = ", ".join(f"p = {p}: {mmoe_synthetic.label_moments(p)[2]:.3f}" for p in CORRELATIONS)
    blind = mmoe_synthetic.label_moments(1.0)[1] ** 2
    text = [f"Correlation of the two tasks' labels (exact, `mmoe_synthetic.label_moments`): {correlations}. "
            f"The label variance, the test MSE of the best input-blind predictor: {blind:.2f}.\n",
            f"Final test MSE (mean of the two tasks; {s['steps']} steps, Adam lr {s['learning_rate']:g}), "
            "mean ± 95% t-interval over seeds:\n", common.markdown_table(headers, rows),
            "The gap loss(p = 0.5) - loss(p = 1.0) along training (eval MSE on the test examples, paired by "
            "seed; ▲: above 0 beyond its interval):\n", common.markdown_table(along_headers, along_rows),
            "\n".join(f"- {claim}: {verdict}" for claim, verdict in checks(s).items()) + "\n",
            archive.provenance(records)]
    return "\n".join(text) + "\n"


def checks(s: dict) -> dict:
    """The paper's qualitative claims, measured on the final test MSE (only for the models run)."""
    models = s["models"]
    final = lambda m, p: models[m]["by_p"][str(p)]["final"]
    gap = lambda m: stats.paired_difference(final(m, 0.5), final(m, 1.0))
    grows = [LABELS[m] for m in models if gap(m).excludes_zero() and gap(m).mean > 0]
    out = {"loss at p = 0.5 above p = 1.0 beyond the interval": ", ".join(grows) or "no model"}
    gaps = lambda m: np.asarray(final(m, 0.5)) - np.asarray(final(m, 1.0))
    for other in ("shared_bottom", "omoe"):
        if {"mmoe", other} <= set(models):
            difference = stats.welch_difference(gaps("mmoe"), gaps(other))
            verdict = ("yes, beyond the interval" if difference.excludes_zero() and difference.mean < 0
                       else "not beyond the interval" if not difference.excludes_zero() else "no")
            out[f"MMoE's gap smaller than {LABELS[other]}'s"] = (
                f"{verdict} ({gap('mmoe').format(4)} vs {gap(other).format(4)}; difference "
                f"{difference.format(4)}, Welch's interval: the models do not share seeds)")
    out["spread (std over seeds) of the final loss at p = 0.5"] = ", ".join(
        f"{LABELS[m]} {np.std(final(m, 0.5), ddof=1):.4f}" for m in models)
    return out


def plot(s: dict, workdir: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(CORRELATIONS) + 1, figsize=(5 * (len(CORRELATIONS) + 1), 4))
    for ax, p in zip(axes, CORRELATIONS):
        for model, entry in s["models"].items():
            curve = np.asarray(entry["by_p"][str(p)]["curve"])       # [S, N]
            steps = np.asarray(entry["eval_steps"])
            mean, std = curve.mean(0), curve.std(0)
            ax.plot(steps, mean, label=LABELS[model])
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set(title=f"correlation {p}", xlabel="step", ylabel="eval MSE (mean of 2 tasks)", yscale="log")
    for model, entry in s["models"].items():
        steps, gaps = gap_along_curve(entry)
        mean = np.asarray([g.mean for g in gaps])
        half = np.asarray([0 if g.n < 2 else g.half_width for g in gaps])
        axes[-1].plot(steps, mean, label=LABELS[model])
        axes[-1].fill_between(steps, mean - half, mean + half, alpha=0.2)
    axes[-1].axhline(0.0, color="black", linewidth=0.8)
    axes[-1].set(title="gap: MSE(p=0.5) - MSE(p=1.0), 95% interval", xlabel="step", ylabel="MSE gap")
    axes[-1].legend(fontsize=8)
    common.save_figure(fig, workdir, "loss_curves.png")

    fig, axes = plt.subplots(1, len(CORRELATIONS), figsize=(5 * len(CORRELATIONS), 3.5))
    for ax, p in zip(axes, CORRELATIONS):
        values = {m: np.asarray(entry["by_p"][str(p)]["final"]) for m, entry in s["models"].items()}
        low, high = min(v.min() for v in values.values()), max(v.max() for v in values.values())
        bins = np.linspace(low, high + 1e-9, 20)
        for model, v in values.items():
            ax.hist(v, bins=bins, alpha=0.5, label=LABELS[model])
        ax.set(title=f"final loss, correlation {p}", xlabel="test MSE", ylabel="runs")
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
