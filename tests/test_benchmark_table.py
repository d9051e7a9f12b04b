"""The benchmark's comparison table and method names: ``x first`` is the ratio to the first row with the
same number of tasks (``--task_counts``), and ``NAME@blocks`` names per-block aggregation."""

import ml_collections
import pytest

from mtt_jax import benchmark


def row(method, num_tasks, step_ms):
    return {"method": method, "num_tasks": num_tasks, "mesh": "1x1x1", "dtype": "float32",
            "grad_accum_steps": 1, "grad_accum_unroll": 1, "scan_layers": False, "attention_kernel": "auto",
            "cudnn_attention_calls": {"forward": 0, "backward": 0}, "step_ms": step_ms, "compile_s": 1.0,
            "examples_per_s": 1.0, "tokens_per_s": None, "model_tflops_per_step": 0.01,
            "hlo_matmul_over_model": 1.0, "achieved_tflops_per_s": 0.01, "mfu": 0.1,
            "peak_memory_mib_per_device": 100.0, "host_batch_ms": 1.0, "step_over_host": 10.0}


def ratio_column(table):
    return [line.split("|")[9].strip() for line in table.splitlines()[2:]]


def test_x_first_is_per_task_count():
    table = benchmark.format_table([row("ew", 2, 100.0), row("upgrad", 2, 130.0),
                                    row("ew", 40, 200.0), row("upgrad", 40, 4558.0)])
    assert ratio_column(table) == ["1.00", "1.30", "1.00", "22.79"]
    assert "| upgrad (T=40) |" in table
    one_count = benchmark.format_table([row("ew", 8, 100.0), row("upgrad@blocks", 8, 250.0)])
    assert ratio_column(one_count) == ["1.00", "2.50"] and "| upgrad@blocks |" in one_count


def test_method_names_with_blocks():
    assert benchmark._method_and_grouping("upgrad@blocks") == ("upgrad", True)
    assert benchmark._method_and_grouping("mgda") == ("mgda", False)
    with pytest.raises(SystemExit):
        benchmark._method_and_grouping("mgda@leaves")
    config = ml_collections.ConfigDict({"weighting": {"name": "upgrad", "blocks": ("(.*)",)}})
    assert benchmark.method_label(config) == "upgrad@blocks"
    config.weighting.blocks = ()
    assert benchmark.method_label(config) == "upgrad"
