"""retrieval: task-selective retrieval from one token sequence (offline, single-input, tokens).

    python -m mtt_jax.main --config configs/retrieval.py --workdir /tmp/mtt_retrieval
    python -m mtt_jax.main --config configs/retrieval.py:narrow --workdir /tmp/mtt_retrieval_narrow \\
        --config.model.task_encoder=False --config.model.task_attention=none

Sequences of 32 tokens from 8 groups x 16 values (every group 4 times); task ``retrieve_t`` is the
largest value among group t's tokens (mtt_jax.data.retrieval). Four tasks, so a task-agnostic pooled
state must hold 4 x 16 = 64 one-hot dimensions, a task-conditioned one 16. Bayes accuracy 1.0 per task;
the majority class scores 0.2275 (``retrieval.reference_accuracies``).

Variants: ``""`` (d_model 64 = V T: wide enough without task conditioning), ``narrow`` (d_model 16 = V:
the width bottleneck under which the task encoder should matter; compare ``model.task_encoder`` on and
off), ``tiny`` (for tests). Sequences are multisets (order carries nothing), so positions are sinusoidal.
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "retrieval"
    c.data.options.num_tasks = 4
    c.data.options.num_groups = 8
    c.data.options.num_values = 16
    c.data.options.length = 32
    c.data.options.num_eval_examples = 2048
    c.tasks = tuple(f"retrieve_{t}" for t in range(c.data.options.num_tasks))
    c.total_steps, c.batch_size, c.eval_every = 3000, 128, 500
    c.eval_batch_size = 512
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 64, 4, 256
    c.model.positional = "sinusoidal"
    c.optimizer.learning_rate = 1e-3
    if variant == "narrow":
        c.model.d_model, c.model.num_heads, c.model.mlp_dim = 16, 2, 64
    elif variant == "tiny":
        c.data.options.num_eval_examples = 64
        c.total_steps, c.batch_size, c.eval_batch_size, c.eval_every, c.log_every = 20, 16, 32, 10, 5
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/retrieval.py; choose '', 'narrow' or "
                         "'tiny'")
    return c
