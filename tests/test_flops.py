"""The FLOPs formula against a hand count, and the benchmark's pieces."""

import functools

import ml_collections
import pytest

from mtt_jax import data, tasks as tasks_lib
from mtt_jax.perf import flops  # noqa: F401 (data: the sources register their tasks)


def model_config(**overrides):
    c = ml_collections.ConfigDict(dict(num_layers=2, d_model=8, mlp_dim=16, patch_size=2,
                                       task_encoder=True, task_attention="none", memory_tokens=2))
    c.update(overrides)
    return c


def test_multi_input_text_model_hand_count():
    tasks = (tasks_lib.get("majority"), tasks_lib.get("repeat_tag"))  # 4 classes; tagging, 2 classes
    count = flops.training_flops(model_config(), tasks, "multi", "tokens", (10,), batch_size=3)
    # 2 tasks x 3 examples = 6 sequences of 10 tokens = 60 tokens, 2 layers, d=8, f=16.
    per_token_layer = 2 * (4 * 8 * 8 + 2 * 8 * 16)          # q,k,v,out + MLP in/out = 1024
    assert count.projections == 60 * 2 * per_token_layer     # 122,880
    assert count.attention == 6 * 2 * (2 * 10 * 10 * 8 + 2 * 10 * 10 * 8)  # qk^T and av: 38,400
    assert count.embedding == 0                              # a lookup
    assert count.heads == 3 * 2 * 8 * 4 + 3 * 10 * 2 * 8 * 2  # pooled 4-way + per-token 2-way = 1,152
    assert count.training == 3 * (122_880 + 38_400 + 1_152)


def test_single_input_image_model_counts_task_tokens_and_task_attention():
    tasks = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
    count = flops.training_flops(model_config(num_layers=1, task_attention="cross"), tasks, "single",
                                 "image", (4, 4), batch_size=1)
    # 4 patches of 2x2 pixels + 2 task tokens = 6 positions.
    assert count.embedding == 4 * 2 * 4 * 8
    assert count.projections == 6 * 2 * (4 * 64 + 2 * 8 * 16)
    assert count.attention == 2 * 2 * 6 * 6 * 8
    assert count.task_attention == 2 * 2 * 4 * 64 + 2 * 2 * 2 * 2 * 8
    assert count.heads == 2 * (2 * 8 * 10)


def test_hlo_matmul_flops_count_every_dot_by_operand_dtypes():
    import jax
    import jax.numpy as jnp
    step = lambda a, b, c: (jnp.einsum("bij,bjk->bik", a, b),
                            a.astype(jnp.bfloat16) @ c.astype(jnp.bfloat16), jnp.sum(a))
    lowered = jax.jit(step).lower(jnp.zeros((3, 4, 5)), jnp.zeros((3, 5, 6)), jnp.zeros((5, 7)))
    count = flops.hlo_matmul_flops(lowered.compiler_ir("hlo").as_hlo_text())
    assert count == {"f32 x f32": 2 * 3 * 4 * 5 * 6, "bf16 x bf16": 2 * 3 * 4 * 5 * 7}
    assert flops.low_precision_share(count) == pytest.approx(840 / 1560)
    # Also a compiled module's text.
    compiled = flops.hlo_matmul_flops(jax.jit(lambda a, b: a @ b).lower(
        jnp.zeros((4, 5)), jnp.zeros((5, 6))).compile().as_text())
    assert sum(compiled.values()) == 2 * 4 * 5 * 6


