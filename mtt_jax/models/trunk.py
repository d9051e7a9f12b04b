"""The shared Transformer trunk: embedding, positional encoding, N pre-LN blocks, final LayerNorm.

Options for pretrained checkpoints (`mtt_jax.models.pretrained`), off by default: post-LN blocks without
the final LayerNorm (BERT), token-type embeddings, no sqrt(D) scale on the token embeddings, exact GELU,
the LayerNorm epsilon."""

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
    sinusoidal positions have the same scale. ``scale = False`` reads the table as it is, as BERT does
    (Devlin et al. 2019), whose learned positions and token types are on the table's own scale.

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
    scale: bool = True

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        table = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype, name="embedding",
                         embedding_init=kernel_init(("vocab", "embed"),
                                                    nn.initializers.normal(self.d_model ** -0.5)))
        axes = (None, None) if sharding.data_is_manual() else ("vocab", None)
        table_VxD = nn.with_logical_constraint(table.embedding, axes).astype(self.dtype)
        x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0)
        return x_BxLxD * jnp.sqrt(self.d_model).astype(self.dtype) if self.scale else x_BxLxD


def token_type_ids(tokens_BxL: jax.Array, separator_id: int, num_types: int) -> jax.Array:
    """The segment of every token of ``[CLS] a [SEP] b [SEP]`` (Devlin et al. 2019, §3): 0 up to and
    including the first separator, 1 after it (at most ``num_types - 1``), 0 at the pads, as BERT's
    tokenizers emit them. Read off the token ids, so the batches need no second input."""
    is_separator_BxL = (tokens_BxL == separator_id).astype(jnp.int32)
    separators_before_BxL = jnp.cumsum(is_separator_BxL, axis=-1) - is_separator_BxL
    return jnp.minimum(separators_before_BxL, num_types - 1) * (tokens_BxL != 0)


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
    """Adds sinusoidal (fixed) or learned positional encodings to ``x_BxLxD``.

    For BERT-family checkpoints (Devlin et al. 2019, §3, fig. 2), the rest of BERT's embedding sum lives
    here too, off by default: ``token_types`` segment embeddings (E_A, E_B; the segments are
    `token_type_ids` of ``tokens_BxL``), and ``norm``, a LayerNorm over the sum. They are shared encoder
    parameters like the positions (``positions/token_types``, ``positions/norm``).
    """
    kind: str = "sinusoidal"
    max_length: int = 512
    token_types: int = 0
    separator_id: int = 2
    norm: bool = False
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, tokens_BxL: jax.Array | None = None) -> jax.Array:
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
        x_BxLxD = x_BxLxD + table[:length].astype(x_BxLxD.dtype)
        if self.token_types and tokens_BxL is not None:
            types_SxD = self.param("token_types", kernel_init((None, "embed"), nn.initializers.normal(0.02)),
                                   (self.token_types, d_model))
            types_BxL = token_type_ids(tokens_BxL, self.separator_id, self.token_types)
            x_BxLxD = x_BxLxD + jnp.take(types_SxD.astype(x_BxLxD.dtype), types_BxL, axis=0)
        return layer_norm("norm", self.dtype, self.layer_norm_eps)(x_BxLxD) if self.norm else x_BxLxD


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

    ``norm_position = "post"``: post-LN blocks (BERT) and no final LayerNorm, as each block already
    ends in one; ``gelu`` and ``layer_norm_eps`` as in `EncoderBlock`.

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
    norm_position: str = "pre"
    gelu: str = "tanh"
    layer_norm_eps: float = 1e-6
    adapters: str = "none"    # bottleneck adapters per task (`mtt_jax.models.adapters`)
    adapter_dim: int = 64
    adapter_hyper_dim: int = 8

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
                      self.num_experts, self.num_tasks, self.film, self.attention_kernel,
                      self.norm_position, self.gelu, self.layer_norm_eps, self.adapters, self.adapter_dim,
                      self.adapter_hyper_dim)
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
        if self.norm_position == "post":
            return x_BxLxD
        return layer_norm("ln_final", self.dtype, self.layer_norm_eps)(x_BxLxD)
