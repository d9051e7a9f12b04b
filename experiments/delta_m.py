"""The two "delta-m" summaries of a multi-task model against single-task baselines, as papers use them.

Both compare every metric ``M`` of the multi-task model with the same metric ``M_b`` of the single-task
model of that task, as a relative change ``(M - M_b) / M_b``, signed so that one direction means better.
They differ in sign convention and in how metrics are pooled:

- `delta_m_pooled` (Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; the
  convention of Nash-MTL, Navon et al. 2022, and FAMO, Liu et al. 2023)::

      delta_m% = 100 / K * sum_{k=1..K} (-1)^{h_k} (M_k - M_b,k) / M_b,k

  over all K metrics of all tasks pooled, ``h_k = 1`` if higher is better: **positive = worse**.

- `delta_p_per_task` (LibMTL, Lin & Zhang, JMLR 2023, "Delta_p")::

      delta_p% = 100 / T * sum_t 1 / N_t * sum_i (-1)^{s_t,i} (M_t,i - M_b,t,i) / M_b,t,i

  averaged within each task first, then over the T tasks, ``s = 1`` if lower is better: **positive =
  better**.

When every task reports the same number of metrics the two are exact negatives; otherwise a task with
many metrics weighs more in the pooled form.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Metrics = Mapping[str, Mapping[str, float]]  # task -> metric -> value

LOWER_IS_BETTER = ("mse", "loss", "mae", "rmse", "error")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (errors and losses are not)."""
    return not any(metric == name or metric.endswith("_" + name) for name in LOWER_IS_BETTER)


def _relative_changes(metrics: Metrics, baseline: Metrics,
                      better: Callable[[str], bool]) -> dict[str, list[float]]:
    """Per task, ``(M - M_b) / M_b`` signed so that positive means better."""
    changes = {}
    for task, task_metrics in metrics.items():
        if task not in baseline:
            raise KeyError(f"no single-task baseline for task {task!r}")
        changes[task] = []
        for name, value in task_metrics.items():
            reference = baseline[task][name]
            if reference == 0:
                raise ValueError(f"baseline {task}/{name} is 0: the relative change is undefined")
            sign = 1.0 if better(name) else -1.0
            changes[task].append(sign * (float(value) - reference) / abs(reference))
    return changes


def delta_m_pooled(metrics: Metrics, baseline: Metrics,
                   better: Callable[[str], bool] = higher_is_better) -> float:
    """Nash-MTL / FAMO's delta-m%: mean over all metrics pooled; positive = worse than single-task."""
    changes = _relative_changes(metrics, baseline, better)
    pooled = [c for task_changes in changes.values() for c in task_changes]
    return -100.0 * float(np.mean(pooled))


def delta_p_per_task(metrics: Metrics, baseline: Metrics,
                     better: Callable[[str], bool] = higher_is_better) -> float:
    """LibMTL's Delta_p%: mean within each task, then over tasks; positive = better than single-task."""
    per_task = [np.mean(c) for c in _relative_changes(metrics, baseline, better).values()]
    return 100.0 * float(np.mean(per_task))


def task_metrics(final: Mapping[str, float], task_names, metric_names: Mapping[str, tuple[str, ...]]) -> dict:
    """``{task: {metric: value}}`` from a run's flat ``"<task>/<metric>"`` eval record."""
    return {t: {m: float(final[f"{t}/{m}"]) for m in metric_names[t]} for t in task_names}
