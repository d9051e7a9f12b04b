"""Checks a resolved config before any work is done (bad input fails first, in one line).

`validate` raises `ConfigError` whose message names the bad field, its value and the valid choices;
`mtt_jax.main` prints it and exits with status 2, before creating or touching the workdir's contents.
It first imports the config's ``plugins`` (`mtt_jax.registry.load_plugins`), so that the methods, sources
and tasks they register are checked like the built-ins.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax

from mtt_jax import data, registry, sharding, tasks as tasks_lib, train_step, weighting
from mtt_jax.data import base as data_base, mixtures
from mtt_jax.models import TASK_ATTENTION, adapters, pretrained
from mtt_jax.models.layers import ATTENTION_KERNELS, GELUS, NORM_POSITIONS, head_dim_of
from mtt_jax.models.multitask import check_film, check_readout, check_task_attention, task_encoder_form
from mtt_jax.models.trunk import POSITIONAL, REMAT_POLICIES
from mtt_jax.weighting.base import check_range

DTYPES = ("float32", "bfloat16")
NONFINITE = ("skip", "halt")
TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")


class ConfigError(ValueError):
    """A config that cannot run; the message is one line."""


def _by_owner(check, *args, note: str = ""):
    """``check(*args)``: a rule where it lives (a data source, the model, the sharding, a weighting
    method), its one-line ValueError turned into a ConfigError (``note`` appended)."""
    try:
        return check(*args)
    except ValueError as e:
        raise ConfigError(f"{e}{note}") from None


def _choice(field: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _positive(config, *fields: str) -> None:
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        _integer_at_least(field, value, 1)


def _integer_at_least(field: str, value, minimum: int, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{field}={value!r} must be {kind}{note}")


def _in_range(field: str, value, low: float, high: float = math.inf, note: str = "", **open_ends) -> None:
    """`weighting.base.check_range`, the methods' range check, as a ConfigError."""
    _by_owner(lambda: check_range(field, value, low, high, **open_ends), note=note)


def validate(config, num_devices: int) -> None:
    _by_owner(registry.load_plugins, config)  # first: they register names the checks below look up
    _integer_at_least("seed", config.seed, 0)
    _positive(config, "total_steps", "batch_size", "eval_batch_size", "eval_every", "log_every",
              "model.num_layers", "model.d_model", "model.num_heads", "model.mlp_dim",
              "model.patch_size", "model.memory_tokens", "grad_accum_steps", "grad_accum_unroll", "checkpoint_every",
              "keep")
    _check_tasks(config)
    _check_model(config)
    _check_weighting(config)
    _check_optimizer(config.optimizer)
    _check_affinity(config.affinity)
    _check_profile(config.profile, config.total_steps)
    _check_mixture(config)
    _choice("dtype", config.dtype, DTYPES)
    _choice("nonfinite", config.nonfinite, NONFINITE)
    _integer_at_least("nonfinite_skip_window", config.nonfinite_skip_window, 1)
    _in_range("nonfinite_skip_limit", config.nonfinite_skip_limit, 0.0, 1.0, note=" (1: never halt)")
    _choice("transfer_guard", config.transfer_guard, TRANSFER_GUARDS)
    _by_owner(sharding.logical_rules, config.axis_rules)
    _check_attention_kernel(config.attention_kernel)
    requested = config.mesh.num_devices
    if requested > num_devices:
        raise ConfigError(f"mesh.num_devices={requested} but only {num_devices} devices are available")
    shape = _by_owner(sharding.mesh_shape, config.mesh, requested if requested > 0 else num_devices,
                      note="; set --config.mesh.data/fsdp/tensor")
    shards = shape[0] * shape[1]
    method = weighting.make_method(config.weighting, len(config.tasks))
    rows = train_step.batch_rows_divisor(method, config.grad_accum_steps)
    micro_note = ("grad_accum_steps" if method.gradient_samples == 1 else
                  f"grad_accum_steps={config.grad_accum_steps} microbatches of {method.name}'s "
                  f"{method.gradient_samples} gradient samples")
    for field, divisor in (("batch_size", shards * rows), ("eval_batch_size", shards)):
        if config[field] % divisor:
            raise ConfigError(f"{field}={config[field]} is not divisible by {divisor} (data x fsdp = "
                              f"{shards} shards of mesh {shape}, times {micro_note} for the "
                              f"train batch); choose a multiple of {divisor}")


