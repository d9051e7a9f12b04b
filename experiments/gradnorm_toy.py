"""Chen et al. (ICML 2018), Figure 2 (T = 2): GradNorm on regression tasks of very different scales.

    python -m experiments.gradnorm_toy --workdir /tmp/exp/gradnorm --quick

Data: `mtt_jax.data.gradnorm_toy`, ``f_i(x) = sigma_i tanh((B + eps_i) x)`` with sigma = (1, 100), so the
second task's loss is ~10^4 times the first's; train batches drawn on the device from the same
distribution (`experiments.toys`). Model: the paper's, four shared ReLU layers of 100 units and a linear
map per task (`variants.SharedBottomMLP`). Methods (`mtt_jax.weighting`): equal weighting, uncertainty
weighting (Kendall et al. 2018) and GradNorm with the paper's asymmetry for this toy, alpha = 0.12.
Adam at a constant learning rate; no gradient clipping (the losses are ~10^4).

Splits: none to select on. Training draws fresh batches from the distribution on the device, nothing is
selected (every method runs at the paper's settings), and the runs are scored, as before, on the
source's fixed test set (2000 examples) only.

What it reports (`report`, from the archived run records alone, `experiments.archive`; one record per
method and seed): the applied task weights at the end, the test-loss ratios ``L_i(T) / L_i(0)`` and
their mean, the normalized test loss (the paper's Fig. 2 middle), each with its 95% t-interval over
seeds, and each method's normalized test loss minus equal weighting's, paired by seed (a seed is the
same initialisation and the same batches for every method); then the paper's claims checked on those
intervals. Plots, drawn from the records: ``test_loss_ratio.png`` (the normalized test loss along
training, 11 evals, and the weights of GradNorm and uncertainty weighting) and ``weights.png``
(GradNorm's weights, Fig. 2 right). Our GradNorm computes gradient norms over all shared parameters
(LibMTL), not the paper's last shared layer; its weights w = 2 softmax(s) follow their own Adam
(lr 0.025), see `mtt_jax.weighting.gradnorm`.

Cost. full: 20 seeds x 5000 steps of batch 128, three methods: about 5-10 minutes on 2 CPU cores.
``--quick``: 5 seeds x 1500 steps, under a minute.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import gradnorm_toy as gradnorm_config
from experiments import archive, common, stats, toys
from mtt_jax import seed_runs, tasks as tasks_lib
from mtt_jax.models import variants

NAME = "gradnorm_toy"
TASKS = ("toy_0", "toy_1")
SIGMAS = (1.0, 100.0)
METHODS = {"ew": "equal weights", "uncertainty": "uncertainty (Kendall)", "gradnorm": "GradNorm (alpha=0.12)"}
PAPER_ALPHA = 0.12
FULL_COST = "about 5-10 minutes on 2 CPU cores (20 seeds x 5000 steps, 3 methods)."


def make_config(size: str, method: str):
    c = gradnorm_config.get_config("")
    c.tasks = TASKS
    c.data.options.sigmas = SIGMAS
    c.data.options.num_eval_examples = common.pick(size, 128, 2000, 2000)
    c.eval_batch_size = c.data.options.num_eval_examples
    c.batch_size = common.pick(size, 32, 128, 128)
    c.total_steps = common.pick(size, 30, 1500, 5000)
    c.log_every = common.pick(size, 10, 25, 50)
    c.weighting.name = method
    c.weighting.gradnorm.alpha = PAPER_ALPHA
    c.weighting.diagnostics_every = 0
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.end_learning_rate_factor = 1.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1e12
    c.optimizer.b2 = 0.999
    return c


def run(args) -> dict:
    log = common.Log()
    seeds = list(range(common.num_seeds(args, 2, 5, 20)))
    task_specs = tuple(tasks_lib.get(t) for t in TASKS)
    writer = archive.RunWriter(args.workdir, NAME, args.size, args.archive, resumed=False)
    command, records = common.command_line(), []
    for method in METHODS:
        config = make_config(args.size, method)
        model = variants.SharedBottomMLP(task_specs, bottom_units=(100,) * 4, tower_units=())
        sampler = toys.gradnorm_sampler(TASKS, dict(zip(TASKS, SIGMAS)), config.batch_size)
        runs = seed_runs.train_seeds(config, seeds, model=model, sampler=sampler, eval_at_start=True,
                                     eval_every=max(config.total_steps // EVALS, 1), max_chunk=100)
        method_records = [_record(args.size, method, seed, runs, r, config, command)
                          for r, seed in enumerate(seeds)]
        writer.write(method_records)
        records += method_records
        weights = np.mean([x["curves"]["task_weights"][-1] for x in method_records], axis=0)
        log(f"{METHODS[method]:24s} weights {np.round(weights, 3).tolist()} ({runs.wall_seconds:.0f} s)")
    return common.write_archived_outputs(
        args, NAME, records, summarize, report, plot, log,
        header=f"GradNorm toy (Chen et al. 2018, §4), T = 2, sigma = {SIGMAS}.")


EVALS = 10  # evals along training, after the one at step 0


def _record(size: str, method: str, seed: int, runs, r: int, config, command: str) -> dict:
    """The archive record of run ``r`` (``method``, seed ``seed``)."""
    eval_steps = sorted(runs.evals)
    run_config = config.copy_and_resolve_references()
    run_config.seed = seed
    curves = {"eval_steps": eval_steps,
              "eval_mse": {t: [runs.evals[step][r][f"{t}/mse"] for step in eval_steps] for t in TASKS},
              **common.train_curves(runs, r), "num_params": runs.num_params}
    return archive.run_record(NAME, size, method, {"method": method}, seed, run_config,
                              common.final_metrics(runs, r, ("test",)), command,
                              runs.wall_seconds / len(runs.seeds), curves)


def summarize(records: list[dict]) -> dict:
    """Per method and seed, from the run records alone: the final weights, the loss ratios
    ``L_i(T) / L_i(0)`` on the test set, their mean (the normalized test loss) and its curve, the final
    test MSEs and the weights along training."""
    methods = {}
    for method, runs in archive.by_arm(records).items():
        mse = {t: np.asarray([x["curves"]["eval_mse"][t] for x in runs]) for t in TASKS}      # [S, E]
        ratio = {t: mse[t] / mse[t][:, :1] for t in TASKS}
        normalized = np.mean([ratio[t] for t in TASKS], axis=0)                                # [S, E]
        weights = np.asarray([x["curves"]["task_weights"] for x in runs])                     # [S, N, T]
        methods[method] = {
            "seeds": [x["seed"] for x in runs], "eval_steps": runs[0]["curves"]["eval_steps"],
            "final_weights": weights[:, -1].tolist(),
            "loss_ratio": {t: ratio[t][:, -1].tolist() for t in TASKS},
            "normalized_test_loss": normalized[:, -1].tolist(), "normalized_curve": normalized.tolist(),
            "test_mse": {t: [x["metrics"]["test"][f"{t}/mse"] for x in runs] for t in TASKS},
            "weight_steps": runs[0]["curves"]["train_steps"], "weights": weights.tolist()}
    return {"tasks": list(TASKS), "sigmas": list(SIGMAS), "steps": records[0]["config"]["total_steps"],
            "methods": {m: methods[m] for m in METHODS if m in methods}}


def report(records: list[dict]) -> str:
    """The table and the paper's claims checked, from the run records alone."""
    s = summarize(records)
    methods = s["methods"]
    headers = (["method", "seeds"] + [f"w(sigma={g:g})" for g in SIGMAS]
               + [f"L(sigma={g:g}) ratio" for g in SIGMAS]
               + ["normalized test loss", "vs equal weights (paired)"]
               + [f"test MSE sigma={g:g}" for g in SIGMAS])
    rows = []
    for method, m in methods.items():
        weights = np.asarray(m["final_weights"])
        versus = ("(reference)" if method == "ew" else
                  common.paired_cell(m["normalized_test_loss"], methods["ew"]["normalized_test_loss"], 4)
                  if "ew" in methods else "")
        rows.append([METHODS[method], len(m["seeds"])]
                    + [stats.interval(weights[:, i]).format(4) for i in range(len(TASKS))]
                    + [stats.interval(m["loss_ratio"][t]).format(4) for t in TASKS]
                    + [stats.interval(m["normalized_test_loss"]).format(4), versus]
                    + [stats.interval(m["test_mse"][t]).format(4) for t in TASKS])
    text = [f"{s['steps']} steps. Weights: the applied task weights at the end (mean over the last "
            "logging window). Ratios: test MSE at the end over test MSE at step 0; normalized test loss: "
            "their mean. Paired: the same seed is the same initialisation and the same batches; ▲/▼: the "
            "paired difference's 95% interval excludes 0.\n", common.markdown_table(headers, rows),
            "\n".join(f"- {claim}: {verdict}" for claim, verdict in checks(s).items()) + "\n",
            archive.provenance(records)]
    return "\n".join(text) + "\n"


