"""The shared Transformer trunk: embedding, positional encoding, N pre-LN blocks, final LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax import sharding
from mtt_jax.models.layers import EncoderBlock, constrain, layer_norm, sinusoidal_positions
from mtt_jax.models.partitioning import Dtype, kernel_init

POSITIONAL = ("sinusoidal", "learned")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class TokenEmbed(nn.Module):
    """Token ids ``[B, L]`` (0 = pad) -> ``[B, L, D]`` with unit-variance channels.

    Initialised N(0, 1/D) and scaled by sqrt(D) (Vaswani et al. 2017, §3.4), so that tokens and the
    sinusoidal positions have the same scale.

    The lookup reads the table whole along ``embed``, as FSDP gathers every weight before use. From a
    table sharded over ``embed`` the looked-up rows come out sharded over ``embed``, and GSPMD can turn
    those into batch-sharded rows only by replicating them on every device ("involuntary full
    rematerialization" with ``mesh.fsdp`` and ``mesh.tensor`` > 1). Inside the data-parallel microbatch
    loop (`sharding.data_is_manual`) the table is read whole along ``vocab`` too: XLA in JAX 0.11.2
    aborts partitioning the vocab-sharded lookup there on a data x fsdp x tensor mesh (a CHECK in
    ``ExpandDeviceGroupsWithIota``), and a whole table is what FSDP gathers for every other weight.
    """
    vocab_size: int
    d_model: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        table = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name="embedding",
                         embedding_init=kernel_init(("vocab", "embed"),
                                                    nn.initializers.normal(self.d_model ** -0.5)))
        axes = (None, None) if sharding.data_is_manual() else ("vocab", None)
        table_VxD = nn.with_logical_constraint(table.embedding, axes).astype(self.dtype)
        return jnp.take(table_VxD, tokens_BxL, axis=0) * jnp.sqrt(self.d_model).astype(self.dtype)


class PatchEmbed(nn.Module):
    """Image ``[B, H, W]`` or ``[B, H, W, C]`` -> non-overlapping patches -> ``[B, HW/p^2, D]``.

    The linear patch embedding of ViT (Dosovitskiy et al. 2021, eq. 1). Pair it with learned positions
    (ViT's choice): unit-scale sinusoids drown the small pixel embeddings early in training (on
    multidigits the loss stays at chance roughly 3x longer).
    """
    patch_size: int
    d_model: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        image_BxHxWxC = image[..., None] if image.ndim == 3 else image
        b, h, w, c = image_BxHxWxC.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"model.patch_size={p}: image {h}x{w} is not divisible into {p}x{p} patches")
        patches = image_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches_BxNxP = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        return _project(patches_BxNxP, self.d_model, self.dtype)


class VectorEmbed(nn.Module):
    """Feature vector ``[B, F]`` -> chunks of ``chunk`` features -> ``[B, F/chunk, D]`` tokens.

    Lets the Transformer read tabular / synthetic regression inputs (the MMoE and GradNorm toys).
    """
    chunk: int
    d_model: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features_BxF: jax.Array) -> jax.Array:
        b, f = features_BxF.shape
        if f % self.chunk:
            raise ValueError(f"model.patch_size={self.chunk}: {f} input features are not divisible "
                             f"into chunks of {self.chunk}")
        chunks_BxNxC = features_BxF.reshape(b, f // self.chunk, self.chunk).astype(self.dtype)
        return _project(chunks_BxNxC, self.d_model, self.dtype)


def _project(x: jax.Array, d_model: int, dtype: Dtype) -> jax.Array:
    return nn.Dense(d_model, dtype=dtype, name="projection", kernel_init=kernel_init((None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))(x)


class PositionalEncoding(nn.Module):
    """Adds sinusoidal (fixed) or learned positional encodings to ``x_BxLxD``."""
    kind: str = "sinusoidal"
    max_length: int = 512

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        length, d_model = x_BxLxD.shape[-2:]
        if length > self.max_length:
            raise ValueError(f"a sequence of {length} positions is longer than the "
                             f"positional table's {self.max_length} rows")
        if self.kind == "sinusoidal":
            table = sinusoidal_positions(self.max_length, d_model)
        elif self.kind == "learned":
            table = self.param("table", kernel_init((None, "embed"), nn.initializers.normal(0.02)),
                               (self.max_length, d_model))
        else:
            raise ValueError(f"positional={self.kind!r}; choose {' or '.join(map(repr, POSITIONAL))}")
        return x_BxLxD + table[:length].astype(x_BxLxD.dtype)


class ScannedBlock(nn.Module):
    """One encoder block as the step of `nn.scan` over layers: ``(x, inputs) -> (x, None)``, with
    ``train`` an attribute, as a scan step takes arrays only."""
    block_cls: type
    block_args: tuple
    train: bool

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, key_mask_BxL: jax.Array | None,
                 task_ids_BxL: jax.Array | None, task_features_TxD: jax.Array | None):
        x_BxLxD = self.block_cls(*self.block_args, name="block")(x_BxLxD, key_mask_BxL, self.train,
                                                                task_ids_BxL, task_features_TxD)
        return x_BxLxD, None


class Trunk(nn.Module):
    """N pre-LN encoder blocks and a final LayerNorm over an embedded sequence ``x_BxLxD``.

    ``scan_layers``: the blocks' parameters are stacked on a leading ``layers`` axis
    (``trunk/blocks/block/...``, replicated) and the blocks run as one `nn.scan`, so XLA compiles
    one block instead of N (MaxText's ``scan_layers``). The same function as the unrolled blocks,
    whose parameters are ``trunk/block_{i}/...`` (tested); compile time falls with N, and the step
    may run slightly slower, as XLA cannot schedule across layers.
    """
    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    remat: str = "none"
    dtype: Dtype = jnp.float32
    ffn: str = "dense"        # or "task_moe" (`mtt_jax.models.moe`)
    num_experts: int = 4
    num_tasks: int = 0
    film: bool = False        # task-conditioned LayerNorms (`mtt_jax.models.layers.TaskFiLM`)
    attention_kernel: str = "auto"   # `mtt_jax.models.layers.dot_product_attention`'s kernel
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, key_mask_BxL: jax.Array | None, train: bool,
                 task_ids_BxL: jax.Array | None = None,
                 task_features_TxD: jax.Array | None = None) -> jax.Array:
        """``task_ids_BxL``: the task of each position (-1: none), read by the task-gated MoE FFN and
        FiLM; ``task_features_TxD``: the task encoder's features, read by FiLM."""
        block_cls = EncoderBlock
        if REMAT_POLICIES[self.remat] is not None:
            block_cls = nn.remat(EncoderBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
        block_args = (self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype, self.ffn,
                      self.num_experts, self.num_tasks, self.film, self.attention_kernel)
        x_BxLxD = nn.Dropout(self.dropout_rate)(constrain(x_BxLxD), deterministic=not train)
        if self.scan_layers:
            blocks = nn.scan(ScannedBlock, variable_axes={"params": 0},
                             split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                             length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxLxD, _ = blocks(block_cls, block_args, train, name="blocks")(
                x_BxLxD, key_mask_BxL, task_ids_BxL, task_features_TxD)
        else:
            for i in range(self.num_layers):
                x_BxLxD = block_cls(*block_args, name=f"block_{i}")(
                    x_BxLxD, key_mask_BxL, train, task_ids_BxL, task_features_TxD)
        return layer_norm("ln_final", self.dtype)(x_BxLxD)