def test_hlo_matmul_flops_count_loop_bodies_by_their_trip_counts():
    """A scan's body counts once per iteration (nested scans multiply, an unrolled scan's body holds
    its copies), a ``fori_loop`` from 2 to 7 five times, and a loop that stops on a test of its values
    (the weighting solvers') once."""
    import jax
    import jax.numpy as jnp
    w, x = jnp.zeros((4, 8, 8)), jnp.zeros((3, 8))
    dot = 2 * 3 * 8 * 8

    def count(f, *args):
        text = jax.jit(f).lower(*args).compiler_ir("hlo").as_hlo_text()
        return sum(flops.hlo_matmul_flops(text).values())
    layer = lambda c, wi: (jnp.tanh(c @ wi), None)
    assert count(lambda w, x: jax.lax.scan(layer, x, w)[0], w, x) == 4 * dot
    assert count(lambda w, x: jax.lax.scan(layer, x, w, unroll=2)[0], w, x) == 4 * dot
    assert count(jax.grad(lambda w, x: jax.lax.scan(layer, x, w)[0].sum()), w, x) == 3 * 4 * dot
    outer = lambda c, _: (jax.lax.scan(layer, c, w)[0], None)
    nested = lambda w, x: jax.lax.scan(outer, x, None, length=5)[0]
    assert count(nested, w, x) == 5 * 4 * dot
    assert count(lambda w, x: jax.lax.fori_loop(2, 7, lambda i, c: c @ w[0], x), w, x) == 5 * dot
    until = lambda w, x: jax.lax.while_loop(lambda c: c.sum() < 1.0, lambda c: c @ w[0] + 1.0, x)
    assert count(until, w, x) == dot


NESTED_STATE_LOOP = """HloModule nested

%body (s: (s32[], (f32[3,8], f32[8,8]))) -> (s32[], (f32[3,8], f32[8,8])) {
  %s = (s32[], (f32[3,8]{1,0}, f32[8,8]{1,0})) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %pair = (f32[3,8]{1,0}, f32[8,8]{1,0}) get-tuple-element(%s), index=1
  %x = f32[3,8]{1,0} get-tuple-element(%pair), index=0
  %w = f32[8,8]{1,0} get-tuple-element(%pair), index=1
  %dot.1 = f32[3,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %new_pair = (f32[3,8]{1,0}, f32[8,8]{1,0}) tuple(%dot.1, %w)
  ROOT %t = (s32[], (f32[3,8]{1,0}, f32[8,8]{1,0})) tuple(%next, %new_pair)
}

%cond (s: (s32[], (f32[3,8], f32[8,8]))) -> pred[] {
  %s = (s32[], (f32[3,8]{1,0}, f32[8,8]{1,0})) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[3,8], w: f32[8,8]) -> f32[3,8] {
  %x = f32[3,8]{1,0} parameter(0)
  %w = f32[8,8]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %pair = (f32[3,8]{1,0}, f32[8,8]{1,0}) tuple(%x, %w)
  %init = (s32[], (f32[3,8]{1,0}, f32[8,8]{1,0})) tuple(%zero, %pair)
  %loop = (s32[], (f32[3,8]{1,0}, /*index=1*/f32[8,8]{1,0})) while(%init), condition=%cond, body=%body
  %out = (f32[3,8]{1,0}, f32[8,8]{1,0}) get-tuple-element(%loop), index=1
  ROOT %y = f32[3,8]{1,0} get-tuple-element(%out), index=0
}
"""


def test_a_loop_whose_state_nests_tuples_is_read_and_counted_by_its_trip_count():
    """Tuple shapes nest (a loop's state may hold tuples): the loop, its body's dot and its six
    iterations are all read, where a flat-tuple reader would miss the loop and its body."""
    module = flops.parse_hlo(NESTED_STATE_LOOP)
    assert module.by_name["loop"].op == "while"
    assert module.by_name["loop"].shape.startswith("(s32[], (f32[3,8]{1,0}, /*index=1*/f32[8,8]")
    assert module.by_name["init"].operands == ["zero", "pair"]
    assert flops.hlo_matmul_flops(NESTED_STATE_LOOP) == {"f32 x f32": 6 * 2 * 3 * 8 * 8}


