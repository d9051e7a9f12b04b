"""XLA op times from a real XLA:CPU trace: control-flow thunks, which span their bodies' thunks, add no
time of their own."""

import time
from types import SimpleNamespace as N

import jax
import jax.numpy as jnp
import pytest

from mtt_jax.perf import profiling

HLO = """\
ENTRY %main.4 (x.1: f32[8,8]) -> f32[8,8] {
  %tuple = (s32[], (f32[8,8]{1,0}, f32[8]{0}), /*index=2*/f32[8,8]{1,0}) tuple(%a, %b, %c)
  %while.5 = (s32[], (f32[8,8]{1,0}, f32[8]{0}), /*index=2*/f32[8]{0}) while(%tuple), condition=%c, body=%b
  %while.7 = f32[8,8]{1,0} get-tuple-element(%while.5), index=2, metadata={op_name="jit(f)/while"}
  %conditional.2 = f32[8,8]{1,0} conditional(%p, %while.7, %while.7), branch_computations={%t, %f}
  %fusion.3 = f32[8,8]{1,0} fusion(%conditional.2), metadata={op_name="f/custom_jvp_call(g)/tanh"}
  ROOT %call.1 = f32[8,8]{1,0} call(%fusion.3), to_apply=%g.1
}
"""


def test_control_flow_instructions_are_found_by_opcode_not_name():
    assert profiling.instruction_opcodes(HLO) == {
        "tuple": "tuple", "while.5": "while", "while.7": "get-tuple-element",
        "conditional.2": "conditional", "fusion.3": "fusion", "call.1": "call"}
    assert profiling.control_flow_instructions(HLO) == {"while.5", "conditional.2", "call.1"}


def test_host_thunks_of_control_flow_add_no_time_but_device_kernels_are_kept():
    labels = {"while.5": "fwd while", "fusion.1": "fwd dot_general", "fusion.2": "fwd tanh"}
    event = lambda name, ns, **stats: N(name=name, duration_ns=ns, stats=list(stats.items()))
    host = N(name="/host:CPU", lines=[N(name="tf_XLAEigen", events=[
        event("while.5", 100), event("fusion.1", 60), event("fusion.2", 30)])])
    rows = profiling.rows_by_source_op([host], labels, 1, {"fusion.1": 5.0}, control_flow={"while.5"})
    assert [(r.label, r.ms_per_step * 1e6, r.share, r.matmul_flops_per_step) for r in rows] == [
        ("fwd dot_general", 60, pytest.approx(2 / 3), 5.0), ("fwd tanh", 30, pytest.approx(1 / 3), 0.0)]
    # A GPU kernel that only the loop names (its predicate's copy) is device time: it stays.
    gpu = N(name="/device:GPU:0", lines=[N(name="Stream #1", events=[
        event("memcpy", 10, hlo_op="while.5"), event("gemm", 60, hlo_op="while.5::fusion.1")])])
    rows = profiling.rows_by_source_op([host, gpu], labels, 1, control_flow={"while.5"})
    assert [(r.label, r.ms_per_step * 1e6) for r in rows] == [("fwd dot_general", 60), ("fwd while", 10)]


def test_events_of_another_module_with_the_same_instruction_names_are_left_out():
    """An eval step traced beside the train step has its own ``fusion.1``: only the named module's
    events count (an event without the stat, as in older traces, is kept)."""
    labels = {"fusion.1": "fwd dot_general"}
    event = lambda name, ns, **stats: N(name=name, duration_ns=ns, stats=list(stats.items()))
    host = N(name="/host:CPU", lines=[N(name="tf_XLAEigen", events=[
        event("fusion.1", 60, hlo_module="jit_train_step"), event("fusion.1", 500, hlo_module="jit_eval_step"),
        event("fusion.1", 7)])])
    rows = profiling.rows_by_source_op([host], labels, 1, module="jit_train_step")
    assert [(r.label, r.ms_per_step * 1e6) for r in rows] == [("fwd dot_general", 67)]
    assert profiling.rows_by_source_op([host], labels, 1)[0].ms_per_step * 1e6 == 567


def test_a_scan_counts_its_body_once(tmp_path):
    """A 10-step scan of a 128x128 matmul and a tanh: the ``while`` thunk's event spans its body's
    thunks, so counting it gave a "while" row of at least half the op time and the body under half."""
    n, length, num_steps = 128, 10, 3

    def scan(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=length)[0]

    x, w = jnp.ones((n, n)), jnp.full((n, n), 0.01)
    compiled = jax.jit(scan).lower(x, w).compile()
    compiled(x, w).block_until_ready()
    walls = []

    def step():
        start = time.perf_counter()
        compiled(x, w).block_until_ready()
        walls.append(time.perf_counter() - start)

    rows = profiling.op_times(step, num_steps, str(tmp_path), compiled.as_text())
    by_label = {r.label: r for r in rows}
    assert not [r.label for r in rows if "while" in r.label]
    assert by_label["fwd dot_general"].matmul_flops_per_step == 2 * n**3 * length  # once per execution
    assert by_label["fwd dot_general"].share + by_label["fwd tanh"].share > 0.75
    assert sum(r.share for r in rows) == pytest.approx(1)
    # Leaf thunks do not overlap on a thread: their time is at most the calls' wall time per thread.
    profile = jax.profiler.ProfileData.from_file(str(next(tmp_path.rglob("*.xplane.pb"))))
    threads = sum(len(list(plane.lines)) for plane in profile.planes if plane.name == "/host:CPU")
    assert sum(r.ms_per_step for r in rows) <= 1e3 * sum(walls) / num_steps * threads


def test_a_conditional_counts_its_taken_branch_once(tmp_path):
    """A scan whose body picks one of two matmul branches with `lax.cond`: the ``conditional`` thunk's
    event would span the taken branch's thunks, so only the branch's own ops count, each execution
    once (10 of the taken branch's matmul, none of the other's)."""
    n, length = 128, 10

    def body(c, _):
        c = jax.lax.cond(c[0, 0] > 0, lambda c: jnp.tanh(c @ w), lambda c: jnp.sin(c @ w.T @ w), c)
        return c, None

    x, w = jnp.ones((n, n)), jnp.full((n, n), 0.01)
    f = jax.jit(lambda x: jax.lax.scan(body, x, None, length=length)[0])
    compiled = f.lower(x).compile()
    assert "conditional(" in compiled.as_text()
    compiled(x).block_until_ready()
    rows = profiling.op_times(lambda: compiled(x).block_until_ready(), 2, str(tmp_path), compiled.as_text())
    assert not [r.label for r in rows if "cond" in r.label or "while" in r.label]
    assert sum(r.matmul_flops_per_step for r in rows) == 2 * n**3 * length  # the taken branch only
    assert sum(r.share for r in rows) == pytest.approx(1)
