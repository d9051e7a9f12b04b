"""The experiment configs of the new sources: every variant passes the config check, every tiny variant
builds its source and model, and configs/glue.py:tiny trains and reports GLUE's metrics on mock data."""

import importlib
import json
import os

import pytest

from mtt_jax import train
from mtt_jax.run import config_check
from mtt_jax.data import tfds_io

VARIANTS = {"glue": ("small", "base", "tiny"), "multimnist": ("", "tiny"), "celeba": ("", "tiny"),
            "mmoe_synthetic": ("", "pairs", "tiny"), "gradnorm_toy": ("", "tiny")}


def tiny_config(name: str, data_dir: str):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    if "data_dir" in config.data.options:
        config.data.options.data_dir = data_dir
    return config


@pytest.mark.parametrize("name, variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_every_variant_passes_the_config_check(name, variant):
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config_check.validate(config, num_devices=1)


def test_glue_base_is_bert_base_shaped():
    m = importlib.import_module("configs.glue").get_config("base").model
    assert (m.num_layers, m.d_model, m.num_heads, m.mlp_dim) == (12, 768, 12, 3072)
    assert m.task_encoder and m.task_attention == "cross"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tiny_variants_build_source_and_model(name, tmp_path):
    config = tiny_config(name, str(tmp_path))
    with tfds_io.mock_data(num_examples=8):
        setup = train.build(config)
    assert setup.source.task_names == tuple(config.tasks)
    batch = setup.source.train_batch(0, config.batch_size)
    leading = (len(config.tasks), config.batch_size) if setup.layout == "multi" else (config.batch_size,)
    assert batch["inputs"].shape == leading + setup.source.input_spec.shape


@pytest.mark.parametrize("mixture", ["", "temperature"])
def test_glue_tiny_trains_and_reports_glue_metrics(tmp_path, mixture):
    """One sub-batch per task, and flat mixture batches (seqio's temperature mixing) of the same data."""
    config = tiny_config("glue", str(tmp_path / "data"))
    config.weighting.diagnostics_every = 0  # per-task gradients are tested elsewhere; keep this fast
    config.tasks = ("cola", "mrpc", "stsb")  # one task per GLUE metric family: compiles 3x faster
    config.data.mixture.method, config.data.mixture.temperature = mixture, 2.0
    workdir = str(tmp_path / "run")
    with tfds_io.mock_data(num_examples=8):
        _, final = train.train_and_evaluate(config, workdir, quiet=True)
    for key in ("cola/matthews_corr", "cola/accuracy", "mrpc/f1", "mrpc/accuracy", "stsb/pearson",
                "stsb/spearman", "stsb/mse", "cola/baseline_matthews_corr", "mrpc/baseline_f1"):
        assert key in final, key
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
