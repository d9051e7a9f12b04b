"""End-of-run outputs: ``summary.md`` with the per-task table, and PNG plots."""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np

from mtt_jax.tasks import TaskSpec
from mtt_jax.run.workdir import exists, join, read_text, remove, write_bytes, write_json, write_text


def per_task_table(tasks: Sequence[TaskSpec], metrics: dict) -> str:
    """Markdown table: one row per task, its metrics and the trivial (input-blind) baseline."""
    lines = ["| task | kind | metric | value | trivial baseline |", "|---|---|---|---|---|"]
    for t in tasks:
        for name in t.metric_names:
            value = metrics.get(f"{t.name}/{name}", float("nan"))
            baseline = metrics.get(f"{t.name}/baseline_{name}")
            baseline_text = f"{baseline:.4f}" if baseline is not None else ""
            lines.append(f"| {t.name} | {t.kind} | {name} | {value:.4f} | {baseline_text} |")
    return "\n".join(lines)


def attention_table(tasks: Sequence[TaskSpec], matrix, fmt: str = ".3f") -> str:
    """A T x T task matrix as markdown (task attention mass, affinity): row i, column j."""
    names = [t.name for t in tasks]
    lines = ["| from \\ to | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, matrix):
        lines.append(f"| {name} | " + " | ".join(format(v, fmt) for v in row) + " |")
    return "\n".join(lines)


def hparams(config) -> dict:
    """The config flattened (``model.d_model``, ...), each value a bool, int, float or str (tuples and
    lists as their text): what TensorBoard's HParams dashboard compares runs by."""
    flat = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else str(value)
    visit("", json.loads(config.to_json_best_effort()))
    return flat


def discard(workdir: str) -> None:
    """Removes the end-of-run outputs of an earlier (possibly interrupted) attempt."""
    for name in ("summary.md", "curves.png", "task_attention.png"):
        remove(join(workdir, name))


def write_summary(workdir: str, tasks: Sequence[TaskSpec], final_eval: dict, config,
                  wall_seconds: float, skipped_steps: int = 0) -> None:
    parts = [f"# Run summary\n",
             f"- tasks: {', '.join(t.name for t in tasks)} ({config.data.source})",
             f"- steps: {config.total_steps}, batch {config.batch_size}, seed {config.seed}, "
             f"weighting {config.weighting.name}, task encoder {config.model.task_encoder}, "
             f"task attention {config.model.task_attention}, dtype {config.dtype}",
             f"- training wall time: {wall_seconds:.1f} s; skipped non-finite steps: {skipped_steps}",
             *throughput_line(read_metrics(workdir)),
             f"- final eval loss (sum over tasks): {final_eval.get('loss', float('nan')):.4f}\n",
             "## Per-task eval metrics\n", per_task_table(tasks, final_eval)]
    if "task_attention" in final_eval:
        parts += ["\n## Task attention (mean attention mass, rows sum to 1)\n",
                  attention_table(tasks, final_eval["task_attention"])]
    affinity_path = join(workdir, "affinity.json")
    if exists(affinity_path):
        saved = json.loads(read_text(affinity_path))
        parts += [f"\n## Task affinity (TAG lookahead, mean of {saved['measurements']}; row i -> column j)\n",
                  attention_table(tasks, saved["affinity"], "+.2e")]
        for k, grouping in saved["best_groupings"].items():
            parts.append(f"- best {k} groups: {grouping['groups']} (score {grouping['score']:.4f})")
    write_text(join(workdir, "summary.md"), "\n".join(parts) + "\n")
    write_plots(workdir, tasks)


def throughput_line(records: list[dict]) -> list[str]:
    """The median throughput of the train records that carry one (`writers.StepTimer`), or nothing."""
    timed = [r for r in records if r["split"] == "train" and "step_ms" in r]
    if not timed:
        return []
    median = lambda key: float(np.median([r[key] for r in timed]))
    parts = [f"step {median('step_ms'):.1f} ms", f"{median('examples_per_s'):.0f} examples/s"]
    if all("tokens_per_s" in r for r in timed):
        parts.append(f"{median('tokens_per_s'):.0f} tokens/s")
    parts.append(f"{median('achieved_tflops_per_s'):.4g} model TFLOP/s")
    if all("mfu" in r for r in timed):
        parts.append(f"MFU {100 * median('mfu'):.1f}%")
    if all("input_wait_fraction" in r for r in timed):
        parts.append(f"waiting for input {100 * median('input_wait_fraction'):.1f}% of the time")
    if "peak_memory_mib_per_device" in timed[-1]:
        parts.append(f"peak memory {timed[-1]['peak_memory_mib_per_device']:.0f} MiB per device")
    return [f"- throughput (median of {len(timed)} train records): {', '.join(parts)}"]


def write_affinity(workdir: str, tasks: Sequence[TaskSpec], mean_affinity, count: int) -> None:
    """``affinity.json``: the run's mean TAG affinity and the best grouping for each number of groups."""
    from mtt_jax.affinity import best_grouping
    names = [t.name for t in tasks]
    groupings = {}
    for k in range(2, len(tasks)):
        groups, score = best_grouping(mean_affinity, k)
        groupings[str(k)] = {"groups": [[names[i] for i in g] for g in groups], "score": score}
    write_json(join(workdir, "affinity.json"),
               {"tasks": names, "measurements": count,
                "affinity": np.round(mean_affinity, 6).tolist(), "best_groupings": groupings}, indent=2)


def read_metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in read_text(join(workdir, "metrics.jsonl")).splitlines()
            if line.strip()]


