"""The example plugin in a run: the ``loss_proportional`` method on the ``noisy_sums`` source's two tasks.

    python -m mtt_jax.main --config examples/plugin/config.py --workdir /tmp/plugin
    python -m mtt_jax.main --config examples/plugin/config.py:tiny --workdir /tmp/plugin_tiny \\
        --config.weighting.loss_proportional.min_loss=1e-6

Run from the repository root, where ``examples.plugin`` is importable (your own package: installed, or
on ``PYTHONPATH``). ``plugins`` names the modules that register the method and the source; the run
imports them before the config is checked. They are also imported here, in ``get_config``, so that
the method's options block exists when the command line's overrides are applied.
"""

from configs.default import base_config
from mtt_jax.registry import load_plugins

PLUGINS = ("examples.plugin.my_methods", "examples.plugin.my_source")


def get_config(variant: str = ""):
    c = base_config()
    c.plugins = PLUGINS
    load_plugins(c)  # adds weighting.loss_proportional (min_loss), the registered method's defaults
    c.data.source = "noisy_sums"
    c.tasks = ("sum_sign", "half_sum")
    c.weighting.name = "loss_proportional"
    c.model.patch_size = 2                # 8 features read as 4 tokens of 2
    c.total_steps, c.eval_every, c.checkpoint_every = 600, 200, 200
    if variant == "tiny":
        c.total_steps, c.batch_size, c.eval_batch_size, c.eval_every, c.log_every = 8, 16, 64, 4, 1
        c.checkpoint_every = 4
        c.data.options.num_eval_examples = 64
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 1, 16, 2, 32
        c.optimizer.warmup_steps = 1
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of examples/plugin/config.py; choose '' or 'tiny'")
    return c
