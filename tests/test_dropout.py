"""Dropout acts in training only, at every site that has it.

Every test elsewhere runs with ``dropout_rate = 0``, where `nn.Dropout` returns its input whatever
``deterministic`` says, so a site that dropped at eval and not in training would pass them all. Here
the rate is 0.5, and every `nn.Dropout` call of the model is watched (`nn.intercept_methods`; a
`jax.debug.callback` reports from inside the scanned and rematerialised blocks): at eval each returns
its input, in training each zeroes some of it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax import data, tasks as tasks_lib  # noqa: F401 (importing the sources registers their tasks)
from mtt_jax.data.base import InputSpec
from mtt_jax.models import MultiTaskTransformer

DIGITS = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
SEQ = tuple(tasks_lib.get(n) for n in ("majority", "mean_value", "repeat_tag"))
IMAGE = InputSpec("image", (8, 8))
TOKENS = InputSpec("tokens", (8,), vocab_size=32)
RATE = 0.5


def _images():
    return jax.random.uniform(jax.random.key(0), (4, 8, 8))


def _tokens():
    return jax.random.randint(jax.random.key(0), (len(SEQ), 4, 8), 1, 32)


# Each case's model covers these dropout sites (module paths), each of which must be seen.
BLOCK = ("Dropout_0", "Dropout_1")       # the residual after attention, the residual after the FFN
CASES = {
    "single_dense_cross": (dict(tasks=DIGITS, layout="single", input_spec=IMAGE), _images,
                           ["trunk/Dropout_0", "trunk/block_0/mlp/Dropout_0", "cross_task/Dropout_0"]
                           + [f"trunk/block_0/{d}" for d in BLOCK]),
    "multi_moe_cross": (dict(tasks=SEQ, layout="multi", input_spec=TOKENS, ffn="task_moe"), _tokens,
                        ["trunk/Dropout_0", "trunk/block_0/moe/Dropout_0", "cross_task/Dropout_0"]
                        + [f"trunk/block_0/{d}" for d in BLOCK]),
    "single_scanned_remat": (dict(tasks=DIGITS, layout="single", input_spec=IMAGE, scan_layers=True,
                                  remat="full", task_attention="none"), _images,
                             ["trunk/Dropout_0", "trunk/blocks/block/mlp/Dropout_0"]
                             + [f"trunk/blocks/block/{d}" for d in BLOCK]),
}


def _model(rate, **kwargs):
    return MultiTaskTransformer(num_layers=1, d_model=16, num_heads=2, mlp_dim=32, dropout_rate=rate,
                                **kwargs)


class _Watched:
    """``model.apply`` (jitted) that also reports every `nn.Dropout` call of the model:
    ``(outputs, {site: [whether each call returned its input unchanged]})``."""

    def __init__(self, model, train):
        self.calls = {}

        def watch(next_fun, args, kwargs_, context):
            out = next_fun(*args, **kwargs_)
            if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
                site = "/".join(context.module.path)
                jax.debug.callback(lambda same: self.calls.setdefault(site, []).append(bool(same)),
                                   jnp.array_equal(out, args[0]))
            return out

        def apply(variables, inputs, rng):
            with nn.intercept_methods(watch):
                return model.apply(variables, inputs, train=train, rngs={"dropout": rng})[0]

        self._apply = jax.jit(apply)

    def __call__(self, variables, inputs, seed):
        self.calls.clear()
        outputs = self._apply(variables, inputs, jax.random.key(seed))
        jax.effects_barrier()
        return outputs, dict(self.calls)


@pytest.mark.parametrize("case", list(CASES))
def test_dropout_is_off_at_eval_and_on_in_training_at_every_site(case):
    config, make_inputs, expected_sites = CASES[case]
    inputs = make_inputs()
    model, plain = _model(RATE, **config), _model(0.0, **config)
    init = jax.jit(lambda inputs: plain.init(jax.random.key(1), inputs))  # (eager: 4x slower)
    params = nn.unbox(init(inputs)["params"])                                # dropout has none
    for head in [k for k in params if k.startswith("head_")]:   # heads start at zero: randomise them
        kernel = params[head]["dense"]["kernel"]
        params[head]["dense"]["kernel"] = jax.random.normal(jax.random.key(4), kernel.shape)
    variables = {"params": params}
    reference, _ = _Watched(plain, False)(variables, inputs, 0)    # dropout off: rate 0

    # Eval: every dropout call returns its input, and the outputs are those of the rate-0 model.
    evaluate = _Watched(model, False)
    for seed in (2, 3):
        outputs, calls = evaluate(variables, inputs, seed)
        assert set(expected_sites) <= set(calls), sorted(calls)
        dropped = sorted(site for site, same in calls.items() if not all(same))
        assert not dropped, f"dropout active at eval at {dropped}"
        for name in reference:
            np.testing.assert_allclose(outputs[name], reference[name], rtol=1e-6, atol=1e-6, err_msg=name)

    # Training: every dropout call drops some of its input, and the outputs depend on the key.
    train = _Watched(model, True)
    first, calls = train(variables, inputs, 2)
    assert set(expected_sites) <= set(calls), sorted(calls)
    idle = sorted(site for site, same in calls.items() if any(same))
    assert not idle, f"dropout off in training at {idle}"
    second, _ = train(variables, inputs, 3)
    for name in reference:
        assert not np.allclose(first[name], second[name]), name
        assert not np.allclose(first[name], reference[name]), name
