"""Model FLOPs of one training step, counted per module (in the manner of MaxText's
``calculate_tflops_training_per_device``, attention included).

Only matrix multiplications count (2 FLOPs per multiply-add); LayerNorm, softmax, GELU and the
optimizer are left out, as in MaxText and the PaLM MFU definition (Chowdhery et al. 2022, App. B).
A training step costs 3x the forward pass (forward, and a backward pass of twice its cost). The extra
work of gradient-based weighting methods (per-task gradients, solvers) is not model FLOPs and is not
counted, so MFU is comparable across methods.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

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


_ARRAY_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]", re.M)
_OPERAND = r"(?:\w+\[[\d,]*\]\S* )?%?([\w.\-]+)"
_DOT = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(" + _OPERAND + ", " + _OPERAND +
                  r"\).*?lhs_contracting_dims=\{([\d,]*)\}", re.M)


def hlo_matmul_flops(hlo_text: str) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of the ``dot`` instructions in an HLO module's text, keyed by their
    operands' element types (``"bf16 x bf16"``), as the compiler sees the program: a check of
    `training_flops` against the model that was traced, and of which matmuls run in low precision.

    Read the module before optimization (``jax.jit(f).lower(...).compiler_ir("hlo").as_hlo_text()``):
    global shapes, dtypes as traced. A dot inside a loop body counts once, and both branches of a
    conditional count, so count a step without microbatching.
    """
    shapes = {name: (dtype, [int(d) for d in dims.split(",") if d])
              for name, dtype, dims in _ARRAY_INSTRUCTION.findall(hlo_text)}
    by_dtypes: dict[str, float] = collections.Counter()
    for out_dims, lhs, rhs, lhs_contracting in _DOT.findall(hlo_text):
        (lhs_dtype, lhs_dims), (rhs_dtype, _) = shapes[lhs], shapes[rhs]
        contracted = math.prod(lhs_dims[int(i)] for i in lhs_contracting.split(",") if i)
        outputs = math.prod(int(d) for d in out_dims.split(",") if d)
        by_dtypes[f"{lhs_dtype} x {rhs_dtype}"] += 2.0 * outputs * contracted
    return dict(by_dtypes)


def low_precision_share(flops_by_dtypes: dict[str, float]) -> float:
    """The share of matmul FLOPs whose operands are both 16-bit floats (bf16 or f16)."""
    total = sum(flops_by_dtypes.values())
    low = sum(f for key, f in flops_by_dtypes.items()
              if all(t in ("bf16", "f16") for t in key.split(" x ")))
    return low / total if total else math.nan


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