COMPILED_HLO = """HloModule jit_step

%fused_dot (param_0: f32[6,128,256], param_1: f32[256,1024]) -> f32[768,1024] {
  %param_0 = f32[6,128,256]{2,1,0} parameter(0)
  %bitcast.1 = f32[768,256]{1,0} bitcast(%param_0)
  %param_1 = f32[256,1024]{1,0} parameter(1)
  ROOT %dot.1 = f32[768,1024]{1,0} dot(%bitcast.1, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_outer (p0: f32[6,128,256], p1: f32[256,1024]) -> f32[768,1024] {
  %p0 = f32[6,128,256]{2,1,0} parameter(0)
  %p1 = f32[256,1024]{1,0} parameter(1)
  %inner = f32[768,1024]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_dot
  ROOT %tanh.1 = f32[768,1024]{1,0} tanh(%inner)
}

ENTRY %main (x: f32[6,128,256], w: f32[256,1024], a: bf16[4,512,16], b: bf16[512,256], a2: bf16[2,16,4,8]) -> f32[768,1024] {
  %x = f32[6,128,256]{2,1,0} parameter(0)
  %w = f32[256,1024]{1,0} parameter(1)
  %a = bf16[4,512,16]{2,1,0} parameter(2)
  %b = bf16[512,256]{1,0} parameter(3)
  %a2 = bf16[2,16,4,8]{3,2,1,0} parameter(4)
  %gemm = (bf16[4,16,256]{2,1,0}, s8[4194304]{0}) custom-call(bf16[4,512,16]{2,1,0} %a, bf16[512,256]{1,0} %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":[]}}}
  %attention = (bf16[2,4,16,8]{3,1,2,0}, f32[2,4,16]{2,1,0}, u8[0]{0}) custom-call(%a2, %a2, %a2), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config": {"intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["2", "4", "16", "16"]}}}
  %copy.1 = f32[6,128,256]{2,1,0} copy(%x)
  ROOT %outer = f32[768,1024]{1,0} fusion(%copy.1, %w), kind=kLoop, calls=%fused_outer
}
"""


def test_instruction_matmul_flops_of_a_compiled_module():
    """Per op that runs: a fusion counts the dots of the fusions it calls; a cuBLAS gemm its
    contracting dimensions from the backend config; cuDNN's attention q k^T and p v over the logits'
    shape [B, H, L, S] from its backend config; a copy nothing."""
    count = flops.instruction_matmul_flops(COMPILED_HLO)
    mlp = 2 * 768 * 1024 * 256
    attention = 2 * (2 * 4 * 16 * 16 * 8) * 2  # B H L S K, two matmuls
    assert count == {"dot.1": mlp, "inner": mlp, "outer": mlp, "gemm": 2 * 4 * 16 * 256 * 512,
                     "attention": attention}
    # The lowered program's count: dots and cuDNN's attention, each once; no cuBLAS before compiling.
    assert flops.hlo_matmul_flops(COMPILED_HLO) == {"f32 x f32": mlp, "bf16 x bf16": attention}


def test_the_matmul_column_labels_the_ratio_the_16_bit_share_or_a_missing_count():
    from mtt_jax.benchmark import matmul_label
    row = lambda ratio, dtype, share: {"hlo_matmul_over_model": ratio, "dtype": dtype,
                                       "low_precision_matmul_share": share}
    assert matmul_label(row(1.0004, "float32", 0.0)) == "1.000"
    assert matmul_label(row(1.667, "bfloat16", 0.9915)) == "1.667 (99.2% 16-bit)"
    assert matmul_label(row(None, "bfloat16", None)) == "-"  # an HLO the counter could not read


def lowered_step_matmul_flops(spec: str, overrides: dict = None):
    """`benchmark.step_matmul_flops` and the formula's count for a config spec with ``overrides``
    (flattened field names); each spec and overrides lowered once per module."""
    return _lowered_step_matmul_flops(spec, tuple(sorted((overrides or {}).items())))


@functools.cache
def _lowered_step_matmul_flops(spec: str, overrides: tuple):
    import importlib
    from mtt_jax import benchmark, sharding, train
    path, _, variant = spec.partition(":")
    config = importlib.import_module(path).get_config(variant)
    config.update_from_flattened_dict(dict(overrides))
    setup = train.build(config)
    batch = sharding.shard_batch(setup.train_source.train_batch(0, config.batch_size),
                                 setup.batch_shardings, setup.layout)
    counted = benchmark.step_matmul_flops(config, setup, setup.create_state(), batch)
    model = flops.training_flops(config.model, setup.tasks, setup.layout, setup.source.input_spec.kind,
                                 setup.source.input_spec.shape, config.batch_size)
    return counted, model.training, len(setup.tasks)


