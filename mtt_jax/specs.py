"""What a batch looks like, at the bottom of the layers: the two batch layouts, the example axis of a batch
leaf, and the per-example input (`InputSpec`).

Data sources produce batches in these layouts (`mtt_jax.data.base`), the model reads `InputSpec`, and the
sharding and the microbatch split cut batches along `example_axis`. This module imports nothing from
mtt_jax.
"""

from __future__ import annotations

import dataclasses

# ``"single"`` (single-input): every example carries a label for every task, ``inputs [B, ...]``.
# ``"multi"`` (multi-input): each task has its own examples on a leading task axis, ``inputs [T, b, ...]``.
# (Flat mixture batches, layout ``"flat"``, are single-input shaped: one task per row, `task_id [B]`.)
LAYOUTS = ("single", "multi")


def example_axis(field: str, layout: str) -> int:
    """The axis that indexes the examples in a batch's leaves under ``field`` ("inputs", "labels", "mask",
    "task_id"): 1 for the inputs of the multi-input layout (behind the task axis), else 0."""
    return 1 if layout == "multi" and field == "inputs" else 0


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Per-example input: ``kind`` "image" with ``shape`` (H, W) or (H, W, C), "tokens" with ``shape``
    (L,), or "vector" with ``shape`` (F,) (features; the model reads chunks of ``model.patch_size``)."""

    kind: str
    shape: tuple[int, ...]
    vocab_size: int = 0  # tokens only; id 0 is padding
    separator_id: int = 2  # tokens only: the tokenizer's [SEP], which token-type embeddings count