MAX_PLOTTED_TASKS = 8  # curves.png: one column per task, the first this many


def write_plots(workdir: str, tasks: Sequence[TaskSpec]) -> None:
    """``curves.png`` and, when the run has task attention, ``task_attention.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    save_png(curves_figure(plt, records, tasks), join(workdir, "curves.png"))
    evals = [r for r in records if r["split"] == "eval"]
    if evals and "task_attention" in evals[-1]:
        save_png(attention_figure(plt, np.asarray(evals[-1]["task_attention"]), tasks),
                 join(workdir, "task_attention.png"))


def curves_figure(plt, records: list[dict], tasks: Sequence[TaskSpec]):
    """One column per task: above, the train losses at the records (each one batch's loss), their
    running mean and the eval loss; below, the eval main metric with the input-blind predictor's value
    (`mtt_jax.tasks.trivial_baseline`) dashed. Each task's metric has its own axis."""
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    shown = list(tasks)[:MAX_PLOTTED_TASKS]
    fig, axes = plt.subplots(2, len(shown), figsize=(3.4 * len(shown) + 0.6, 6.2), squeeze=False)
    train_steps, eval_steps = [r["step"] for r in train], [r["step"] for r in evals]
    for column, t in enumerate(shown):
        loss_ax, metric_ax = axes[0, column], axes[1, column]
        losses = np.asarray([r[f"{t.name}/loss"] for r in train], np.float64)
        loss_ax.plot(train_steps, losses, ".", color="tab:blue", alpha=0.35, label="train (one batch)")
        if len(losses) >= 5:
            running = np.convolve(losses, np.ones(5) / 5, mode="valid")
            loss_ax.plot(train_steps[4:], running, color="tab:blue", label="train (running mean of 5)")
        loss_ax.plot(eval_steps, [r[f"{t.name}/loss"] for r in evals], "o-", color="tab:orange",
                     label="eval")
        shown_losses = np.concatenate([losses, [r[f"{t.name}/loss"] for r in evals]])
        spans_decades = shown_losses.size and shown_losses.min() > 0 and shown_losses.max() > 10 * shown_losses.min()
        loss_ax.set(title=t.name, xlabel="step", ylabel="loss", yscale="log" if spans_decades else "linear")
        metric = t.main_metric
        metric_ax.plot(eval_steps, [r[f"{t.name}/{metric}"] for r in evals], "o-", color="tab:orange",
                       label="eval")
        baseline = [r.get(f"{t.name}/baseline_{metric}") for r in evals]
        if evals and baseline[-1] is not None:
            metric_ax.axhline(baseline[-1], color="gray", linestyle="--", label="input-blind predictor")
        metric_ax.set(xlabel="step", ylabel=f"eval {metric}")
        for ax in (loss_ax, metric_ax):
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    if len(tasks) > len(shown):
        fig.suptitle(f"the first {len(shown)} of {len(tasks)} tasks (all are in metrics.jsonl)", fontsize=9)
    fig.tight_layout()
    return fig


def attention_figure(plt, matrix_TxT: np.ndarray, tasks: Sequence[TaskSpec]):
    """The task-attention map with its values in the cells, coloured over the range of the values that
    are not fixed by construction (a diagonal of zeros: the own stream is not attended)."""
    names = [t.name for t in tasks]
    self_excluded = np.allclose(np.diag(matrix_TxT), 0.0)
    free = matrix_TxT[~np.eye(len(names), dtype=bool)] if self_excluded else matrix_TxT.ravel()
    shown = np.where(np.eye(len(names), dtype=bool), np.nan, matrix_TxT) if self_excluded else matrix_TxT
    low, high = float(free.min()), float(free.max())
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 1.1 * len(names) + 1.8))
    image = ax.imshow(shown, vmin=low, vmax=max(high, low + 1e-6), cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            if not (self_excluded and i == j):
                ax.text(j, i, f"{matrix_TxT[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if image.norm(matrix_TxT[i, j]) < 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    title = "Task attention mass (rows sum to 1)"
    if self_excluded and len(names) == 2:
        title += "\ntwo tasks, own stream excluded: 1 by construction"
    elif self_excluded:
        title += "\ndiagonal: own stream not attended"
    ax.set(xlabel="attends to (keys/values)", ylabel="task (queries)", title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def save_png(fig, path: str, **savefig_options) -> None:
    """Saves and closes ``fig`` (dpi 100 unless given), written whole (`write_bytes`: a local path or
    a bucket URL)."""
    import matplotlib.pyplot as plt
    png = io.BytesIO()
    fig.savefig(png, format="png", **{"dpi": 100, **savefig_options})
    plt.close(fig)
    write_bytes(path, png.getvalue())
