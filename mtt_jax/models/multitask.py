"""The multi-task Transformer: shared trunk, task encoder, task attention, per-task heads.

The forward pass is split in two so that tests and diagnostics can act on the task streams directly:

- `encode`: inputs -> task streams. single-input: ``streams_BxTxD`` (one vector per task and example;
  with ``readout = "attention_pool"`` the positions the pool reads: ``x_BxNxD``, or ``x_BxTxNxD`` with
  one trunk pass per task); multi-input: ``(x_TxBxLxD, token_mask_TxBxL)`` (every position of every
  task's examples); a flat mixture batch of the multi-input model (``task_id`` given): ``(x_BxLxD,
  token_mask_BxL, task_id_B)``, each row with its own task's features, as in `encode_task`.
- `decode`: task streams -> task attention (optional) -> per-task read-out and heads. The read-out
  (``readout``): "mean", today's (the masked mean of the positions; single-input task tokens are read
  directly), "attention_pool", a learned query per task over the positions (`TaskAttentionPool`;
  single-input: the input's positions, not the task tokens), or "cls" (multi-input), the first
  position, BERT's [CLS], through BERT's pooler when ``cls_pooler`` (`Pooler`, shared by the tasks, as
  in MT-DNN). Read-out parameters live in `decode`, so they belong to the task side of
  `mtt_jax.task_grads`, and train under ``optimizer.freeze="encoder"``.

The multi-input and flat forms share every parameter, so a model trained on flat mixtures is scored on
the multi-input eval batches, and row i of a flat batch gets exactly what slice ``task_id[i]`` of the
multi-input forward gives its example (tested).

``task_attention = "none"`` is the hard-parameter-sharing baseline: task i's outputs then depend on task
i's stream only. ``"cross"``: single-input, the task streams of one example attend to each other;
multi-input, every task's positions attend over learned memory tokens (`task_attention`).
``"aligned"`` (multi-input sources whose rows are aligned across tasks, not flat mixture batches):
task i's positions of row b attend over the other tasks' streams of row b, so task i's outputs of row b
depend on every task's input of row b (`decode_mixes_tasks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.adapters import frozen
from mtt_jax.models.heads import (READOUTS, Pooler, TaskAttentionPool, TaskHead, first_position,
                                   masked_mean_pool)
from mtt_jax.models.partitioning import Dtype
from mtt_jax.models.task_attention import (ALIGNED_POOLS, AlignedTaskAttention, MultiInputTaskAttention,
                                           SingleInputTaskAttention)
from mtt_jax.models.task_encoder import TaskEncoder, add_task_features, prepend_task_tokens
from mtt_jax.models.trunk import PatchEmbed, PositionalEncoding, TokenEmbed, Trunk, VectorEmbed
from mtt_jax.specs import InputSpec
from mtt_jax.tasks import TaskSpec

TASK_ATTENTION = ("none", "cross", "aligned")
# How task t's features (`TaskEncoder`) enter the trunk; True is the layout's own form ("tokens" for
# single-input, "add" for multi-input), False is "none" (`task_encoder_form`).
TASK_ENCODERS = ("tokens", "add", "none")
Streams = Any


class MultiTaskTransformer(nn.Module):
    tasks: tuple[TaskSpec, ...]
    layout: str                      # "single" or "multi"
    input_spec: InputSpec
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    dropout_rate: float = 0.0
    patch_size: int = 2
    positional: str = "sinusoidal"
    task_encoder: bool | str = True   # True, False or one of TASK_ENCODERS (`task_encoder_form`)
    task_encoder_init_std: float = 0.02  # the task features' initial scale (`TaskEncoder.init_std`)
    task_attention: str = "cross"
    task_attention_self: bool = False
    task_attention_pool: str = "positions"  # aligned: keys are the other tasks' positions, or "pooled"
    memory_tokens: int = 4
    readout: str = "mean"            # or "attention_pool": a learned query per task (`TaskAttentionPool`),
    #                                  or "cls": the first position (multi-input; BERT's [CLS])
    cls_pooler: bool = False         # readout="cls": through BERT's pooler, Dense + tanh (`Pooler`)
    remat: str = "none"
    dtype: Dtype = jnp.float32
    ffn: str = "dense"               # or "task_moe": task-gated MoE feed-forward (`mtt_jax.models.moe`)
    num_experts: int = 4
    film: bool = False               # task-conditioned LayerNorms in every block (needs task_encoder)
    attention_kernel: str = "auto"   # auto | cudnn | xla | einsum (`layers.dot_product_attention`)
    scan_layers: bool = False        # the trunk's blocks as one nn.scan over stacked parameters
    # For pretrained checkpoints (`mtt_jax.models.pretrained`); the defaults are the from-scratch model.
    norm_position: str = "pre"       # or "post": LN(x + f(x)) blocks, no final LayerNorm (BERT)
    token_types: int = 0             # token inputs: segment embeddings (BERT: 2); 0: none
    embed_norm: bool = False         # a LayerNorm over the summed embeddings (BERT)
    embed_scale: bool = True         # token embeddings times sqrt(d_model); BERT: False
    gelu: str = "tanh"               # or "exact" (erf; BERT, ViT)
    layer_norm_eps: float = 1e-6     # the trunk's LayerNorms (BERT, ViT: 1e-12)
    # Parameter-efficient modules (`mtt_jax.models.adapters`): "task" or "hyper" adapters in every block.
    adapters: str = "none"
    adapter_dim: int = 64            # the adapters' bottleneck
    adapter_hyper_dim: int = 8       # "hyper": the task embedding the generators read
    freeze_encoder: bool = False     # optimizer.freeze="encoder": no gradients for the frozen encoder

    def setup(self):
        # A frozen encoder's modules read their parameters through stop_gradient (`adapters.frozen`).
        encoder = frozen if self.freeze_encoder else lambda module_cls: module_cls
        if self.input_spec.kind == "image":
            self.embed = encoder(PatchEmbed)(self.patch_size, self.d_model, self.dtype)
        elif self.input_spec.kind == "vector":
            self.embed = encoder(VectorEmbed)(self.patch_size, self.d_model, self.dtype)
        else:
            self.embed = encoder(TokenEmbed)(self.input_spec.vocab_size, self.d_model, self.dtype,
                                             self.embed_scale)
        # At least 512 rows, the size of the learned table in existing checkpoints.
        token_types = self.token_types if self.input_spec.kind == "tokens" else 0
        self.positions = encoder(PositionalEncoding)(self.positional,
                                            max(512, num_positions(self.input_spec, self.patch_size)),
                                            token_types, self.input_spec.separator_id, self.embed_norm,
                                            self.layer_norm_eps, self.dtype)
        check_film(self.film, self.task_encoder)
        if self._task_encoder != "none":
            self.task_features = TaskEncoder(len(self.tasks), self.d_model, self.dtype,
                                             self.task_encoder_init_std)
        self.trunk = encoder(Trunk)(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                                    self.remat, self.dtype, self.ffn, self.num_experts, len(self.tasks),
                                    self.film, self.attention_kernel, self.scan_layers, self.norm_position,
                                    self.gelu, self.layer_norm_eps, self.adapters, self.adapter_dim,
                                    self.adapter_hyper_dim)
        check_task_attention(self.task_attention, self.layout, self.task_attention_pool)
        kwargs = dict(num_heads=self.num_heads, include_self=self.task_attention_self,
                      dropout_rate=self.dropout_rate, dtype=self.dtype)
        if self.task_attention == "cross":
            self.cross_task = (SingleInputTaskAttention(**kwargs) if self.layout == "single"
                               else MultiInputTaskAttention(memory_tokens=self.memory_tokens,
                                                            num_tasks=len(self.tasks), **kwargs))
        elif self.task_attention == "aligned":
            self.cross_task = AlignedTaskAttention(pool=self.task_attention_pool, **kwargs)
        check_readout(self.readout, self.layout, self.cls_pooler)
        if self.readout == "attention_pool":
            self.readout_pool = TaskAttentionPool(len(self.tasks), self.num_heads, self.dtype)
        if self.cls_pooler:
            self.pooler = Pooler(self.dtype)
        self.heads = {t.name: TaskHead(t, self.dtype, name=f"head_{t.name}") for t in self.tasks}

    def __call__(self, inputs: jax.Array, train: bool = False, task_id: jax.Array | None = None):
        return self.decode(self.encode(inputs, train, task_id), train)

    def encode(self, inputs: jax.Array, train: bool = False, task_id: jax.Array | None = None) -> Streams:
        """``task_id int[B]``: ``inputs [B, L]`` is a flat mixture batch of the multi-input model."""
        if self.layout == "single":
            if task_id is not None:
                raise ValueError("flat mixture batches (task_id) need the multi-input layout")
            return self._encode_single(inputs, train)
        if task_id is not None:
            return self.encode_task(inputs, task_id, train), inputs != 0, task_id
        return self._encode_multi(inputs, train)

    def decode(self, streams: Streams, train: bool = False) -> tuple[dict[str, jax.Array], dict]:
        """Returns ``({task: output}, aux)``; aux holds ``task_attention`` (the T x T mass) if on.
        single-input: read-out (the attention pools, if on), task attention, heads; multi-input: task
        attention, read-out, heads."""
        aux = {}
        if self.layout == "single":
            streams_BxTxD = self._pool_single(streams) if self.readout == "attention_pool" else streams
            if self.task_attention == "cross":
                streams_BxTxD, aux["task_attention"] = self.cross_task(streams_BxTxD, train)
            outputs = {t.name: self.heads[t.name](streams_BxTxD[:, i]) for i, t in enumerate(self.tasks)}
            return outputs, aux
        if len(streams) == 3:  # a flat mixture batch: every head reads every row (losses mask them)
            x_BxLxD, token_mask_BxL, task_id_B = streams
            if self.task_attention == "aligned":
                raise ValueError("model.task_attention='aligned' needs every task's sub-batch of the same "
                                 "rows; a flat mixture batch's rows are independent examples")
            if self.task_attention == "cross":
                x_1xBxLxD, aux["task_attention"] = self.cross_task(
                    x_BxLxD[None], token_mask_BxL[None], train, query_task_B=task_id_B)
                x_BxLxD = x_1xBxLxD[0]
            outputs = {t.name: self._read_out(i, t, x_BxLxD, token_mask_BxL)
                       for i, t in enumerate(self.tasks)}
            return outputs, aux
        x_TxBxLxD, token_mask_TxBxL = streams
        if self.task_attention in ("cross", "aligned"):
            x_TxBxLxD, aux["task_attention"] = self.cross_task(x_TxBxLxD, token_mask_TxBxL, train)
        outputs = {t.name: self._read_out(i, t, x_TxBxLxD[i], token_mask_TxBxL[i])
                   for i, t in enumerate(self.tasks)}
        return outputs, aux

    def _read_out(self, index: int, task: TaskSpec, x_BxLxD: jax.Array,
                  token_mask_BxL: jax.Array) -> jax.Array:
        """Task head on every position (tagging), or on the real positions pooled: their mean, task
        ``index``'s attention pool, or the first position ([CLS]; through the pooler if on)."""
        if task.kind == "tagging":
            features = x_BxLxD
        elif self.readout == "attention_pool":
            features = self.readout_pool(x_BxLxD, token_mask_BxL, index)
        elif self.readout == "cls":
            features = first_position(x_BxLxD)
            features = self.pooler(features) if self.cls_pooler else features
        else:
            features = masked_mean_pool(x_BxLxD, token_mask_BxL)
        return self.heads[task.name](features)

    def _pool_single(self, x: jax.Array) -> jax.Array:
        """single-input positions -> ``[B, T, D]``: each task's attention pool over the shared positions
        ``x_BxNxD``, or over its own pass's ``x_BxTxNxD[:, t]``."""
        per_task = x.ndim == 4
        return jnp.stack([self.readout_pool(x[:, t] if per_task else x, None, t)
                          for t in range(len(self.tasks))], axis=1)

    def encode_task(self, tokens_BxL: jax.Array, task_index: jax.Array,
                    train: bool = False) -> jax.Array:
        """Multi-input, examples ``[B, L]`` of task ``task_index`` (a scalar, or ``[B]``: one task per
        row, a flat mixture batch) -> ``[B, L, D]``; ``task_index`` may be traced.

        Equal to slice ``task_index`` of `encode`; it lets the step ``vmap`` the trunk over the task
        axis with one parameter copy per task, which yields every task's gradient in one backward pass.
        """
        token_mask_BxL = tokens_BxL != 0
        x_BxLxD = self.embed_inputs(tokens_BxL)
        task_index = jnp.asarray(task_index, jnp.int32)
        features_TxD = self.task_features() if self._task_encoder != "none" else None
        if features_TxD is not None:
            features = features_TxD[task_index].astype(x_BxLxD.dtype)     # [D] or [B, D]
            x_BxLxD = x_BxLxD + (features[:, None] if task_index.ndim else features)
        task_ids_BxL = None
        if self._needs_task_ids:
            task_ids_BxL = jnp.broadcast_to(task_index[..., None], tokens_BxL.shape)
        return self.trunk(x_BxLxD, token_mask_BxL, train, task_ids_BxL, features_TxD)

    def embed_inputs(self, inputs: jax.Array) -> jax.Array:
        """Inputs -> ``[..., L, D]``: the embedding plus positions (and, when on, BERT's token types and
        embedding LayerNorm: `PositionalEncoding`), before any task features are added."""
        tokens = inputs if self.input_spec.kind == "tokens" else None
        return self.positions(self.embed(inputs), tokens)

    @property
    def _task_encoder(self) -> str:
        """The task encoder's form in this layout: "tokens", "add" or "none" (`task_encoder_form`)."""
        return task_encoder_form(self.task_encoder, self.layout)

    @property
    def decode_mixes_tasks(self) -> bool:
        """Whether task t's loss reads other tasks' multi-input streams (aligned task attention), so the
        per-task gradients cannot be read off one backward pass (`mtt_jax.task_grads`)."""
        return self.layout == "multi" and self.task_attention == "aligned"

    @property
    def _needs_task_ids(self) -> bool:
        """Whether the blocks read the task of each position (the task-gated MoE FFN, FiLM, adapters)."""
        return self.ffn == "task_moe" or self.film or self.adapters != "none"

    def _encode_single(self, inputs: jax.Array, train: bool) -> jax.Array:
        """One shared sequence per example (image patches or feature chunks); each task's stream is its
        task token (or the mean output; with ``task_encoder = "add"``, the mean output of its own pass,
        `_encode_single_per_task`). With ``readout = "attention_pool"``: the input's positions (of
        each task's pass), which `decode` pools."""
        num_tasks = len(self.tasks)
        x_BxNxD = self.embed_inputs(inputs)
        pool = self.readout == "attention_pool"   # decode pools the positions
        if self._task_encoder == "add":
            x_BxTxNxD = self._encode_single_per_task(x_BxNxD, train)
            return x_BxTxNxD if pool else x_BxTxNxD.mean(axis=2)
        if self._task_encoder == "tokens":
            features_TxD = self.task_features()
            x_BxLxD = prepend_task_tokens(x_BxNxD, features_TxD)
            task_ids_BxL = None
            if self._needs_task_ids:  # task token t belongs to task t; patches to none (-1)
                ids_L = jnp.concatenate([jnp.arange(num_tasks, dtype=jnp.int32),
                                         jnp.full((x_BxNxD.shape[1],), -1, jnp.int32)])
                task_ids_BxL = jnp.broadcast_to(ids_L, x_BxLxD.shape[:2])
            x_BxLxD = self.trunk(x_BxLxD, None, train, task_ids_BxL, features_TxD)
            return x_BxLxD[:, num_tasks:] if pool else x_BxLxD[:, :num_tasks]
        x_BxNxD = self.trunk(x_BxNxD, None, train)
        if pool:
            return x_BxNxD
        pooled_BxD = x_BxNxD.mean(axis=1)
        return jnp.broadcast_to(pooled_BxD[:, None], (pooled_BxD.shape[0], num_tasks, self.d_model))

    def _encode_single_per_task(self, x_BxNxD: jax.Array, train: bool) -> jax.Array:
        """The additive single-input form (``task_encoder = "add"``): task t's features are added to
        every position of the shared sequence and the trunk runs once per task, ``[B, N, D] ->
        [B, T, N, D]``. The T passes are one trunk call over ``B T`` sequences, example-major (as in
        `_encode_multi`); each is the pass `encode_task` makes for task t. Cost: T times the trunk's
        FLOPs and activation memory (the embedding runs once), where task tokens cost T extra positions
        of one pass (`mtt_jax.perf.flops.training_flops` counts both).
        """
        batch, length, d_model = x_BxNxD.shape
        num_tasks = len(self.tasks)
        features_TxD = self.task_features()
        x_BxTxNxD = x_BxNxD[:, None] + features_TxD[None, :, None].astype(x_BxNxD.dtype)
        task_ids = None
        if self._needs_task_ids:  # every position of pass t belongs to task t
            task_ids = jnp.broadcast_to(jnp.arange(num_tasks, dtype=jnp.int32)[None, :, None],
                                        (batch, num_tasks, length)).reshape(batch * num_tasks, length)
        x = self.trunk(x_BxTxNxD.reshape(batch * num_tasks, length, d_model), None, train, task_ids,
                       features_TxD)
        return x.reshape(batch, num_tasks, length, d_model)

    def _encode_multi(self, tokens_TxBxL: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        """Each task's own examples, with that task's features added at every position.

        The trunk sees the T x B sequences example-major (``[B * T, L, D]``): with the example axis B
        sharded over the data-parallel devices, the merged axis stays sharded (each device holds
        whole rows of it). Task-major (``[T * B, ...]``) would split the sharded axis inside the merged
        one, which GSPMD cannot express, so every device would compute the whole batch.
        """
        num_tasks, batch, length = tokens_TxBxL.shape
        token_mask_TxBxL = tokens_TxBxL != 0
        x_TxBxLxD = self.embed_inputs(tokens_TxBxL)
        features_TxD = self.task_features() if self._task_encoder != "none" else None
        if features_TxD is not None:
            x_TxBxLxD = add_task_features(x_TxBxLxD, features_TxD)
        to_rows = lambda y: jnp.swapaxes(y, 0, 1).reshape((batch * num_tasks,) + y.shape[2:])
        task_ids = None
        if self._needs_task_ids:
            task_ids = to_rows(jnp.broadcast_to(jnp.arange(num_tasks, dtype=jnp.int32)[:, None, None],
                                                (num_tasks, batch, length)))
        x = self.trunk(to_rows(x_TxBxLxD), to_rows(token_mask_TxBxL), train, task_ids, features_TxD)
        x_TxBxLxD = nn.with_logical_constraint(
            jnp.swapaxes(x.reshape(batch, num_tasks, length, self.d_model), 0, 1),
            ("task", "batch", "length", "embed"))
        return x_TxBxLxD, token_mask_TxBxL


def check_task_attention(task_attention: str, layout: str, pool: str = "positions") -> None:
    """A one-line ValueError for a task attention the layout cannot run (whether a source's rows are
    aligned is the data's to say: `mtt_jax.run.config_check` and `mtt_jax.builder` ask it)."""
    if task_attention not in TASK_ATTENTION:
        raise ValueError(f"model.task_attention={task_attention!r}; choose one of {TASK_ATTENTION}")
    if task_attention == "aligned" and layout != "multi":
        raise ValueError("model.task_attention='aligned' attends across the tasks' sub-batches of the "
                         "multi-input layout; single-input task streams use 'cross'")
    if pool not in ALIGNED_POOLS:
        raise ValueError(f"model.task_attention_pool={pool!r}; choose one of {ALIGNED_POOLS}")


def task_encoder_form(task_encoder: bool | str, layout: str) -> str:
    """``model.task_encoder`` in ``layout`` ("single" or "multi") as one of `TASK_ENCODERS`.

    - "tokens" (single-input; True there): one task token per task prepended to the shared sequence,
      one pass; task t's stream is the trunk's output at token t.
    - "add": task t's features added to every input position. multi-input (True there): every example
      belongs to one task, so the pass is the one the examples get anyway. single-input: one
      conditioned pass per task (`MultiTaskTransformer._encode_single_per_task`).
    - "none" (False): the plain shared trunk.

    A one-line ValueError for another value, and for "tokens" in the multi-input layout, whose examples
    have no shared sequence to prepend task tokens to.
    """
    if isinstance(task_encoder, bool):
        return ("tokens" if layout == "single" else "add") if task_encoder else "none"
    if task_encoder not in TASK_ENCODERS:
        raise ValueError(f"model.task_encoder={task_encoder!r}; choose True, False or one of "
                         f"{', '.join(TASK_ENCODERS)}")
    if task_encoder == "tokens" and layout != "single":
        raise ValueError("model.task_encoder='tokens' prepends task tokens to the shared sequence of the "
                         "single-input layout; multi-input examples get their task's features added: "
                         "use 'add' (or True)")
    return task_encoder


def check_readout(readout: str, layout: str = "multi", pooler: bool = False) -> None:
    """A one-line ValueError for a read-out the layout cannot run. "cls" reads the first position of
    each example's own sequence (BERT's [CLS]), which only multi-input examples have: single-input task
    streams are already one vector per task (their task tokens)."""
    if readout not in READOUTS:
        raise ValueError(f"model.readout={readout!r}; choose one of {', '.join(READOUTS)}")
    if readout == "cls" and layout != "multi":
        raise ValueError("model.readout='cls' reads the first position ([CLS]) of each example's token "
                         "sequence in the multi-input layout; single-input task tokens are read directly "
                         "by 'mean'")
    if pooler and readout != "cls":
        raise ValueError(f"model.pooler=True is BERT's pooler on the first position; set "
                         f"model.readout='cls' (it is {readout!r})")


def check_film(film: bool, task_encoder: bool | str) -> None:
    """FiLM conditions the blocks on the task encoder's features, so it needs the task encoder."""
    if film and task_encoder in (False, "none"):
        raise ValueError("model.film=True conditions the blocks on the task encoder's features; "
                         "set model.task_encoder=True")


def num_positions(input_spec: InputSpec, patch_size: int) -> int:
    """Length of the embedded sequence that gets positions: the patches of an image, the chunks of a
    feature vector, the tokens of a token sequence. Task tokens are prepended after the positions are
    added, and memory tokens live in task attention, so neither needs a row of the table."""
    if input_spec.kind == "image":
        height, width = input_spec.shape[:2]
        return (height // patch_size) * (width // patch_size)
    if input_spec.kind == "vector":
        return input_spec.shape[0] // patch_size
    return input_spec.shape[0]


def build_model(config, tasks: tuple[TaskSpec, ...], layout: str, input_spec: InputSpec,
                dtype: Dtype = jnp.float32) -> MultiTaskTransformer:
    """The model a config describes (``config.model.*``)."""
    m = config.model
    if m.vocab_size and input_spec.kind == "tokens":
        if m.vocab_size < input_spec.vocab_size:
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the data's "
                             f"vocabulary of {input_spec.vocab_size}")
        input_spec = dataclasses.replace(input_spec, vocab_size=m.vocab_size)
    return MultiTaskTransformer(
        tasks=tasks, layout=layout, input_spec=input_spec, num_layers=m.num_layers, d_model=m.d_model,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout_rate=m.dropout_rate, patch_size=m.patch_size,
        positional=m.positional, task_encoder=m.task_encoder,
        task_encoder_init_std=m.get("task_encoder_init_std", 0.02), task_attention=m.task_attention,
        task_attention_self=m.task_attention_self, task_attention_pool=m.task_attention_pool,
        memory_tokens=m.memory_tokens, readout=m.readout, cls_pooler=m.get("pooler", False), remat=m.remat,
        dtype=dtype, ffn=m.ffn, num_experts=m.num_experts, film=m.film, attention_kernel=config.attention_kernel,
        scan_layers=m.scan_layers, **pretrained_options(m),
        freeze_encoder=config.optimizer.get("freeze", "none") == "encoder")


PRETRAINED_OPTIONS = {"norm_position": "pre", "token_types": 0, "embed_norm": False, "embed_scale": True,
                      "gelu": "tanh", "layer_norm_eps": 1e-6, "adapters": "none", "adapter_dim": 64,
                      "adapter_hyper_dim": 8}


def pretrained_options(model_config) -> dict:
    """The trunk's options for pretrained checkpoints and adapters in ``config.model``, their defaults
    where a config (an older run's) lacks them."""
    return {name: model_config.get(name, default) for name, default in PRETRAINED_OPTIONS.items()}