def _check_tasks(config) -> None:
    _choice("data.source", config.data.source, sorted(data.SOURCES))
    names = _by_owner(data_base.check_task_names, config.data.source, config.tasks,
                      data.AVAILABLE_TASKS[config.data.source])
    _by_owner(data.check_options, config.data.source, tuple(config.data.options.keys()))
    _choice("data.eval_split", config.data.get("eval_split", "test"), data_base.SPLITS)
    layout = data.SOURCES[config.data.source].layout
    for name in names:
        if layout == "single" and tasks_lib.get(name).kind == "tagging":
            raise ConfigError(f"task {name!r} is token tagging, which needs the multi-input layout")


def _check_mixture(config) -> None:
    mixture = config.data.mixture
    if not mixture.method:
        return
    _choice("data.mixture.method", mixture.method, ("",) + mixtures.METHODS)
    source = data.SOURCES[config.data.source]
    if not mixtures.can_mix(source):
        flat = [name for name, s in data.SOURCES.items() if mixtures.can_mix(s)]
        raise ConfigError(f"data.mixture.method={mixture.method!r}: data.source={config.data.source!r} "
                          f"cannot serve flat mixture batches; sources that can: {', '.join(sorted(flat))}")
    if mixtures.needs_sizes(mixture.method) and not mixtures.has_sizes(source):
        raise ConfigError(f"data.mixture.method={mixture.method!r} needs the tasks' train sizes, and "
                          f"{config.data.source} generates its data; use uniform or explicit")
    # The temperature and the explicit rates, by the rule that turns them into rates (all sizes 1).
    rates = tuple(mixture.rates) or None
    _by_owner(lambda: mixtures.mixing_rates([1] * len(config.tasks), mixture.method,
                                            temperature=mixture.temperature, rates=rates))
    method = weighting.make_method(config.weighting, len(config.tasks))
    if method.requires not in ("losses", "lookahead"):
        raise ConfigError(f"weighting.name={config.weighting.name!r} needs per-task gradients, which flat "
                          "mixture batches do not give; use a loss-based method or data.mixture.method=''")
    if config.weighting.diagnostics_every or config.affinity.every:
        raise ConfigError("flat mixture batches (data.mixture.method) give no per-task gradients: set "
                          "weighting.diagnostics_every=0 and affinity.every=0")


