"""Default: MultiMNIST analogue on scikit-learn's 8x8 digits (offline, single-input, two tasks).

    python -m mtt_jax.main --config configs/default.py --workdir /tmp/mtt
    python -m mtt_jax.main --config configs/default.py:tiny --workdir /tmp/mtt   # seconds, for checks

Every field can be overridden on the command line, e.g. ``--config.weighting.name=uncertainty``.
"""

import ml_collections
from ml_collections import config_dict

from mtt_jax.weighting import DEFAULT_OPTIONS


def base_config() -> ml_collections.ConfigDict:
    """Fields shared by every experiment family; families override what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1500
    c.batch_size = 128          # global; multi-input: examples per task
    c.eval_batch_size = 256
    c.eval_every = 500
    c.log_every = 100
    c.tasks = ("left_digit", "right_digit")
    c.plugins = ()              # modules imported, in order, before the config is checked: they register
    #                             methods, sources, tasks, variants (mtt_jax.registry; docs/extending.md)

    c.data = ml_collections.ConfigDict()
    c.data.source = "multidigits"
    c.data.options = ml_collections.ConfigDict()   # source keyword options, e.g. jitter
    c.data.eval_split = "test"            # held-out set the run is scored on: test, or validation to
    #                                       choose hyper-parameters (mtt_jax.data.base.SPLITS)
    # Flat mixture batches (multi-input sources: glue, seqtasks): batch_size rows per step,
    # each from one task drawn by the mixing rates (mtt_jax.data.mixtures), for loss-based methods.
    c.data.mixture = ml_collections.ConfigDict()
    c.data.mixture.method = ""            # "" (off: one sub-batch per task), proportional, temperature,
    #                                       uniform or explicit
    c.data.mixture.temperature = 1.0      # temperature: rates ~ min(N_t, maximum) ** (1 / temperature)
    c.data.mixture.maximum = 0.0          # temperature: cap on N_t (0: none)
    c.data.mixture.rates = ()             # explicit: one rate per task

    # Not type-safe: model.task_encoder takes a bool or a string, also in a copy of the config.
    c.model = ml_collections.ConfigDict(type_safe=False)
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.dropout_rate = 0.0
    c.model.patch_size = 2
    c.model.positional = "learned"        # or "sinusoidal"
    # task identity -> Dense -> task features, entering the trunk as: "tokens" (single-input: T task
    # tokens prepended, one pass), "add" (added to every position; single-input: one trunk pass per
    # task, T times the trunk's FLOPs) or "none"; True: the layout's own form (single-input "tokens",
    # multi-input "add"), False: "none". (A literal on the command line: --config.model.task_encoder=add.)
    c.model.task_encoder = config_dict.FieldReference(True, field_type=object)
    c.model.task_encoder_init_std = 0.02  # the task features' initial scale: 0.02 suits task tokens;
    #                                       "add" adds them to the embedded inputs, which it barely moves
    c.model.task_attention = "cross"      # or "none": the plain shared-trunk baseline; or "aligned"
    #                                       (multi-input sources whose rows are aligned across tasks):
    #                                       task i's stream queries the other tasks' streams of its row
    c.model.task_attention_self = False   # also attend to the task's own stream
    c.model.task_attention_pool = "positions"  # aligned: keys/values are the other tasks' positions of
    #                                       the row, or "pooled": their masked-mean-pooled vectors
    c.model.memory_tokens = 4             # multi-input task attention: memory tokens per task
    c.model.readout = "mean"              # each task's vector from the positions: "mean" (masked mean;
    #                                       single-input task tokens are read directly) or
    #                                       "attention_pool" (a learned query per task over the positions)
    #                                       or "cls" (multi-input: the first position, BERT's [CLS])
    c.model.pooler = False                # readout="cls": through BERT's pooler (Dense + tanh), which a
    #                                       BERT checkpoint's pooler.dense fills
    c.model.remat = "none"                # none | full | dots | dots_no_batch
    c.model.vocab_size = 0                # token inputs: embedding rows (0: the source's vocabulary)
    c.model.ffn = "dense"                 # or "task_moe": task-gated mixture-of-experts feed-forward
    c.model.num_experts = 4               # task_moe: experts per block (mlp_dim split over them)
    c.model.film = False                  # task-conditioned LayerNorms in every block (CA-MTL)
    c.model.scan_layers = False           # blocks as one nn.scan: compile time independent of depth
    # A pretrained encoder (docs/pretrained.md): a Hugging Face BERT or ViT folder (config.json and
    # model.safetensors) whose weights replace the initialised trunk's; "" trains from scratch. The
    # fields below are the trunk options such checkpoints need (BERT: post, 2, True, False, exact, 1e-12).
    c.model.checkpoint = ""
    c.model.norm_position = "pre"         # "pre": x + f(LN(x)); "post": LN(x + f(x)), no final LN
    c.model.token_types = 0               # token inputs: segment embeddings (0: none)
    c.model.embed_norm = False            # a LayerNorm over the summed embeddings
    c.model.embed_scale = True            # token embeddings times sqrt(d_model)
    c.model.gelu = "tanh"                 # or "exact" (erf)
    c.model.layer_norm_eps = 1e-6         # the trunk's LayerNorms
    # Parameter-efficient multi-task modules (mtt_jax/models/adapters.py), multi-input layout: "task"
    # (a bottleneck adapter per task, Houlsby 2019) or "hyper" (generated from the task encoder's
    # features, HyperFormer); with optimizer.freeze="encoder" only they, the task side and the task
    # encoder train.
    c.model.adapters = "none"
    c.model.adapter_dim = 64              # the adapters' bottleneck
    c.model.adapter_hyper_dim = 8         # hyper: the task embedding the adapter generators read

    c.weighting = ml_collections.ConfigDict()
    c.weighting.name = "ew"               # any of mtt_jax.weighting.METHODS
    c.weighting.weights = ()              # fixed: one weight per task (empty = all 1)
    c.weighting.init_log_var = -0.5       # uncertainty: initial s = log sigma^2 (LibMTL's default)
    c.weighting.rep_grad = False          # gradient methods see d L_t / d representation (MGDA-UB)
    c.weighting.diagnostics_every = 100   # loss-based methods: per-task gradients for diagnostics
    c.weighting.blocks = ()               # Gram methods per group of shared parameters: path regexes,
                                          # e.g. ("trunk/(block_\\d+)/.*",) (docs/per_block_aggregation.md)
    # Method options live in weighting.<name>, e.g. --config.weighting.cagrad.c=0.4; the defaults are
    # the paper's (mtt_jax.weighting.DEFAULT_OPTIONS).
    for name, options in DEFAULT_OPTIONS.items():
        if options and name not in ("fixed", "uncertainty"):
            c.weighting[name] = ml_collections.ConfigDict(options)

    c.affinity = ml_collections.ConfigDict()
    c.affinity.every = 0                  # TAG lookahead affinity every N steps (0: off)
    c.affinity.lr = 0.0                   # lookahead step size (0: the current learning rate)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.end_learning_rate_factor = 0.01
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.freeze = "none"           # or "encoder": embedding, positions and trunk frozen (adapters train)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                      # -1: all devices left over
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = -1               # use the first N devices (-1: all)
    c.axis_rules = ()                     # ((logical, mesh axes), ...); empty: sharding.DEFAULT_RULES
    c.dtype = "float32"                   # compute dtype; params stay f32
    c.attention_kernel = "auto"           # auto | cudnn | xla | einsum; auto: cuDNN on GPUs where it can
    c.grad_accum_steps = 1                # microbatches per step (batch_size is the total)
    c.grad_accum_unroll = 1               # microbatches per scan iteration (XLA overlaps their work)
    c.nonfinite = "skip"                  # skip | halt: a non-finite loss is never applied
    c.nonfinite_skip_window = 20          # skip: the run halts (last good checkpoint kept) once more
    c.nonfinite_skip_limit = 0.25         #   than this share of the last window's updates were skipped

    c.prefetch = 2                        # batches built ahead on a host thread (0: inline)
    c.transfer_guard = "allow"            # "disallow": implicit host<->device transfers in the loop fail
    c.checkpoint_every = 500
    c.keep = 3

    # jax.profiler trace of updates first_step .. first_step + num_steps - 1 into WORKDIR/profile, with
    # the train step's op times by source op (mtt_jax.perf.profile_window); the first update compiles.
    c.profile = ml_collections.ConfigDict()
    c.profile.first_step = 0              # 0: off
    c.profile.num_steps = 3
    return c


def shrink_for_tests(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``tiny`` variant of a TFDS family: a few steps of a one-layer model on 8 eval examples."""
    c.data.options.max_eval_examples = 8
    c.batch_size, c.eval_batch_size = 8, 8
    c.total_steps, c.eval_every, c.log_every, c.checkpoint_every = 4, 2, 2, 2
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 1, 32, 2, 64
    c.optimizer.warmup_steps = 1
    return c


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    if variant == "tiny":  # learns in seconds: 0.2-0.35 accuracy per digit after 40 steps (chance 0.1)
        c.total_steps, c.batch_size, c.eval_every, c.log_every = 40, 64, 10, 5
        c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 2  # (the default 100 would be all 40)
        c.data.options.num_eval_pairs = 256  # one eval batch
        c.model.num_layers, c.model.d_model, c.model.mlp_dim = 1, 32, 64
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/default.py; choose '' or 'tiny'")
    return c
