"""Pretrained encoders into the trunk (`mtt_jax.models.pretrained`), offline: each test writes a tiny
BERT- or ViT-shaped Hugging Face folder (random weights under the real tensor names, a real config.json),
imports it, and compares the trunk's hidden states with an independent numpy forward of the encoder
written here (Devlin et al. 2019; Dosovitskiy et al. 2021) to 1e-5 in float32."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import glue as glue_config
from mtt_jax import tasks as tasks_lib
from mtt_jax import train
from mtt_jax.data import glue, tfds_io  # noqa: F401  (registers the GLUE tasks)
from mtt_jax.data.tokenizer import WordPieceTokenizer, encode_texts
from mtt_jax.models import build_model, pretrained
from mtt_jax.models.heads import first_position
from mtt_jax.models.multitask import check_readout
from mtt_jax.models.task_encoder import prepend_task_tokens
from mtt_jax.run import config_check
from mtt_jax.specs import InputSpec

from configs.default import base_config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "a", "##s",
         "ran", ".", ",", "is", "not", "it", "and"] + [f"w{i}" for i in range(12)]
BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
           patch_size=4, num_channels=3, layer_norm_eps=1e-12, hidden_act="gelu", qkv_bias=True)


# --- Tiny checkpoints, as Hugging Face writes them ---------------------------------------------------

def _layer_tensors(rng, prefix, names, d, f):
    def dense(name, out_dim, in_dim):
        return {f"{name}.weight": rng.normal(0, 0.2, (out_dim, in_dim)),
                f"{name}.bias": rng.normal(0, 0.2, (out_dim,))}

    def norm(name):
        return {f"{name}.weight": 1 + rng.normal(0, 0.2, (d,)), f"{name}.bias": rng.normal(0, 0.2, (d,))}
    tensors = {}
    for part in ("query", "key", "value"):
        tensors |= dense(f"{prefix}.{names['attention']}.{part}", d, d)
    tensors |= dense(f"{prefix}.attention.output.dense", d, d) | dense(f"{prefix}.intermediate.dense", f, d)
    tensors |= dense(f"{prefix}.output.dense", d, f)
    return tensors | norm(f"{prefix}.{names['ln_attention']}") | norm(f"{prefix}.{names['ln_mlp']}")


def write_checkpoint(folder, config, tensors):
    os.makedirs(folder, exist_ok=True)
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def write_bert(folder, seed=0, prefix="bert.", **overrides):
    """A BertModel folder: ``bert.``-prefixed names, as BertForSequenceClassification saves them, with a
    pooler (which only a model with ``model.pooler`` reads), and the vocabulary."""
    c = BERT | overrides | {"model_type": "bert", "vocab_size": len(VOCAB), "architectures": ["BertModel"]}
    rng = np.random.default_rng(seed)
    d = c["hidden_size"]
    t = {"embeddings.word_embeddings.weight": rng.normal(0, 0.5, (len(VOCAB), d)),
         "embeddings.position_embeddings.weight": rng.normal(0, 0.5, (c["max_position_embeddings"], d)),
         "embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (c["type_vocab_size"], d)),
         "embeddings.LayerNorm.weight": 1 + rng.normal(0, 0.2, (d,)),
         "embeddings.LayerNorm.bias": rng.normal(0, 0.2, (d,)),
         "pooler.dense.weight": rng.normal(0, 0.2, (d, d)), "pooler.dense.bias": rng.normal(0, 0.2, (d,))}
    for i in range(c["num_hidden_layers"]):
        t |= _layer_tensors(rng, f"encoder.layer.{i}", pretrained.BLOCK_NAMES["bert"], d, c["intermediate_size"])
    write_checkpoint(folder, c, {prefix + k: v for k, v in t.items()})
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    return c


def write_vit(folder, seed=0):
    c = VIT | {"model_type": "vit"}
    rng = np.random.default_rng(seed)
    d, p, ch = c["hidden_size"], c["patch_size"], c["num_channels"]
    num_patches = (c["image_size"] // p) ** 2
    t = {"embeddings.cls_token": rng.normal(0, 0.5, (1, 1, d)),
         "embeddings.position_embeddings": rng.normal(0, 0.5, (1, num_patches + 1, d)),
         "embeddings.patch_embeddings.projection.weight": rng.normal(0, 0.2, (d, ch, p, p)),
         "embeddings.patch_embeddings.projection.bias": rng.normal(0, 0.2, (d,)),
         "layernorm.weight": 1 + rng.normal(0, 0.2, (d,)), "layernorm.bias": rng.normal(0, 0.2, (d,))}
    for i in range(c["num_hidden_layers"]):
        t |= _layer_tensors(rng, f"encoder.layer.{i}", pretrained.BLOCK_NAMES["vit"], d, c["intermediate_size"])
    write_checkpoint(folder, c, {"vit." + k: v for k, v in t.items()})
    return c


# --- The reference: the encoders in numpy (float64), from the papers ---------------------------------

erf = np.vectorize(math.erf)


def np_layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def np_attention(x, t, pre, heads, key_mask):
    """Multi-head self-attention of Vaswani et al. (2017), with torch's ``Linear`` (x W^T + b)."""
    b, length, d = x.shape
    k_dim = d // heads
    project = lambda name: (x @ t[f"{pre}.{name}.weight"].T + t[f"{pre}.{name}.bias"]).reshape(
        b, length, heads, k_dim).transpose(0, 2, 1, 3)
    names = "attention.self" if f"{pre}.attention.self.query.weight" in t else "attention.attention"
    q, k, v = (project(f"{names}.{n}") for n in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(k_dim)
    if key_mask is not None:
        logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, d)
    return context @ t[f"{pre}.attention.output.dense.weight"].T + t[f"{pre}.attention.output.dense.bias"]


