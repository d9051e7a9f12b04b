"""Where a compiled step spends its time: XLA op times from a `jax.profiler` trace, by source op.

``python -m mtt_jax.benchmark --config ... --profile DIR`` runs a few steps of the first variant under
`jax.profiler.trace` (the trace in DIR opens in TensorBoard's profile plugin / XProf), reads it back with
`jax.profiler.ProfileData` and sums the events that belong to an instruction of the compiled HLO. Each
instruction is labelled with the JAX operation that produced it (its ``op_name`` metadata), with the
layer index folded (``block_*``) and the pass marked (``fwd`` / ``bwd``: under ``transpose(...)``), so a
table of a few rows says which part of the model dominates.

Which events count: on XLA:CPU every instruction (thunk) is one event on a host thread, named after the
instruction; a control-flow thunk (``while``, ``conditional``, ``call``) spans the thunks of the
computations it runs, which are events of their own, so only the leaf thunks count (else every scan
counts its body twice). On a GPU the kernels are events of the device planes (``/device:GPU:N``) with the
instruction in their ``hlo_op`` stat; the host threads there only launch them, so where device planes
hold such kernels, only they count. The GPU reading is tested on a synthetic profile only: no GPU
trace has been read yet.

Each row also has its matmul FLOPs: every instruction's (`flops.instruction_matmul_flops`) times its
executions, which are its events over its distinct kernel names (a split-K gemm launches a gemm and a
reduction per execution; an XLA:CPU thunk is one event).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import re
import tempfile
from typing import Callable

from mtt_jax.perf import flops
from mtt_jax.run import workdir

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MODULE_NAME = re.compile(r"^HloModule ([^\s,]+)", re.MULTILINE)
# Op-name segments of JAX's wrappers (``eval_jaxpr``: inside a scan body, from JAX 0.11 on).
_WRAPPERS = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "eval_jaxpr"}
# Opcodes whose XLA:CPU thunk runs other computations' thunks, each traced as an event of its own.
CONTROL_FLOW = frozenset({"while", "conditional", "call"})


@dataclasses.dataclass(frozen=True)
class OpTime:
    label: str            # e.g. "bwd trunk/block_*/mlp/wo/dot_general"
    ms_per_step: float
    share: float          # of the summed op time
    count: int            # HLO instructions folded into this row
    matmul_flops_per_step: float = 0.0  # of the row's executions (`flops.instruction_matmul_flops`)

    @property
    def matmul_flops_per_s(self) -> float:
        """The row's matmul FLOPs over its op time; on XLA:CPU per thread that runs the op (a matmul
        that the other thread helps with can exceed one thread's peak)."""
        return self.matmul_flops_per_step / (self.ms_per_step / 1e3) if self.ms_per_step else 0.0


def source_label(op_name: str) -> str:
    """``jit(train_step)/.../transpose(jvp(M))/M.encode/trunk/block_3/mlp/wo/dot_general`` ->
    ``bwd trunk/block_*/mlp/wo/dot_general``."""
    if not op_name:
        return "(no source op)"
    direction = "bwd" if "transpose(" in op_name else "fwd"
    parts = [p for p in op_name.split("/") if p and "(" not in p and "." not in p and p not in _WRAPPERS]
    path = "/".join(parts[-5:]) if parts else op_name.rsplit("/", 1)[-1]
    return f"{direction} {re.sub(r'block_[0-9]+', 'block_*', path)}"


