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


def write_plots(workdir: str, tasks: Sequence[TaskSpec]) -> None:
    """``curves.png``: per-task train loss and eval main metric over steps; ``task_attention.png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    for t in tasks:
        ax_loss.plot([r["step"] for r in train], [r[f"{t.name}/loss"] for r in train], label=t.name)
        ax_metric.plot([r["step"] for r in evals], [r[f"{t.name}/{t.main_metric}"] for r in evals],
                       marker="o", label=f"{t.name} ({t.main_metric})")
    ax_loss.set(xlabel="step", ylabel="train loss", yscale="log", title="Train loss per task")
    ax_metric.set(xlabel="step", ylabel="eval metric", title="Eval main metric per task")
    for ax in (ax_loss, ax_metric):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, join(workdir, "curves.png"))
    if evals and "task_attention" in evals[-1]:
        matrix = np.asarray(evals[-1]["task_attention"])
        fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 1.2 * len(tasks) + 1.5))
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        names = [t.name for t in tasks]
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set(xlabel="attends to (keys/values)", ylabel="task (queries)", title="Task attention mass")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        save_png(fig, join(workdir, "task_attention.png"))


def save_png(fig, path: str, **savefig_options) -> None:
    """Saves and closes ``fig`` (dpi 100 unless given), written whole (`write_bytes`: a local path or
    a bucket URL)."""
    import matplotlib.pyplot as plt
    png = io.BytesIO()
    fig.savefig(png, format="png", **{"dpi": 100, **savefig_options})
    plt.close(fig)
    write_bytes(path, png.getvalue())
