"""Model FLOPs of one training step, counted per module (in the manner of MaxText's
``calculate_tflops_training_per_device``, attention included).

Only matrix multiplications count (2 FLOPs per multiply-add); LayerNorm, softmax, GELU and the
optimizer are left out, as in MaxText and the PaLM MFU definition (Chowdhery et al. 2022, App. B).
A training step costs 3x the forward pass (forward, and a backward pass of twice its cost). The extra
work of gradient-based weighting methods (per-task gradients, solvers) is not model FLOPs and is not
counted, so MFU is comparable across methods.
"""

from __future__ import annotations

import dataclasses
import math

from mtt_jax.tasks import TaskSpec


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one step, by part; ``training`` is 3x their sum."""
    embedding: float
    projections: float   # attention q, k, v, out and the MLP, all layers
    attention: float     # q k^T and attention x v, all layers
    task_attention: float
    heads: float

    @property
    def forward(self) -> float:
        return self.embedding + self.projections + self.attention + self.task_attention + self.heads

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def training_flops(model_config, tasks: tuple[TaskSpec, ...], layout: str, input_kind: str,
                   input_shape: tuple[int, ...], batch_size: int) -> FlopCount:
    """FLOPs of one step for ``batch_size`` examples (multi-input: per task, so T x batch_size).

    ``model_config`` needs num_layers, d_model, mlp_dim, patch_size, task_encoder, task_attention,
    memory_tokens.
    """
    m = model_config
    d, f, num_tasks = m.d_model, m.mlp_dim, len(tasks)
    if input_kind == "image":
        h, w = input_shape[:2]
        channels = input_shape[2] if len(input_shape) == 3 else 1
        length = (h // m.patch_size) * (w // m.patch_size)
        embed_per_token = 2 * m.patch_size ** 2 * channels * d
    elif input_kind == "vector":
        length = input_shape[0] // m.patch_size
        embed_per_token = 2 * m.patch_size * d
    else:  # token lookup: a gather, no matmul
        length, embed_per_token = input_shape[0], 0
    sequences = batch_size * (num_tasks if layout == "multi" else 1)
    # Single input with the task encoder: the T task tokens join every sequence.
    seq_len = length + (num_tasks if layout == "single" and m.task_encoder else 0)
    tokens = sequences * seq_len
    projections = tokens * m.num_layers * 2 * (4 * d * d + 2 * d * f)
    attention = sequences * m.num_layers * 2 * 2 * seq_len * seq_len * d
    if m.task_attention == "none":
        task_attention = 0.0
    elif layout == "single":  # T streams per example attend to each other
        streams = batch_size * num_tasks
        task_attention = streams * 2 * 4 * d * d + batch_size * 2 * 2 * num_tasks * num_tasks * d
    else:  # every position attends over the memory tokens of all tasks
        memory = num_tasks * m.memory_tokens
        task_attention = tokens * 2 * (2 * d * d + 2 * memory * d) + memory * 2 * 2 * d * d
    heads = 0.0
    for t in tasks:
        per_example = length if t.kind == "tagging" else 1
        heads += batch_size * per_example * 2 * d * t.num_outputs
    embedding = sequences * length * embed_per_token
    return FlopCount(float(embedding), float(projections), float(attention), float(task_attention),
                     float(heads))


def model_flops_utilization(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    return flops_per_step / step_seconds / peak_flops if step_seconds > 0 and peak_flops > 0 else math.nan


# Datasheet dense bf16 peaks per device (FLOP/s), for MFU on accelerators.
DATASHEET_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12,   # SXM, dense
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}
