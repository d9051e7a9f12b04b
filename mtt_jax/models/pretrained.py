"""Pretrained encoders into the trunk: a Hugging Face checkpoint folder (``config.json`` and
``model.safetensors``) of a BERT-family text encoder (Devlin et al. 2019) or a ViT (Dosovitskiy et al.
2021), read with the ``safetensors`` package's numpy API (no torch), mapped onto our parameter tree.

Three steps, each before the next can cost anything:

1. `open_checkpoint` and `check_architecture` (`mtt_jax.run.config_check`, before any work): the files
   are there, the model type is supported, and ``config.model`` has the shape and trunk options the
   checkpoint was trained with (`architecture`; the first field that differs is named with its fix).
2. `check_tensors` (`mtt_jax.builder.build`, on the model's abstract parameters, before compiling or
   touching the workdir): every tensor the trunk needs is in the file with a shape that maps onto ours;
   the first missing or mismatched one is named. Only the file's header is read.
3. `load_into` (after the state is initialised): the imported arrays replace the initialised ones,
   each placed with the sharding of the leaf it replaces. Heads, task attention and other parameters
   the checkpoint has no tensor for keep their initialisation; tensors we have no place for (the
   pre-training heads, a ViT classifier; the pooler unless the model has one) are not read.

The mapping (`tensor_map`): torch ``Linear`` weights ``[out, in]`` are transposed into our ``[in, out]``
kernels; the attention projections are split into our ``[D, H, K]`` / ``[H, K, D]`` head layout (head h
is rows ``h K .. (h + 1) K`` of the fused weight, as the checkpoint's own reshape reads it); the learned
position table fills the first rows of ours (which has at least 512), and the data may use no more
positions than the checkpoint learned. A ViT's ``[CLS]`` token (plus its position embedding) becomes the
task encoder's bias, with its kernel at zero, so every task token starts as ViT's ``[CLS]``; with one task
the encoder is ViT exactly. A model with BERT's pooler (``model.readout="cls"``, ``model.pooler=True``,
`mtt_jax.models.heads.Pooler`) reads the checkpoint's ``pooler.dense``, which the file must then hold.

Not supported: RoBERTa (its padding id is 1, and our pad mask reads id != 0; its positions are offset by
2), relative position embeddings, T5.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPES = ("bert", "vit")
# Hugging Face's ``hidden_act`` -> our ``model.gelu``: "gelu" is the exact (erf) form, the others tanh's.
GELU_OF = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
# Older checkpoints (bert-base-uncased's) name LayerNorm parameters as TensorFlow did.
LAYER_NORM_ALIASES = {"weight": "gamma", "bias": "beta"}

Path = tuple[str, ...]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be imported; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    folder: str
    config: dict

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS_FILE)


def open_checkpoint(folder: str) -> Checkpoint:
    """The folder's ``config.json``, checked: both files present, a supported ``model_type``."""
    where = f"model.checkpoint={folder}"
    if not os.path.isdir(folder):
        raise CheckpointError(f"{where}: no such folder (a Hugging Face checkpoint folder with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{where}: {os.path.join(folder, name)} is missing (pytorch_model.bin "
                                  f"is not read; save the model with safetensors)")
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot read {path} ({type(e).__name__}: {e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: {path} has model_type={model_type!r}; supported: "
                              f"{', '.join(MODEL_TYPES)}")
    return Checkpoint(folder, config)


def architecture(checkpoint: Checkpoint) -> dict[str, Any]:
    """The ``config.model`` fields a checkpoint was trained with, from its ``config.json``."""
    c, where = checkpoint.config, os.path.join(checkpoint.folder, CONFIG_FILE)
    activation = c.get("hidden_act", "gelu")
    if activation not in GELU_OF:
        raise CheckpointError(f"{where}: hidden_act={activation!r}; the trunk's FFN runs GELU "
                              f"({', '.join(GELU_OF)})")
    fields = {"num_layers": c["num_hidden_layers"], "d_model": c["hidden_size"],
              "num_heads": c["num_attention_heads"], "mlp_dim": c["intermediate_size"],
              "positional": "learned", "gelu": GELU_OF[activation],
              "layer_norm_eps": float(c.get("layer_norm_eps", 1e-12))}
    if checkpoint.model_type == "bert":
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{where}: position_embedding_type={c['position_embedding_type']!r}; "
                                  "only absolute (learned) positions are supported")
        return fields | {"norm_position": "post", "token_types": c.get("type_vocab_size", 2),
                         "embed_norm": True, "embed_scale": False}
    if not c.get("qkv_bias", True):
        raise CheckpointError(f"{where}: qkv_bias=false; the trunk's attention projections have biases")
    return fields | {"norm_position": "pre", "patch_size": c["patch_size"], "embed_norm": False}