def np_mlp(x, t, pre):
    h = x @ t[f"{pre}.intermediate.dense.weight"].T + t[f"{pre}.intermediate.dense.bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))   # GELU, exact
    return h @ t[f"{pre}.output.dense.weight"].T + t[f"{pre}.output.dense.bias"]


def np_bert(t, c, tokens, token_types):
    """BERT's encoder (Devlin et al. 2019): embeddings summed and normalised, post-LN layers."""
    t = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in t.items()}
    eps, length = c["layer_norm_eps"], tokens.shape[1]
    x = (t["embeddings.word_embeddings.weight"][tokens] + t["embeddings.position_embeddings.weight"][:length]
         + t["embeddings.token_type_embeddings.weight"][token_types])
    x = np_layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    for i in range(c["num_hidden_layers"]):
        pre = f"encoder.layer.{i}"
        norm = f"{pre}.attention.output.LayerNorm"
        x = np_layer_norm(x + np_attention(x, t, pre, c["num_attention_heads"], tokens != 0),
                          t[f"{norm}.weight"], t[f"{norm}.bias"], eps)
        x = np_layer_norm(x + np_mlp(x, t, pre), t[f"{pre}.output.LayerNorm.weight"],
                          t[f"{pre}.output.LayerNorm.bias"], eps)
    return x


def np_bert_pooler(t, hidden_BxLxD):
    """BERT's pooler (Devlin et al. 2019, §3): tanh of a dense layer on the first position, [CLS]."""
    t = {k.removeprefix("bert."): np.asarray(v, np.float64) for k, v in t.items()}
    return np.tanh(hidden_BxLxD[:, 0] @ t["pooler.dense.weight"].T + t["pooler.dense.bias"])


