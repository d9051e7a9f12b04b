"""Task-gated mixture-of-experts feed-forward for the Transformer trunk (``model.ffn = "task_moe"``).

Replaces the dense feed-forward of every block by ``E = model.num_experts`` expert FFNs mixed by a soft
gate, ``FFN(x) = sum_e g_e(x, t) W_o,e gelu(W_i,e x + b_i,e) + b_o,e``. The gate is

    g(x, t) = softmax(W_g x + a_t),

the token-level gate of MMoE (Ma et al., KDD 2018, eq. 8) plus a learned per-task row ``a_t`` of
task-level routing (Kudugunta et al., "Beyond Distillation: Task-level Mixture-of-Experts for Efficient
Inference", Findings of EMNLP 2021), so that each task can claim its own experts while the experts stay
shared. ``t`` is the task a position belongs to: every position of a task's examples in the multi-input
layout, the task token of task ``t`` in the single-input layout; positions of no task (the shared image
patches or feature chunks) use one extra learned "shared" row.

Gating is soft and dense (every expert runs on every position): no capacity, no dropped tokens and no
load-balancing loss, which keeps the step a pure function of the batch and is cheap at the scale of the
offline benchmarks. Each expert has ``mlp_dim // num_experts`` hidden units, so the FFN keeps the
parameter count and FLOPs of the dense one (plus the gate).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.partitioning import Dtype, kernel_init, zeros_init

FFN_KINDS = ("dense", "task_moe")


class TaskMoEFeedForward(nn.Module):
    """``x_BxLxD`` and ``task_ids_BxL`` (int, -1 = no task) -> ``[B, L, D]``."""
    num_experts: int
    mlp_dim: int                  # total hidden units, split evenly over the experts
    num_tasks: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, task_ids_BxL: jax.Array | None, train: bool) -> jax.Array:
        if self.num_experts < 1 or self.mlp_dim < self.num_experts:
            raise ValueError(f"model.num_experts={self.num_experts} must be in [1, mlp_dim={self.mlp_dim}]")
        d_model = x_BxLxD.shape[-1]
        expert_dim = self.mlp_dim // self.num_experts
        # --- Gate: token term + task row ("shared" row for positions of no task). ---
        gate_kernel = self.param("gate_kernel", kernel_init(("embed", None), nn.initializers.normal(0.02)),
                                 (d_model, self.num_experts))
        task_rows = self.param("gate_task", kernel_init((None, None), nn.initializers.normal(0.02)),
                               (self.num_tasks + 1, self.num_experts))
        if task_ids_BxL is None:
            task_ids_BxL = jnp.full(x_BxLxD.shape[:2], -1, jnp.int32)
        rows_BxL = jnp.where(task_ids_BxL < 0, self.num_tasks, task_ids_BxL)
        logits_BxLxE = (jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), gate_kernel)
                        + task_rows[rows_BxL])
        gates_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1).astype(self.dtype)
        # --- Experts, mixed by scaling each expert's hidden units by its gate. ---
        wi = self.param("wi_kernel", kernel_init((None, "embed", "mlp")),
                        (self.num_experts, d_model, expert_dim))
        bi = self.param("wi_bias", zeros_init((None, "mlp")), (self.num_experts, expert_dim))
        wo = self.param("wo_kernel", kernel_init((None, "mlp", "embed")),
                        (self.num_experts, expert_dim, d_model))
        bo = self.param("wo_bias", zeros_init((None, "embed")), (self.num_experts, d_model))
        h_BxLxExM = nn.gelu(jnp.einsum("bld,edm->blem", x_BxLxD.astype(self.dtype), wi.astype(self.dtype))
                            + bi.astype(self.dtype))
        h_BxLxExM = nn.Dropout(self.dropout_rate)(h_BxLxExM, deterministic=not train)
        h_BxLxExM = h_BxLxExM * gates_BxLxE[..., None]
        return (jnp.einsum("blem,emd->bld", h_BxLxExM, wo.astype(self.dtype))
                + jnp.einsum("ble,ed->bld", gates_BxLxE, bo.astype(self.dtype)))