def test_the_formula_counts_the_matmuls_of_the_traced_step():
    """The formula against the compiler's view of the lowered step, not only a hand count: the
    multi-input text model in bf16 (microbatched, as the reference) and with its layers as one scan,
    and the single-input image model. The bf16 step runs every matmul with 16-bit operands."""
    counted, model, _ = lowered_step_matmul_flops("configs.benchmark:tasks8", {
        "dtype": "bfloat16", "batch_size": 16, "grad_accum_steps": 2})
    assert sum(counted.values()) == pytest.approx(model, rel=1e-3)
    assert flops.low_precision_share(counted) == 1.0, counted
    counted, _, _ = lowered_step_matmul_flops("configs.benchmark:tasks8", {  # layers as one scan
        "batch_size": 16, "grad_accum_steps": 2, "model.scan_layers": True})
    assert sum(counted.values()) == pytest.approx(model, rel=1e-3)
    counted, model, _ = lowered_step_matmul_flops("configs.default:tiny")  # the patch embedding has no
    assert sum(counted.values()) == pytest.approx(model, rel=0.01)        # input gradient: 2x, not 3x


def test_the_matmul_count_of_a_gradient_method_has_a_backward_pass_per_task():
    """PCGrad differentiates each task's loss: one forward (1/3 of the formula's 3x) and T backward
    passes (2/3 each), up to the task side's shared backward."""
    counted, model, num_tasks = lowered_step_matmul_flops("configs.default:tiny")
    counted_pcgrad, _, _ = lowered_step_matmul_flops("configs.default:tiny", {"weighting.name": "pcgrad"})
    assert sum(counted_pcgrad.values()) / sum(counted.values()) == pytest.approx((1 + 2 * num_tasks) / 3,
                                                                                  rel=0.02)


def test_mfu():
    assert flops.model_flops_utilization(50.0, 1.0, 100.0) == pytest.approx(0.5)


@pytest.mark.parametrize("device_kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H20", None), ("NVIDIA L40", None), ("TPU v3", None), ("Tesla V100-SXM2-16GB", None),
])
def test_datasheet_peaks_by_device_kind(device_kind, peak):
    """Each kind gets its own form's peak (PCIe and NVL below SXM), and an unknown one None: the
    benchmark then measures a bf16 matmul and says so, rather than borrow a neighbour's peak."""
    assert flops.datasheet_bf16_peak(device_kind) == peak


