"""Task registry: what a task predicts, how it is scored, and how it is trained.

A `TaskSpec` names a task and fixes its kind:

- ``classification``: one label in ``[0, num_classes)`` per example; cross-entropy loss; accuracy and
    macro-F1.
- ``regression``: one real target per example; squared-error loss; MSE and Pearson correlation.
- ``tagging``: one label per input token (pads excluded); token-level cross-entropy; token accuracy and
    token macro-F1.

Those are each kind's default metrics. A task may name its own (``TaskSpec.metrics``, the first is its
main metric), e.g. the metrics GLUE reports: Matthews correlation for CoLA, F1 of class 1 and accuracy for
MRPC and QQP, Pearson and Spearman correlation for STS-B.

This module sits at the bottom of the layers and imports nothing from mtt_jax: each data source
registers the tasks it serves (`register`) when its module is imported, so importing `mtt_jax.data`
fills the registry that `get` reads.

Losses are pure jax functions used inside the train step. They return per-example sums and counts, so
that the task loss is a masked mean over examples (and over tokens for tagging) whatever the batch
layout. Metrics are numpy functions run on the host over the whole eval set, because macro-F1 and
Pearson are not means of per-batch values.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("classification", "regression", "tagging")
METRICS = {
        "classification": ("accuracy", "macro_f1"),
        "regression": ("mse", "pearson"),
        "tagging": ("token_accuracy", "token_macro_f1"),
}
# The kinds each metric applies to (TaskSpec.metrics are checked against it).
METRIC_KINDS = {
        "accuracy": ("classification",), "macro_f1": ("classification",), "f1": ("classification",),
        "matthews_corr": ("classification",), "token_accuracy": ("tagging",),
        "token_macro_f1": ("tagging",), "mse": ("regression",), "pearson": ("regression",),
        "spearman": ("regression",),
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    num_classes: int = 1  # output width of the head; 1 for regression
    source: str = ""      # the data source that serves the task
    metrics: tuple[str, ...] = ()  # empty: the kind's defaults (METRICS); the first is the main metric

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else self.num_classes

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.metrics or METRICS[self.kind]

    @property
    def main_metric(self) -> str:
        return self.metric_names[0]


_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.kind not in KINDS:
        raise ValueError(f"task kind {spec.kind!r} is not one of {KINDS}")
    for metric in spec.metrics:
        if metric not in METRIC_KINDS or spec.kind not in METRIC_KINDS[metric]:
            valid = [m for m, kinds in METRIC_KINDS.items() if spec.kind in kinds]
            raise ValueError(f"metric {metric!r} does not apply to {spec.kind} task {spec.name!r}; "
                             f"valid choices: {', '.join(valid)}")
    if "f1" in spec.metrics and spec.num_classes != 2:
        raise ValueError(f"metric 'f1' (of class 1) needs a binary task; {spec.name!r} has "
                         f"{spec.num_classes} classes")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> TaskSpec:
    """The spec of a registered task. Each data source registers the tasks it serves when its module is
    imported, so ``import mtt_jax.data`` (the sources' registry) registers them all."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_REGISTRY))}"
                       + ("" if _REGISTRY else " (none: the data sources register their tasks; "
                          "import mtt_jax.data first)"))
    return _REGISTRY[name]


def registered() -> Mapping[str, TaskSpec]:
    return dict(_REGISTRY)


# --- Losses (inside the step). ----------------------------------------------------------------------

def example_losses(spec: TaskSpec, outputs: jax.Array, labels: jax.Array,
                                      token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-example loss sums and element counts, in f32 whatever the compute dtype.

    Args:
        outputs: ``[B, C]`` logits (classification), ``[B]`` predictions (regression) or ``[B, L, C]``
            token logits (tagging).
        labels: ``[B]`` int or float labels, or ``[B, L]`` token labels.
        token_mask: ``[B, L]`` 1 for real tokens (tagging only).

    Returns:
        ``(loss_sum_B, count_B)``: the task loss is ``sum(loss_sum * m) / sum(count * m)`` for an
        example mask ``m``.
    """
    outputs = outputs.astype(jnp.float32)
    if spec.kind == "classification":
        loss = cross_entropy(outputs, labels)
        return loss, jnp.ones_like(loss)
    if spec.kind == "regression":
        loss = jnp.square(outputs - labels.astype(jnp.float32))
        return loss, jnp.ones_like(loss)
    token_loss_BxL = cross_entropy(outputs, labels) * token_mask
    return token_loss_BxL.sum(-1), token_mask.astype(jnp.float32).sum(-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def masked_mean(loss_sum: jax.Array, count: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the kept examples; 0 (not NaN) when a batch keeps none of them."""
    mask = mask.astype(jnp.float32)
    return (loss_sum * mask).sum() / jnp.maximum((count * mask).sum(), 1.0)


def predictions(spec: TaskSpec, outputs: jax.Array) -> jax.Array:
    """What the host needs for metrics: class ids, or the regression value."""
    if spec.kind == "regression":
        return outputs.astype(jnp.float32)
    return jnp.argmax(outputs, axis=-1).astype(jnp.int32)


# --- Metrics (host, numpy, whole eval set). ---------------------------------------------------------

def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(pred == label)) if label.size else float("nan")