def _check_model(config) -> None:
    m = config.model
    _choice("model.task_attention", m.task_attention, TASK_ATTENTION)
    _check_task_attention(config)
    _choice("model.positional", m.positional, POSITIONAL)
    _choice("model.remat", m.remat, tuple(REMAT_POLICIES))
    _by_owner(head_dim_of, m.d_model, m.num_heads)
    if not 0.0 <= m.dropout_rate < 1.0:
        raise ConfigError(f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
    _by_owner(task_encoder_form, m.task_encoder, data.SOURCES[config.data.source].layout)
    _in_range("model.task_encoder_init_std", m.get("task_encoder_init_std", 0.02), 0.0)
    _by_owner(check_film, m.film, m.task_encoder)
    _by_owner(check_readout, m.readout, data.SOURCES[config.data.source].layout, m.get("pooler", False))
    _check_pretrained_options(m)
    _check_adapters(config)


def _check_pretrained_options(m) -> None:
    """The trunk's options for pretrained checkpoints, and the checkpoint itself: its files, and the
    shape and options it was trained with (`pretrained.check_architecture`; its tensors are checked
    against the built model in `mtt_jax.builder.build`, before any work)."""
    _choice("model.norm_position", m.norm_position, NORM_POSITIONS)
    _choice("model.gelu", m.gelu, GELUS)
    _integer_at_least("model.token_types", m.token_types, 0, " (0: none)")
    _in_range("model.layer_norm_eps", m.layer_norm_eps, 0.0, low_open=True, high_open=True)
    if m.checkpoint:
        _by_owner(lambda: pretrained.check_architecture(m, pretrained.open_checkpoint(m.checkpoint)))


def _check_adapters(config) -> None:
    """Adapters (`mtt_jax.models.adapters`): one task per row, the task encoder for hypernetworks."""
    m = config.model
    _by_owner(adapters.check_adapters, m.adapters, data.SOURCES[config.data.source].layout, m.task_encoder,
              config.optimizer.freeze)
    _integer_at_least("model.adapter_dim", m.adapter_dim, 1)
    _integer_at_least("model.adapter_hyper_dim", m.adapter_hyper_dim, 1)


def _check_task_attention(config) -> None:
    """What the layout allows (`multitask.check_task_attention`); aligned task attention also needs
    a source whose class declares its rows aligned across tasks (``aligned_rows``; an instance that
    serves them shuffled as a negative control is meant to run the same model), and the per-task
    sub-batches (not flat)."""
    m, source = config.model, data.SOURCES[config.data.source]
    _by_owner(check_task_attention, m.task_attention, source.layout, m.task_attention_pool)
    if m.task_attention != "aligned":
        return
    if not getattr(source, "aligned_rows", False):
        raise ConfigError(f"model.task_attention='aligned' needs rows aligned across tasks (row b of every "
                          f"task is one instance), and data.source={config.data.source!r} does not "
                          "declare aligned_rows; use 'cross' or 'none'")
    if config.data.mixture.method:
        raise ConfigError(f"model.task_attention='aligned' with data.mixture.method="
                          f"{config.data.mixture.method!r}: a flat mixture batch's rows are not aligned "
                          "across tasks; use data.mixture.method='' or task_attention='cross'")


def _check_optimizer(o) -> None:
    """AdamW's fields (`train_step.make_optimizer`): a negative learning rate (ascent), a clipping norm
    of 0 (every update zeroed), or Adam's decay rates outside [0, 1) would run without an error and
    train nothing or diverge."""
    _in_range("optimizer.learning_rate", o.learning_rate, 0.0, high_open=True)  # 0: a frozen model
    _in_range("optimizer.end_learning_rate_factor", o.end_learning_rate_factor, 0.0, high_open=True)
    _in_range("optimizer.b1", o.b1, 0.0, 1.0, high_open=True)
    _in_range("optimizer.b2", o.b2, 0.0, 1.0, high_open=True)
    _in_range("optimizer.weight_decay", o.weight_decay, 0.0, high_open=True)
    _in_range("optimizer.grad_clip_norm", o.grad_clip_norm, 0.0, low_open=True, high_open=True)
    _integer_at_least("optimizer.warmup_steps", o.warmup_steps, 0)


def _check_affinity(a) -> None:
    """TAG's lookahead (`mtt_jax.affinity`): a negative period would measure it at every step."""
    _integer_at_least("affinity.every", a.every, 0, " (0: off)")
    _in_range("affinity.lr", a.lr, 0.0, note=" (0: the current learning rate)", high_open=True)


def _check_profile(p, total_steps: int) -> None:
    """The traced window (`mtt_jax.perf.profile_window`) lies within the run."""
    _integer_at_least("profile.first_step", p.first_step, 0, " (0: off)")
    _integer_at_least("profile.num_steps", p.num_steps, 1)
    last = p.first_step + p.num_steps - 1
    if p.first_step and last > total_steps:
        raise ConfigError(f"profile.first_step={p.first_step} with profile.num_steps={p.num_steps} ends "
                          f"at update {last}, after total_steps={total_steps}; start the window earlier")


def _check_attention_kernel(kernel: str) -> None:
    _choice("attention_kernel", kernel, ATTENTION_KERNELS)
    if kernel == "cudnn" and (backend := jax.default_backend()) != "gpu":
        raise ConfigError(f"attention_kernel='cudnn' needs a GPU, and this run's backend is {backend}; "
                          "use 'auto'")


def _check_weighting(config) -> None:
    w = config.weighting
    method = _by_owner(weighting.make_method, w, len(config.tasks))
    if w.rep_grad and w.blocks:
        raise ConfigError("weighting.blocks groups the shared parameters, and weighting.rep_grad=True gives "
                          "the methods the representation's gradients instead: set one of them off")
    if method.requires == "lookahead" and config.grad_accum_steps > 1:
        raise ConfigError(f"weighting.name={w.name!r} takes its lookahead on the whole batch, which "
                          "grad_accum_steps > 1 would not hold in memory; set grad_accum_steps=1")
    if w.rep_grad and method.requires not in ("losses", "lookahead"):
        if data.SOURCES[config.data.source].layout == "multi":
            raise ConfigError("weighting.rep_grad=True needs the single-input layout: in the multi-input "
                              "layout the tasks' representation gradients are disjoint blocks")
        if config.grad_accum_steps > 1:
            raise ConfigError("weighting.rep_grad=True does not support grad_accum_steps > 1")
        if method.gradient_samples > 1:
            raise ConfigError(f"weighting.rep_grad=True does not work with {w.name!r}: it takes the "
                              f"gradients of {method.gradient_samples} samples of the batch; set rep_grad=False")
        if method.state_mirrors_params:
            raise ConfigError(f"weighting.rep_grad=True does not work with {w.name!r}: its state is shaped "
                              "like the shared parameters, not the representation; set rep_grad=False")
    _integer_at_least("weighting.diagnostics_every", w.diagnostics_every, 0, " (0: off)")