def run_benchmark(*args):
    """`python -m mtt_jax.benchmark` on the tiny default config, one CPU device."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(  # conftest's cheaper compiles
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"))
    return subprocess.run([sys.executable, "-m", "mtt_jax.benchmark", "--config=configs/default.py:tiny",
                           "--peak_repeats=3", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_benchmark_command_compares_dtypes_side_by_side(tmp_path):
    """The CLI end to end: one row per variant, the same model FLOPs, MFU against the peak of a matmul
    of the row's own dtype measured in the same run."""
    import json
    import statistics
    out = tmp_path / "bench.json"
    result = run_benchmark("--steps=2", "--dtypes=float32,bfloat16", "--grad_accums=2", "--unrolls=2",
                           "--paired_peak", f"--out={out}", f"--profile={tmp_path / 'trace'}", "--loop",
                           "--loop_rounds=3")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["peak_source"].startswith("measured")
    peaks, boundaries = report["peak_flops_per_device"], report["boundary_peak_flops"]
    assert set(peaks) == set(boundaries) == {"float32", "bfloat16"} and min(peaks.values()) > 1e9
    rows = report["results"]
    assert ([(r["dtype"], r["grad_accum_steps"], r["grad_accum_unroll"]) for r in rows] ==
            [("float32", 2, 2), ("bfloat16", 2, 2)])
    assert len({r["model_tflops_per_step"] for r in rows}) == 1 and rows[0]["model_tflops_per_step"] > 0
    # The lowered step's matmuls, counted without microbatching: the same for every row, the model's.
    assert len({r["hlo_matmul_tflops_per_step"] for r in rows}) == 1
    assert rows[0]["hlo_matmul_over_model"] == pytest.approx(1.0, abs=0.01)
    assert [r["low_precision_matmul_share"] for r in rows] == [0.0, 1.0]
    for r in rows:
        peak, boundary_peaks = peaks[r["dtype"]], boundaries[r["dtype"]]
        assert r["peak_flops_per_device"] == peak
        # before, between and after the 2 rounds, each a matmul of the row's dtype
        assert len(boundary_peaks) == 3 and max(boundary_peaks) <= peak
        round_peaks = [max(boundary_peaks[:2]), max(boundary_peaks[1:])]
        assert 0 < r["mfu"] < 1.5 and r["step_ms"] > 0
        assert abs(r["achieved_tflops_per_s"] * 1e12 / peak - r["mfu"]) < 1e-6
        # Each round's step against the better peak around it; the main MFU: the best peak of the run.
        per_round = [r["model_tflops_per_step"] * 1e12 / (1e-3 * t * p)
                     for t, p in zip(r["step_ms_per_round"], round_peaks)]
        assert r["mfu_paired"] == pytest.approx(statistics.median(per_round), rel=1e-9)
        assert (r["mfu_paired_min"], r["mfu_paired_max"]) == pytest.approx((min(per_round), max(per_round)))
        assert r["mfu_paired_max"] >= r["mfu"]
        # The loop against the pure step: the median of 3 alternating rounds' ratios, and their range.
        assert r["loop_rounds"] == 3 and r["loop_step_ms"] > 0
        assert r["loop_over_step_min"] <= r["loop_over_step"] <= r["loop_over_step_max"]
        assert r["host_wait_fraction"] == pytest.approx(max(0.0, 1 - 1 / r["loop_over_step"]))
    assert "TFLOP/s (float32), " in result.stdout and "TFLOP/s (bfloat16) (measured" in result.stdout
    assert "| accum | unroll |" in result.stdout and "MFU paired (range)" in result.stdout
    assert "| loop/step (range) | host wait |" in result.stdout
    profile = result.stdout.split("XLA op time by source op")[1]
    assert "trunk/block_*/" in profile and "dot_general |" in profile and "% |" in profile
    # The profiled ops' matmuls (compiled, each execution) are the lowered step's, up to the tiny dots
    # that XLA rewrites as elementwise ops.
    profiled = sum(row["matmul_flops_per_step"] for row in report["profile"])
    assert profiled == pytest.approx(rows[0]["hlo_matmul_tflops_per_step"] * 1e12, rel=0.02)
    assert all(row["matmul_flops_per_s"] > 0 for row in report["profile"] if row["matmul_flops_per_step"])
    tables = json.loads((tmp_path / "trace" / "op_times.json").read_text())  # beside the trace
    assert tables["rows"] == report["profile"] and tables["method"] == "ew"
    assert (tmp_path / "trace" / "op_times.md").read_text().startswith("# XLA op time by source op, ew ")


