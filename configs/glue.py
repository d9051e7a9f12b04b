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
- ``bert_base_mtdnn``: MT-DNN (Liu et al., "Multi-Task Deep Neural Networks for Natural Language
  Understanding", ACL 2019): a pretrained BERT-base encoder fine-tuned on eight GLUE tasks at once, with
  per-task heads and batches drawn in proportion to the tasks' sizes. Needs the checkpoint
  (docs/pretrained.md)::

      python -m mtt_jax.main --config configs/glue.py:bert_base_mtdnn --workdir /tmp/mtdnn \
          --config.model.checkpoint=$BERT --config.data.options.data_dir=$DATA

Metrics are GLUE's (``mtt_jax.tasks``): CoLA Matthews correlation; MRPC and QQP F1 and accuracy; STS-B
Pearson and Spearman (on standardized scores); accuracy for the rest. MNLI is scored on
validation_matched (``--config.data.options.mnli_eval=mismatched`` for the other).
"""

from configs.default import base_config, shrink_for_tests
from mtt_jax.data.glue import TASK_NAMES

# GLUE's train split sizes (TFDS glue 2.0.0), for the recipes' epoch counts.
TRAIN_EXAMPLES = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qqp": 363846, "stsb": 5749, "mnli": 392702,
                  "qnli": 104743, "rte": 2490, "wnli": 635}


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
    elif variant == "bert_base_mtdnn":
        bert_base_mtdnn(c)
    elif variant == "bert_base_adapters":
        bert_base_adapters(c)
    elif variant == "bert_base_hyperformer":
        bert_base_hyperformer(c)
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/glue.py; choose 'small', 'base', 'tiny', "
                         "'bert_base_mtdnn', 'bert_base_adapters' or 'bert_base_hyperformer'")
    return c


def bert_base(c) -> None:
    """A pretrained BERT-base (Devlin et al. 2019) as the trunk: its shape and trunk options, and its
    WordPiece vocabulary, read from the checkpoint folder (``model.checkpoint``, which the tokenizer
    follows when it is overridden)."""
    c.model.checkpoint = ""
    c.data.options.tokenizer = "wordpiece"
    c.data.options.wordpiece_vocab = c.model.get_ref("checkpoint")
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 12, 768, 12, 3072
    c.model.positional, c.model.norm_position, c.model.token_types = "learned", "post", 2
    c.model.embed_norm, c.model.embed_scale, c.model.gelu, c.model.layer_norm_eps = True, False, "exact", 1e-12
    c.model.vocab_size = 0                # the vocabulary's (30522 in bert-base-uncased)


def bert_base_mtdnn(c) -> None:
    """MT-DNN's multi-task fine-tuning (Liu et al. 2019, §4.2): learning rate 5e-5, batch size 32, 5
    epochs, linear warm-up over the first 10% of steps, dropout 0.1, gradient norm clipped at 1;
    each batch drawn from the tasks in proportion to their train sizes, a linear head per task on the
    shared encoder (no task encoder or task attention), reading [CLS] through BERT's pooler (§3.1;
    ``model.readout="cls"``, ``model.pooler=True``, filled from the checkpoint's ``pooler.dense``).
    WNLI is left out, as in MT-DNN's training.

    Differences, by what this library has: AdamW with weight decay 0.01 (BERT's fine-tuning optimizer)
    for MT-DNN's Adamax; cosine decay after the warm-up for linear; a batch's rows mix tasks (flat
    mixture batches) where MT-DNN's batches each hold one task; a linear head on [CLS] for every task,
    where MT-DNN's pairwise ranking task (QNLI) scores each candidate and normalises over them
    (§3.1); one dropout rate, where MT-DNN uses 0.3 for MNLI's and 0.05 for CoLA's head; 128 tokens
    (BERT's GLUE length) for MT-DNN's 512.
    GLUE dev metrics: the eval split ``test`` is GLUE's labelled validation split (mtt_jax/data/glue.py)."""
    bert_base(c)
    c.tasks = tuple(task for task in TASK_NAMES if task != "wnli")
    c.data.options.max_length = 128
    c.data.options.max_eval_examples = 0
    c.data.mixture.method = "proportional"
    c.model.task_encoder = False
    c.model.task_attention = "none"
    c.model.readout, c.model.pooler = "cls", True
    c.model.dropout_rate = 0.1
    c.weighting.name = "ew"
    c.weighting.diagnostics_every = 0     # flat mixture batches give no per-task gradients
    c.batch_size, c.eval_batch_size = 32, 128
    epochs = 5
    c.total_steps = epochs * sum(TRAIN_EXAMPLES[task] for task in c.tasks) // c.batch_size  # 148,296
    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_steps = c.total_steps // 10
    c.optimizer.end_learning_rate_factor = 0.0
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
    c.optimizer.weight_decay = 0.01
    c.optimizer.grad_clip_norm = 1.0
    c.eval_every, c.log_every, c.checkpoint_every = 10000, 100, 10000


def bert_base_adapters(c) -> None:
    """Houlsby et al. (2019) in the multi-task setting: BERT-base frozen, a bottleneck adapter of 64 units
    per task after each sublayer of every block (§2.1; 64 is one of their sizes {8, 64, 256}), trained
    with the heads at learning rate 3e-4 (their sweep: 3e-5 to 3e-3), on MT-DNN's mixture and schedule.
    Trained: 24 adapters x 8 tasks x 99k values = 19.0M, 17% of the 109M of BERT-base's encoder."""
    bert_base_mtdnn(c)
    c.model.adapters, c.model.adapter_dim = "task", 64
    c.optimizer.freeze = "encoder"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.weight_decay = 0.0


def bert_base_hyperformer(c) -> None:
    """HyperFormer (Karimi Mahabadi et al. 2021) on BERT-base (the paper's encoder is T5's): adapters of
    24 units (their reduction factor 32 of 768) generated per task and block from the task encoder's
    features through an 8-dimensional task embedding, the encoder frozen, learning rate 3e-4 (theirs).
    One hypernetwork per block (HyperFormer, not ++), so the parameters do not grow with the tasks. The
    task encoder's features are also added to every input position (the multi-input task encoder)."""
    bert_base_mtdnn(c)
    c.model.adapters, c.model.adapter_dim, c.model.adapter_hyper_dim = "hyper", 24, 8
    c.model.task_encoder = True
    c.optimizer.freeze = "encoder"
    c.optimizer.learning_rate = 3e-4
    c.optimizer.weight_decay = 0.0
