"""GLUE: the nine tasks, multi-input, with the task encoder and task attention (from TFDS ``glue``).

    tfds build glue --data_dir=$DATA --file_format=array_record      # once; see mtt_jax/data/glue.py
    python -m mtt_jax.main --config configs/glue.py:small --workdir /tmp/glue \\
        --config.data.options.data_dir=$DATA

Variants:

- ``small`` (the default): 2 layers, d_model 128, 4 heads, MLP 512, 128 byte tokens, 16 examples per task
  per step (144 sequences); runs on a CPU. Eval on the first 2,000 validation examples of each task.
- ``base``: BERT-base's shape (Devlin et al. 2019): 12 layers, d_model 768, 12 heads, MLP 3072, dropout
  0.1; 256 byte tokens (bytes run about 4x longer than word pieces: pass
  ``--config.data.options.tokenizer=sentencepiece --config.data.options.sentencepiece_model=PATH``
  and 128 for sub-words); 32 examples per task per step; eval on the full validation sets.
- ``tiny``: for tests, on ``tfds_io.mock_data``.

Metrics are GLUE's (``mtt_jax.tasks``): CoLA Matthews correlation; MRPC and QQP F1 and accuracy; STS-B
Pearson and Spearman (on standardized scores); accuracy for the rest. MNLI is scored on
validation_matched (``--config.data.options.mnli_eval=mismatched`` for the other).
"""

from configs.default import base_config, shrink_for_tests
from mtt_jax.data.glue import TASK_NAMES


def get_config(variant: str = "small"):
    c = base_config()
    c.data.source = "glue"
    c.tasks = TASK_NAMES
    c.data.options.data_dir = ""          # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.options.tokenizer = "bytes"    # or "sentencepiece" with data.options.sentencepiece_model
    c.data.options.sentencepiece_model = ""
    c.data.options.mnli_eval = "matched"
    c.model.positional = "learned"
    c.model.task_encoder = True
    c.model.task_attention = "cross"
    c.optimizer.b2 = 0.999
    if variant in ("", "small"):
        c.data.options.max_length = 128
        c.data.options.max_eval_examples = 2000
        c.batch_size = 16                 # examples per task: 144 sequences per step
        c.eval_batch_size = 64
        c.total_steps, c.eval_every, c.log_every, c.checkpoint_every = 10000, 2000, 100, 2000
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 128, 4, 512
        c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-3, 500
    elif variant == "base":
        c.data.options.max_length = 256
        c.data.options.max_eval_examples = 0
        c.batch_size = 32
        c.eval_batch_size = 128
        c.total_steps, c.eval_every, c.log_every, c.checkpoint_every = 100000, 5000, 100, 5000
        c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 12, 768, 12, 3072
        c.model.dropout_rate = 0.1
        c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-4, 10000
        c.optimizer.weight_decay = 0.01
    elif variant == "tiny":
        c.data.options.max_length = 32
        shrink_for_tests(c)
        c.model.memory_tokens = 2
        c.optimizer.warmup_steps = 1
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/glue.py; choose 'small', 'base' or 'tiny'")
    return c
