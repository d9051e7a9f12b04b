"""The loop never recompiles after the first step, makes no implicit transfers, and prefetches
exactly the batches it would have built inline."""

import json
import logging
import time

import jax
import pytest

from configs import default as default_config
from mtt_jax import sharding, train
from mtt_jax.perf import flops, profile_window
from mtt_jax.run import writers
from mtt_jax.run.prefetch import prefetch


class CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_recompilation_and_no_implicit_transfers_with_a_profiled_window(tmp_path):
    """Also with a `jax.profiler` window over an eval and a checkpoint (updates 5-7): its op table is the
    train step's alone, three executions of it, read without compiling the step again."""
    config = default_config.get_config("tiny")
    config.total_steps, config.eval_every, config.log_every, config.checkpoint_every = 12, 6, 2, 6
    config.transfer_guard = "disallow"   # any implicit host<->device transfer in the loop raises
    config.weighting.diagnostics_every = 0  # no conditional: every instruction runs once per update
    config.profile.first_step, config.profile.num_steps = 5, 3
    handler = CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        state, _ = train.train_and_evaluate(config, str(tmp_path), quiet=True)
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)
    compiles = [m for m in handler.messages if m.startswith("Compiling")]
    assert sum("train_step" in m for m in compiles) == 1, compiles
    assert sum("eval_step" in m for m in compiles) == 1, compiles
    assert int(state.step) == 12

    table = json.loads((tmp_path / "profile" / "op_times.json").read_text())
    assert (table["first_step"], table["last_step"]) == (5, 7) and table["wall_ms_per_update"] > 0
    assert list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    # The matmul FLOPs of each update's executions on the 8 devices: the step's global matmul FLOPs (and
    # 0.01% more: small products that every device computes whole, such as the task encoder's).
    setup = train.build(config)
    with setup.context():
        lowered = train.config_train_step(setup, config).lower(
            setup.create_state(), sharding.shard_batch(setup.source.train_batch(0, config.batch_size),
                                                       setup.batch_shardings, setup.layout))
    step_flops = sum(flops.hlo_matmul_flops(lowered.compiler_ir("hlo").as_hlo_text()).values())
    assert sum(r["matmul_flops_per_step"] for r in table["rows"]) == pytest.approx(step_flops, rel=1e-3)
    assert sum(r["share"] for r in table["rows"]) == pytest.approx(1)
    assert "fwd trunk/block_*/mlp/wi/dot_general" in {r["label"] for r in table["rows"]}


def test_train_records_report_the_throughput_of_their_updates_alone(tmp_path, monkeypatch):
    """Each record's step time is of the updates since the record before: not the first update (the
    compile), not an eval (made 2 s slower here) or a checkpoint. Its examples/s and model FLOP/s follow
    from it and the FLOPs formula; a CPU has no datasheet peak, so no MFU, and reports no memory, which
    a known accelerator adds (both stubbed here)."""
    config = default_config.get_config("tiny")
    config.total_steps, config.eval_every, config.log_every, config.checkpoint_every = 12, 6, 2, 6
    config.weighting.diagnostics_every = 0  # the step of the test above: compiled once per module
    real_run_eval = train.run_eval

    def slow_eval(*args, **kwargs):
        time.sleep(2.0)
        return real_run_eval(*args, **kwargs)
    monkeypatch.setattr(train, "run_eval", slow_eval)
    monkeypatch.setattr(flops, "datasheet_bf16_peak", lambda kind: 1e12)  # as on a known accelerator
    assert train.device_peak_memory_mib() is None  # XLA:CPU reports none; GPU and TPU runtimes do
    monkeypatch.setattr(train, "device_peak_memory_mib", lambda: 123.0)
    train.train_and_evaluate(config, str(tmp_path), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10, 12]
    # A window over the eval would read at least 1000 ms per update (2 s over 2 updates).
    assert all(0 < r["step_ms"] < 1000 for r in train_records), [r["step_ms"] for r in train_records]
    model_flops = flops.training_flops(config.model, train.build(config).tasks, "single", "image",
                                       (12, 12), config.batch_size).training
    for r in train_records:
        seconds = r["step_ms"] / 1e3
        assert r["examples_per_s"] == pytest.approx(config.batch_size / seconds)
        assert r["achieved_tflops_per_s"] == pytest.approx(model_flops / seconds / 1e12)
        assert r["mfu"] == pytest.approx(model_flops / 8 / seconds / 1e12)  # 8 devices, 1 TFLOP/s each
        assert "tokens_per_s" not in r  # image inputs
        assert r["peak_memory_mib_per_device"] == 123.0
        assert 0 <= r["input_wait_fraction"] <= 1
    median_ms = sorted(r["step_ms"] for r in train_records)[2:4]
    line = next(l for l in (tmp_path / "summary.md").read_text().splitlines() if "throughput" in l)
    assert line.startswith(f"- throughput (median of 6 train records): step {sum(median_ms) / 2:.1f} ms, ")
    assert "model TFLOP/s, MFU " in line and "tokens/s" not in line and "% of the time, " in line
    assert line.endswith(", peak memory 123 MiB per device")


def test_the_step_timer_counts_the_wait_for_input_in_its_window(monkeypatch):
    """Batches that take 100 ms to come, updates that take 25 ms: 125 ms per update, 80% of it waiting;
    a new mark starts a new window. (A clock that the test moves: exact, where sleeps were 30% off.)"""
    now = [100.0]
    monkeypatch.setattr(writers.time, "perf_counter", lambda: now[0])

    def slow_batches():
        for step in range(6):
            now[0] += 0.1
            yield step

    timer = writers.StepTimer()
    assert timer.window(1) is None
    for step in timer.timed(slow_batches()):
        if step == 0:
            timer.mark(0)
        else:
            now[0] += 0.025  # the update
        if step == 3:
            assert timer.window(3) == pytest.approx((0.125, 0.8))
            timer.mark(3)
            assert timer.window(3) is None  # nothing since the mark
    assert timer.window(5) == pytest.approx((0.125, 0.8))
    now[0] += 0.25  # 250 ms more outside the batch iterator: counted, and not as waiting
    assert timer.window(6) == pytest.approx((0.5 / 3, 0.2 / 0.5))


def test_a_profile_window_the_resumed_run_has_passed_is_not_traced(tmp_path):
    window = profile_window.ProfileWindow(str(tmp_path), first_step=5, num_steps=3, start_step=6)
    assert window.missed and not window.enabled
    window.before_update(7, state=None)
    assert not window.active and window.after_update(7, None, hlo_text=lambda: "") is None
    assert not profile_window.ProfileWindow(str(tmp_path), 0, 3, start_step=0).missed  # 0: off
    assert profile_window.ProfileWindow(str(tmp_path), 5, 3, start_step=4).enabled


def test_prefetch_yields_every_step_in_order_and_reraises():
    assert list(prefetch(lambda s: s * s, 3, 8, depth=2)) == [(s, s * s) for s in range(3, 8)]
    assert list(prefetch(lambda s: s, 0, 3, depth=0)) == [(0, 0), (1, 1), (2, 2)]

    def failing(step):
        if step == 2:
            raise RuntimeError("bad batch")
        return step
    with pytest.raises(RuntimeError, match="bad batch"):
        list(prefetch(failing, 0, 5))
    # Abandoning the iterator early stops the producer.
    iterator = prefetch(lambda s: s, 0, 1000, depth=1)
    assert next(iterator) == (0, 0)
    iterator.close()