def check_architecture(model_config, checkpoint: Checkpoint) -> None:
    """A one-line `CheckpointError` for the first ``config.model`` field that differs from what the
    checkpoint was trained with (`architecture`), naming the override that fixes it."""
    for field, wanted in architecture(checkpoint).items():
        have = model_config.get(field)
        same = (isinstance(have, (int, float)) and np.isclose(have, wanted, rtol=1e-6, atol=0)
                if isinstance(wanted, float) else have == wanted)
        if not same:
            raise CheckpointError(f"model.checkpoint={checkpoint.folder}: {CONFIG_FILE} asks for "
                                  f"model.{field}={wanted!r}, and the config has {have!r}; set "
                                  f"--config.model.{field}={wanted}")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Checkpoint tensors ``names`` (without the model's prefix) -> our parameter ``path``.

    ``convert`` takes the tensors and returns our array; ``layer``: the block it belongs to (for the
    layers of a scanned trunk, stacked on a leading axis); ``leading_rows``: fills the first rows of a
    table that may be longer (the positions)."""
    names: tuple[str, ...]
    path: Path
    convert: Callable[..., np.ndarray] = lambda x: x
    layer: int | None = None
    leading_rows: bool = False


def _transpose(weight_OxI):
    return weight_OxI.T


def _to_heads(num_heads: int):
    """A fused q/k/v ``Linear`` ``[H K, D]`` -> our ``[D, H, K]`` kernel (or bias ``[H K]`` -> ``[H, K]``)."""
    def convert(weight):
        if weight.ndim == 1:
            return weight.reshape(num_heads, -1)
        return weight.T.reshape(weight.shape[1], num_heads, -1)
    return convert


def _from_heads(num_heads: int):
    """The attention output ``Linear`` ``[D, H K]`` -> our ``[H, K, D]`` kernel."""
    return lambda weight: weight.T.reshape(num_heads, -1, weight.shape[0])


def _patch_kernel(weight_DxCxPxP):
    """ViT's patch convolution ``[D, C, p, p]`` -> our projection ``[p p C, D]`` of patches flattened
    row, column, channel (`mtt_jax.models.trunk.PatchEmbed`)."""
    return weight_DxCxPxP.transpose(2, 3, 1, 0).reshape(-1, weight_DxCxPxP.shape[0])


def _layer_norm(hf: str, ours: Path, layer: int | None = None) -> list[Tensor]:
    return [Tensor((f"{hf}.weight",), ours + ("scale",), layer=layer),
            Tensor((f"{hf}.bias",), ours + ("bias",), layer=layer)]


def _dense(hf: str, ours: Path, layer: int | None = None, kernel=_transpose, bias=lambda b: b) -> list[Tensor]:
    return [Tensor((f"{hf}.weight",), ours + ("kernel",), kernel, layer),
            Tensor((f"{hf}.bias",), ours + ("bias",), bias, layer)]


def _block(hf: str, ours: Path, layer: int, num_heads: int, names: dict[str, str]) -> list[Tensor]:
    """One encoder layer; ``names``: where its attention, LayerNorms and FFN live in the checkpoint."""
    tensors = []
    for projection in ("query", "key", "value"):
        tensors += _dense(f"{hf}.{names['attention']}.{projection}", ours + ("attention", projection), layer,
                          _to_heads(num_heads), _to_heads(num_heads))
    tensors += _dense(f"{hf}.{names['attention_out']}", ours + ("attention", "out"), layer,
                      _from_heads(num_heads))
    tensors += _layer_norm(f"{hf}.{names['ln_attention']}", ours + ("ln_attention",), layer)
    tensors += _dense(f"{hf}.intermediate.dense", ours + ("mlp", "wi"), layer)
    tensors += _dense(f"{hf}.output.dense", ours + ("mlp", "wo"), layer)
    tensors += _layer_norm(f"{hf}.{names['ln_mlp']}", ours + ("ln_mlp",), layer)
    return tensors


BLOCK_NAMES = {
    "bert": {"attention": "attention.self", "attention_out": "attention.output.dense",
             "ln_attention": "attention.output.LayerNorm", "ln_mlp": "output.LayerNorm"},
    "vit": {"attention": "attention.attention", "attention_out": "attention.output.dense",
            "ln_attention": "layernorm_before", "ln_mlp": "layernorm_after"},
}


def tensor_map(checkpoint: Checkpoint, param_shapes: dict[Path, tuple[int, ...]],
               task_tokens: bool = False) -> list[Tensor]:
    """Every checkpoint tensor the model reads, and where it goes; ``param_shapes`` (our parameter path
    -> shape) tells whether the trunk is scanned; ``task_tokens``: the model prepends task tokens
    (single-input, ``model.task_encoder="tokens"``), which a ViT's [CLS] starts."""
    c = checkpoint.config
    scan_layers = any(path[:2] == ("trunk", "blocks") for path in param_shapes)
    num_tasks = param_shapes[("task_features", "dense", "kernel")][0] if task_tokens else 0
    num_layers, num_heads = c["num_hidden_layers"], c["num_attention_heads"]

    def block_path(i: int) -> Path:
        return ("trunk", "blocks", "block") if scan_layers else ("trunk", f"block_{i}")
    names = BLOCK_NAMES[checkpoint.model_type]
    tensors = []
    for i in range(num_layers):
        tensors += _block(f"encoder.layer.{i}", block_path(i), i, num_heads, names)
    if ("pooler", "dense", "kernel") in param_shapes:   # model.pooler: the [CLS] read-out's Dense + tanh
        tensors += _dense("pooler.dense", ("pooler", "dense"))
    if checkpoint.model_type == "bert":
        return tensors + [
            Tensor(("embeddings.word_embeddings.weight",), ("embed", "embedding", "embedding")),
            Tensor(("embeddings.position_embeddings.weight",), ("positions", "table"), leading_rows=True),
            Tensor(("embeddings.token_type_embeddings.weight",), ("positions", "token_types")),
            *_layer_norm("embeddings.LayerNorm", ("positions", "norm"))]
    tensors += _dense("embeddings.patch_embeddings.projection", ("embed", "projection"), kernel=_patch_kernel)
    tensors += _layer_norm("layernorm", ("trunk", "ln_final"))
    tensors.append(Tensor(("embeddings.position_embeddings",), ("positions", "table"),
                          lambda table_1xNxD: table_1xNxD[0, 1:], leading_rows=True))
    if num_tasks:  # every task token starts as [CLS] + its position embedding (module docstring)
        tensors += [
            Tensor(("embeddings.cls_token", "embeddings.position_embeddings"),
                   ("task_features", "dense", "bias"),
                   lambda cls_1x1xD, table_1xNxD: cls_1x1xD[0, 0] + table_1xNxD[0, 0]),
            Tensor(("embeddings.cls_token",), ("task_features", "dense", "kernel"),
                   lambda cls_1x1xD: np.zeros((num_tasks, cls_1x1xD.shape[-1]), cls_1x1xD.dtype))]
    return tensors


def _resolve(name: str, available) -> str | None:
    """``name`` as the file has it: behind the model's prefix (``bert.``, ``vit.``) or none, and with a
    LayerNorm's ``gamma``/``beta`` for ``weight``/``bias``."""
    stem, _, leaf = name.rpartition(".")
    spellings = [name] + ([f"{stem}.{LAYER_NORM_ALIASES[leaf]}"]
                          if ("LayerNorm" in stem or "layernorm" in stem) and leaf in LAYER_NORM_ALIASES else [])
    for prefix in ("", "bert.", "vit."):
        for spelling in spellings:
            if prefix + spelling in available:
                return prefix + spelling
    return None


def _model_prefix(available) -> str:
    """The prefix of the file's encoder tensors (``bert.`` behind a task head's, "" for a bare encoder)."""
    return next((prefix for prefix in ("bert.", "vit.") if any(n.startswith(prefix) for n in available)), "")


def _header_shapes(checkpoint: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the file's header only."""
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    try:
        with safe_open(checkpoint.weights_path, framework="np") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise CheckpointError(f"cannot read {checkpoint.weights_path}: {str(e).splitlines()[0]}") from None


def _target_shape(tensor: Tensor, param_shapes: dict[Path, tuple[int, ...]]) -> tuple[int, ...] | None:
    shape = param_shapes.get(tensor.path)
    if shape is None:
        return None
    return shape[1:] if tensor.layer is not None and tensor.path[1] == "blocks" else shape


def parameter_shapes(params) -> dict[Path, tuple[int, ...]]:
    """Parameter path -> shape, of boxed or plain, abstract or placed parameters."""
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(nn.unbox(params)).items()}


def check_tensors(checkpoint: Checkpoint, abstract_params, positions_used: int,
                  task_tokens: bool = False) -> None:
    """A one-line `CheckpointError` naming the weights file and the first tensor the model needs that
    the file lacks, or whose shape does not map onto our parameter's; also where the data uses more
    positions than the checkpoint learned (for a ViT: other than, as its positions form a grid).
    ``abstract_params``: the model's (boxed) parameter shapes."""
    available = _header_shapes(checkpoint)
    param_shapes = parameter_shapes(abstract_params)
    file = checkpoint.weights_path
    for tensor in tensor_map(checkpoint, param_shapes, task_tokens):
        names = [_resolve(name, available) for name in tensor.names]
        if None in names:
            missing = _model_prefix(available) + tensor.names[names.index(None)]
            hint = "; the file has no pooler: set model.pooler=False" if tensor.path[0] == "pooler" else ""
            raise CheckpointError(f"{file}: no tensor {missing!r} (for {'/'.join(tensor.path)}){hint}")
        target = _target_shape(tensor, param_shapes)
        if target is None:
            raise CheckpointError(f"{file}: tensor {names[0]!r} has no parameter {'/'.join(tensor.path)} to "
                                  "go to in the model; set the config.model fields its config.json asks for")
        shapes = [available[name] for name in names]
        converted = jax.eval_shape(tensor.convert, *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).shape
        fits = (converted[0] <= target[0] and converted[1:] == target[1:]) if tensor.leading_rows else (
            converted == target)
        if not fits:
            raise CheckpointError(f"{file}: tensor {names[0]!r} of shape {shapes[0]} maps to {converted}, and "
                                  f"the model's {'/'.join(tensor.path)} is {target}")
        if tensor.leading_rows and checkpoint.model_type == "vit" and positions_used != converted[0]:
            raise CheckpointError(f"{file}: tensor {names[0]!r} holds the positions of {converted[0]} "
                                  f"patches, and the data's images have {positions_used}; use images of "
                                  f"image_size={checkpoint.config.get('image_size')}")
        if tensor.leading_rows and positions_used > converted[0]:
            raise CheckpointError(f"{file}: tensor {names[0]!r} holds {converted[0]} positions, and the "
                                  f"data has {positions_used}; shorten the inputs (data.options.max_length)")


def read_arrays(checkpoint: Checkpoint, param_shapes: dict[Path, tuple[int, ...]], task_tokens: bool = False
                ) -> dict[Path, tuple[np.ndarray, bool]]:
    """Our parameter path -> (the imported array, whether it fills only the leading rows), with the
    layers of a scanned trunk stacked; after `check_tensors`."""
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    stored = load_file(checkpoint.weights_path)
    arrays, leading, layers = {}, {}, {}
    for tensor in tensor_map(checkpoint, param_shapes, task_tokens):
        array = np.asarray(tensor.convert(*(stored[_resolve(n, stored)] for n in tensor.names)), np.float32)
        leading[tensor.path] = tensor.leading_rows
        if tensor.layer is not None and tensor.path[1] == "blocks":
            layers.setdefault(tensor.path, {})[tensor.layer] = array
        else:
            arrays[tensor.path] = array
    for path, by_layer in layers.items():
        arrays[path] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return {path: (array, leading[path]) for path, array in arrays.items()}


def load_into(model_params, checkpoint: Checkpoint, task_tokens: bool = False):
    """``model_params`` (unboxed, placed) with the checkpoint's arrays in place of the initialised ones,
    each on the sharding of the leaf it replaces; returns the new tree and the number of values imported."""
    flat = traverse_util.flatten_dict(model_params)
    imported = 0
    arrays = read_arrays(checkpoint, parameter_shapes(model_params), task_tokens)
    for path, (array, leading_rows) in arrays.items():
        old = flat[path]
        if leading_rows and array.shape[0] < old.shape[0]:
            flat[path] = _set_leading_rows(old, array)
        else:
            flat[path] = jax.make_array_from_callback(old.shape, old.sharding,
                                                      lambda index, a=array.astype(old.dtype): a[index])
        imported += array.size
    return traverse_util.unflatten_dict(flat), imported


def _set_leading_rows(table: jax.Array, rows: np.ndarray) -> jax.Array:
    return jax.jit(lambda t, r: t.at[:r.shape[0]].set(r.astype(t.dtype)), out_shardings=table.sharding)(
        table, rows)
