"""Step-time benchmark against the hardware limit.

    python -m mtt_jax.benchmark --config configs/benchmark.py
    python -m mtt_jax.benchmark --config configs/benchmark.py:tasks8 --methods ew,mgda,pcgrad,cagrad
    python -m mtt_jax.benchmark --config configs/benchmark.py:tasks8 --methods ew,upgrad,upgrad@blocks
    python -m mtt_jax.benchmark --config configs/default.py --meshes 8x1x1,1x8x1 --dtypes float32,bfloat16
    python -m mtt_jax.benchmark --config configs/benchmark.py --grad_accums 1,16 --profile /tmp/trace
    python -m mtt_jax.benchmark --config configs/benchmark.py --grad_accums 8,16,32 --unrolls 1,2,4
    python -m mtt_jax.benchmark --config configs/benchmark.py --paired_peak
    python -m mtt_jax.benchmark --config configs/benchmark.py --config.model.num_layers=24 \
        --scan_layers false,true    # compile time of unrolled vs scanned blocks
    python -m mtt_jax.benchmark --config configs/benchmark.py:base --dtypes bfloat16 \
        --attention_kernels auto,xla    # on a GPU
    python -m launch.local --num_processes 2 --devices_per_process 4 --module mtt_jax.benchmark -- \
        --config configs/default.py    # two hosts on this machine; on a TPU pod, run it on every host

Compiles each variant once (ahead of time, so compile time and the compiled memory analysis are
measured), then times ``--steps`` train steps (interleaved across variants, round by round) and reports
the median step time, examples/s, tokens/s, model FLOPs per step (`mtt_jax.perf.flops`), achieved FLOP/s and
MFU, peak memory per device, and, with ``--loop``, the time per step of the real input pipeline + step
loop and the fraction of it spent waiting on the host. On CPU the peak is measured in the same run with
a large matmul of each row's dtype; on GPU/TPU it is the datasheet bf16 peak. Variants (methods x
meshes x dtypes x microbatching x layer scans x attention kernels) run side by side in one process, so
their ratios compare like with like. The attention column counts the cuDNN fused attention call sites in
the lowered step (`cudnn_attention_calls`; a scanned model's layers share one), so a GPU row says
whether cuDNN's kernel ran. ``HLO matmuls / model`` is the lowered step's matmul FLOPs
(`step_matmul_flops`) over the formula's. Both read the step lowered on one device with the global
shapes (`counting_lowering`), where a multi-device mesh would hide cuDNN's calls. The ratio is about
1 for loss-weighting methods, which checks the MFU's numerator against the traced program; above 1 for
gradient methods, by their per-task backward passes. With a 16-bit dtype it adds the share of matmul
FLOPs with 16-bit operands.

A variant that the device cannot run (XLA's runtime error, e.g. out of memory) is reported and left out;
the others still run, and the exit status is then 1 (`compile_variants`).

Multi-host (`mtt_jax.run.cli.initialize_distributed`, as `mtt_jax.main`): every process compiles and runs
the same steps over the global mesh; process 0 prints, profiles and writes ``--out``.

``--paired_peak`` (CPU) also measures the peak between the rounds of timed steps and reports the median
and range of each round's MFU against the better of the two peaks around it. On a shared or throttling
machine the peak moves with the step; the main MFU column (median step against the best peak of the
run) is the conservative one.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
import statistics
import sys
import time

from absl import app, flags

from mtt_jax.perf import huge_pages
from mtt_jax.run import cli
from mtt_jax.run.cli import fail, initialize_distributed, parse_flags

_CONFIG = cli.CONFIG
_METHODS = flags.DEFINE_list("methods", [], "Weighting methods to compare (ratio to the first); "
                              "NAME@blocks is NAME per group of --blocks (per-block aggregation).")
_BLOCKS = flags.DEFINE_list("blocks", [r"trunk/(block_\d+)/.*"], "The shared-parameter groups of the "
                            "methods named NAME@blocks (``weighting.blocks``): path patterns; the default "
                            "is one group per Transformer block plus one of the other shared leaves, "
                            "'(.*)' one group per leaf.")
_MESHES = flags.DEFINE_list("meshes", [], "Meshes as DATAxFSDPxTENSOR, e.g. 8x1x1,2x4x1.")
_TASK_COUNTS = flags.DEFINE_list("task_counts", [], "Numbers of tasks to compare, e.g. 2,8,40: the first "
                                 "k of the config's tasks (per-task gradients cost T backward passes in "
                                 "the single-input layout).")
_DTYPES = flags.DEFINE_list("dtypes", [], "Compute dtypes, e.g. float32,bfloat16.")
_GRAD_ACCUMS = flags.DEFINE_list("grad_accums", [], "Microbatches per step to compare, e.g. 1,4,16 "
                                 "(the same update, computed in pieces).")
_UNROLLS = flags.DEFINE_list("unrolls", [], "Microbatches per scan iteration to compare, e.g. 1,2,4 "
                             "(``grad_accum_unroll``: independent chains of work for the cores).")
_SCAN_LAYERS = flags.DEFINE_list("scan_layers", [], "Blocks unrolled or as one nn.scan "
                                  "(``model.scan_layers``) to compare, e.g. false,true.")
_ATTENTION_KERNELS = flags.DEFINE_list(
    "attention_kernels", [], "Attention kernels to compare (``attention_kernel``: auto, cudnn, xla, "
    "einsum), e.g. cudnn,xla on a GPU.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant (after 3 warm-up steps).",
                             lower_bound=1)
_PEAK_REPEATS = flags.DEFINE_integer("peak_repeats", 30, "Runs of the peak matmul where it is measured "
                                     "(the best counts; before and after the timed steps).", lower_bound=1)
_LOOP = flags.DEFINE_bool("loop", False, "Also time the real input-pipeline loop (host wait).")
_LOOP_ROUNDS = flags.DEFINE_integer("loop_rounds", 11, "With --loop: alternating rounds of --steps loop "
                                    "steps and --steps pure steps; the ratio is the median over rounds.",
                                    lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here (a path or a gs:// URL).")
_PAIRED_PEAK = flags.DEFINE_bool(
    "paired_peak", False, "On CPU, also measure the matmul peak (best of 3) between the rounds of timed "
    "steps, and report each round's MFU against the better of the two peaks around it (median and "
    "range): the step and the peak then see the same machine conditions. The main MFU column is "
    "unchanged.")
_PROFILE = flags.DEFINE_string("profile", None, "Trace 3 steps of the first variant into this directory "
                               "(or bucket URL) and print its XLA op times by source op "
                               "(`mtt_jax.perf.profiling`).")
_MOCK_DATA = flags.DEFINE_integer("mock_data", 0, "Serve TFDS datasets from tfds.testing.mock_data "
                                  "with this many examples per split (0: real data).", lower_bound=0)
flags.mark_flags_as_required(["config"])
flags.adopt_module_key_flags(cli)  # --coordinator_address --num_processes --process_id in --help


_OPEN_CONTEXTS: list = []  # contexts entered for the whole process (--mock_data)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def _jitted_matmul():
    import jax
    return jax.jit(lambda x, y: x @ y)


def _integer(flag: str, text: str) -> int:
    """An integer from a comma-list flag; anything else is an error (the range is the config check's)."""
    try:
        return int(text.strip())
    except ValueError:
        fail(f"--{flag}: {text!r} is not an integer")


def _mesh(text: str) -> tuple[int, int, int]:
    """``DATAxFSDPxTENSOR`` (``-1`` fills the devices left over) from ``--meshes``."""
    parts = text.strip().split("x")
    if len(parts) != 3:
        fail(f"--meshes: {text!r} is not DATAxFSDPxTENSOR, e.g. 8x1x1 or 2x2x2")
    return tuple(_integer("meshes", part) for part in parts)


def _boolean(flag: str, text: str) -> bool:
    """``true`` / ``false`` (any case, or 1 / 0) from a comma-list flag; anything else is an error."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower())
    if value is None:
        fail(f"--{flag}: {text!r} is not true or false")
    return value


def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 30) -> float:
    """FLOP/s of a large square matmul on the default device (the CPU's practical peak).

    The best of ``repeats`` runs: interference from other processes only ever slows a run down, so the
    fastest one is the closest to what the hardware can do (a median moved by 10-25% between runs on a
    shared 2-core machine, and MFU with it). Random operands: a GPU multiplies constant or zero
    matrices faster than real data.
    """
    import jax
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    matmul = _jitted_matmul()  # one compilation per shape, however often the peak is measured
    matmul(a, a).block_until_ready()
    fastest = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size ** 3 / fastest


def device_peaks(dtypes, repeats: int = 30) -> tuple[dict[str, float], str]:
    """The peak FLOP/s per device that each compute dtype's rows are measured against, and its source.

    On a CPU, a matmul of the row's own dtype measured in this run: XLA:CPU's bf16 matmul is not its
    f32 one (on this repository's AVX-512 CI machine it is 0.7-0.85x as fast), so a bf16 row against
    the f32 peak would understate its MFU, and a CPU with fast bf16 units would overstate it. On a
    GPU/TPU, the datasheet dense bf16 peak for every dtype, as MaxText's MFU does; a kind without a
    datasheet entry gets a measured 8192^3 bf16 matmul.
    """
    import jax
    from mtt_jax.perf.flops import datasheet_bf16_peak
    device = jax.devices()[0]
    if device.platform == "cpu":
        return ({d: measured_matmul_peak(d, repeats=repeats) for d in dtypes},
                f"measured matmul of the row's dtype, 2048^3, best of {repeats}")
    kind = device.device_kind
    if (peak := datasheet_bf16_peak(kind)) is not None:
        return dict.fromkeys(dtypes, peak), f"datasheet bf16 ({kind})"
    return (dict.fromkeys(dtypes, measured_matmul_peak("bfloat16", 8192, repeats)),
            f"measured bf16 matmul ({kind})")


def format_peaks(peaks: dict[str, float]) -> str:
    return ", ".join(f"{p / 1e12:.3f} TFLOP/s ({dtype})" for dtype, p in peaks.items())


def peak_memory_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
               analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


class Variant:
    """One compiled configuration: its setup, compiled step, state and a fixed device batch."""

    def __init__(self, config):
        from mtt_jax import sharding, train
        from mtt_jax.perf import flops

        self.config = config
        self.setup = setup = train.build(config)
        step_fn = train.config_train_step(setup, config)
        self.state = setup.create_state()
        self.batch = sharding.shard_batch(setup.train_source.train_batch(0, config.batch_size),
                                          setup.batch_shardings, setup.layout)
        start = time.perf_counter()
        with setup.context():  # trace as the training loop does: under the mesh and the axis rules
            lowered = step_fn.lower(self.state, self.batch)
            self.compiled = lowered.compile()
        self.compile_seconds = time.perf_counter() - start
        counted = counting_lowering(config, setup, self.state, self.batch, lowered)
        self.cudnn_attention_calls = cudnn_attention_calls(counted.as_text())
        try:  # a check beside the timing, which an HLO it cannot read must not stop
            self.matmul_flops = flops.hlo_matmul_flops(counted.compiler_ir("hlo").as_hlo_text())
        except flops.UNREADABLE_HLO as e:
            print(f"  warning: the step's matmul FLOPs were not counted ({type(e).__name__}: {e})")
            self.matmul_flops = None
        self.times: list[float] = []
        for _ in range(3):  # warm-up
            self.step()

    def step(self) -> None:
        import jax
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)

    def time_one_step(self) -> None:
        start = time.perf_counter()
        self.step()
        self.times.append(time.perf_counter() - start)

    def matmul_columns(self, model_flops: float) -> dict:
        """The lowered step's matmul FLOPs, their ratio to the model's and their 16-bit share (None
        where they were not counted)."""
        from mtt_jax.perf import flops
        keys = ("hlo_matmul_tflops_per_step", "hlo_matmul_over_model", "low_precision_matmul_share")
        if self.matmul_flops is None:
            return dict.fromkeys(keys)
        total = sum(self.matmul_flops.values())
        return dict(zip(keys, (total / 1e12, total / model_flops,
                               flops.low_precision_share(self.matmul_flops))))

    def result(self, peak: float, loop_rounds: int, steps: int, boundary_peaks: list[float] = ()) -> dict:
        """The row of this variant; ``peak``: its dtype's (`device_peaks`); ``loop_rounds`` > 0 adds the
        loop's time (`time_loop`); ``boundary_peaks`` (its dtype's, measured before, between and after
        the rounds of timed steps: one more than the steps) adds the paired MFU."""
        from mtt_jax import train
        from mtt_jax.perf import flops
        config, setup = self.config, self.setup
        step_seconds = statistics.median(self.times)
        count, sequences, tokens = train.step_work(setup, config)
        memory = peak_memory_bytes(self.compiled)
        result = {
            "method": method_label(config), "blocks": list(config.weighting.get("blocks", ())),
            "num_tasks": len(config.tasks), "mesh": "x".join(str(v) for v in setup.mesh.shape.values()),
            "dtype": config.dtype, "grad_accum_steps": config.grad_accum_steps,
            "grad_accum_unroll": config.grad_accum_unroll,
            "scan_layers": config.model.scan_layers,
            "attention_kernel": config.attention_kernel,
            "cudnn_attention_calls": self.cudnn_attention_calls,
            "step_ms": 1e3 * step_seconds, "step_ms_per_round": [1e3 * t for t in self.times],
            "compile_s": self.compile_seconds,
            **flops.throughput(count.training, sequences, tokens, step_seconds, setup.mesh.devices.size,
                               peak),
            "model_tflops_per_step": count.training / 1e12,
            **self.matmul_columns(count.training),
            "peak_flops_per_device": peak,
            "peak_memory_mib_per_device": memory / 2 ** 20 if memory else None,
        }
        if boundary_peaks:
            round_peaks = [max(before, after) for before, after in zip(boundary_peaks, boundary_peaks[1:])]
            per_round = [flops.model_flops_utilization(count.training / setup.mesh.devices.size, t, p)
                         for t, p in zip(self.times, round_peaks, strict=True)]
            result.update({"mfu_paired": statistics.median(per_round),
                           "mfu_paired_min": min(per_round), "mfu_paired_max": max(per_round)})
        host_seconds = host_batch_seconds(config, setup)
        result.update({"host_batch_ms": 1e3 * host_seconds, "step_over_host": step_seconds / host_seconds})
        if loop_rounds:
            result.update(time_loop(config, setup, self.compiled, self, steps, loop_rounds))
        return result


def counting_lowering(config, setup, state, batch, lowered=None, platform: str | None = None):
    """The config's train step lowered to be read by `step_matmul_flops` and `cudnn_attention_calls`:
    without microbatching, whose data-parallel scan runs in a ``shard_map`` on each shard's rows; without
    the periodic diagnostics, a conditional whose branch would count on every step; and on one device
    (`train.Setup.on_one_device`), with the same global shapes. On a mesh of several devices JAX lowers
    a custom-partitioned op, as cuDNN's fused attention is, to an opaque ``CustomSPMDPartitioning`` call
    that the SPMD partitioner expands only when it compiles: a data-parallel step on 8 GPUs would read
    as 0 cuDNN calls and 0.93 of the model's matmuls (tested). ``lowered``: the config's step as
    lowered already, reused where it is that program. ``platform``: lower for another platform than
    this process's (``"cuda"``, ``"tpu"``; the tests read the GPU and TPU programs on a CPU)."""
    import jax
    from mtt_jax import train
    plain = config.grad_accum_steps == 1 and not config.weighting.diagnostics_every
    if lowered is not None and plain and setup.mesh.devices.size == 1 and platform is None:
        return lowered
    counted = config.copy_and_resolve_references()
    counted.grad_accum_steps, counted.grad_accum_unroll = 1, 1
    counted.weighting.diagnostics_every = 0
    one = setup.on_one_device()
    abstract = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    with one.context():
        traced = train.config_train_step(one, counted).trace(abstract(state, one.state_shardings),
                                                             abstract(batch, one.batch_shardings))
        return traced.lower(lowering_platforms=(platform,) if platform else None)


def step_matmul_flops(config, setup, state, batch, lowered=None, platform: str | None = None
                      ) -> dict[str, float]:
    """Matmul FLOPs of the config's train step as XLA sees it (`flops.hlo_matmul_flops`, by operand
    dtypes; a layer scan counts by its trip count), in the program of `counting_lowering`. For
    loss-weighting methods the total checks `flops.training_flops` against the traced model; for
    gradient methods it includes their per-task backward passes."""
    from mtt_jax.perf import flops
    counted = counting_lowering(config, setup, state, batch, lowered, platform)
    return flops.hlo_matmul_flops(counted.compiler_ir("hlo").as_hlo_text())


def cudnn_attention_calls(lowered_text: str) -> dict[str, int]:
    """Call sites of cuDNN's fused attention in a lowered program (the StableHLO custom calls
    ``@__cudnn$fmha...(``), forward and backward apart; a call inside a loop counts once."""
    targets = re.findall(r'@(__cudnn\$fmha\w*)\(', lowered_text)
    backward = sum(t.endswith("Backward") for t in targets)
    return {"forward": len(targets) - backward, "backward": backward}


def host_batch_seconds(config, setup, repeats: int = 20) -> float:
    """Median time to build one step's host batch (this process's rows) and place it on the devices."""
    from mtt_jax import sharding
    step = iter(range(1000, 1000 + 10 * repeats))

    def build():
        batch = setup.train_source.train_batch(next(step), config.batch_size,
                                               shard=sharding.process_shard())
        import jax
        jax.block_until_ready(sharding.shard_local_batch(batch, setup.batch_shardings, setup.layout))
    build()
    return median_seconds(build, repeats)


def time_loop(config, setup, compiled, holder: Variant, steps: int, rounds: int = 11) -> dict:
    """The train loop's own pattern (prefetched host batches, dispatch, metrics read one step late)
    against the pure step, in alternating rounds of ``steps`` steps each, so that both see the same
    machine conditions; the ratio is the median over rounds, with its range. (On a 2-core CPU one
    round's ratio moves by +-10% with the machine, even between two copies of the same loop: 5 rounds
    put the median anywhere in 0.99-1.06.)"""
    import jax
    from mtt_jax import train

    def run(num_steps, first):
        pending = None
        for _, batch in train.train_batches(setup, config, first, first + num_steps):
            holder.state, metrics = compiled(holder.state, batch)
            if pending is not None:
                jax.device_get(pending)
            pending = metrics
        jax.block_until_ready(pending)
    def pure(num_steps):
        for _ in range(num_steps):
            holder.step()
    run(3, 1)
    pure_seconds, loop_seconds = [], []
    for r in range(rounds):
        for fn, times in ((lambda: pure(steps), pure_seconds), (lambda: run(steps, 100 + r * steps),
                                                                loop_seconds)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) / steps)
    ratios = [l / p for l, p in zip(loop_seconds, pure_seconds)]
    ratio = statistics.median(ratios)
    return {"loop_step_ms": 1e3 * statistics.median(loop_seconds), "loop_over_step": ratio,
            "loop_over_step_min": min(ratios), "loop_over_step_max": max(ratios), "loop_rounds": rounds,
            "host_wait_fraction": max(0.0, 1.0 - 1.0 / ratio)}


def variants(config):
    methods = _METHODS.value or [config.weighting.name]
    dtypes = _DTYPES.value or [config.dtype]
    meshes = [_mesh(m) for m in _MESHES.value] or [None]
    accums = [_integer("grad_accums", a) for a in _GRAD_ACCUMS.value] or [config.grad_accum_steps]
    unrolls = [_integer("unrolls", u) for u in _UNROLLS.value] or [config.grad_accum_unroll]
    scans = [_boolean("scan_layers", s) for s in _SCAN_LAYERS.value] or [
        config.model.scan_layers]
    kernels = _ATTENTION_KERNELS.value or [config.attention_kernel]
    task_counts = [_task_count(config, k) for k in _TASK_COUNTS.value] or [len(config.tasks)]
    for num_tasks, method, mesh, dtype, accum, unroll, scan, kernel in itertools.product(
            task_counts, methods, meshes, dtypes, accums, unrolls, scans, kernels):
        variant = config.copy_and_resolve_references()
        variant.tasks = tuple(config.tasks[:num_tasks])
        method, grouped = _method_and_grouping(method)
        if grouped:
            variant.weighting.blocks = tuple(_BLOCKS.value)
        variant.weighting.name, variant.dtype, variant.grad_accum_steps = method, dtype, accum
        variant.grad_accum_unroll, variant.attention_kernel = unroll, kernel
        variant.model.scan_layers = scan
        if mesh:
            variant.mesh.data, variant.mesh.fsdp, variant.mesh.tensor = mesh
        yield variant


def _task_count(config, text: str) -> int:
    """A ``--task_counts`` entry: at least 1 and at most the config's number of tasks."""
    count = _integer("task_counts", text)
    if not 1 <= count <= len(config.tasks):
        fail(f"--task_counts: {count} is not in [1, {len(config.tasks)}] (the config's tasks)")
    return count


def _method_and_grouping(text: str) -> tuple[str, bool]:
    """``("upgrad", True)`` for ``upgrad@blocks`` (the method per group of ``--blocks``)."""
    name, _, suffix = text.partition("@")
    if suffix not in ("", "blocks"):
        fail(f"--methods: {text!r}; write NAME or NAME@blocks")
    return name, suffix == "blocks"


def method_label(config) -> str:
    """The method's name, with ``@blocks`` where it is aggregated per group of the shared parameters."""
    return config.weighting.name + ("@blocks" if config.weighting.get("blocks") else "")


def variant_name(config) -> str:
    m = config.mesh
    return (f"{method_label(config)} T={len(config.tasks)} mesh {m.data}x{m.fsdp}x{m.tensor} {config.dtype} "
            f"accum {config.grad_accum_steps} unroll {config.grad_accum_unroll}"
            f"{' scan' if config.model.scan_layers else ''} "
            f"attention {config.attention_kernel}")


def compile_variants(configs) -> tuple[list[Variant], list[dict]]:
    """Compiles and warms up each variant. One that the device cannot run (out of memory, a kernel it
    lacks: XLA's runtime error) is reported as failed and left out, so that the others still give
    their rows: on a lent GPU, one variant must not cost the whole comparison."""
    import jax
    compiled, failed = [], []
    for config in configs:
        try:
            compiled.append(Variant(config))
        except jax.errors.JaxRuntimeError as e:
            error = (str(e).splitlines() or [type(e).__name__])[0][:300]
            failed.append({"variant": variant_name(config), "error": error})
            print(f"  failed {variant_name(config)}: {error}", flush=True)
            continue
        print(f"  compiled {variant_name(config)}: {compiled[-1].compile_seconds:.1f} s", flush=True)
    return compiled, failed


def attention_label(row: dict) -> str:
    """``auto``, or ``auto (cuDNN 12+12)`` where the step calls cuDNN's fused attention forward + backward."""
    calls = row["cudnn_attention_calls"]
    if not calls["forward"] + calls["backward"]:
        return row["attention_kernel"]
    return f"{row['attention_kernel']} (cuDNN {calls['forward']}+{calls['backward']})"


def matmul_label(row: dict) -> str:
    """``1.000``: the lowered step's matmul FLOPs over the model's; with a 16-bit dtype also the share
    of them whose operands are 16-bit, ``1.000 (99.1% 16-bit)``."""
    if row["hlo_matmul_over_model"] is None:
        return "-"
    label = f"{row['hlo_matmul_over_model']:.3f}"
    if row["dtype"] != "float32":
        label += f" ({100 * row['low_precision_matmul_share']:.1f}% 16-bit)"
    return label


def format_table(results: list[dict]) -> str:
    """The results as a markdown table; ``x first`` is the step time over the first row's with the same
    number of tasks (``--task_counts``: the ratio to the first method at each T)."""
    first_by_tasks = {}
    for r in results:
        first_by_tasks.setdefault(r.get("num_tasks"), r["step_ms"])
    paired, loop = "mfu_paired" in results[0], "loop_step_ms" in results[0]
    lines = ["| method | mesh | dtype | accum | unroll | layers | attention | step ms | x first | "
             "compile s | examples/s | tokens/s | TFLOP/step | HLO matmuls / model | TFLOP/s | MFU | "
             "peak MiB/dev | host batch ms | step/host |" +
             (" MFU paired (range) |" if paired else "") + (" loop/step (range) | host wait |" if loop else ""),
             "|---" * (19 + paired + 2 * loop) + "|"]
    for r in results:
        tokens = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        memory = f"{r['peak_memory_mib_per_device']:.1f}" if r["peak_memory_mib_per_device"] else "-"
        base = first_by_tasks[r.get("num_tasks")]
        method = r["method"] if len(first_by_tasks) == 1 else f"{r['method']} (T={r['num_tasks']})"
        line = (f"| {method} | {r['mesh']} | {r['dtype']} | {r['grad_accum_steps']} | "
                f"{r['grad_accum_unroll']} | {'scan' if r['scan_layers'] else 'unrolled'} | "
                f"{attention_label(r)} | {r['step_ms']:.1f} | "
                f"{r['step_ms'] / base:.2f} | {r['compile_s']:.1f} | {r['examples_per_s']:.0f} | {tokens} | "
                f"{r['model_tflops_per_step']:.4f} | {matmul_label(r)} | {r['achieved_tflops_per_s']:.3f} | "
                f"{100 * r['mfu']:.1f}% | {memory} | {r['host_batch_ms']:.2f} | {r['step_over_host']:.0f} |")
        if paired:
            line += (f" {100 * r['mfu_paired']:.1f}% ({100 * r['mfu_paired_min']:.1f}-"
                     f"{100 * r['mfu_paired_max']:.1f}%) |")
        if loop:
            line += (f" {r['loop_over_step']:.3f} ({r['loop_over_step_min']:.3f}-{r['loop_over_step_max']:.3f})"
                     f" | {100 * r['host_wait_fraction']:.1f}% |")
        lines.append(line)
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    initialize_distributed()  # multi-host: every process runs the same steps; process 0 reports
    import jax

    primary = jax.process_index() == 0
    if not primary:
        sys.stdout = open(os.devnull, "w")
    all_variants = checked_variants()
    if _MOCK_DATA.value:
        from mtt_jax.data import tfds_io
        # for the whole process: the context is kept, since a dropped one is closed by the garbage
        # collector (its generator exits the mock: "celeb_a is not prepared" under --mock_data)
        _OPEN_CONTEXTS.append(tfds_io.mock_data(_MOCK_DATA.value))
        _OPEN_CONTEXTS[-1].__enter__()
    dtypes = list(dict.fromkeys(v.dtype for v in all_variants))  # in the order of the rows
    peaks, peak_source = device_peaks(dtypes, _PEAK_REPEATS.value)
    measured = peak_source.startswith("measured")
    report = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "peak_source": peak_source, "huge_pages": huge_pages.enabled(),
              "measured_bf16_matmul_flops": None}
    print(f"device: {report['device']} x {report['devices']}; peak per device {format_peaks(peaks)} "
          f"({peak_source}); host allocations on huge pages: {'yes' if report['huge_pages'] else 'no'} "
          f"(`mtt_jax.perf.huge_pages`)", flush=True)
    if not measured:  # what a large bf16 matmul reaches, beside the datasheet
        report["measured_bf16_matmul_flops"] = matmul_flops = measured_matmul_peak("bfloat16", 8192, repeats=10)
        print(f"measured bf16 matmul, 8192^3, best of 10: {matmul_flops / 1e12:.1f} TFLOP/s "
              f"({100 * matmul_flops / peaks[dtypes[0]]:.1f}% of the datasheet peak)", flush=True)
    compiled, failed = compiled_variants(all_variants)
    peaks, boundary_peaks = timed_rounds(compiled, dtypes, peaks, measured)
    results = [v.result(peaks[v.config.dtype], _LOOP_ROUNDS.value if _LOOP.value else 0, _STEPS.value,
                        boundary_peaks[v.config.dtype])
               for v in compiled]
    print(format_table(results))
    for failure in failed:
        print(f"not run: {failure['variant']}: {failure['error']}")
    profile_rows = profile_first_variant(compiled[0], primary) if _PROFILE.value else []
    if _OUT.value and primary:
        from mtt_jax.perf import profiling
        from mtt_jax.run import workdir
        workdir.write_json(_OUT.value, {
            **report, "peak_flops_per_device": peaks, "boundary_peak_flops": boundary_peaks,
            "results": results, "failed": failed, "profile": profiling.rows_as_dicts(profile_rows)}, indent=2)
    if failed:  # the table is written, but it is not the whole comparison that was asked for
        sys.exit(1)


