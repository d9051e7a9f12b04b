"""Transformer building blocks with logical axis names on every kernel.

Kernels carry the logical names ``embed``, ``mlp``, ``heads``, ``kv`` and ``vocab``; the mesh rules in
`mtt_jax.sharding` map them onto the ``data``/``fsdp``/``tensor`` mesh axes. Activations are
constrained with ``batch``, ``length`` and ``embed``. Parameters are kept in f32; ``dtype`` is the
compute dtype (bf16 for mixed precision).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.adapters import make_adapter
from mtt_jax.models.moe import TaskMoEFeedForward
from mtt_jax.models.partitioning import Dtype, kernel_init, zeros_init  # (re-exported)

ACTIVATION_AXES = ("batch", "length", "embed")


NORM_POSITIONS = ("pre", "post")
GELUS = ("tanh", "exact")


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32, epsilon: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm (Ba et al. 2016) named logically; ``epsilon`` 1e-6 is flax's default, BERT's and ViT's
    checkpoints were trained with 1e-12 (`mtt_jax.models.pretrained`)."""
    return nn.LayerNorm(dtype=dtype, name=name, epsilon=epsilon,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=zeros_init(("embed",)))


def constrain(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


class HeadsProjection(nn.Module):
    """``[..., D] -> [..., H, K]`` (``to_heads``) or ``[..., H, K] -> [..., D]``, kernels named logically.

    Written out rather than with ``nn.DenseGeneral``, whose flattened kernel initialisation does not
    carry three logical axis names.
    """
    num_heads: int
    head_dim: int
    to_heads: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.to_heads:
            kernel = self.param("kernel", kernel_init(("embed", "heads", "kv")),
                                (x.shape[-1], self.num_heads, self.head_dim))
            bias = self.param("bias", zeros_init(("heads", "kv")), (self.num_heads, self.head_dim))
            equation = "...d,dhk->...hk"
        else:
            d_model = self.num_heads * self.head_dim
            kernel = self.param("kernel", kernel_init(("heads", "kv", "embed")),
                                (self.num_heads, self.head_dim, d_model))
            bias = self.param("bias", zeros_init(("embed",)), (d_model,))
            equation = "...hk,hkd->...d"
        y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax in f32 over the last axis, with masked entries at exactly 0 (a row with nothing
    unmasked is all 0)."""
    logits = jnp.where(mask, logits.astype(jnp.float32), -1e30)
    return jax.nn.softmax(logits, axis=-1) * mask


ATTENTION_KERNELS = ("auto", "cudnn", "xla", "einsum")


def cudnn_attention_supported(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array) -> bool:
    """Whether cuDNN's fused attention takes these inputs in training (the conditions that
    `jax.nn.dot_product_attention(implementation="cudnn")` checks): fp16 / bf16, a head dim that is a
    multiple of 8 and at most 128 (256 from Hopper on; 128 holds everywhere), and even sequence
    lengths, which its backward with a mask needs."""
    head_dim = q_BxLxHxK.shape[-1]
    return (q_BxLxHxK.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
            and q_BxLxHxK.shape[1] % 2 == 0 and k_BxSxHxK.shape[1] % 2 == 0)


def select_attention_kernel(requested: str, q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array,
                            backend: str) -> str:
    """The attention implementation to run: ``requested`` unless it is ``"auto"``, which picks cuDNN's
    fused kernel on GPUs where it takes the inputs, XLA's attention on other GPU inputs, and einsums
    on CPUs and TPUs. (``jax.nn.dot_product_attention``'s own default is XLA's attention even on GPUs.)"""
    if requested != "auto":
        return requested
    if backend == "gpu":
        return "cudnn" if cudnn_attention_supported(q_BxLxHxK, k_BxSxHxK) else "xla"
    return "einsum"


def attention_mask(key_mask_BxS: jax.Array | None, kernel: str, query_length: int) -> jax.Array | None:
    """``jax.nn.dot_product_attention``'s boolean mask for a key mask: ``[B, 1, 1, S]``, or
    ``[B, 1, L, S]`` for cuDNN, which reads the mask as a bias spanning queries and keys and refuses
    a broadcast one (jax-ml/jax#28974)."""
    if key_mask_BxS is None:
        return None
    mask_Bx1x1xS = key_mask_BxS[:, None, None, :].astype(bool)
    if kernel != "cudnn":
        return mask_Bx1x1xS
    batch, _, _, keys = mask_Bx1x1xS.shape
    return jnp.broadcast_to(mask_Bx1x1xS, (batch, 1, query_length, keys))


def attention_logits(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array) -> jax.Array:
    """``q k^T`` per head, accumulated and returned in f32, with its gradients in the inputs' dtype.

    Autodiff of an einsum with an f32 ``preferred_element_type`` multiplies the f32 cotangent with
    the other operand upcast to f32, so in a bf16 model two of attention's four backward matmuls
    would run in f32 (TF32 or f32 on GPUs, half the bf16 rate or less). Here the cotangent is rounded
    to the inputs' dtype first, as every other bf16 activation gradient is. f32 inputs take the plain
    einsum and its autodiff."""
    if q_BxLxHxK.dtype == jnp.float32:
        return jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
    return _low_precision_logits(q_BxLxHxK, k_BxSxHxK)


@jax.custom_vjp
def _low_precision_logits(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array) -> jax.Array:
    return jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)


