"""Statistics over seeds for the experiments' tables: intervals, paired differences, normalised scores.

A table cell is a mean over seeds with a 95% confidence interval, Student's t with ``n - 1`` degrees of
freedom (`interval`): seeds are few (5), so the normal 1.96 would understate the width (t_{0.975, 4} =
2.776). Two rows trained on the same seeds share the initialisation and data order of each seed, so
their difference is judged on the per-seed differences (`paired_difference`), whose interval is
usually much narrower than either row's.

`gap_normalised` is the score the tables put beside delta-m%: per task

    r_t = (M_t - M_trivial,t) / (M_single,t - M_trivial,t),

the share of the single-task model's gain over the best input-blind predictor (`mtt_jax.tasks.
trivial_baseline`) that the multi-task model keeps: 1 = as good as single-task, 0 = no better than
guessing. Unlike a relative change against the single-task value, it stays bounded when the single-task
metric is near zero (an MSE of 1e-5 makes every delta-m% huge), and it is signed the same way for
metrics where lower is better. `dominant_metric` finds the metric that carries most of a delta-m%.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and the half-width of its confidence interval (nan for one seed)."""
    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a difference "beyond its interval")."""
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``"mean ± half-width"``; ``"mean (n = 1)"`` without an interval; ``"nan"`` if undefined."""
        mean = self.mean * scale
        if not math.isfinite(mean):
            return "nan"
        if self.n < 2:
            return f"{mean:.{digits}f} (n = 1)"
        return f"{mean:.{digits}f} ± {self.half_width * abs(scale):.{digits}f}"


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t confidence half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` (s: ddof = 1)."""
    values = np.asarray(values, np.float64)
    n = int(values.size)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = float(np.mean(values))
    if n == 1:
        return Interval(mean, float("nan"), 1)
    t = float(scipy_stats.t.ppf((1 + confidence) / 2, df=n - 1))
    return Interval(mean, t * float(np.std(values, ddof=1)) / math.sqrt(n), n)


def paired_difference(values: Sequence[float], reference: Sequence[float],
                      confidence: float = CONFIDENCE) -> Interval:
    """The interval of the per-seed differences ``values[s] - reference[s]`` (same seeds, same order)."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    if values.shape != reference.shape:
        raise ValueError(f"paired values need the same seeds: {values.shape} vs {reference.shape}")
    return interval(values - reference, confidence)


def welch_difference(values: Sequence[float], reference: Sequence[float],
                     confidence: float = CONFIDENCE) -> Interval:
    """The interval of ``mean(values) - mean(reference)`` for two independent samples (Welch 1947).

    Half-width ``t_{(1+c)/2, nu} * sqrt(s1^2/n1 + s2^2/n2)`` with the Welch-Satterthwaite degrees of
    freedom ``nu``: for arms that share no seeds, where `paired_difference` does not apply. ``n`` of the
    result is the smaller sample's size.
    """
    a, b = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    if min(a.size, b.size) < 2:
        raise ValueError(f"a Welch interval needs two values on each side: {a.size} and {b.size}")
    va, vb = np.var(a, ddof=1) / a.size, np.var(b, ddof=1) / b.size
    dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    t = float(scipy_stats.t.ppf((1 + confidence) / 2, df=dof))
    return Interval(float(a.mean() - b.mean()), t * math.sqrt(va + vb), int(min(a.size, b.size)))


def gap_normalised(value: float, trivial: float, single_task: float) -> float:
    """``(value - trivial) / (single_task - trivial)``: 1 = single-task, 0 = the input-blind predictor.

    Undefined (nan) when the single-task model is no better than the trivial one: there is no gap to
    keep a share of.
    """
    gap = single_task - trivial
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        return float("nan")
    return (value - trivial) / gap


def mean_gap_normalised(metrics: Mapping[str, float], trivial: Mapping[str, float],
                        single_task: Mapping[str, float]) -> float:
    """The mean of `gap_normalised` over the given metrics (keys: ``"<task>/<metric>"``)."""
    return float(np.mean([gap_normalised(metrics[k], trivial[k], single_task[k]) for k in metrics]))


def dominant_metric(changes: Mapping[str, float], share: float = 0.5) -> tuple[str, float] | None:
    """``(metric, its share of sum |change|)`` when one metric carries more than ``share`` of the
    summed absolute relative changes behind a delta-m%, else None."""
    total = sum(abs(c) for c in changes.values())
    if not changes or total == 0:
        return None
    name = max(changes, key=lambda k: abs(changes[k]))
    fraction = abs(changes[name]) / total
    return (name, fraction) if fraction > share else None