def checked_variants() -> list:
    """Every variant of the config, each checked (and the output paths) before any is run."""
    import jax
    from mtt_jax.run import config_check, workdir
    try:  # outputs that could not be written after the work are refused before it
        if _OUT.value:
            workdir.check_output_file(_OUT.value, "--out")
        if _PROFILE.value:
            workdir.check_location(_PROFILE.value, "--profile", urls=True)
        all_variants = list(variants(_CONFIG.value))
        for variant in all_variants:
            config_check.validate(variant, jax.device_count())
    except (config_check.ConfigError, workdir.WorkdirError) as e:
        fail(str(e))
    return all_variants


def compiled_variants(all_variants: list) -> tuple[list, list[dict]]:
    """The variants compiled (`compile_variants`), and those that could not be; exits if none could."""
    from mtt_jax.run import config_check
    try:
        compiled, failed = compile_variants(all_variants)
    except config_check.ConfigError as e:
        fail(str(e))
    if not compiled:
        print("error: no variant could run on this device (see the 'failed' lines)", file=sys.stderr)
        sys.exit(1)
    return compiled, failed


def timed_rounds(compiled: list, dtypes: list[str], peaks: dict, measured: bool) -> tuple[dict, dict]:
    """`--steps` interleaved rounds, one step of every variant each, so that every variant sees the same
    machine conditions; with `--paired_peak` on a CPU the peak matmul between rounds. The peaks (the
    best measured, where measured) and the matmul peaks between rounds."""
    import jax
    paired = _PAIRED_PEAK.value and jax.devices()[0].platform == "cpu"
    boundary_peaks = {d: [measured_matmul_peak(d, repeats=3)] if paired else [] for d in dtypes}
    for _ in range(_STEPS.value):
        for variant in compiled:
            variant.time_one_step()
        for dtype, boundary in boundary_peaks.items() if paired else ():
            boundary.append(measured_matmul_peak(dtype, repeats=3))
    if measured:  # again after the steps; the best of all is the peak
        again, _ = device_peaks(dtypes, _PEAK_REPEATS.value)
        peaks = {d: max([peaks[d], again[d], *boundary_peaks[d]]) for d in dtypes}
        print(f"peak after the timed steps: best {format_peaks(peaks)}", flush=True)
    return peaks, boundary_peaks


def profile_first_variant(first, primary: bool) -> list:
    """Three steps of the first variant traced into `--profile`, and its op-time table (process 0;
    the others run the steps with it)."""
    from mtt_jax.perf import profiling
    if not primary:
        for _ in range(3):
            first.step()
        return []
    rows = profiling.op_times(first.step, 3, _PROFILE.value, first.compiled.as_text())
    title = f"XLA op time by source op, {first.config.weighting.name} {first.config.dtype}"
    print(f"\n{title} (trace in {_PROFILE.value}):")
    print(profiling.format_op_table(rows))
    profiling.write_op_tables(_PROFILE.value, rows, title, "Three steps of the benchmark's first variant "
                              "(`python -m mtt_jax.benchmark --profile`), op ms per step.",
                              method=first.config.weighting.name, dtype=first.config.dtype)
    return rows


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
