"""The two-objective toy of CAGrad / Nash-MTL / FAMO: which methods reach the Pareto front, from where.

    python -m experiments.pareto_toy --workdir /tmp/exp/pareto --quick

The problem (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
appendix; with the first loss scaled by 0.1 as in Navon et al. 2022, "Multi-Task Learning as a Bargaining
Game", and Liu et al. 2023, "FAMO"), on a 2-d parameter theta = (x1, x2):

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, 5e-6)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, 5e-6)) + 6
    g1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    g2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(x2 / 2), 0),  c2 = max(tanh(-x2 / 2), 0)
    L1 = 0.1 (c1 f1 + c2 g1),  L2 = c1 f2 + c2 g2

Five starting points (those of Nash-MTL's and FAMO's toy scripts): (-8.5, 7.5), (0, 0), (9, 9),
(-7.5, -0.5), (9, -1). Adam with learning rate 1e-3 on theta, 50000 steps (FAMO's protocol; Nash-MTL ran
35000). Every method is OUR implementation (`mtt_jax.weighting`) applied to the 2-d parameter: the
Jacobian J (2 x 2) of (L1, L2) gives the Gram matrix K = J J^T for the Gram methods, the update direction
is d = c^T J with the method's coefficients c, and loss-based methods get d = w^T J with their applied
weights w. The methods see the losses shifted by FAMO's lower bounds (-2.1, -21), so that they are
positive (only FAMO uses their values); FAMO runs with gamma = 0 as in FAMO's toy script.

"Reaching the front": the Pareto front is computed by brute force on a grid of theta in [-10, 10]^2
(non-dominated (L1, L2) pairs); a run reaches it when no grid point improves both of its final losses by
more than 0.05 (the dominance gap). Also measured: the min-norm ||sum_t a_t g_t|| over a in the simplex
at the final point (Pareto stationarity; MGDA's own objective).

Seeds and splits: the problem is deterministic (PCGrad too, with two tasks) and has no data, so there is
no split: a run's metrics are the exact objectives at its final point (the records' "split" is named
``objective``), and nothing is selected. A run is one method from one starting point; the record's seed
is the index of its start in `STARTS`, and every statistic is over the five starting points, not over
random seeds.

What it reports (`report`, from the archived run records alone, `experiments.archive`; one record per
method and start, with its trajectory at 21 points): per method, how many starts reach the front and
each start's final (L1, L2); the final losses, min-norm and dominance gap as a mean with its 95%
t-interval over the starts; the dominance gap minus LS's, paired by start; which methods reach the front
from every start and from none. Plots, drawn from the records: trajectories over the loss landscape with
the Pareto set (``trajectories_theta.png``) and in objective space with the Pareto front
(``trajectories_objectives.png``).

Cost. full: 7 methods x 5 starts x 50000 steps (FAMO's count): about 1-2 minutes on 2 CPU cores.
``--quick``: 35000 steps (Nash-MTL's count), under a minute.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import archive, common, stats
from mtt_jax import weighting
from configs.default import base_config

NAME = "pareto_toy"
SCALE = 0.1                                  # first loss scaled (Nash-MTL, FAMO)
LOWER = 5e-6
MIN_LOSSES = np.asarray([-21.0 * SCALE, -21.0], np.float32)   # FAMO's lower bounds
STARTS = np.asarray([[-8.5, 7.5], [0.0, 0.0], [9.0, 9.0], [-7.5, -0.5], [9.0, -1.0]], np.float32)
METHODS = {"ew": "LS (ew)", "pcgrad": "PCGrad", "mgda": "MGDA", "cagrad": "CAGrad", "nash_mtl": "Nash-MTL",
           "famo": "FAMO", "upgrad": "UPGrad"}
METHOD_OPTIONS = {"famo": {"gamma": 0.0}}    # FAMO's toy script: gamma = 0
FRONT_TOLERANCE = 0.05
FULL_COST = "about 1-2 minutes on 2 CPU cores (7 methods x 5 starts x 50000 steps)."


def objectives(theta_2: jax.Array) -> jax.Array:
    """``(L1, L2)`` of the toy at ``theta = (x1, x2)`` (module docstring)."""
    x1, x2 = theta_2[0], theta_2[1]
    f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
    f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
    c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0.0)
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)
    return jnp.stack([SCALE * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2])


def make_method(name: str) -> weighting.WeightingMethod:
    config = base_config().weighting
    config.name = name
    for key, value in METHOD_OPTIONS.get(name, {}).items():
        config[name][key] = value
    return weighting.make_method(config, 2)


def direction(method: weighting.WeightingMethod, state, losses_2, jacobian_2x2, step, rng):
    """``(d, coefficients, new_state)``: the method's update direction on theta."""
    if method.requires == "gram":
        coeffs_2, state = method.gram_weights(state, jacobian_2x2 @ jacobian_2x2.T, losses_2, step, rng)
    elif method.requires == "losses":
        _, coeffs_2, state = method.combine(method.init_params(), state, losses_2, step, rng)
    else:
        raise ValueError(f"{method.name!r} needs per-task gradients of a network; not part of this toy")
    return coeffs_2 @ jacobian_2x2, coeffs_2, state


