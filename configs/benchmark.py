"""Reference config of the benchmark (issue 7): a multi-input text model, 4 layers, d_model 256, 4 heads,
MLP 1024, sequence 128, global batch 32, 3 tasks, vocabulary 8192, AdamW. On a CPU the batch is computed as
16 microbatches (``grad_accum_steps``; the same update), which keeps activations in cache.

    python -m mtt_jax.benchmark --config configs/benchmark.py

The data are seqtasks sequences (ids < 32) in a model with an 8192-entry vocabulary, so the embedding
and its gradient have the reference size. Variants: ``tasks8`` (8 tasks, for the weighting-method step
time ratios; 2 layers, d_model 128, sequence 64, 16 examples per task), ``base`` (12 layers, d_model 768,
12 heads, MLP 3072, for accelerators) with 128 examples per task: 49k tokens per step, in the range of
BERT-base's pretraining batches (256 x 128 tokens). At the reference's 12k tokens a base step is 6.5
TFLOP, 6.6 ms at an H200's bf16 peak, which leaves per-kernel overheads a large share; at 49k tokens it is
26 TFLOP. Not yet run on a GPU.
"""

from configs.default import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.source = "seqtasks"
    c.data.options.length = 128
    c.data.options.num_eval_examples = 64
    c.tasks = ("majority", "mean_value", "repeat_tag")
    c.batch_size = 32  # the multi-input batch_size counts examples per task: 96 sequences per step
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 4, 256, 4, 1024
    c.model.positional = "sinusoidal"
    c.model.vocab_size = 8192
    c.total_steps, c.eval_every, c.log_every = 30, 1000, 10
    c.weighting.diagnostics_every = 0
    if not variant:  # on a CPU: the same update over 16 microbatches of 2 examples per task, 2 per
        # scan iteration; activations stay in cache, 1.6x faster than one batch (docs/performance.md)
        c.grad_accum_steps, c.grad_accum_unroll = 16, 2
    if variant == "tasks8":  # smaller per task, so that 8 tasks fit a CPU run
        c.tasks = ("majority", "majority_parity", "mean_value", "repeat_tag", "first_group",
                   "max_value", "distinct_count", "last_group_tag")
        c.data.options.length = 64
        c.batch_size = 16
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 128, 4, 512
        c.model.vocab_size = 0
    elif variant == "base":
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 12, 768, 12, 3072
        c.batch_size = 128  # per task: 384 sequences, 49k tokens per step
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/benchmark.py; choose '', tasks8, base")
    return c
