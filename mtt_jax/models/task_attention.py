"""Task attention: queries from one task's stream, keys/values from the others.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1) in which the query of task i is computed from
task i's stream and the keys and values from the streams of tasks j != i (``include_self`` adds task i
itself). The result is added residually (pre-LN) to task i's stream. The T x T matrix of attention mass
("how much of task i's attention goes to task j", rows sum to 1) is returned as a diagnostic.

Three forms:

- `SingleInputTaskAttention`: the T task streams of the same example attend to each other.
- `MultiInputTaskAttention`: each task has its own examples, so task i's positions attend over learned
  per-task memory tokens of the other tasks; no example ever sees another example, and predictions do not
  depend on what else is in the batch. In a flat mixture batch (``query_task_B``) each row's positions
  are queries of that row's task.
- `AlignedTaskAttention`: multi-input batches whose rows are aligned across tasks (row b of every task's
  sub-batch is the same instance, e.g. several views of one object). Task i's positions of row b attend
  over the other tasks' streams of row b: their positions (with their padding masks), or their
  masked-mean-pooled vectors. Task attention in its most literal form; predictions of row b depend
  on every task's input of row b, and on no other row.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.heads import masked_mean_pool
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


ALIGNED_POOLS = ("positions", "pooled")


class AlignedTaskAttention(nn.Module):
    """Task i's positions ``[T, B, L, D]`` attend over the other tasks' streams of the same row b.

    ``pool = "positions"``: the keys and values of row b are every position of the other tasks' row b
    (their padding masked out), ``T L`` per row; ``"pooled"``: one per task, the masked mean of its
    row b (after the LayerNorm; the projections are affine, so pooling first is pooling the keys).
    Each row is one batched matmul ``[T L] x [T L]`` (or ``[T L] x [T]``) with the example axis B
    leading, so an example-sharded batch needs no communication. A query row with no key it may attend
    to (one task and ``include_self = False``, or the other tasks' row all padding) gets 0 and keeps its
    stream. The map: task i's attention mass on task j, averaged over heads, real query positions and
    rows (rows sum to 1 where task i had keys).
    """
    num_heads: int
    include_self: bool = False
    pool: str = "positions"
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_TxBxLxD: jax.Array, token_mask_TxBxL: jax.Array,
                 train: bool) -> tuple[jax.Array, jax.Array]:
        num_tasks, batch, length, d_model = x_TxBxLxD.shape
        head_dim = head_dim_of(d_model, self.num_heads)
        project = lambda name, y: HeadsProjection(self.num_heads, head_dim, dtype=self.dtype, name=name)(y)
        h_TxBxLxD = layer_norm("ln", self.dtype)(x_TxBxLxD)
        if self.pool == "positions":
            keys_SxBxMxD, key_mask_SxBxM = h_TxBxLxD, token_mask_TxBxL
        else:
            keys_SxBxMxD = jax.vmap(masked_mean_pool)(h_TxBxLxD, token_mask_TxBxL)[:, :, None]
            key_mask_SxBxM = token_mask_TxBxL.any(-1)[:, :, None]
        keys = keys_SxBxMxD.shape[2]
        # [T, B, L, ...] -> [B, T L, ...]: each row's positions of every task, the example axis first.
        rows = lambda y: jnp.swapaxes(y, 0, 1).reshape((batch, -1) + y.shape[3:])
        q_BxQxHxK = rows(project("query", h_TxBxLxD))
        k_BxRxHxK, v_BxRxHxK = rows(project("key", keys_SxBxMxD)), rows(project("value", keys_SxBxMxD))
        logits_BxHxQxR = attention_logits(q_BxQxHxK, k_BxRxHxK) / jnp.sqrt(head_dim)
        allowed_TxS = _task_mask(num_tasks, self.include_self)
        mask_BxTxSxM = allowed_TxS[None, :, :, None] & jnp.swapaxes(key_mask_SxBxM, 0, 1)[:, None]
        mask_Bx1xQxR = jnp.broadcast_to(mask_BxTxSxM[:, :, None], (batch, num_tasks, length, num_tasks, keys)
                                        ).reshape(batch, 1, num_tasks * length, num_tasks * keys)
        weights_BxHxQxR = masked_softmax(logits_BxHxQxR, mask_Bx1xQxR)
        out_BxQxHxK = jnp.einsum("bhqr,brhk->bqhk", weights_BxHxQxR.astype(self.dtype), v_BxRxHxK)
        out_BxQxD = HeadsProjection(self.num_heads, head_dim, False, self.dtype, name="out")(out_BxQxHxK)
        out_TxBxLxD = jnp.swapaxes(out_BxQxD.reshape(batch, num_tasks, length, d_model), 0, 1)
        out_TxBxLxD = nn.Dropout(self.dropout_rate)(out_TxBxLxD, deterministic=not train)
        # Mass over heads and real query positions of every row: rows are tasks i, columns tasks j.
        mass_BxTxLxS = weights_BxHxQxR.mean(1).reshape(batch, num_tasks, length, num_tasks, keys).sum(-1)
        valid_BxTxL = jnp.swapaxes(token_mask_TxBxL, 0, 1).astype(jnp.float32)
        mass_TxS = ((mass_BxTxLxS * valid_BxTxL[..., None]).sum((0, 2))
                    / jnp.maximum(valid_BxTxL.sum((0, 2)), 1.0)[:, None])
        return x_TxBxLxD + out_TxBxLxD, mass_TxS