def np_vit(t, c, images_BxHxWxC):
    """ViT's encoder (Dosovitskiy et al. 2021, eq. 1-4): patch convolution, [CLS], pre-LN layers, final LN."""
    t = {k.removeprefix("vit."): np.asarray(v, np.float64) for k, v in t.items()}
    p, eps = c["patch_size"], c["layer_norm_eps"]
    b, h, w, ch = images_BxHxWxC.shape
    patches = images_BxHxWxC.reshape(b, h // p, p, w // p, p, ch)
    x = np.einsum("biujvc,dcuv->bijd", patches, t["embeddings.patch_embeddings.projection.weight"])
    x = x.reshape(b, -1, x.shape[-1]) + t["embeddings.patch_embeddings.projection.bias"]
    cls = np.broadcast_to(t["embeddings.cls_token"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1) + t["embeddings.position_embeddings"]
    for i in range(c["num_hidden_layers"]):
        pre = f"encoder.layer.{i}"
        ln = lambda y, name: np_layer_norm(y, t[f"{pre}.{name}.weight"], t[f"{pre}.{name}.bias"], eps)
        x = x + np_attention(ln(x, "layernorm_before"), t, pre, c["num_attention_heads"], None)
        x = x + np_mlp(ln(x, "layernorm_after"), t, pre)
    return np_layer_norm(x, t["layernorm.weight"], t["layernorm.bias"], eps)


# --- Our model with the checkpoint's architecture -----------------------------------------------------

def model_config(checkpoint, **fields):
    c = base_config()
    c.model.update(pretrained.architecture(checkpoint) | fields)
    return c


def imported(model, folder, sample, task_tokens=False):
    variables = jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)}, sample)
    params, count = pretrained.load_into(nn.unbox(variables["params"]),
                                         pretrained.open_checkpoint(folder), task_tokens)
    return params, count


def bert_inputs(folder):
    """Two sentence pairs packed with the checkpoint's own [CLS]/[SEP] ids, and their segments."""
    tokenizer = WordPieceTokenizer(folder)
    tokens = encode_texts(tokenizer, ["the cats sat on the mat .", "a dog ran"],
                          ["it is not a cat", "the dog , the mat and the cat sat ."], 24)
    sep_positions = [np.flatnonzero(row == tokenizer.sep_id) for row in tokens]
    token_types = np.zeros_like(tokens)
    for row, seps in enumerate(sep_positions):
        token_types[row, seps[0] + 1:seps[1] + 1] = 1
    return tokenizer, tokens, token_types


@pytest.mark.parametrize("scan_layers", [False, True])
def test_an_imported_bert_gives_the_reference_hidden_states(tmp_path, scan_layers):
    folder = str(tmp_path / "bert")
    c = write_bert(folder)
    tokenizer, tokens, token_types = bert_inputs(folder)
    assert tokens[0, 0] == VOCAB.index("[CLS]") and (tokens == VOCAB.index("[SEP]")).sum() == 4
    config = model_config(pretrained.open_checkpoint(folder), scan_layers=scan_layers, task_encoder=False,
                          task_attention="none")
    spec = InputSpec("tokens", (tokens.shape[1],), tokenizer.vocab_size, separator_id=tokenizer.sep_id)
    model = build_model(config, (tasks_lib.get("mrpc"),), "multi", spec)
    params, count = imported(model, folder, jnp.asarray(tokens[None]))
    ours, mask = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, tokens[None])
    reference = np_bert(load_file(os.path.join(folder, "model.safetensors")), c, tokens, token_types)
    assert np.asarray(mask[0]).sum() == (tokens != 0).sum()
    np.testing.assert_allclose(np.asarray(ours[0]), reference, atol=1e-5, rtol=0)
    d, layers, f = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    assert count == len(VOCAB) * d + 40 * d + 2 * d + 2 * d + layers * per_layer  # all but the pooler