def _low_precision_logits_fwd(q_BxLxHxK, k_BxSxHxK):
    return _low_precision_logits(q_BxLxHxK, k_BxSxHxK), (q_BxLxHxK, k_BxSxHxK)


def _low_precision_logits_bwd(residuals, dlogits_BxHxLxS):
    q_BxLxHxK, k_BxSxHxK = residuals
    dlogits_BxHxLxS = dlogits_BxHxLxS.astype(q_BxLxHxK.dtype)
    return (jnp.einsum("bhls,bshk->blhk", dlogits_BxHxLxS, k_BxSxHxK),
            jnp.einsum("bhls,blhk->bshk", dlogits_BxHxLxS, q_BxLxHxK))


_low_precision_logits.defvjp(_low_precision_logits_fwd, _low_precision_logits_bwd)


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                          key_mask_BxS: jax.Array | None = None, kernel: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(K)) v per head (Vaswani et al. 2017, eq. 1), keys where ``key_mask`` is 0
    left out.

    ``kernel`` (`select_attention_kernel`; ``"auto"`` by default): ``"cudnn"`` is cuDNN's fused kernel and
    ``"xla"`` XLA's attention, both through `jax.nn.dot_product_attention`. ``"einsum"`` is two
    einsums around an f32 softmax. That is the same computation as XLA's path without its grouped-query
    reshapes, which cost XLA:CPU a transpose of the probabilities per head and made attention's
    forward and backward ~25% slower on the benchmark's shapes. A query whose keys are all masked gets
    0 from einsums and the mean of the values from the others (only fully padded examples have such
    queries, and their outputs are never read).
    """
    kernel = select_attention_kernel(kernel, q_BxLxHxK, k_BxSxHxK, jax.default_backend())
    mask = attention_mask(key_mask_BxS, kernel, q_BxLxHxK.shape[1])
    if kernel != "einsum":
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                            implementation=kernel)
    scale = q_BxLxHxK.shape[-1] ** -0.5
    logits_BxHxLxS = attention_logits(q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype), k_BxSxHxK)
    probs_BxHxLxS = (jax.nn.softmax(logits_BxHxLxS, axis=-1) if mask is None else
                     masked_softmax(logits_BxHxLxS, mask)).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS, v_BxSxHxK)


def head_dim_of(d_model: int, num_heads: int) -> int:
    """``d_model // num_heads``, the width of one attention head; a one-line ValueError unless the heads
    divide the model width (`mtt_jax.run.config_check` asks this before anything is built)."""
    if d_model % num_heads:
        raise ValueError(f"model.d_model={d_model} is not divisible by model.num_heads={num_heads}")
    return d_model // num_heads


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product self-attention (Vaswani et al. 2017, eq. 1) over ``x_BxLxD``.

    The attention itself is `dot_product_attention`, with ``implementation`` as its ``kernel``
    (``"auto"``: cuDNN's fused kernel on GPUs where it takes the inputs, einsums on CPUs and TPUs).
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, key_mask_BxL: jax.Array | None = None) -> jax.Array:
        head_dim = head_dim_of(x_BxLxD.shape[-1], self.num_heads)

        def project(name):
            return HeadsProjection(self.num_heads, head_dim, dtype=self.dtype, name=name)(x_BxLxD)

        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = project("query"), project("key"), project("value")
        out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, key_mask_BxL,
                                            self.implementation)
        return HeadsProjection(self.num_heads, head_dim, to_heads=False, dtype=self.dtype,
                               name="out")(out_BxLxHxK)


def matmul(x_NxD: jax.Array, kernel_DxF: jax.Array) -> jax.Array:
    """``x @ kernel`` over the last axis of ``x``.

    On CPU, the output axis is split into blocks of 64 (``[..., F/64, 64]``, as attention's projections
    are into heads) when it divides. The product and both gradients are the same; what changes is how
    XLA:CPU lays out the kernel gradient ``x^T dy``: with the plain ``[..., F]`` einsum it contracts
    ``x`` over its leading axis in an Eigen matmul, with the split one it transposes ``x`` and runs a
    row-major YNNPACK matmul. On one core that took the MLP's kernel gradients from 1.5x to 1.0x the
    time of its forward matmuls (equal FLOPs), -5% of the step of ``configs/benchmark.py``, measured
    side by side. (A custom VJP that saves ``x^T`` does not help: XLA folds the transpose back.)
    """
    features = kernel_DxF.shape[-1]
    if jax.default_backend() == "cpu" and features % 64 == 0 and features > 64:
        kernel_DxBx64 = kernel_DxF.reshape(kernel_DxF.shape[0], features // 64, 64)
        y = jnp.einsum("...d,dbk->...bk", x_NxD, kernel_DxBx64)
        return y.reshape(x_NxD.shape[:-1] + (features,))
    return jnp.einsum("...d,df->...f", x_NxD, kernel_DxF)


class Dense(nn.Module):
    """``nn.Dense`` (same parameters: ``kernel [in, out]``, ``bias [out]``) on `matmul`, with logical
    names ``axes`` on the kernel and ``axes[1:]`` on the bias."""
    features: int
    axes: tuple[str | None, str | None]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", kernel_init(self.axes), (x.shape[-1], self.features))
        bias = self.param("bias", zeros_init(self.axes[1:]), (self.features,))
        return matmul(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class FeedForward(nn.Module):
    """``wo(GELU(wi(x)))`` (Hendrycks & Gimpel 2016). ``gelu = "tanh"`` is flax's tanh approximation,
    ``"exact"`` the erf form that BERT (Devlin et al. 2019) and ViT (Dosovitskiy et al. 2021) were
    trained with: the two differ by up to ~1e-3 per unit, enough to move an imported checkpoint's
    hidden states far past float32 round-off."""
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    gelu: str = "tanh"

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, train: bool) -> jax.Array:
        d_model = x_BxLxD.shape[-1]
        h = Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi")(x_BxLxD)
        h = nn.gelu(h, approximate=check_gelu(self.gelu) == "tanh")
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        return Dense(d_model, ("mlp", "embed"), self.dtype, name="wo")(h)


class TaskFiLM(nn.Module):
    """Task-conditioned LayerNorm output: ``LN(x) * (1 + gamma_t) + beta_t``.

    The conditional layer normalisation of CA-MTL (Pilault et al., ICLR 2021, §2.2), a FiLM
    (Perez et al., AAAI 2018, eq. 1-2) of the normalised activations: ``[gamma_t, beta_t]`` is a linear
    map of task t's features ``z_t`` (the task encoder's output). The map starts at zero, so training
    starts from the plain LayerNorm. Positions of no task (``task_ids_BxL = -1``: the shared patches
    of the single-input layout) are not modulated.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, normed_BxLxD: jax.Array, task_ids_BxL: jax.Array,
                 task_features_TxD: jax.Array) -> jax.Array:
        d_model = normed_BxLxD.shape[-1]
        kernel = self.param("kernel", zeros_init((None, None, "embed")),
                            (task_features_TxD.shape[-1], 2, d_model))
        bias = self.param("bias", zeros_init((None, "embed")), (2, d_model))
        film_Tx2xD = jnp.einsum("td,dkf->tkf", task_features_TxD.astype(jnp.float32), kernel) + bias
        film_Tx2xD = jnp.concatenate([film_Tx2xD, jnp.zeros((1, 2, d_model))])  # row -1: no task
        film_BxLx2xD = film_Tx2xD[task_ids_BxL].astype(normed_BxLxD.dtype)
        return normed_BxLxD * (1 + film_BxLx2xD[..., 0, :]) + film_BxLx2xD[..., 1, :]


