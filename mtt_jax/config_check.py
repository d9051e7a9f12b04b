"""Checks a resolved config before any work is done (DESIGN §7: bad input fails first, in one line).

`validate` raises `ConfigError` whose message names the bad field, its value and the valid choices;
`mtt_jax.main` prints it and exits with status 2, before creating or touching the workdir's contents.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax

from mtt_jax import data, sharding, tasks as tasks_lib, train_step, weighting
from mtt_jax.data import mixtures
from mtt_jax.models import TASK_ATTENTION
from mtt_jax.models.layers import ATTENTION_KERNELS
from mtt_jax.models.trunk import REMAT_POLICIES
from mtt_jax.weighting.base import check_range

DTYPES = ("float32", "bfloat16")
NONFINITE = ("skip", "halt")
TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
POSITIONAL = ("sinusoidal", "learned")


class ConfigError(ValueError):
    """A config that cannot run; the message is one line."""


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
    try:
        check_range(field, value, low, high, **open_ends)
    except ValueError as e:
        raise ConfigError(f"{e}{note}") from None


def validate(config, num_devices: int) -> None:
    _integer_at_least("seed", config.seed, 0)
    _positive(config, "total_steps", "batch_size", "eval_batch_size", "eval_every", "log_every",
              "model.num_layers", "model.d_model", "model.num_heads", "model.mlp_dim",
              "model.patch_size", "model.memory_tokens", "grad_accum_steps", "grad_accum_unroll", "checkpoint_every",
              "keep")
    _check_tasks(config)
    _check_model(config)
    _check_weighting(config)
    _check_optimizer(config.optimizer)
    _check_affinity(config.get("affinity"))
    _check_profile(config.get("profile"), config.total_steps)
    _check_mixture(config)
    _choice("dtype", config.dtype, DTYPES)
    _choice("nonfinite", config.nonfinite, NONFINITE)
    _integer_at_least("nonfinite_skip_window", config.nonfinite_skip_window, 1)
    _in_range("nonfinite_skip_limit", config.nonfinite_skip_limit, 0.0, 1.0, note=" (1: never halt)")
    _choice("transfer_guard", config.transfer_guard, TRANSFER_GUARDS)
    try:
        sharding.logical_rules(config.axis_rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_attention_kernel(config.get("attention_kernel", "auto"))
    requested = config.mesh.get("num_devices", -1)
    if requested > num_devices:
        raise ConfigError(f"mesh.num_devices={requested} but only {num_devices} devices are available")
    try:
        shape = sharding.mesh_shape(config.mesh, requested if requested > 0 else num_devices)
    except ValueError as e:
        raise ConfigError(f"{e}; set --config.mesh.data/fsdp/tensor") from None
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
    available = data.AVAILABLE_TASKS[config.data.source]
    names = tuple(config.tasks) if not isinstance(config.tasks, str) else (config.tasks,)
    if not names:
        raise ConfigError(f"tasks is empty; choose from: {', '.join(available)}")
    for name in names:
        if name not in available:
            raise ConfigError(f"unknown task {name!r} for data.source={config.data.source!r}; "
                              f"choose from: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks={names} lists a task twice")
    options = tuple(config.data.options.keys()) if config.data.get("options") else ()
    valid_options = data.source_options(config.data.source)
    for option in options:
        _choice(f"data.options.{option} (option of {config.data.source})", option, valid_options)
    layout = data.SOURCES[config.data.source].layout
    for name in names:
        if layout == "single" and tasks_lib.get(name).kind == "tagging":
            raise ConfigError(f"task {name!r} is token tagging, which needs the multi-input layout")


def _check_mixture(config) -> None:
    mixture = config.data.get("mixture")
    if not mixture or not mixture.method:
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
    if mixture.method == "temperature" and not mixture.get("temperature", 1.0) > 0:
        raise ConfigError(f"data.mixture.temperature={mixture.temperature} must be > 0")
    if mixture.method == "explicit":
        rates = tuple(mixture.get("rates", ()))
        if len(rates) != len(config.tasks) or any(r < 0 for r in rates) or not sum(rates) > 0:
            raise ConfigError(f"data.mixture.rates={rates} must give one non-negative rate per task "
                              f"({len(config.tasks)}), not all 0")
    method = weighting.make_method(config.weighting, len(config.tasks))
    if method.requires != "losses":
        raise ConfigError(f"weighting.name={config.weighting.name!r} needs per-task gradients, which flat "
                          "mixture batches do not give; use a loss-based method or data.mixture.method=''")
    if config.weighting.get("diagnostics_every", 0) or (config.get("affinity") and config.affinity.every):
        raise ConfigError("flat mixture batches (data.mixture.method) give no per-task gradients: set "
                          "weighting.diagnostics_every=0 and affinity.every=0")


def _check_model(config) -> None:
    m = config.model
    _choice("model.task_attention", m.task_attention, TASK_ATTENTION)
    _choice("model.positional", m.positional, POSITIONAL)
    _choice("model.remat", m.remat, tuple(REMAT_POLICIES))
    if m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise ConfigError(f"model.dropout_rate={m.dropout_rate} must be in [0, 1)")
    if m.get("film", False) and not m.task_encoder:
        raise ConfigError("model.film=True conditions the blocks on the task encoder's features; "
                          "set model.task_encoder=True")


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
    if not a:
        return
    _integer_at_least("affinity.every", a.every, 0, " (0: off)")
    _in_range("affinity.lr", a.get("lr", 0.0), 0.0, note=" (0: the current learning rate)", high_open=True)


def _check_profile(p, total_steps: int) -> None:
    """The traced window (`mtt_jax.profile_window`) lies within the run."""
    if not p:
        return
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
    _choice("weighting.name", w.name, sorted(weighting.METHODS))
    try:
        method = weighting.make_method(w, len(config.tasks))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if w.get("rep_grad", False) and method.requires != "losses":
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
    _integer_at_least("weighting.diagnostics_every", w.get("diagnostics_every", 0), 0, " (0: off)")
