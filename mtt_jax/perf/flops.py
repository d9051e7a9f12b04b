"""Model FLOPs of one training step, counted per module (in the manner of MaxText's
``calculate_tflops_training_per_device``, attention included).

Only matrix multiplications count (2 FLOPs per multiply-add); LayerNorm, softmax, GELU and the
optimizer are left out, as in MaxText and the PaLM MFU definition (Chowdhery et al. 2022, App. B).
A training step costs 3x the forward pass (forward, and a backward pass of twice its cost). The extra
work of gradient-based weighting methods (per-task gradients, solvers) is not model FLOPs and is not
counted, so MFU is comparable across methods.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

from mtt_jax.tasks import TaskSpec


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one step, by part; ``training`` is 3x their sum."""
    embedding: float
    projections: float   # attention q, k, v, out and the MLP, all layers
    attention: float     # q k^T and attention x v, all layers
    task_attention: float
    heads: float
    readout: float = 0.0  # the per-task attention pools (``model.readout = "attention_pool"``)

    @property
    def forward(self) -> float:
        return (self.embedding + self.projections + self.attention + self.task_attention + self.heads
                + self.readout)

    @property
    def training(self) -> float:
        return 3.0 * self.forward


def training_flops(model_config, tasks: tuple[TaskSpec, ...], layout: str, input_kind: str,
                   input_shape: tuple[int, ...], batch_size: int) -> FlopCount:
    """FLOPs of one step for ``batch_size`` examples (multi-input: per task, so T x batch_size).

    ``model_config`` needs num_layers, d_model, mlp_dim, patch_size, task_encoder, task_attention,
    memory_tokens; ``task_attention_pool`` (aligned task attention) defaults to "positions" and
    ``readout`` to "mean" (no matmul; "attention_pool": 4 L D per task and example, tagging tasks
    read every position instead).
    Single-input task encoders: task tokens ("tokens", True) add T positions to each sequence;
    additive features ("add") run the trunk once per task, T times its FLOPs (the embedding once).
    """
    m = model_config
    d, f, num_tasks = m.d_model, m.mlp_dim, len(tasks)
    if input_kind == "image":
        h, w = input_shape[:2]
        channels = input_shape[2] if len(input_shape) == 3 else 1
        length = (h // m.patch_size) * (w // m.patch_size)
        embed_per_token = 2 * m.patch_size ** 2 * channels * d
    elif input_kind == "vector":
        length = input_shape[0] // m.patch_size
        embed_per_token = 2 * m.patch_size * d
    else:  # token lookup: a gather, no matmul
        length, embed_per_token = input_shape[0], 0
    examples = batch_size * (num_tasks if layout == "multi" else 1)
    pass_per_task = layout == "single" and m.task_encoder == "add"
    sequences = examples * (num_tasks if pass_per_task else 1)   # through the trunk
    # Single input with task tokens: the T task tokens join every sequence.
    seq_len = length + (num_tasks if layout == "single" and m.task_encoder in (True, "tokens") else 0)
    tokens = sequences * seq_len
    projections = tokens * m.num_layers * 2 * (4 * d * d + 2 * d * f)
    attention = sequences * m.num_layers * 2 * 2 * seq_len * seq_len * d
    if m.task_attention == "none":
        task_attention = 0.0
    elif layout == "single":  # T streams per example attend to each other
        streams = batch_size * num_tasks
        task_attention = streams * 2 * 4 * d * d + batch_size * 2 * 2 * num_tasks * num_tasks * d
    elif m.task_attention == "aligned":  # every position attends over all tasks' keys of its row
        per_task = length if getattr(m, "task_attention_pool", "positions") == "positions" else 1
        keys_per_row = num_tasks * per_task  # own task's included: computed, then masked
        task_attention = (tokens * 2 * 2 * d * d + batch_size * keys_per_row * 2 * 2 * d * d
                          + tokens * keys_per_row * 2 * 2 * d)
    else:  # every position attends over the memory tokens of all tasks
        memory = num_tasks * m.memory_tokens
        task_attention = tokens * 2 * (2 * d * d + 2 * memory * d) + memory * 2 * 2 * d * d
    heads = readout = 0.0
    pools = getattr(m, "readout", "mean") == "attention_pool"
    for t in tasks:
        per_example = length if t.kind == "tagging" else 1
        heads += batch_size * per_example * 2 * d * t.num_outputs
        if pools and t.kind != "tagging":  # the query's logits and the weighted sum over the positions
            readout += batch_size * length * 2 * 2 * d
    embedding = examples * length * embed_per_token
    return FlopCount(float(embedding), float(projections), float(attention), float(task_attention),
                     float(heads), float(readout))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE_AND_OPERANDS = re.compile(r"\s*([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_CUBLAS_GEMM = re.compile(r'custom_call_target="__cublas\$')
_CUDNN_ATTENTION = re.compile(r'custom_call_target="__cudnn\$fmha\w*"')
_LOGITS_SHAPE = re.compile(r'"intermediate_tensor_shape":\s*\{[^{}]*?"dimensions":\s*\[([^\]]*)\]')
_ENTRY = re.compile(r"^ENTRY %?([\w.\-]+) ", re.MULTILINE)
_CALLED = re.compile(r"\b(calls|to_apply|body|branch_computations|true_computation|false_computation)="
                     r"(\{[^{}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    computation: str
    shape: str            # "f32[8,4]{1,0}", or a tuple "(bf16[8,4]{1,0}, s8[1024]{0})"
    op: str
    operands: list[str]   # names
    attributes: str
    root: bool = False    # the computation's ROOT


def _split_top_level(text: str) -> tuple[list[str], str]:
    """``"a, f32[2,3]{1,0} %b), x={1}"`` -> (["a", "f32[2,3]{1,0} %b"], ", x={1}")."""
    depth, parts, start = 0, [], 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            if depth == 0:
                parts.append(text[start:i])
                return [p.strip() for p in parts if p.strip()], text[i + 1:]
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts + [text[start:]] if p.strip()], ""


@dataclasses.dataclass(frozen=True)
class _Module:
    """A parsed HLO module's instructions, indexed by name and by computation."""
    instructions: list[_Instruction]
    by_name: dict[str, _Instruction]
    by_computation: dict[str, list[_Instruction]]

    @property
    def shapes(self) -> dict[str, str]:
        return {name: i.shape for name, i in self.by_name.items()}


# What reading an HLO text this parser does not follow raises; the benchmark and the profile report
# such a failure beside their timings instead of stopping.
UNREADABLE_HLO = (ValueError, KeyError, AttributeError, IndexError)


def _split_shape(right_hand_side: str) -> tuple[str, str]:
    """``(s32[], (f32[8]{0}, f32[])) while(%t), ...`` -> the shape and the rest: a tuple shape up to its
    matching parenthesis (tuples nest, as a loop's state may), else one token (``f32[8,4]{1,0}``). An
    unclosed tuple leaves no rest, so the line is not read as an instruction."""
    if not right_hand_side.startswith("("):
        shape, _, rest = right_hand_side.partition(" ")
        return shape, rest
    depth = 0
    for i, char in enumerate(right_hand_side):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return right_hand_side[:i + 1], right_hand_side[i + 1:]
    return right_hand_side, ""


def parse_hlo(hlo_text: str) -> _Module:
    """An HLO module's text (``as_hlo_text()``, before or after optimization) -> its instructions: name,
    computation, shape, opcode, operand names and the attribute text (``metadata={op_name=...}``
    included). The one reader of HLO text here, shared by the FLOP counters and `mtt_jax.perf.profiling`."""
    instructions, computation = [], ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        shape, rest = _split_shape(m.group(2))
        call = _OPCODE_AND_OPERANDS.match(rest)
        if call:
            operands, attributes = _split_top_level(call.group(2))
            instructions.append(_Instruction(m.group(1), computation, shape, call.group(1),
                                             [o.split()[-1].lstrip("%") for o in operands], attributes,
                                             line.lstrip().startswith("ROOT ")))
    by_computation = collections.defaultdict(list)
    for i in instructions:
        by_computation[i.computation].append(i)
    return _Module(instructions, {i.name: i for i in instructions}, by_computation)


def _dims(shape: str) -> tuple[str, list[int]]:
    """The element type and dimensions of an array shape, or of a tuple's first element."""
    dtype, dims = _ARRAY.search(shape).groups()
    return dtype, [int(d) for d in dims.split(",") if d]


def _fused_attention_flops(instruction: _Instruction, shapes: dict[str, str]) -> float:
    """cuDNN's fused attention (custom calls ``__cudnn$fmha...``, operands q, k, v first): its two
    matmuls over the logits' shape ``[..., L, S]`` (in the backend config), ``2 S |q| + 2 L |v|``; the
    backward twice that, the model's count (flash attention's recomputation of ``q k^T`` is not)."""
    logits = _LOGITS_SHAPE.search(instruction.attributes)
    if not logits:
        raise ValueError(f"no intermediate_tensor_shape in cuDNN attention {instruction.name}")
    queries, keys = (int(d) for d in re.findall(r"\d+", logits.group(1))[-2:])
    q_size, v_size = (math.prod(_dims(shapes[o])[1]) for o in (instruction.operands[0],
                                                               instruction.operands[2]))
    forward = 2.0 * (keys * q_size + queries * v_size)
    return 2 * forward if "Backward" in _CUDNN_ATTENTION.search(instruction.attributes).group(0) else forward


def _is_counted_matmul(instruction: _Instruction) -> bool:
    """A ``dot`` or a cuDNN fused attention call: what `hlo_matmul_flops` counts (a module before
    optimization has no cuBLAS gemms)."""
    return instruction.op == "dot" or (instruction.op == "custom-call"
                                       and bool(_CUDNN_ATTENTION.search(instruction.attributes)))


def _matmul_flops(instruction: _Instruction, shapes: dict[str, str]) -> float:
    """2 x outputs x contracted size of a ``dot`` or a cuBLAS gemm custom call, the matmuls of cuDNN's
    fused attention, else 0."""
    if instruction.op == "custom-call" and _CUDNN_ATTENTION.search(instruction.attributes):
        return _fused_attention_flops(instruction, shapes)
    if instruction.op == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    elif instruction.op == "custom-call" and _CUBLAS_GEMM.search(instruction.attributes):
        contracting = re.search(r'\\?"lhs_contracting_dimensions\\?":\[([^\]]*)\]', instruction.attributes)
    else:
        return 0.0
    lhs_dims = _dims(shapes[instruction.operands[0]])[1]
    axes = [int(a) for a in re.findall(r"\d+", contracting.group(1))] if contracting else []
    return 2.0 * math.prod(_dims(instruction.shape)[1]) * math.prod(lhs_dims[a] for a in axes)


def _constant(instruction: _Instruction | None) -> int | None:
    if instruction is None or instruction.op != "constant":
        return None
    try:
        return int(instruction.operands[0])
    except (IndexError, ValueError):
        return None


def _trip_count(loop: _Instruction, module: _Module) -> int:
    """Iterations of a counted ``while``: its condition's root is ``counter < N`` (the counter at tuple
    index 0, N a constant) and the counter starts at a constant, as `jax.lax.scan` and ``fori_loop``
    lower. Any other loop (one that stops on a test of its values) counts as one iteration."""
    condition = re.search(r"condition=%?([\w.\-]+)", loop.attributes).group(1)
    root = next((i for i in module.by_computation[condition] if i.root), None)
    by_name = module.by_name
    if root is None or root.op != "compare" or "direction=LT" not in root.attributes:
        return 1
    counter, bound = (by_name.get(o) for o in root.operands[:2])
    if counter is None or counter.op != "get-tuple-element" or not re.search(r"\bindex=0\b",
                                                                              counter.attributes):
        return 1
    initial = by_name.get(loop.operands[0]) if loop.operands else None
    start = _constant(by_name.get(initial.operands[0]) if initial is not None and initial.op == "tuple"
                      and initial.operands else None)
    end = _constant(bound)
    return max(end - start, 0) if start is not None and end is not None else 1


def hlo_matmul_flops(hlo_text: str) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of the ``dot`` instructions and cuDNN fused attention calls in an HLO
    module's text, keyed by their operands' element types (``"bf16 x bf16"``), as the compiler sees the
    program: a check of `training_flops` against the model that was traced, and of which matmuls run in
    low precision.

    Read the module before optimization (``jax.jit(f).lower(...).compiler_ir("hlo").as_hlo_text()``):
    global shapes, dtypes as traced. Computations count as often as the entry runs them: a scan's
    body (microbatches, ``model.scan_layers``) times its trip count (`_trip_count`), a called
    computation once per call, and every branch of a conditional, so count a step without periodic
    diagnostics. A matmul outside what the entry calls (a parse this counter does not follow) is an
    error.
    """
    module = parse_hlo(hlo_text)
    shapes = module.shapes
    matmul_flops = {i.name: _matmul_flops(i, shapes) for i in module.instructions if _is_counted_matmul(i)}
    reached = set()

    @functools.cache
    def computation_flops(name: str) -> tuple[tuple[str, float], ...]:
        reached.add(name)
        total: dict[str, float] = collections.Counter()
        for i in module.by_computation[name]:
            if i.name in matmul_flops:
                lhs, rhs = (_dims(shapes[o])[0] for o in i.operands[:2])
                total[f"{lhs} x {rhs}"] += matmul_flops[i.name]
            for kind, called in _CALLED.findall(i.attributes):
                times = _trip_count(i, module) if kind == "body" else 1
                for callee in re.findall(r"[\w.\-]+", called):
                    for key, value in computation_flops(callee):
                        total[key] += times * value
        return tuple(total.items())

    entry = _ENTRY.search(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    by_dtypes = dict(computation_flops(entry.group(1)))
    missed = sorted({module.by_name[name].computation for name in matmul_flops} - reached)
    if missed:
        raise ValueError(f"matmuls in computations the entry does not reach as parsed: {missed[:3]}")
    return by_dtypes


def instruction_matmul_flops(compiled_hlo: str | _Module) -> dict[str, float]:
    """Matmul FLOPs of each instruction of a compiled module that runs as one op, by name: a ``dot``, a
    cuBLAS gemm or cuDNN fused attention custom call, or a fusion with dots inside (XLA:CPU's YNNPACK
    fusions, GPU Triton gemm fusions; nested fusions included). Per execution: a profile's events of an
    instruction inside a loop times these give the loop's FLOPs. ``compiled_hlo``: the module's text, or
    its `parse_hlo` already read."""
    module = parse_hlo(compiled_hlo) if isinstance(compiled_hlo, str) else compiled_hlo
    shapes = module.shapes

    @functools.cache
    def op_flops(name: str) -> float:
        i = module.by_name[name]
        if i.op != "fusion":
            return _matmul_flops(i, shapes)
        called = re.search(r"calls=%?([\w.\-]+)", i.attributes)
        return sum(op_flops(j.name) for j in module.by_computation[called.group(1)]) if called else 0.0
    return {i.name: f for i in module.instructions if (f := op_flops(i.name))}


def low_precision_share(flops_by_dtypes: dict[str, float]) -> float:
    """The share of matmul FLOPs whose operands are both 16-bit floats (bf16 or f16)."""
    total = sum(flops_by_dtypes.values())
    low = sum(f for key, f in flops_by_dtypes.items()
              if all(t in ("bf16", "f16") for t in key.split(" x ")))
    return low / total if total else math.nan


def model_flops_utilization(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    return flops_per_step / step_seconds / peak_flops if step_seconds > 0 and peak_flops > 0 else math.nan


def throughput(model_flops: float, sequences: int, tokens: int, step_seconds: float, num_devices: int,
               peak_flops: float | None) -> dict[str, float | None]:
    """What a step of ``step_seconds`` achieves: examples (sequences) and tokens per second, the model's
    FLOP/s (``model_flops``: `FlopCount.training` of the global batch) and its MFU against the peak
    per device; None where there are no tokens or no peak. The benchmark's columns and the training
    log's fields."""
    return {"examples_per_s": sequences / step_seconds,
            "tokens_per_s": tokens / step_seconds if tokens else None,
            "achieved_tflops_per_s": model_flops / step_seconds / 1e12,
            "mfu": (model_flops_utilization(model_flops / num_devices, step_seconds, peak_flops)
                    if peak_flops else None)}


# Datasheet dense (not 2:4-sparse) bf16 peaks per JAX device, for MFU on accelerators: the first
# pattern that `device_kind` matches (case-insensitive), so the more specific names come first. NVIDIA's
# H100 / H200 datasheet (SXM, PCIe and NVL forms), A100, L40S and L4 datasheets; Cloud TPU's system
# architecture pages, per chip (one JAX device from v4 on).
DATASHEET_BF16_PEAK = (
    (r"\bGH200\b", 989e12),          # Grace Hopper: the H100 SXM tensor cores
    (r"\bH[12]00\b.*\bPCIe\b", 756e12),
    (r"\bH[12]00\b.*\bNVL\b", 835e12),
    (r"\bH[12]00\b", 989e12),        # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    (r"\bA100\b", 312e12),           # SXM4 and PCIe, 40 and 80 GB
    (r"\bL40S\b", 362e12),
    (r"\bL4\b", 121e12),
    (r"^TPU v4\b", 275e12),
    (r"^TPU v5 ?lite\b|^TPU v5e\b", 197e12),
    (r"^TPU v5p?$", 459e12),           # v5p reports "TPU v5"
    (r"^TPU v6 ?lite\b|^TPU v6e\b", 918e12),
)


def datasheet_bf16_peak(device_kind: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a JAX device kind from `DATASHEET_BF16_PEAK`, or None."""
    for pattern, peak in DATASHEET_BF16_PEAK:
        if re.search(pattern, device_kind.strip(), re.IGNORECASE):
            return peak
    return None
