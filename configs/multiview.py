"""multiview: aligned multi-view evidence about one latent class (offline, multi-input, tokens).

    python -m mtt_jax.main --config configs/multiview.py --workdir /tmp/mtt_multiview \\
        --config.model.task_attention=aligned
    python -m mtt_jax.main --config configs/multiview.py:shuffled --workdir /tmp/mtt_multiview_shuffled

Four tasks, each with its own 16-token noisy view of the same instance's class (mtt_jax.data.multiview):
``view_class`` (c, 4 classes), ``view_parity`` (c mod 2), ``view_high`` (c >= 2), each view revealing
the class per token with probability 0.15, and ``view_blind`` (c) whose own view is pure noise. Exact
Bayes accuracies (own view -> all four views of the row): view_class 0.6017 -> 0.8192, view_parity and
view_high 0.7390 -> 0.8812, view_blind 0.25 (chance) -> 0.8192; ``multiview.reference_accuracies``.
Row b of every task's sub-batch is the same instance (the source declares ``aligned_rows``), which
``model.task_attention=aligned`` reads; the base config keeps the library default task attention.

Variants: ``""``; ``shuffled``, the negative control (``data.options.shuffle_rows=True``: each task's
rows are other instances, so every task's Bayes accuracy falls to its own view's, view_blind to chance);
``tiny`` (for tests).
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "multiview"
    c.tasks = ("view_class", "view_parity", "view_high", "view_blind")
    c.data.options.view_length = 16
    c.data.options.reveal = (0.15, 0.15, 0.15, 0.0)
    c.data.options.shuffle_rows = False
    c.data.options.num_eval_examples = 2048
    c.total_steps, c.batch_size, c.eval_every = 2000, 64, 500   # batch_size: examples per task
    c.eval_batch_size = 512
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 64, 4, 256
    c.model.positional = "sinusoidal"
    c.optimizer.learning_rate = 1e-3
    if variant == "shuffled":
        c.data.options.shuffle_rows = True
    elif variant == "tiny":
        c.data.options.num_eval_examples = 64
        c.total_steps, c.batch_size, c.eval_batch_size, c.eval_every, c.log_every = 20, 8, 32, 10, 5
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/multiview.py; choose '', 'shuffled' or "
                         "'tiny'")
    return c
