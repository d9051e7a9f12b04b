"""Chen et al. (ICML 2018), Figure 2 (T = 2): GradNorm on regression tasks of very different scales.

    python -m experiments.gradnorm_toy --workdir /tmp/exp/gradnorm --quick

Data: `mtt_jax.data.gradnorm_toy`, ``f_i(x) = sigma_i tanh((B + eps_i) x)`` with sigma = (1, 100), so the
second task's loss is ~10^4 times the first's; train batches drawn on the device from the same
distribution (`experiments.toys`). Model: the paper's, four shared ReLU layers of 100 units and a linear
map per task (`variants.SharedBottomMLP`). Methods (`mtt_jax.weighting`): equal weighting, uncertainty
weighting (Kendall et al. 2018) and GradNorm with the paper's asymmetry for this toy, alpha = 0.12.
Adam at a constant learning rate; no gradient clipping (the losses are ~10^4).

Reported: the task weights w_i(t) (plot ``weights.png``; the paper's Fig. 2 right), the test-loss ratios
``L_i(t) / L_i(0)`` on the fixed eval set and their mean, the normalized test loss (plot
``test_loss_ratio.png``; Fig. 2 middle), mean ± std over seeds. Our GradNorm computes gradient norms over
all shared parameters (LibMTL), not the paper's last shared layer; its weights w = 2 softmax(s) follow
their own Adam (lr 0.025), see `mtt_jax.weighting.gradnorm`.

Cost. full: 20 seeds x 5000 steps of batch 128, three methods: about 5-10 minutes on 2 CPU cores.
``--quick``: 5 seeds x 1500 steps, under a minute.
"""

from __future__ import annotations

import sys

import numpy as np

from configs import gradnorm_toy as gradnorm_config
from experiments import common, toys
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
    results = {"tasks": list(TASKS), "sigmas": list(SIGMAS), "seeds": seeds, "methods": {}}
    for method in METHODS:
        config = make_config(args.size, method)
        model = variants.SharedBottomMLP(task_specs, bottom_units=(100,) * 4, tower_units=())
        sampler = toys.gradnorm_sampler(TASKS, dict(zip(TASKS, SIGMAS)), config.batch_size)
        runs = seed_runs.train_seeds(config, seeds, model=model, sampler=sampler, eval_at_start=True,
                                  eval_every=max(config.total_steps // 10, 1), max_chunk=100)
        steps = sorted(runs.evals)
        mse = {t: np.asarray([runs.metric(f"{t}/mse", s) for s in steps]) for t in TASKS}   # [E, S]
        ratio = {t: mse[t] / mse[t][0] for t in TASKS}
        results["methods"][method] = {
            "eval_steps": steps,
            "eval_mse": {t: mse[t].tolist() for t in TASKS},
            "loss_ratio": {t: ratio[t].tolist() for t in TASKS},
            "normalized_test_loss": np.mean([ratio[t] for t in TASKS], axis=0).tolist(),   # [E, S]
            "curve_steps": runs.curve_steps.tolist(),
            "curve_weights": runs.curve_weights.tolist(),                                  # [N, S, T]
            "final_weights": runs.curve_weights[-1].tolist(),                              # [S, T]
            "wall_seconds": round(runs.wall_seconds, 1)}
        r = results["methods"][method]
        log(f"{METHODS[method]:24s} weights {np.mean(r['final_weights'], 0).round(3).tolist()}  "
            f"normalized test loss {common.fmt(r['normalized_test_loss'][-1], 4)} "
            f"({runs.wall_seconds:.0f} s)")
    results["steps"] = make_config(args.size, "ew").total_steps
    results["checks"] = checks(results)
    table = make_table(results)
    table += "\n" + "\n".join(f"- {k}: {v}" for k, v in results["checks"].items()) + "\n"
    plot(results, args.workdir)
    common.write_outputs(args.workdir, NAME, args, table, results, log, header=(
        f"GradNorm toy (Chen et al. 2018, §4), T = 2, sigma = {SIGMAS}, {results['steps']} steps. "
        "Weights: the applied task weights at the end (mean over the last logging window). "
        "Ratios: eval MSE at the end over eval MSE at step 0; normalized test loss = their mean."))
    return results


def make_table(results: dict) -> str:
    headers = ["method", "w(sigma=1)", "w(sigma=100)", "L(sigma=1) ratio", "L(sigma=100) ratio",
               "normalized test loss", "MSE sigma=1", "MSE sigma=100"]
    rows = []
    for method, r in results["methods"].items():
        weights = np.asarray(r["final_weights"])
        rows.append([METHODS[method], common.fmt(weights[:, 0], 4), common.fmt(weights[:, 1], 4)]
                    + [common.fmt(r["loss_ratio"][t][-1], 4) for t in TASKS]
                    + [common.fmt(r["normalized_test_loss"][-1], 4)]
                    + [common.fmt(r["eval_mse"][t][-1], 4) for t in TASKS])
    return common.markdown_table(headers, rows)


def checks(results: dict) -> dict:
    final = lambda m: float(np.mean(results["methods"][m]["normalized_test_loss"][-1]))
    weights = np.mean(results["methods"]["gradnorm"]["final_weights"], axis=0)
    return {"GradNorm gives the sigma=1 task the larger weight": bool(weights[0] > weights[1]),
            "GradNorm's normalized test loss < equal weighting's": final("gradnorm") < final("ew")}


def plot(results: dict, workdir: str) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, r in results["methods"].items():
        steps = np.asarray(r["eval_steps"])
        values = np.asarray(r["normalized_test_loss"])
        axes[0].plot(steps, values.mean(1), label=METHODS[method])
        axes[0].fill_between(steps, values.mean(1) - values.std(1), values.mean(1) + values.std(1), alpha=0.2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("mean_i L_i(t) / L_i(0) (eval)")
    axes[0].set_title("normalized test loss")
    axes[0].legend()
    for method in ("gradnorm", "uncertainty"):
        r = results["methods"][method]
        weights = np.asarray(r["curve_weights"])   # [N, S, T]
        for i, (t, sigma) in enumerate(zip(TASKS, SIGMAS)):
            axes[1].plot(r["curve_steps"], weights[:, :, i].mean(1),
                         linestyle="-" if method == "gradnorm" else "--",
                         label=f"{METHODS[method]}, sigma={sigma:g}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("task weight w_i(t)")
    axes[1].set_title("weights")
    axes[1].legend(fontsize=8)
    common.save_figure(fig, workdir, "test_loss_ratio.png")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    r = results["methods"]["gradnorm"]
    weights = np.asarray(r["curve_weights"])
    for i, sigma in enumerate(SIGMAS):
        mean, std = weights[:, :, i].mean(1), weights[:, :, i].std(1)
        ax.plot(r["curve_steps"], mean, label=f"sigma={sigma:g}")
        ax.fill_between(r["curve_steps"], mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("GradNorm weight w_i(t)")
    ax.set_title("GradNorm weights (alpha=0.12)")
    ax.legend()
    common.save_figure(fig, workdir, "weights.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
