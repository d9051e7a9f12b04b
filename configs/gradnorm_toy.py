"""GradNorm's regression toy (Chen et al., ICML 2018, §4): tasks whose losses differ by sigma_i^2.

    python -m mtt_jax.main --config configs/gradnorm_toy.py --workdir /tmp/toy
    python -m mtt_jax.main --config configs/gradnorm_toy.py --workdir /tmp/toy_ew --config.weighting.name=ew

Offline (generated). Two tasks with sigma = (1, 100) by default
(``--config.data.options.sigmas="(1.0, 10.0, 100.0)"`` and matching tasks for more); inputs of 250
features read by the model as 25 tokens of 10 (``model.patch_size``). Weighting: GradNorm with the
paper's asymmetry alpha (``weighting.gradnorm``). Variant ``tiny`` for tests.
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "gradnorm_toy"
    c.tasks = ("toy_0", "toy_1")
    c.data.options.sigmas = (1.0, 100.0)
    c.data.options.num_eval_examples = 2000
    c.model.patch_size = 10
    c.model.positional = "learned"
    c.weighting.name = "gradnorm"
    c.batch_size, c.total_steps, c.eval_every = 128, 3000, 500
    c.optimizer.learning_rate = 1e-3
    if variant == "tiny":
        c.data.options.num_eval_examples = 64
        c.total_steps, c.batch_size, c.eval_every, c.log_every = 20, 16, 10, 5
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/gradnorm_toy.py; choose '' or 'tiny'")
    return c