def instruction_labels(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> `source_label` of its op_name."""
    return _labels(flops.parse_hlo(hlo_text))


def _labels(module) -> dict[str, str]:
    labels = {}
    for i in module.instructions:
        op_name = _OP_NAME.search(i.attributes)
        labels[i.name] = source_label(op_name.group(1) if op_name else "")
    return labels


def instruction_opcodes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its opcode (``fusion``, ``while``, ``get-tuple-element``, ...)."""
    return {i.name: i.op for i in flops.parse_hlo(hlo_text).instructions}


def control_flow_instructions(hlo_text: str) -> frozenset[str]:
    """The instructions whose thunk encloses other thunks' events (`CONTROL_FLOW`), by opcode: a name
    says nothing (``%while.7`` may be the loop's ``get-tuple-element``)."""
    return _control_flow(flops.parse_hlo(hlo_text))


def _control_flow(module) -> frozenset[str]:
    return frozenset(i.name for i in module.instructions if i.op in CONTROL_FLOW)


def op_times(step: Callable[[], None], num_steps: int, trace_dir: str, hlo_text: str) -> list[OpTime]:
    """Traces ``num_steps`` calls of ``step()`` into ``trace_dir`` (a local folder or a bucket URL,
    `trace_to`) and returns rows by source op, per step (`read_op_times`)."""
    import jax
    with trace_to(trace_dir) as local_dir:
        with jax.profiler.trace(local_dir):
            for _ in range(num_steps):
                step()
        return read_op_times(local_dir, num_steps, hlo_text)


@contextlib.contextmanager
def trace_to(trace_dir: str):
    """The local folder for `jax.profiler` to write a trace for ``trace_dir``: the folder itself, or for
    a bucket URL a temporary one whose files are uploaded under the URL when the block ends (the
    profiler's export writes local files)."""
    if not workdir.is_url(trace_dir):
        yield trace_dir
        return
    with tempfile.TemporaryDirectory(prefix="mtt_jax_trace_") as local_dir:
        yield local_dir
        workdir.upload_tree(local_dir, trace_dir)


def latest_trace(trace_dir: str) -> str:
    """The newest ``*.xplane.pb`` under ``trace_dir`` (the profiler writes one per trace and host under
    ``plugins/profile/<time>/``)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
    return max(paths, key=os.path.getmtime)


def read_op_times(trace_dir: str, num_steps: int, hlo_text: str) -> list[OpTime]:
    """Rows by source op, per step, of the compiled module ``hlo_text`` in the newest trace under
    ``trace_dir``; the HLO text is read once for the labels, the control-flow instructions and the
    matmul FLOPs, and events of other modules traced beside it (an eval step) are left out."""
    import jax
    profile = jax.profiler.ProfileData.from_file(latest_trace(trace_dir))
    module = flops.parse_hlo(hlo_text)
    try:  # the FLOP rates are a column beside the times, which an HLO it cannot read must not stop
        instruction_flops = flops.instruction_matmul_flops(module)
    except flops.UNREADABLE_HLO as e:
        print(f"warning: no matmul FLOP rates in the profile ({type(e).__name__}: {e})")
        instruction_flops = {}
    name = _MODULE_NAME.search(hlo_text)
    return rows_by_source_op(profile.planes, _labels(module), num_steps, instruction_flops,
                             control_flow=_control_flow(module), module=name.group(1) if name else None)


def _stat(event, name: str):
    return next((value for key, value in event.stats if key == name), None)


def thunk_instruction(event, labels: dict[str, str]) -> str | None:
    """XLA:CPU: a thunk's event is named after its instruction."""
    return event.name if event.name in labels else None


def kernel_instruction(event, labels: dict[str, str]) -> str | None:
    """GPU: a kernel names its instruction in its ``hlo_op`` stat, enclosing ops first where there are
    several (``while.3::fusion.12``); the innermost one that is in the HLO."""
    hlo_op = _stat(event, "hlo_op")
    if hlo_op is None:
        return None
    return next((op for op in reversed(str(hlo_op).split("::")) if op in labels), None)


def rows_by_source_op(planes, labels: dict[str, str], num_steps: int,
                      instruction_flops: dict[str, float] | None = None,
                      control_flow: frozenset[str] = frozenset(),
                      module: str | None = None) -> list[OpTime]:
    """Event time (and matmul FLOPs, from ``instruction_flops`` per execution) by source op, per step:
    the kernels of the device planes where there are any (lines the profiler derives there, such as
    "XLA Ops", carry no ``hlo_op`` and would count a loop and its kernels twice), else the host's
    thunks but those of the ``control_flow`` instructions (`control_flow_instructions`), whose events
    span their bodies' thunks. With ``module``, an event whose ``hlo_module`` stat names another module
    is left out: instruction names (``fusion.3``) repeat across modules."""
    def matched(plane_list, instruction_of):
        return [(instruction, event.duration_ns, event.name) for plane in plane_list
                for line in plane.lines for event in line.events
                if (module is None or _stat(event, "hlo_module") in (None, module))
                and (instruction := instruction_of(event, labels)) is not None]
    def leaf_thunk_instruction(event, labels):
        instruction = thunk_instruction(event, labels)
        return None if instruction in control_flow else instruction
    planes = list(planes)
    events = (matched([p for p in planes if p.name.startswith("/device:")], kernel_instruction) or
              matched([p for p in planes if not p.name.startswith("/device:")], leaf_thunk_instruction))
    instruction_flops = instruction_flops or {}
    nanoseconds, matmul_flops, launches = collections.Counter(), collections.Counter(), collections.Counter()
    counts, kernels = collections.defaultdict(set), collections.defaultdict(set)
    for instruction, duration, kernel in events:
        nanoseconds[labels[instruction]] += duration
        counts[labels[instruction]].add(instruction)
        kernels[instruction].add(kernel)
        launches[instruction] += 1
    # An instruction may launch several kernels per execution (a split-K gemm and its reduction):
    # its executions are its events over its distinct kernel names.
    for instruction, n in launches.items():
        executions = n / len(kernels[instruction])
        matmul_flops[labels[instruction]] += instruction_flops.get(instruction, 0.0) * executions
    total = sum(nanoseconds.values())
    return [OpTime(label, ns / 1e6 / num_steps, ns / total, len(counts[label]),
                   matmul_flops[label] / num_steps)
            for label, ns in nanoseconds.most_common()]


def rows_as_dicts(rows: list[OpTime]) -> list[dict]:
    """The rows for a JSON file, each with its matmul FLOP rate."""
    return [{**dataclasses.asdict(r), "matmul_flops_per_s": r.matmul_flops_per_s} for r in rows]


def write_op_tables(directory: str, rows: list[OpTime], title: str, note: str, **fields) -> None:
    """``op_times.md`` (``title``, ``note`` and `format_op_table`) and ``op_times.json`` (``fields`` and
    the rows) in ``directory``, beside the trace; a folder or a bucket URL."""
    workdir.write_text(workdir.join(directory, "op_times.md"),
                       "\n".join([f"# {title}", "", note, "", format_op_table(rows), ""]))
    workdir.write_json(workdir.join(directory, "op_times.json"),
                       {**fields, "rows": rows_as_dicts(rows)}, indent=2)


def format_op_table(rows: list[OpTime], top: int = 20) -> str:
    if not rows:
        return ("no XLA op events matched the compiled HLO (open the trace directory in TensorBoard's "
                "profile plugin)")
    def line(r: OpTime) -> str:
        rate = f"{r.matmul_flops_per_s / 1e9:.4g}" if r.matmul_flops_per_step else "-"
        return f"| {r.label} | {r.ms_per_step:.1f} | {100 * r.share:.1f}% | {r.count} | {rate} |"
    lines = ["| source op | op ms / step (summed over threads or streams) | share | HLO ops | "
             "matmul GFLOP/s per op time |", "|---|---|---|---|---|"]
    lines += [line(r) for r in rows[:top]]
    rest = rows[top:]
    if rest:
        lines.append(line(OpTime(f"({len(rest)} more)", *(sum(getattr(r, field) for r in rest) for field in
                                 ("ms_per_step", "share", "count", "matmul_flops_per_step")))))
    matmul = sum(r.matmul_flops_per_step for r in rows)
    in_matmuls = sum(r.share for r in rows if r.matmul_flops_per_step)
    lines.append(f"\nmatmul FLOPs per step in the profiled ops: {matmul / 1e12:.4g} TFLOP; "
                 f"{100 * in_matmuls:.1f}% of the op time is in ops with matmuls")
    return "\n".join(lines)
