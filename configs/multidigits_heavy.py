"""multidigits with heavy overlap: two 8x8 digits sharing a 6x6 block, plus pixel noise (offline).

    python -m mtt_jax.main --config configs/multidigits_heavy.py --workdir /tmp/mtt_heavy

The default config's MultiMNIST analogue (configs/default.py) with ``data.options.overlap="heavy"``
(mtt_jax.data.multidigits): the digits' corners at (1, 1) and (3, 3) of the 12x12 canvas, so 56% of
each digit's square (70% of its ink) lies under the other digit, and Gaussian pixel noise of standard
deviation 0.1. The two labels stay independent. Variant ``tiny`` for tests.
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "multidigits"
    c.tasks = ("left_digit", "right_digit")
    c.data.options.overlap = "heavy"
    if variant == "tiny":
        c.total_steps, c.batch_size, c.eval_every, c.log_every = 20, 16, 10, 5
        c.data.options.num_eval_pairs = 64
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/multidigits_heavy.py; choose '' or 'tiny'")
    return c
