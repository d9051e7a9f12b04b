"""seqtasks: synthetic token tasks of three kinds and known relatedness (offline, multi-input).

    python -m mtt_jax.main --config configs/seqtasks.py --workdir /tmp/mtt_seq

Default tasks (mtt_jax.data.seqtasks): ``majority`` (4-way classification), ``majority_parity`` (binary,
a function of majority), ``mean_value`` (regression) and ``repeat_tag`` (token tagging). Four more are
available (``first_group``, ``max_value``, ``distinct_count``, ``last_group_tag``); the ``all8``
variant trains all eight. ``mixture``: the same four tasks from flat mixture batches (uniform rates,
128 rows per step, the rows of the default's four sub-batches of 32), e.g.
``--config.data.mixture.method=explicit --config.data.mixture.rates=(4,1,1,1)``.
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "seqtasks"
    c.tasks = ("majority", "majority_parity", "mean_value", "repeat_tag")
    c.total_steps = 1500
    c.batch_size = 32            # examples per task
    c.eval_every = 500
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.mlp_dim = 256
    c.model.positional = "sinusoidal"
    if variant == "all8":
        c.tasks = c.tasks + ("first_group", "max_value", "distinct_count", "last_group_tag")
    elif variant == "mixture":
        c.data.mixture.method = "uniform"
        c.batch_size = 32 * len(c.tasks)   # rows of the flat batch
        c.weighting.diagnostics_every = 0  # flat batches give no per-task gradients
    elif variant == "tiny":
        c.total_steps, c.batch_size, c.eval_every, c.log_every = 20, 8, 10, 5
        c.data.options.num_eval_examples = 32
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/seqtasks.py; choose '', 'all8', 'mixture' or 'tiny'")
    return c