def test_benchmark_compares_attention_kernels_and_layer_scans_and_refuses_bad_variants(tmp_path):
    import json
    out = tmp_path / "bench.json"
    result = run_benchmark("--steps=1", "--attention_kernels=einsum,xla", "--scan_layers=false,true",
                           "--config.model.num_layers=2", "--config.weighting.diagnostics_every=0",
                           f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["scan_layers"], r["attention_kernel"]) for r in rows] == [
        (False, "einsum"), (False, "xla"), (True, "einsum"), (True, "xla")]
    assert all(r["cudnn_attention_calls"] == {"forward": 0, "backward": 0} for r in rows)  # a CPU
    assert len({r["model_tflops_per_step"] for r in rows}) == 1
    for unrolled, scanned in zip(rows[:2], rows[2:]):  # a scan's body counts once per layer
        assert scanned["hlo_matmul_over_model"] == pytest.approx(unrolled["hlo_matmul_over_model"],
                                                                 rel=1e-9)
    assert "| 1 | 1 | unrolled | einsum |" in result.stdout and "| 1 | 1 | scan | xla |" in result.stdout
    refused = run_benchmark("--attention_kernels=xla,cudnn", f"--out={tmp_path / 'no.json'}")
    assert refused.returncode == 2 and not (tmp_path / "no.json").exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("error: ") and "cudnn" in refused.stderr
    assert "compiled" not in refused.stdout  # refused before any work
    refused = run_benchmark("--out=ftp://host/bench.json")  # not writable after the work: refused before
    assert refused.returncode == 2 and "compiled" not in refused.stdout, refused.stderr[-1500:]
    assert "unknown URL scheme ftp://" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("parse,text,expected", [
    ("mesh", "2x2x2", (2, 2, 2)), ("mesh", "-1x2x1", (-1, 2, 1)), ("integer", " 16", 16),
    ("mesh", "2x2", "error: --meshes: '2x2' is not DATAxFSDPxTENSOR, e.g. 8x1x1 or 2x2x2"),
    ("mesh", "2xax1", "error: --meshes: 'a' is not an integer"),
    ("integer", "x", "error: --grad_accums: 'x' is not an integer"),
    ("boolean", "True", True), ("boolean", "0", False),
    ("boolean", "maybe", "error: --scan_layers: 'maybe' is not true or false"),
])
def test_the_benchmark_reads_its_variant_lists_or_stops_in_one_line(parse, text, expected, capsys):
    from mtt_jax import benchmark
    read = {"mesh": lambda: benchmark._mesh(text), "integer": lambda: benchmark._integer("grad_accums", text),
            "boolean": lambda: benchmark._boolean("scan_layers", text)}[parse]
    if not isinstance(expected, str):
        assert read() == expected
        return
    with pytest.raises(SystemExit) as exit_info:
        read()
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip() == expected


def test_a_variant_the_device_cannot_run_is_reported_and_the_others_still_run(monkeypatch, capsys):
    import jax
    from configs import default
    from mtt_jax import benchmark

    class FakeVariant:  # compiling is not what is tested here
        compile_seconds = 1.0

        def __init__(self, config):
            if config.attention_kernel == "xla":
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9GiB.\nstack")
            self.config = config

    monkeypatch.setattr(benchmark, "Variant", FakeVariant)
    configs = []
    for kernel in ("xla", "einsum"):
        configs.append(default.get_config("tiny"))
        configs[-1].attention_kernel = kernel
    compiled, failed = benchmark.compile_variants(configs)
    assert [v.config.attention_kernel for v in compiled] == ["einsum"]
    assert failed == [{"variant": "ew T=2 mesh -1x1x1 float32 accum 1 unroll 1 attention xla",
                       "error": "RESOURCE_EXHAUSTED: Out of memory allocating 9GiB."}]
    assert "  failed ew T=2 mesh -1x1x1 float32 accum 1 unroll 1 attention xla: RESOURCE_EXHAUSTED" in (
        capsys.readouterr().out)


def test_the_benchmark_runs_on_two_hosts_and_process_0_reports(tmp_path):
    """Two processes (`launch.local`, 2 CPU devices each, gloo): one global 4-device mesh, every process
    runs the same steps (the profiled ones too, which need all of them), only process 0 prints and
    writes."""
    import io
    import json
    import math
    from launch import local
    out, log = tmp_path / "bench.json", io.StringIO()
    status = local.launch(2, 2, ["--config=configs/default.py:tiny", "--steps=1", "--peak_repeats=3",
                                 f"--out={out}",
                                 f"--profile={tmp_path / 'trace'}"],
                          module="mtt_jax.benchmark", timeout=300, out=log)
    assert status == 0, log.getvalue()[-3000:]
    rows = [line for line in log.getvalue().splitlines() if "| ew | 4x1x1 |" in line]
    assert len(rows) == 1 and rows[0].startswith("[0] "), log.getvalue()[-3000:]
    assert not any(line.startswith("[1] ") and "|" in line for line in log.getvalue().splitlines())
    report = json.loads(out.read_text())
    assert report["devices"] == 4 and report["profile"]
    assert report["results"][0]["step_ms"] > 0 and math.isfinite(report["results"][0]["mfu"])


