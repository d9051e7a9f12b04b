"""The loop never recompiles after the first step, makes no implicit transfers, and prefetches
exactly the batches it would have built inline."""

import logging

import jax
import pytest

from configs import default as default_config
from mtt_jax import train
from mtt_jax.prefetch import prefetch


class CompileLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_recompilation_and_no_implicit_transfers(tmp_path):
    config = default_config.get_config("tiny")
    config.total_steps, config.eval_every, config.log_every, config.checkpoint_every = 12, 6, 2, 6
    config.transfer_guard = "disallow"   # any implicit host<->device transfer in the loop raises
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