def check_gelu(gelu: str) -> str:
    if gelu not in GELUS:
        raise ValueError(f"model.gelu={gelu!r}; choose one of {', '.join(GELUS)}")
    return gelu


def check_norm_position(norm_position: str) -> str:
    if norm_position not in NORM_POSITIONS:
        raise ValueError(f"model.norm_position={norm_position!r}; choose one of {', '.join(NORM_POSITIONS)}")
    return norm_position


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block (Xiong et al. 2020): x + Attn(LN(x)), then x + FFN(LN(x)).

    ``norm_position = "post"``: the post-LN block of Vaswani et al. (2017) and BERT (Devlin et al.
    2019), LN(x + Attn(x)), then LN(x + FFN(x)), with the same parameter names, so that BERT-family
    checkpoints load as they were trained (`mtt_jax.models.pretrained`). ``gelu`` and ``layer_norm_eps``
    likewise follow the checkpoint. ``adapters`` ("task" or "hyper", `mtt_jax.models.adapters`): a
    bottleneck adapter on the output of each sublayer, before the residual sum (Houlsby et al. 2019).

    ``ffn = "task_moe"`` swaps the dense FFN for `mtt_jax.models.moe.TaskMoEFeedForward`, gated by the
    task of each position (``task_ids_BxL``, -1 = no task); the dense FFN ignores ``task_ids_BxL``.
    ``film = True`` conditions both LayerNorms on the position's task (`TaskFiLM`, from
    ``task_features_TxD``).
    """
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    ffn: str = "dense"
    num_experts: int = 4
    num_tasks: int = 0
    film: bool = False
    attention_kernel: str = "auto"   # `dot_product_attention`'s kernel
    norm_position: str = "pre"       # or "post" (BERT)
    gelu: str = "tanh"               # or "exact" (erf; BERT, ViT)
    layer_norm_eps: float = 1e-6
    adapters: str = "none"           # or "task", "hyper" (`mtt_jax.models.adapters`)
    adapter_dim: int = 64
    adapter_hyper_dim: int = 8

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, key_mask_BxL: jax.Array | None, train: bool,
                 task_ids_BxL: jax.Array | None = None,
                 task_features_TxD: jax.Array | None = None) -> jax.Array:
        drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=not train)

        def norm(name, y_BxLxD):
            normed = layer_norm(f"ln_{name}", self.dtype, self.layer_norm_eps)(y_BxLxD)
            if self.film:
                normed = TaskFiLM(self.dtype, name=f"film_{name}")(normed, task_ids_BxL, task_features_TxD)
            return normed

        def adapt(name, h_BxLxD):
            if self.adapters == "none":
                return h_BxLxD
            return make_adapter(self.adapters, name, self.num_tasks, self.adapter_dim, self.adapter_hyper_dim,
                                self.dtype)(h_BxLxD, task_ids_BxL, task_features_TxD)

        def attention(y_BxLxD):
            return adapt("attention", MultiHeadSelfAttention(self.num_heads, self.dtype, self.attention_kernel,
                                                             name="attention")(y_BxLxD, key_mask_BxL))

        def feed_forward(y_BxLxD):
            if self.ffn == "dense":
                return adapt("mlp", FeedForward(self.mlp_dim, self.dropout_rate, self.dtype, self.gelu,
                                                name="mlp")(y_BxLxD, train))
            if self.ffn == "task_moe":
                return adapt("mlp", TaskMoEFeedForward(self.num_experts, self.mlp_dim, self.num_tasks,
                                                       self.dropout_rate, self.dtype, name="moe")(
                    y_BxLxD, task_ids_BxL, train))
            raise ValueError(f"model.ffn={self.ffn!r}; choose 'dense' or 'task_moe'")

        if check_norm_position(self.norm_position) == "post":
            x_BxLxD = constrain(norm("attention", x_BxLxD + drop(attention(x_BxLxD))))
            return constrain(norm("mlp", x_BxLxD + drop(feed_forward(x_BxLxD))))
        x_BxLxD = constrain(x_BxLxD + drop(attention(norm("attention", x_BxLxD))))
        return constrain(x_BxLxD + drop(feed_forward(norm("mlp", x_BxLxD))))


def sinusoidal_positions(length: int, d_model: int) -> jax.Array:
    """The fixed encoding of Vaswani et al. (2017), §3.5: sin on even, cos on odd channels."""
    position = jnp.arange(length, dtype=jnp.float32)[:, None]
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
    angles = position * inv_freq[None, :]
    table = jnp.zeros((length, d_model), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(angles))
    return table.at[:, 1::2].set(jnp.cos(angles[:, : d_model // 2]))
