"""Task attention: queries from one task's stream, keys/values from the others.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1) in which the query of task i is computed from
task i's stream and the keys and values from the streams of tasks j != i (``include_self`` adds task i
itself). The result is added residually (pre-LN) to task i's stream. The T x T matrix of attention mass
("how much of task i's attention goes to task j", rows sum to 1) is returned as a diagnostic.

Two layouts:

- `SingleInputTaskAttention`: the T task streams of the same example attend to each other.
- `MultiInputTaskAttention`: each task has its own examples, so task i's positions attend over learned
  per-task memory tokens of the other tasks; no example ever sees another example, and predictions do not
  depend on what else is in the batch. In a flat mixture batch (``query_task_B``) each row's positions
  are queries of that row's task.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.layers import HeadsProjection, attention_logits, head_dim_of, layer_norm, masked_softmax
from mtt_jax.models.partitioning import Dtype, kernel_init


def _task_mask(num_tasks: int, include_self: bool) -> jax.Array:
    """``[T, T]`` boolean: may task i (row) attend to task j (column)."""
    allowed = jnp.ones((num_tasks, num_tasks), bool)
    return allowed if include_self else ~jnp.eye(num_tasks, dtype=bool)


def _memory_logits(q_TxBxLxHxK: jax.Array, k_SxMxHxK: jax.Array) -> jax.Array:
    """``[T, B, L, H, S, M]`` logits of every query against every memory token, computed as the trunk's
    (`attention_logits`: f32 logits, a bf16 backward in a bf16 model).

    Each task's queries meet the memory as one batch ``[B, L, H, K]`` against the memory broadcast over
    B (a few rows per task, so the copy is small). Merging T into the batch would split the sharded
    example axis inside the merged one, which GSPMD cannot express (as in `MultiTaskTransformer`).
    """
    tasks, batch, length, heads, head_dim = q_TxBxLxHxK.shape
    rows = k_SxMxHxK.shape[0] * k_SxMxHxK.shape[1]
    k_BxRxHxK = jnp.broadcast_to(k_SxMxHxK.reshape(1, rows, heads, head_dim), (batch, rows, heads, head_dim))
    logits_TxBxHxLxR = jax.vmap(attention_logits, in_axes=(0, None))(q_TxBxLxHxK, k_BxRxHxK)
    return jnp.swapaxes(logits_TxBxHxLxR, 2, 3).reshape(
        (tasks, batch, length, heads) + k_SxMxHxK.shape[:2])


class SingleInputTaskAttention(nn.Module):
    """Task streams ``[B, T, D]`` of one example attend to each other across tasks."""
    num_heads: int
    include_self: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, streams_BxTxD: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        _, num_tasks, d_model = streams_BxTxD.shape
        head_dim = head_dim_of(d_model, self.num_heads)
        project = lambda name, y: HeadsProjection(self.num_heads, head_dim, dtype=self.dtype, name=name)(y)
        h_BxTxD = layer_norm("ln", self.dtype)(streams_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (project(n, h_BxTxD) for n in ("query", "key", "value"))
        logits_BxHxTxS = attention_logits(q_BxTxHxK, k_BxTxHxK) / jnp.sqrt(head_dim)
        weights_BxHxTxS = masked_softmax(logits_BxHxTxS, _task_mask(num_tasks, self.include_self))
        out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", weights_BxHxTxS.astype(self.dtype), v_BxTxHxK)
        out_BxTxD = HeadsProjection(self.num_heads, head_dim, False, self.dtype, name="out")(out_BxTxHxK)
        out_BxTxD = nn.Dropout(self.dropout_rate)(out_BxTxD, deterministic=not train)
        mass_TxT = weights_BxHxTxS.mean(axis=(0, 1))
        return streams_BxTxD + out_BxTxD, mass_TxT


class MultiInputTaskAttention(nn.Module):
    """Task i's positions ``[T, B, L, D]`` attend over learned memory tokens of the other tasks.

    With ``query_task_B`` the input is one flat mixture batch ``[1, B, L, D]`` whose row b holds an
    example of task ``query_task_B[b]``; the map's row i then averages over the rows of task i.
    """
    num_heads: int
    memory_tokens: int = 4
    include_self: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    num_tasks: int = 0               # 0: the leading axis of the input (required with query_task_B)

    @nn.compact
    def __call__(self, x_TxBxLxD: jax.Array, token_mask_TxBxL: jax.Array, train: bool,
                 query_task_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        d_model = x_TxBxLxD.shape[-1]
        num_tasks = self.num_tasks or x_TxBxLxD.shape[0]
        memory_TxMxD = self.param("memory", kernel_init((None, None, "embed"), nn.initializers.normal(1.0)),
                                  (num_tasks, self.memory_tokens, d_model))
        head_dim = head_dim_of(d_model, self.num_heads)
        project = lambda name, y: HeadsProjection(self.num_heads, head_dim, dtype=self.dtype, name=name)(y)
        q_TxBxLxHxK = project("query", layer_norm("ln", self.dtype)(x_TxBxLxD))
        memory_TxMxD = layer_norm("ln_memory", self.dtype)(memory_TxMxD.astype(self.dtype))
        k_SxMxHxK, v_SxMxHxK = project("key", memory_TxMxD), project("value", memory_TxMxD)
        logits = _memory_logits(q_TxBxLxHxK, k_SxMxHxK) / jnp.sqrt(head_dim)
        shape = logits.shape
        mask_TxS = _task_mask(num_tasks, self.include_self)
        if query_task_B is None:   # query task t = position t of the leading axis
            mask = mask_TxS[:, None, None, None, :, None]
        else:                      # query task of row b = query_task_B[b]
            mask = mask_TxS[query_task_B][None, :, None, None, :, None]
        mask = jnp.broadcast_to(mask, shape).reshape(shape[:4] + (-1,))
        weights = masked_softmax(logits.reshape(shape[:4] + (-1,)), mask).reshape(shape)
        out_TxBxLxHxK = jnp.einsum("tblhsm,smhk->tblhk", weights.astype(self.dtype), v_SxMxHxK)
        out_TxBxLxD = HeadsProjection(self.num_heads, head_dim, False, self.dtype, name="out")(
            out_TxBxLxHxK)
        out_TxBxLxD = nn.Dropout(self.dropout_rate)(out_TxBxLxD, deterministic=not train)
        # Mass over real (non-pad) query positions and heads: rows are tasks i, columns tasks j.
        mass_TxBxLxS = weights.sum(-1).mean(3)
        valid = token_mask_TxBxL.astype(jnp.float32)[..., None]
        if query_task_B is not None:  # group the rows by their task: [1, B, L, S] -> [T, B, L, S]
            of_task_TxB = jax.nn.one_hot(query_task_B, num_tasks, dtype=jnp.float32).T
            valid = valid * of_task_TxB[:, :, None, None]
        mass_TxS = (mass_TxBxLxS * valid).sum((1, 2)) / jnp.maximum(valid.sum((1, 2)), 1.0)
        return x_TxBxLxD + out_TxBxLxD, mass_TxS
