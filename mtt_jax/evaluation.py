"""Scoring a fixed held-out set: per-task loss and metrics, the best input-blind baseline, and the mean
task-attention map; for one run, or for several runs at once (a leading run axis, as in the
experiments' seeds-in-a-vmap runs), so that both score exactly the same way.

    metrics = run_eval(eval_step, state, source, tasks, batch_size, shardings, layout)
    per_run = score_eval_set(lambda batch: eval_fn(states, batch), source, tasks, batch_size, layout,
                             runs=[0, 1, 2], split="validation")

``split`` is one of the sources' held-out sets (`mtt_jax.data.base.SPLITS`): ``"test"`` (the default,
the eval set reported) or ``"validation"`` (for choosing hyper-parameters before reporting test once).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import numpy as np

from mtt_jax import sharding, tasks as tasks_lib
from mtt_jax.data.base import check_split


def run_eval(eval_step, state, source, tasks, batch_size: int, shardings, layout: str,
             split: str = "test") -> dict:
    """One run's metrics on the whole held-out set ``split`` of ``source`` (its batches placed with
    ``shardings``)."""
    def outputs_with_run_axis(host_batch):
        out = jax.device_get(eval_step(state, sharding.shard_batch(host_batch, shardings, layout)))
        return jax.tree.map(lambda x: np.asarray(x)[None], out)
    metrics = score_eval_set(outputs_with_run_axis, source, tasks, batch_size, layout, runs=[0],
                             split=split)[0]
    label = "eval" if split == "test" else f"eval ({split})"
    logging.info("%s: %s", label, {k: v for k, v in metrics.items() if k != "task_attention"})
    return metrics


def score_eval_set(outputs_fn: Callable[[dict], dict], source, tasks, batch_size: int, layout: str,
                   runs: Sequence[int], baselines: bool = True, split: str = "test") -> list[dict]:
    """The metrics of each run in ``runs`` on held-out set ``split`` of ``source``.
    ``outputs_fn(host_batch)`` gives the eval step's outputs with a leading run axis (``loss_sum [R, T]``,
    ``count [R, T]``, ``predictions[task] [R, B, ...]``, optional ``task_attention [R, T, T]``).
    ``baselines`` adds each task's best input-blind predictor as ``<task>/baseline_<metric>``."""
    check_split(split)  # a one-line error before any batch is built
    predictions = {t.name: [] for t in tasks}
    labels = {t.name: [] for t in tasks}
    token_masks = {t.name: [] for t in tasks}
    loss_sum, count, attention = 0.0, 0.0, []
    for host_batch in source.eval_batches(batch_size, split=split):
        out = jax.device_get(outputs_fn(host_batch))
        loss_sum, count = loss_sum + out["loss_sum"], count + out["count"]   # [R, T]
        if "task_attention" in out:
            attention.append(out["task_attention"])                             # [R, T, T]
        for i, t in enumerate(tasks):
            keep = host_batch["mask"][t.name] > 0
            predictions[t.name].append(np.asarray(out["predictions"][t.name])[:, keep])
            labels[t.name].append(host_batch["labels"][t.name][keep])
            if t.kind == "tagging":
                task_inputs = host_batch["inputs"][i] if layout == "multi" else host_batch["inputs"]
                token_masks[t.name].append(task_inputs[keep] != 0)
    label = {t.name: np.concatenate(labels[t.name]) for t in tasks}
    mask = {t.name: np.concatenate(token_masks[t.name]) if t.kind == "tagging" else None for t in tasks}
    results = []
    for r in runs:
        metrics = {"loss": float(np.sum(loss_sum[r] / np.maximum(count[r], 1)))}
        for i, t in enumerate(tasks):
            pred = np.concatenate([p[r] for p in predictions[t.name]])
            metrics[f"{t.name}/loss"] = float(loss_sum[r][i] / max(count[r][i], 1))
            for name, value in tasks_lib.compute_metrics(t, pred, label[t.name], mask[t.name]).items():
                metrics[f"{t.name}/{name}"] = value
            if baselines:
                for name, value in tasks_lib.trivial_baseline(t, label[t.name], mask[t.name]).items():
                    metrics[f"{t.name}/baseline_{name}"] = value
        if attention:
            metrics["task_attention"] = np.mean([a[r] for a in attention], axis=0).round(4).tolist()
        results.append(metrics)
    return results