def test_an_imported_bert_pooler_gives_the_reference_cls_readout(tmp_path):
    """model.readout="cls" with model.pooler: the pooled [CLS] vector the heads read is BERT's pooler
    output, with the checkpoint's pooler.dense; the import counts its d^2 + d values too."""
    folder = str(tmp_path / "bert")
    c = write_bert(folder)
    tokenizer, tokens, token_types = bert_inputs(folder)
    config = model_config(pretrained.open_checkpoint(folder), task_encoder=False, task_attention="none",
                          readout="cls", pooler=True)
    spec = InputSpec("tokens", (tokens.shape[1],), tokenizer.vocab_size, separator_id=tokenizer.sep_id)
    model = build_model(config, (tasks_lib.get("mrpc"),), "multi", spec)
    params, count = imported(model, folder, jnp.asarray(tokens[None]))

    def pooled(module, x_TxBxL):
        return module.pooler(first_position(module.encode(x_TxBxL)[0][0]))
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x, method=pooled))(params, tokens[None])
    stored = load_file(os.path.join(folder, "model.safetensors"))
    reference = np_bert_pooler(stored, np_bert(stored, c, tokens, token_types))
    assert ours.shape == (2, 32) and np.abs(reference).max() > 0.1
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-5, rtol=0)
    d, layers, f = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    per_layer = 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    assert count == len(VOCAB) * d + 40 * d + 2 * d + 2 * d + layers * per_layer + d * d + d
    # The heads read it: mrpc's logits are its head on the pooled vector.
    head = {"kernel": jax.random.normal(jax.random.key(2), (d, 2)), "bias": jnp.arange(2.0)}
    params = {**params, "head_mrpc": {"dense": head}}
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x)[0]["mrpc"])(params, tokens[None])
    np.testing.assert_allclose(np.asarray(logits), reference @ np.asarray(head["kernel"]) + np.arange(2.0),
                               atol=1e-4, rtol=0)


def test_a_pooler_the_file_lacks_is_named(tmp_path):
    folder = tmp_path / "bert"
    write_bert(str(folder))
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".pooler." not in "." + k}, str(folder / "model.safetensors"))
    checkpoint = pretrained.open_checkpoint(str(folder))
    pretrained.check_tensors(checkpoint, _abstract_bert_params(str(folder)), 24)   # no pooler asked for
    with pytest.raises(pretrained.CheckpointError,
                       match=r"model.safetensors: no tensor 'bert.pooler.dense.weight' \(for pooler/dense/kernel\); "
                             r"the file has no pooler: set model.pooler=False$"):
        pretrained.check_tensors(checkpoint, _abstract_bert_params(str(folder), readout="cls", pooler=True), 24)


def test_the_cls_readout_reads_the_first_position_in_both_multi_input_forms():
    """readout="cls" without the pooler: each task's head reads position 0 of its own examples, in the
    multi-input batch and in a flat mixture batch; the refusals are one line."""
    tasks = (tasks_lib.TaskSpec("a", "classification", 3, "test"), tasks_lib.TaskSpec("b", "regression", 1, "test"))
    config = base_config()
    config.model.update(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, task_attention="none", readout="cls")
    model = build_model(config, tasks, "multi", InputSpec("tokens", (6,), 20))
    tokens = jax.random.randint(jax.random.key(0), (2, 3, 6), 1, 20).at[:, :, 4:].set(0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    heads = {f"head_{t.name}": {"dense": {"kernel": jax.random.normal(jax.random.key(i), (16, t.num_outputs)),
                                          "bias": jnp.zeros((t.num_outputs,))}} for i, t in enumerate(tasks)}
    params = {**params, **heads}
    outputs, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
    x_TxBxLxD, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, tokens)
    for i, t in enumerate(tasks):
        expected = np.asarray(x_TxBxLxD[i, :, 0] @ heads[f"head_{t.name}"]["dense"]["kernel"])
        np.testing.assert_allclose(np.asarray(outputs[t.name]), expected.reshape(outputs[t.name].shape),
                                   atol=1e-5, rtol=0)
    flat, task_id = tokens.reshape(6, 6), jnp.repeat(jnp.arange(2), 3)
    flat_outputs, _ = jax.jit(lambda p, x, i: model.apply({"params": p}, x, task_id=i))(params, flat, task_id)
    for i, t in enumerate(tasks):
        np.testing.assert_allclose(np.asarray(flat_outputs[t.name][3 * i:3 * i + 3]), np.asarray(outputs[t.name]),
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"model.readout='cls' reads the first position .* multi-input layout"):
        check_readout("cls", "single")
    with pytest.raises(ValueError, match=r"^model.pooler=True is BERT's pooler on the first position; set "
                                         r"model.readout='cls' \(it is 'mean'\)$"):
        check_readout("mean", "multi", pooler=True)