def macro_f1(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in labels or predictions."""
    scores = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (label == c))
        fp = np.sum((pred == c) & (label != c))
        fn = np.sum((pred != c) & (label == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def mse(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(np.square(pred - label)))


def pearson(pred: np.ndarray, label: np.ndarray) -> float:
    if np.std(pred) == 0 or np.std(label) == 0:
        return 0.0
    return float(np.corrcoef(pred, label)[0, 1])


def spearman(pred: np.ndarray, label: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the ranks, ties given their average rank."""
    return pearson(average_ranks(np.asarray(pred, np.float64)), average_ranks(np.asarray(label, np.float64)))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``; tied values all get the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first position of each value
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def f1(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of the positive class 1 (binary tasks; GLUE's F1 for MRPC and QQP); 0 when it has no TP."""
    tp = np.sum((pred == 1) & (label == 1))
    fp = np.sum((pred == 1) & (label != 1))
    fn = np.sum((pred != 1) & (label == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def matthews_corr(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation coefficient (Matthews 1975; GLUE's metric for CoLA), in its multi-class form
    (Gorodkin 2004), which for two classes is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    0 when predictions or labels are constant (the denominator vanishes)."""
    classes, encoded = np.unique(np.concatenate([pred, label]), return_inverse=True)
    pred_ids, label_ids = encoded[:len(pred)], encoded[len(pred):]
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (label_ids, pred_ids), 1)
    n = confusion.sum()
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    covariance = np.trace(confusion) * n - true_counts @ pred_counts
    denominator = np.sqrt((n**2 - pred_counts @ pred_counts) * (n**2 - true_counts @ true_counts))
    return float(covariance / denominator) if denominator else 0.0



def compute_metrics(spec: TaskSpec, pred: np.ndarray, label: np.ndarray,
                                        token_mask: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of one task over the kept eval examples (already filtered by the example mask)."""
    if spec.kind == "tagging":
        keep = token_mask.astype(bool)
        pred, label = pred[keep], label[keep]
    fns: dict[str, Callable[[], float]] = {
            "accuracy": lambda: accuracy(pred, label),
            "token_accuracy": lambda: accuracy(pred, label),
            "macro_f1": lambda: macro_f1(pred, label, spec.num_classes),
            "token_macro_f1": lambda: macro_f1(pred, label, spec.num_classes),
            "mse": lambda: mse(pred, label),
            "pearson": lambda: pearson(pred, label),
            "spearman": lambda: spearman(pred, label),
            "f1": lambda: f1(pred, label),
            "matthews_corr": lambda: matthews_corr(pred, label),
    }
    return {m: fns[m]() for m in spec.metric_names}


def trivial_baseline(spec: TaskSpec, label: np.ndarray,
                                          token_mask: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of the best input-blind predictor: the majority class, or the label mean (whose
    correlations are 0 by definition)."""
    if spec.kind == "tagging":
        label = label[token_mask.astype(bool)]
    if spec.kind == "regression":
        values = {"mse": float(np.var(label)), "pearson": 0.0, "spearman": 0.0}
        return {m: values[m] for m in spec.metric_names}
    majority = np.bincount(label.astype(np.int64), minlength=spec.num_classes).argmax()
    constant = np.full_like(label, majority)
    names = {m: m.removeprefix("token_") for m in spec.metric_names}  # tagging: tokens already kept
    flat = dataclasses.replace(spec, kind="classification", metrics=tuple(names.values()))
    values = compute_metrics(flat, constant, label)
    return {m: values[name] for m, name in names.items()}
