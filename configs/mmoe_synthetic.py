"""MMoE synthetic regression pairs (Ma et al., KDD 2018, §3.2): task relatedness set by a correlation p.

    python -m mtt_jax.main --config configs/mmoe_synthetic.py --workdir /tmp/mmoe \\
        --config.data.options.correlation=0.5

Offline (generated). Inputs: 100 features read by the model as 10 tokens of 10 (``model.patch_size``).
Variants: default one pair (``mmoe_a1``, ``mmoe_a2``) at p = 0.9; ``pairs``: three pairs at
p = 1.0, 0.9 and 0.5 in one run (pairs are mutually unrelated, cosine 0); ``tiny`` for tests.
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "mmoe_synthetic"
    c.tasks = ("mmoe_a1", "mmoe_a2")
    # One p for all pairs (a float), or one per pair (a tuple); the type is fixed by the variant.
    c.data.options.correlation = (1.0, 0.9, 0.5) if variant == "pairs" else 0.9
    c.data.options.num_pairs = 1
    c.data.options.num_eval_examples = 2000
    c.model.patch_size = 10
    c.model.positional = "learned"
    c.batch_size, c.total_steps, c.eval_every = 128, 3000, 500
    c.optimizer.learning_rate = 1e-3
    if variant == "pairs":
        c.tasks = ("mmoe_a1", "mmoe_a2", "mmoe_b1", "mmoe_b2", "mmoe_c1", "mmoe_c2")
        c.data.options.num_pairs = 3
    elif variant == "tiny":
        c.data.options.num_eval_examples = 64
        c.total_steps, c.batch_size, c.eval_every, c.log_every = 20, 16, 10, 5
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/mmoe_synthetic.py; "
                         "choose '', 'pairs' or 'tiny'")
    return c
