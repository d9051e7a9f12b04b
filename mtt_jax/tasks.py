"""Task registry: what a task predicts, how it is scored, and how it is trained.

A `TaskSpec` names a task and fixes its kind:

- ``classification``: one label in ``[0, num_classes)`` per example; cross-entropy loss; accuracy and
    macro-F1.
- ``regression``: one real target per example; squared-error loss; MSE and Pearson correlation.
- ``tagging``: one label per input token (pads excluded); token-level cross-entropy; token accuracy and
    token macro-F1.

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


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    num_classes: int = 1  # output width of the head; 1 for regression
    source: str = ""      # the data source that serves the task

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else self.num_classes

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRICS[self.kind]

    @property
    def main_metric(self) -> str:
        return METRICS[self.kind][0]


_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.kind not in KINDS:
        raise ValueError(f"task kind {spec.kind!r} is not one of {KINDS}")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered() -> Mapping[str, TaskSpec]:
    return dict(_REGISTRY)


# --- The offline tasks (mtt_jax.data.multidigits and mtt_jax.data.seqtasks). -----------------------
register(TaskSpec("left_digit", "classification", 10, "multidigits"))
register(TaskSpec("right_digit", "classification", 10, "multidigits"))
register(TaskSpec("majority", "classification", 4, "seqtasks"))
register(TaskSpec("majority_parity", "classification", 2, "seqtasks"))
register(TaskSpec("mean_value", "regression", 1, "seqtasks"))
register(TaskSpec("repeat_tag", "tagging", 2, "seqtasks"))
register(TaskSpec("first_group", "classification", 4, "seqtasks"))
register(TaskSpec("max_value", "classification", 7, "seqtasks"))
register(TaskSpec("distinct_count", "regression", 1, "seqtasks"))
register(TaskSpec("last_group_tag", "tagging", 4, "seqtasks"))


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


METRICS = {
        "classification": ("accuracy", "macro_f1"),
        "regression": ("mse", "pearson"),
        "tagging": ("token_accuracy", "token_macro_f1"),
}


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
    }
    return {m: fns[m]() for m in spec.metric_names}


def trivial_baseline(spec: TaskSpec, label: np.ndarray,
                                          token_mask: np.ndarray | None = None) -> dict[str, float]:
    """The main metric of the best input-blind predictor: the majority class, or the label mean."""
    if spec.kind == "tagging":
        label = label[token_mask.astype(bool)]
    if spec.kind == "regression":
        return {"mse": float(np.var(label)), "pearson": 0.0}
    majority = np.bincount(label.astype(np.int64), minlength=spec.num_classes).argmax()
    return {spec.main_metric: accuracy(np.full_like(label, majority), label)}