def optimize(name: str, starts: np.ndarray, steps: int, record_every: int, learning_rate: float = 1e-3):
    """Runs ``name`` from every start at once (vmap); returns trajectories ``[S, N, 2]`` of theta."""
    method = make_method(name)
    adam = optax.adam(learning_rate)
    value_and_jacobian = lambda theta: (objectives(theta), jax.jacrev(objectives)(theta))

    def one_start(theta0):
        def step_fn(carry, step):
            theta, opt_state, state = carry
            losses_2, jacobian_2x2 = value_and_jacobian(theta)
            shifted_2 = losses_2 - MIN_LOSSES
            rng = jax.random.fold_in(jax.random.key(0), step)
            d_2, _, state = direction(method, state, shifted_2, jacobian_2x2, step, rng)
            updates, opt_state = adam.update(d_2, opt_state)
            theta = optax.apply_updates(theta, updates)
            if method.needs_losses_after_step:
                state = method.after_step(state, shifted_2, objectives(theta) - MIN_LOSSES)
            return (theta, opt_state, state), theta

        def record_chunk(carry, chunk_index):
            steps_ = chunk_index * record_every + jnp.arange(record_every)
            carry, thetas = jax.lax.scan(step_fn, carry, steps_)
            return carry, thetas[-1]

        carry = (theta0, adam.init(theta0), method.init_state())
        _, recorded = jax.lax.scan(record_chunk, carry, jnp.arange(steps // record_every))
        return jnp.concatenate([theta0[None], recorded])

    return np.asarray(jax.jit(jax.vmap(one_start))(jnp.asarray(starts)))


def min_norm(theta_2: np.ndarray) -> float:
    """``min_{a in simplex} ||a^T J||`` at ``theta`` (0 at Pareto-stationary points), by our MGDA."""
    jacobian = jax.jacrev(objectives)(jnp.asarray(theta_2))
    gram = jacobian @ jacobian.T
    mgda = make_method("mgda")
    alpha, _ = mgda.gram_weights(mgda.init_state(), gram, jnp.ones(2), jnp.zeros((), jnp.int32))
    return float(jnp.sqrt(jnp.maximum(alpha @ gram @ alpha, 0.0)))


def pareto_front(resolution: int, bound: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Non-dominated ``(L1, L2)`` pairs ``[F, 2]`` over a grid of theta, and their theta ``[F, 2]``."""
    axis = np.linspace(-bound, bound, resolution, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    losses = np.asarray(jax.jit(jax.vmap(objectives))(jnp.asarray(grid)))
    order = np.lexsort((losses[:, 1], losses[:, 0]))          # by L1, then L2
    best_l2 = np.minimum.accumulate(losses[order, 1])
    keep = np.r_[True, losses[order[1:], 1] < best_l2[:-1]]     # strictly better L2 than every lower L1
    return losses[order[keep]], grid[order[keep]]


def dominance_gap(losses_2: np.ndarray, front: np.ndarray) -> float:
    """How much some front point improves *both* losses: ``max_q min_t (L_t - q_t)`` (<= 0 on the front)."""
    return float(np.max(np.min(losses_2[None, :] - front, axis=1)))


TRAJECTORY_POINTS = 20   # points of a trajectory after its start, kept in each run's record


def run(args) -> dict:
    log = common.Log()
    steps = common.pick(args.size, 1000, 35000, 50000)
    learning_rate = common.pick(args.size, 3e-2, 1e-3, 1e-3)      # --tiny: larger steps, few of them
    resolution = common.pick(args.size, 201, 801, 1201)
    front, front_theta = pareto_front(resolution)
    log(f"Pareto front: {len(front)} non-dominated grid points")
    writer = archive.RunWriter(args.workdir, NAME, args.size, args.archive, resumed=False)
    command, records = common.command_line(), []
    for name in METHODS:
        start = time.perf_counter()
        trajectories = optimize(name, STARTS, steps, steps // TRAJECTORY_POINTS, learning_rate)  # [S, N, 2]
        losses = np.asarray(jax.vmap(jax.vmap(objectives))(jnp.asarray(trajectories)))          # [S, N, 2]
        gaps = [dominance_gap(f, front) for f in losses[:, -1]]
        norms = [min_norm(t) for t in trajectories[:, -1]]
        wall = (time.perf_counter() - start) / len(STARTS)
        method_records = []
        for k, start_point in enumerate(STARTS):
            config = {"method": name, "method_options": METHOD_OPTIONS.get(name, {}),
                      "start": start_point.tolist(), "steps": steps, "learning_rate": learning_rate,
                      "loss_scale": SCALE, "min_losses": MIN_LOSSES.tolist(),
                      "front_resolution": resolution, "front_tolerance": FRONT_TOLERANCE}
            metrics = {"L1": losses[k, -1, 0], "L2": losses[k, -1, 1], "dominance_gap": gaps[k],
                       "min_norm": norms[k], "reached": float(gaps[k] <= FRONT_TOLERANCE),
                       "x1": trajectories[k, -1, 0], "x2": trajectories[k, -1, 1]}
            curves = {"steps": np.arange(TRAJECTORY_POINTS + 1) * (steps // TRAJECTORY_POINTS),
                      "theta": trajectories[k], "losses": losses[k]}
            method_records.append(archive.run_record(NAME, args.size, name, {"method": name}, k, config,
                                                     {SPLIT: metrics}, command, wall, curves))
        writer.write(method_records)
        records += method_records
        log(f"{METHODS[name]:10s} reached {sum(g <= FRONT_TOLERANCE for g in gaps)}/{len(STARTS)}; "
            f"min-norm {np.round(norms, 4).tolist()}")
    summary = summarize(records)
    plot(summary, front, front_theta, args.workdir)
    common.write_outputs(args.workdir, NAME, args, report(records),
                         {"summary": summary, "front": front.tolist(), "front_theta": front_theta.tolist()},
                         log, header=f"Archived runs: {args.workdir}/runs.",
                         spread="mean ± 95% t-interval over the five starting points")
    return summary


SPLIT = "objective"  # the metrics' "split": the exact objectives, there is no data


def summarize(records: list[dict]) -> dict:
    """Per method, over the starting points (a record's seed is its start's index): what the table and
    the plots show, from the run records alone."""
    methods = {}
    for name, runs in archive.by_arm(records).items():
        final = [x["metrics"][SPLIT] for x in runs]
        methods[name] = {
            "starts": [x["config"]["start"] for x in runs],
            "reached": [bool(f["reached"]) for f in final],
            "final_losses": [[f["L1"], f["L2"]] for f in final],
            "dominance_gap": [f["dominance_gap"] for f in final], "min_norm": [f["min_norm"] for f in final],
            "trajectory_theta": [x["curves"]["theta"] for x in runs],
            "trajectory_losses": [x["curves"]["losses"] for x in runs]}
    config = records[0]["config"]
    return {"steps": config["steps"], "learning_rate": config["learning_rate"],
            "tolerance": config["front_tolerance"], "front_resolution": config["front_resolution"],
            "starts": methods[next(iter(methods))]["starts"],
            "methods": {m: methods[m] for m in METHODS if m in methods}}


def report(records: list[dict]) -> str:
    """The table and which methods reach the front from where, from the run records alone."""
    s = summarize(records)
    methods = s["methods"]
    headers = (["method", "reached front"] + [f"start ({a:g}, {b:g})" for a, b in s["starts"]]
               + ["final L1", "final L2", "min-norm at end", "dominance gap", "gap vs LS (paired by start)"])
    rows = []
    for name, m in methods.items():
        final = np.asarray(m["final_losses"])
        versus = ("(reference)" if name == "ew" else common.paired_cell(m["dominance_gap"],
                                                                       methods["ew"]["dominance_gap"], 3)
                  if "ew" in methods else "")
        rows.append([METHODS[name], f"{sum(m['reached'])}/{len(m['reached'])}"]
                    + [("yes" if ok else "no") + f" ({f[0]:.2f}, {f[1]:.2f})"
                       for ok, f in zip(m["reached"], final)]
                    + [stats.interval(final[:, 0]).format(3), stats.interval(final[:, 1]).format(3),
                       stats.interval(m["min_norm"]).format(4), stats.interval(m["dominance_gap"]).format(3),
                       versus])
    every = [METHODS[n] for n, m in methods.items() if all(m["reached"])]
    never = [METHODS[n] for n, m in methods.items() if not any(m["reached"])]
    text = [f"CAGrad's toy with L1 scaled by {SCALE} (Nash-MTL / FAMO), Adam lr {s['learning_rate']:g}, "
            f"{s['steps']} steps from each starting point; cells (x, y): the final (L1, L2). Reached: the "
            f"dominance gap to the brute-force Pareto front (grid {s['front_resolution']}^2) is at most "
            f"{s['tolerance']}. The problem is deterministic: the intervals are over the "
            f"{len(s['starts'])} starting points, not over random seeds, and the paired column is each "
            "method's dominance gap minus LS's from the same start.\n",
            common.markdown_table(headers, rows),
            f"- Reach the front from every start: {', '.join(every) or 'none'}.\n"
            f"- Reach it from no start: {', '.join(never) or 'none'}.\n", archive.provenance(records)]
    return "\n".join(text) + "\n"


def plot(s: dict, front: np.ndarray, front_theta: np.ndarray, workdir: str) -> None:
    plt = common.pyplot()
    colors = plt.get_cmap("tab10")(np.arange(len(s["starts"])))
    names = list(s["methods"])
    cols = 4
    rows = -(-len(names) // cols)

    axis = np.linspace(-10, 10, 201, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1)
    landscape = np.asarray(jax.vmap(jax.vmap(objectives))(jnp.asarray(grid))).sum(-1)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        m = s["methods"][name]
        ax.contourf(axis, axis, landscape, levels=30, cmap="Greys", alpha=0.6)
        ax.scatter(front_theta[:, 0], front_theta[:, 1], s=2, color="tab:red", label="Pareto set")
        for k, (start, trajectory) in enumerate(zip(s["starts"], np.asarray(m["trajectory_theta"]))):
            ax.plot(trajectory[:, 0], trajectory[:, 1], color=colors[k], linewidth=1.5,
                    label=f"from ({start[0]:g}, {start[1]:g})")
            ax.scatter(*trajectory[0], color=colors[k], marker="o", s=25)
            ax.scatter(*trajectory[-1], color=colors[k], marker="*", s=80, edgecolor="black")
        ax.set(title=f"{METHODS[name]} ({sum(m['reached'])}/{len(m['reached'])} on front)",
               xlim=(-10, 10), ylim=(-10, 10), xlabel="x1", ylabel="x2")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    fig.suptitle("trajectories over L1 + L2 (theta space); o start, * end")
    common.save_figure(fig, workdir, "trajectories_theta.png")

    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        ax.plot(front[:, 0], front[:, 1], color="tab:red", linewidth=2, label="Pareto front")
        trajectories = np.asarray(s["methods"][name]["trajectory_losses"])
        for k, (start, losses) in enumerate(zip(s["starts"], trajectories)):
            ax.plot(losses[:, 0], losses[:, 1], color=colors[k], linewidth=1.2,
                    label=f"from ({start[0]:g}, {start[1]:g})")
            ax.scatter(*losses[-1], color=colors[k], marker="*", s=80, edgecolor="black")
        ax.set(title=METHODS[name], xlabel="L1", ylabel="L2")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    common.save_figure(fig, workdir, "trajectories_objectives.png")


def main(argv=None) -> None:
    args = common.parse_args(__doc__, FULL_COST, argv)
    common.run_locked(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