def checks(s: dict) -> dict:
    """The paper's claims (Figure 2), measured on the final weights and the normalized test loss."""
    methods = s["methods"]
    out = {}
    if "gradnorm" in methods:
        weights = np.asarray(methods["gradnorm"]["final_weights"])
        larger = int(np.sum(weights[:, 0] > weights[:, 1]))
        out["GradNorm gives the sigma=1 task the larger weight"] = (
            f"{'yes' if larger == len(weights) else 'no'} ({larger}/{len(weights)} seeds; "
            f"w(sigma=1) - w(sigma=100) = {stats.paired_difference(weights[:, 0], weights[:, 1]).format(4)})")
    for method in (m for m in methods if m != "ew" and "ew" in methods):
        difference = stats.paired_difference(methods[method]["normalized_test_loss"],
                                             methods["ew"]["normalized_test_loss"])
        below = difference.excludes_zero() and difference.mean < 0
        out[f"{METHODS[method]}'s normalized test loss below equal weighting's beyond the paired interval"] = (
            f"{'yes' if below else 'no'} ({difference.format(4)})")
    return out


def plot(s: dict, workdir: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for method, m in s["methods"].items():
        steps, values = np.asarray(m["eval_steps"]), np.asarray(m["normalized_curve"])    # [S, E]
        mean, half = common.interval_band(values)
        axes[0].plot(steps, mean, label=METHODS[method])
        axes[0].fill_between(steps, mean - half, mean + half, alpha=0.2)
    axes[0].set(yscale="log", xlabel="step", ylabel="mean_i L_i(t) / L_i(0) (test)",
                title="normalized test loss (95% interval over seeds)")
    axes[0].legend()
    for method in ("gradnorm", "uncertainty"):
        if method not in s["methods"]:
            continue
        m = s["methods"][method]
        weights = np.asarray(m["weights"])                                                    # [S, N, T]
        for i, sigma in enumerate(SIGMAS):
            axes[1].plot(m["weight_steps"], weights[:, :, i].mean(0),
                         linestyle="-" if method == "gradnorm" else "--",
                         label=f"{METHODS[method]}, sigma={sigma:g}")
    axes[1].set(yscale="log", xlabel="step", ylabel="task weight w_i(t) (seed mean)", title="weights")
    axes[1].legend(fontsize=8)
    common.save_figure(fig, workdir, "test_loss_ratio.png")
    if "gradnorm" not in s["methods"]:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    m = s["methods"]["gradnorm"]
    weights = np.asarray(m["weights"])
    for i, sigma in enumerate(SIGMAS):
        mean, half = common.interval_band(weights[:, :, i])
        ax.plot(m["weight_steps"], mean, label=f"sigma={sigma:g}")
        ax.fill_between(m["weight_steps"], mean - half, mean + half, alpha=0.2)
    ax.set(xlabel="step", ylabel="GradNorm weight w_i(t)",
           title=f"GradNorm weights (alpha={PAPER_ALPHA}; 95% interval over seeds)")
    ax.legend()
    common.save_figure(fig, workdir, "weights.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
