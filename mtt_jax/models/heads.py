"""Per-task output heads, chosen by task kind (`mtt_jax.tasks.KINDS`), and the read-outs that turn the
trunk's positions into one vector per task: the masked mean (``model.readout = "mean"``), a learned
attention pool per task (``"attention_pool"``, `TaskAttentionPool`), or the first position, BERT's
[CLS] (``"cls"``), optionally through BERT's pooler (``model.pooler``, `Pooler`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.layers import attention_logits, head_dim_of, masked_softmax
from mtt_jax.models.partitioning import Dtype, kernel_init, zeros_init
from mtt_jax.tasks import TaskSpec

READOUTS = ("mean", "attention_pool", "cls")


class TaskHead(nn.Module):
    """Linear read-out of one task.

    classification: ``[B, D] -> [B, C]`` logits; regression: ``[B, D] -> [B]``; tagging:
    ``[B, L, D] -> [B, L, C]`` token logits. Outputs are f32 so that losses are computed in f32.
    """
    spec: TaskSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        out = nn.Dense(self.spec.num_outputs, dtype=self.dtype, name="dense",
                       kernel_init=zeros_init(("embed", None)), bias_init=zeros_init((None,)))(features)
        out = out.astype(jnp.float32)
        return out[..., 0] if self.spec.kind == "regression" else out


def masked_mean_pool(x_BxLxD: jax.Array, token_mask_BxL: jax.Array) -> jax.Array:
    """Mean over the real (non-pad) positions of each sequence."""
    weights = token_mask_BxL.astype(x_BxLxD.dtype)[..., None]
    return (x_BxLxD * weights).sum(1) / jnp.maximum(weights.sum(1), 1)


def first_position(x_BxLxD: jax.Array) -> jax.Array:
    """The output at the first position, where BERT's tokenizer puts [CLS] (``readout = "cls"``)."""
    return x_BxLxD[:, 0]


class Pooler(nn.Module):
    """BERT's pooler (Devlin et al. 2019, §3; `BertPooler` in Hugging Face's port): ``tanh(W x + b)`` of
    the first position's output, ``[B, D] -> [B, D]``, shared by the tasks; MT-DNN's heads read it (Liu
    et al. 2019, §3.1: the [CLS] vector). A checkpoint's ``pooler.dense`` fills it
    (`mtt_jax.models.pretrained`)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        return jnp.tanh(nn.Dense(x_BxD.shape[-1], dtype=self.dtype, name="dense",
                                 kernel_init=kernel_init(("embed", "mlp")),
                                 bias_init=zeros_init(("mlp",)))(x_BxD))


class TaskAttentionPool(nn.Module):
    """Task t's vector: its learned query attends over the trunk's final outputs ``x_BxLxD``.

    Pooling by attention with one learned seed vector per task (the PMA of the Set Transformer, Lee et
    al., ICML 2019, §3.2), without projections, so that the read-out is a weighted mean of the
    positions: per head h (channels ``h K .. (h + 1) K``), ``pooled_h = sum_l a_l x_{l,h}`` with
    ``a = softmax_l(q_{t,h} . x_{l,h} / sqrt(K))`` over the real positions (``token_mask_BxL``; None:
    all). The queries start at 0, i.e. at the masked mean (``readout = "mean"``); all that is
    task-specific is where each task looks, which separates a task-specific read-out from conditioning
    inside the trunk. Cost per task and example: ``4 L D`` FLOPs (logits and the weighted sum).
    """
    num_tasks: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, token_mask_BxL: jax.Array | None, task: int) -> jax.Array:
        batch, length, d_model = x_BxLxD.shape
        head_dim = head_dim_of(d_model, self.num_heads)
        query_TxHxK = self.param("query", zeros_init((None, "heads", "kv")),
                                 (self.num_tasks, self.num_heads, head_dim))
        x_BxLxHxK = x_BxLxD.reshape(batch, length, self.num_heads, head_dim).astype(self.dtype)
        q_Bx1xHxK = jnp.broadcast_to(query_TxHxK[task].astype(self.dtype),
                                     (batch, 1, self.num_heads, head_dim))
        logits_BxHx1xL = attention_logits(q_Bx1xHxK, x_BxLxHxK) / jnp.sqrt(head_dim)
        if token_mask_BxL is None:
            weights_BxHx1xL = jax.nn.softmax(logits_BxHx1xL, axis=-1)
        else:
            weights_BxHx1xL = masked_softmax(logits_BxHx1xL, token_mask_BxL[:, None, None, :])
        pooled_Bx1xHxK = jnp.einsum("bhql,blhk->bqhk", weights_BxHx1xL.astype(self.dtype), x_BxLxHxK)
        return pooled_Bx1xHxK.reshape(batch, d_model)