def test_an_imported_vit_gives_the_reference_hidden_states(tmp_path):
    folder = str(tmp_path / "vit")
    c = write_vit(folder)
    images = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    config = model_config(pretrained.open_checkpoint(folder), task_encoder=True, task_attention="none")
    task = tasks_lib.TaskSpec("label", "classification", 3, "test")
    model = build_model(config, (task,), "single", InputSpec("image", (8, 8, 3)))
    params, _ = imported(model, folder, jnp.asarray(images), task_tokens=True)

    def hidden_states(module, x):  # the task token (ViT's [CLS]) and the patches, through the trunk
        return module.trunk(prepend_task_tokens(module.embed_inputs(x), module.task_features()), None, False)
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x, method=hidden_states))(params, images)
    reference = np_vit(load_file(os.path.join(folder, "model.safetensors")), c, images.astype(np.float64))
    assert ours.shape == reference.shape == (2, 5, 32)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-5, rtol=0)


# --- Refusals: one line, naming the file and the first mismatch ---------------------------------------

def test_a_missing_folder_or_file_is_named(tmp_path):
    with pytest.raises(pretrained.CheckpointError, match="model.checkpoint=.*nowhere: no such folder"):
        pretrained.open_checkpoint(str(tmp_path / "nowhere"))
    folder = tmp_path / "bert"
    write_bert(str(folder))
    os.remove(folder / "model.safetensors")
    with pytest.raises(pretrained.CheckpointError, match=r"bert/model.safetensors is missing"):
        pretrained.open_checkpoint(str(folder))


def test_an_architecture_mismatch_names_the_field_and_its_fix(tmp_path):
    folder = str(tmp_path / "bert")
    write_bert(folder)
    checkpoint = pretrained.open_checkpoint(folder)
    config = model_config(checkpoint, num_heads=2)
    with pytest.raises(pretrained.CheckpointError,
                       match=r"asks for model.num_heads=4, and the config has 2; set --config.model.num_heads=4$"):
        pretrained.check_architecture(config.model, checkpoint)
    config = model_config(checkpoint, gelu="tanh")
    with pytest.raises(pretrained.CheckpointError, match=r"model.gelu='exact'"):
        pretrained.check_architecture(config.model, checkpoint)


def test_the_config_check_refuses_bad_trunk_options_and_a_mismatched_checkpoint(tmp_path):
    folder = str(tmp_path / "bert")
    write_bert(folder)
    for field, value, message in [
            ("norm_position", "mid", r"model.norm_position='mid' is not valid; choose one of: pre, post"),
            ("gelu", "erf", r"model.gelu='erf' is not valid; choose one of: tanh, exact"),
            ("token_types", -1, r"model.token_types=-1 must be an integer >= 0 \(0: none\)"),
            ("d_model", 64, r"config.json asks for model.d_model=32, and the config has 64"),
            ("readout", "mean", r"model.pooler=True is BERT's pooler on the first position; set "
                                r"model.readout='cls' \(it is 'mean'\)")]:
        config = recipe(folder, str(tmp_path / "data"))
        config.model[field] = value
        with pytest.raises(config_check.ConfigError, match=message):
            config_check.validate(config, jax.device_count())


def _abstract_bert_params(folder, length=24, **fields):
    config = model_config(pretrained.open_checkpoint(folder), task_encoder=False, task_attention="none", **fields)
    model = build_model(config, (tasks_lib.get("mrpc"),), "multi", InputSpec("tokens", (length,), len(VOCAB), 3))
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1, length), jnp.int32))["params"]