def test_source_labels_fold_layers_and_mark_the_pass():
    from mtt_jax.perf.profiling import instruction_labels, source_label
    name = ("jit(train_step)/while/body/closed_call/transpose(jvp(MultiTaskTransformer))/"
            "MultiTaskTransformer.encode/trunk/block_3/mlp/wo/dot_general")
    assert source_label(name) == "bwd trunk/block_*/mlp/wo/dot_general"
    assert source_label("jit(f)/jvp(M)/M.encode/trunk/block_0/ln_mlp/reduce_sum") == \
        "fwd trunk/block_*/ln_mlp/reduce_sum"
    assert source_label("jit(scan)/while/body/eval_jaxpr/dot_general") == "fwd dot_general"  # JAX 0.11
    hlo = ('  %fusion.7 = f32[8,4]{1,0} fusion(%p.1), kind=kLoop, metadata={op_name="' + name + '"}\n'
           '  ROOT %copy.2 = f32[8]{0} copy(%p.2)\n')
    assert instruction_labels(hlo) == {"fusion.7": "bwd trunk/block_*/mlp/wo/dot_general",
                                       "copy.2": "(no source op)"}


def test_op_times_read_gpu_kernels_from_the_device_planes_and_cpu_thunks_from_the_host():
    """A synthetic profile: on a GPU the host's launch events are left out, kernels are matched by the
    innermost op of their ``hlo_op`` stat, and the derived "XLA Ops" line (a loop spanning its kernels)
    is not counted again."""
    from types import SimpleNamespace as N
    from mtt_jax.perf.profiling import rows_by_source_op
    labels = {"fusion.1": "fwd trunk/block_*/mlp/wi/dot_general", "fusion.2": "bwd trunk/block_*/ln/mul",
              "while.3": "fwd while", "gemm.4": "fwd heads/dot_general"}
    event = lambda name, ns, **stats: N(name=name, duration_ns=ns, stats=list(stats.items()))
    host = N(name="/host:CPU",
             lines=[N(name="tf_XLAEigen", events=[event("fusion.1", 7), event("fusion.2", 3)])])
    gpu = N(name="/device:GPU:0", lines=[
        N(name="Stream #13(Compute)", events=[
            event("sm90_xmma_gemm_bf16", 300, hlo_op="while.3::fusion.1", hlo_module="jit_train_step"),
            event("sm90_xmma_gemm_bf16", 100, hlo_op="fusion.1"),
            event("loop_multiply_fusion", 100, hlo_op="while.3::fusion.2"), event("memcpy", 50),
            # a split-K gemm: two kernels per execution, one execution per step
            event("gemm_splitk", 200, hlo_op="gemm.4"), event("splitk_reduce", 50, hlo_op="gemm.4"),
            event("gemm_splitk", 200, hlo_op="gemm.4"), event("splitk_reduce", 50, hlo_op="gemm.4")]),
        N(name="XLA Ops", events=[event("while.3", 600), event("fusion.1", 450), event("fusion.2", 150)])])
    rows = rows_by_source_op([host, gpu], labels, num_steps=2,
                             instruction_flops={"fusion.1": 1e6, "gemm.4": 3e6})
    assert [(r.label, r.ms_per_step * 1e6, r.share, r.count) for r in rows] == [
        ("fwd heads/dot_general", 250, 0.5, 1), ("fwd trunk/block_*/mlp/wi/dot_general", 200, 0.4, 1),
        ("bwd trunk/block_*/ln/mul", 50, 0.1, 1)]
    # fusion.1 ran twice in 2 steps, 400 ns in all: 1e6 FLOPs per step in 200 ns per step. gemm.4's
    # four kernels are two executions: 3e6 FLOPs per step, not 6e6.
    assert [r.matmul_flops_per_step for r in rows] == [3e6, 1e6, 0.0]
    assert rows[1].matmul_flops_per_s == pytest.approx(1e6 / 200e-9)
    assert [r.ms_per_step * 1e6 for r in rows_by_source_op([host], labels, 1)] == [7, 3]  # a CPU