def test_the_first_missing_or_misshapen_tensor_is_named(tmp_path):
    folder = tmp_path / "bert"
    write_bert(str(folder))
    checkpoint = pretrained.open_checkpoint(str(folder))
    params = _abstract_bert_params(str(folder))
    pretrained.check_tensors(checkpoint, params, 24)  # as written: no error
    with pytest.raises(pretrained.CheckpointError, match="holds 40 positions, and the data has 48"):
        pretrained.check_tensors(checkpoint, _abstract_bert_params(str(folder), 48), 48)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    save_file(tensors | {name: np.zeros((48, 30), np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(pretrained.CheckpointError,
                       match=rf"model.safetensors: tensor '{name}' of shape \(48, 30\) maps to \(30, 48\), and "
                             r"the model's trunk/block_1/mlp/wi/kernel is \(32, 48\)$"):
        pretrained.check_tensors(checkpoint, params, 24)
    del tensors["bert.encoder.layer.0.attention.self.key.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(pretrained.CheckpointError,
                       match=r"model.safetensors: no tensor 'bert.encoder.layer.0.attention.self.key.bias' "
                             r"\(for trunk/block_0/attention/key/bias\)$"):
        pretrained.check_tensors(checkpoint, params, 24)


def test_a_vit_refuses_images_of_another_patch_grid(tmp_path):
    folder = str(tmp_path / "vit")
    write_vit(folder)
    checkpoint = pretrained.open_checkpoint(folder)
    config = model_config(checkpoint, task_encoder=True, task_attention="none")
    task = tasks_lib.TaskSpec("label", "classification", 3, "test")
    for side, patches in ((8, 4), (12, 9)):
        model = build_model(config, (task,), "single", InputSpec("image", (side, side, 3)))
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
        if patches == 4:
            pretrained.check_tensors(checkpoint, params, patches, task_tokens=True)
            continue
        with pytest.raises(pretrained.CheckpointError, match=r"tensor 'vit.embeddings.position_embeddings' holds "
                           r"the positions of 4 patches, and the data's images have 9; use images of image_size=8$"):
            pretrained.check_tensors(checkpoint, params, patches, task_tokens=True)


def test_tensorflow_layer_norm_names_and_no_prefix_are_read(tmp_path):
    """bert-base-uncased's file names its LayerNorms gamma/beta; a BertModel's has no ``bert.`` prefix."""
    folder = tmp_path / "bert"
    write_bert(str(folder), prefix="")
    tensors = load_file(str(folder / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    save_file(renamed, str(folder / "model.safetensors"))
    checkpoint = pretrained.open_checkpoint(str(folder))
    pretrained.check_tensors(checkpoint, _abstract_bert_params(str(folder)), 24)
    arrays = pretrained.read_arrays(checkpoint, pretrained.parameter_shapes(_abstract_bert_params(str(folder))))
    np.testing.assert_array_equal(arrays[("positions", "norm", "scale")][0], renamed["embeddings.LayerNorm.gamma"])


# --- The recipe --------------------------------------------------------------------------------------

def recipe(folder, data_dir):
    config = glue_config.get_config("bert_base_mtdnn")
    config.model.checkpoint = folder
    config.data.options.data_dir = data_dir
    config.model.update(pretrained.architecture(pretrained.open_checkpoint(folder)))
    config.tasks = ("cola", "mrpc", "stsb")
    config.data.options.max_length, config.data.options.max_eval_examples = 24, 8
    config.batch_size, config.eval_batch_size = 8, 8
    config.total_steps, config.eval_every, config.log_every, config.checkpoint_every = 3, 3, 1, 3
    config.optimizer.warmup_steps = 1
    return config


def test_the_imported_arrays_are_placed_like_the_initialised_ones(tmp_path):
    """On 8 CPU devices, FSDP x tensor parallel: the recipe's state holds the checkpoint's arrays, sharded
    like the initialised ones."""
    folder = str(tmp_path / "bert")
    write_bert(folder)
    config = recipe(folder, str(tmp_path / "data"))
    config.mesh.fsdp, config.mesh.tensor = 2, 2
    config_check.validate(config, jax.device_count())
    stored = load_file(os.path.join(folder, "model.safetensors"))
    with tfds_io.mock_data(num_examples=8):
        setup = train.build(config)
        assert setup.source.input_spec.separator_id == VOCAB.index("[SEP]")
        state = setup.create_state()
        model = state.params["model"]
        table = model["embed"]["embedding"]["embedding"]
        query = model["trunk"]["block_1"]["attention"]["query"]["kernel"]
        np.testing.assert_array_equal(np.asarray(table), stored["bert.embeddings.word_embeddings.weight"])
        query_weight = stored["bert.encoder.layer.1.attention.self.query.weight"]
        np.testing.assert_array_equal(np.asarray(query), query_weight.T.reshape(32, 4, 8))
        shardings = setup.state_shardings.params["model"]
        assert table.sharding == shardings["embed"]["embedding"]["embedding"]
        assert query.sharding == shardings["trunk"]["block_1"]["attention"]["query"]["kernel"]
        assert not query.sharding.is_fully_replicated


def test_the_mtdnn_recipe_trains_from_the_imported_checkpoint(tmp_path):
    folder = str(tmp_path / "bert")
    write_bert(folder)
    config = recipe(folder, str(tmp_path / "data"))
    with tfds_io.mock_data(num_examples=8):
        state, final = train.train_and_evaluate(config, str(tmp_path / "run"), quiet=True)
    assert int(state.step) == 3 and int(state.skipped_steps) == 0
    assert np.isfinite(final["cola/matthews_corr"]) and np.isfinite(final["stsb/pearson"])
    assert 0.0 <= final["mrpc/accuracy"] <= 1.0


def test_a_missing_checkpoint_stops_the_command_in_one_line(tmp_path):
    missing = tmp_path / "no_checkpoint"
    result = subprocess.run(
        [sys.executable, "-m", "mtt_jax.main", "--config", "configs/glue.py:bert_base_mtdnn",
         f"--config.model.checkpoint={missing}", f"--config.data.options.data_dir={tmp_path}",
         f"--workdir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: model.checkpoint={missing}: no such folder (a Hugging Face " \
                                    "checkpoint folder with config.json and model.safetensors)"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variant, adapter_values", [
    # 2 layers x 2 adapters x (8 tasks x (2 * 32 * 64 + 64 + 32)) and x (32 * 8 + 9 * (2 * 32 * 24 + 24 + 32))
    ("bert_base_adapters", 2 * 2 * 8 * 4192), ("bert_base_hyperformer", 2 * 2 * (256 + 9 * 1592))])
def test_the_adapter_recipes_build_on_the_frozen_checkpoint_and_print_their_counts(tmp_path, monkeypatch,
                                                                                   variant, adapter_values):
    folder = str(tmp_path / "bert")
    write_bert(folder)
    config = glue_config.get_config(variant)
    config.model.checkpoint, config.data.options.data_dir = folder, str(tmp_path / "data")
    config.model.update(pretrained.architecture(pretrained.open_checkpoint(folder)))
    config.data.options.max_length = 24
    config_check.validate(config, jax.device_count())
    # The line as builder logs it, whatever the logging levels an earlier test in this process left
    from mtt_jax import builder
    logged = []
    monkeypatch.setattr(builder.logging, "info", lambda message, *args: logged.append(message % args))
    with tfds_io.mock_data(num_examples=8):
        train.build(config)
    line = next(m for m in logged if m.startswith("parameters:"))
    assert f"{adapter_values:,} in adapters" in line
    trained = int(line.split(" trained")[0].rsplit(", ", 1)[1].replace(",", ""))
    heads = 32 * 2 * 6 + 2 * 6 + 32 * 1 + 1 + 32 * 3 + 3   # 6 binary tasks, STS-B, MNLI
    pooler = 32 * 32 + 32                                    # MT-DNN's [CLS] read-out, trained
    task_encoder = 8 * 32 + 32 if variant == "bert_base_hyperformer" else 0
    assert trained == adapter_values + heads + pooler + task_encoder
