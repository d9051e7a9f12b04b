"""Everything a config builds before the first step, shared by the training loop (`mtt_jax.train`),
the multi-seed runs of the experiments (`mtt_jax.seed_runs`) and the benchmark:

    setup = build(config)              # tasks, data, mesh, model, method, optimizer, shardings
    compiled = compile_steps(setup, config)   # the train and eval steps, compiled ahead of time

`build` raises one-line `config_check.ConfigError`s for what only the data source, the model's
constructors or the batch sizes can tell; `compile_steps` for steps that cannot fit in memory
(`mtt_jax.run.memory_check`). Both run before a workdir is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mtt_jax import affinity, data, registry, sharding
from mtt_jax.perf import flops
from mtt_jax.run import checkpoint, config_check, memory_check
from mtt_jax import tasks as tasks_lib
from mtt_jax import train_step as steps, weighting
from mtt_jax.data import mixtures
from mtt_jax.models import adapters, build_model, pretrained
from mtt_jax.models.multitask import num_positions, task_encoder_form
from mtt_jax.run.prefetch import prefetch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Setup:
    """What a config builds before the first step: data, mesh, model, method, optimizer, shardings.

    ``source`` serves the eval set (and, without a mixture, the train batches); ``train_source`` serves
    the train batches: the source itself, or its flat mixture (``data.mixture.method``).
    """
    tasks: tuple
    source: data.Source
    train_source: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    method: weighting.WeightingMethod
    tx: optax.GradientTransformation
    init: Callable            # rng -> boxed TrainState
    abstract_state: Any       # boxed (logically named) abstract TrainState
    state_shardings: Any
    batch_shardings: Any
    abstract_batch: Any       # the global train batch as ShapeDtypeStructs with batch_shardings
    seed: int = 0
    checkpoint: str = ""      # a pretrained encoder's folder (`mtt_jax.models.pretrained`), "" for none

    @property
    def layout(self) -> str:
        """Of the train batches: "single", "multi" or "flat" (eval batches: ``source.layout``)."""
        return self.train_source.layout

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical axis rules, under which the steps must be traced (and the loop runs)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def on_one_device(self) -> "Setup":
        """This setup on this process's first device: the same global shapes, nothing partitioned.
        For programs that are lowered to be read, not run (`mtt_jax.benchmark.counting_lowering`)."""
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        batch_shardings = jax.tree.map(lambda _: replicated, self.batch_shardings)
        return dataclasses.replace(
            self, mesh=mesh, state_shardings=sharding.tree_shardings(self.abstract_state, mesh, self.rules),
            batch_shardings=batch_shardings,
            abstract_batch=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        self.abstract_batch, batch_shardings))

    def create_state(self) -> steps.TrainState:
        """The initial state, created directly sharded (no host copy of the full parameters); with a
        pretrained ``checkpoint``, its encoder's arrays then replace the initialised ones, each placed
        like the leaf it replaces."""
        with self.context():
            state = jax.jit(lambda rng: nn.unbox(self.init(rng)), out_shardings=self.state_shardings)(
                jax.random.key(self.seed))
        if not self.checkpoint:
            return state
        model_params, _ = pretrained.load_into(
            state.params["model"], pretrained.open_checkpoint(self.checkpoint), _has_task_tokens(self.model))
        return state.replace(params={**state.params, "model": model_params})


@dataclasses.dataclass(frozen=True)
class Parts:
    """The pieces of a run that need no mesh: what the experiments' multi-seed runs share with `build`.

    ``source`` serves the eval set (and, without a mixture, the train batches); ``train_source`` serves
    the train batches: the source itself, or its flat mixture (``data.mixture.method``)."""
    tasks: tuple
    source: data.Source
    train_source: Any
    model: nn.Module
    method: weighting.WeightingMethod
    tx: optax.GradientTransformation


def build_parts(config, seed: int | None = None, model: nn.Module | None = None) -> Parts:
    """Tasks, data source (of ``seed``, default ``config.seed``), model (``model`` or the config's
    Transformer), weighting method and optimizer of ``config``. Its ``plugins`` are imported first
    (`mtt_jax.registry.load_plugins`), for callers that skip `config_check.validate`."""
    with _as_config_error():
        registry.load_plugins(config)
    tasks = tuple(tasks_lib.get(name) for name in config.tasks)
    with _as_config_error(f"data.source={config.data.source!r}: "):
        source = data.make_source(config.data.source, config.tasks,
                                  seed=config.seed if seed is None else seed, **dict(config.data.options))
        train_source = source
        if config.data.mixture.method:
            train_source = mixtures.FlatMixture(source, mixtures.rates_for(source, config.data.mixture))
    if model is None:
        _check_aligned_rows(config, train_source)
        with _as_config_error():
            model = build_model(config, tasks, source.layout, source.input_spec, DTYPES[config.dtype])
    tx = adapters.with_freeze(steps.make_optimizer(config.optimizer, config.total_steps),
                              config.optimizer.get("freeze", "none"))
    return Parts(tasks=tasks, source=source, train_source=train_source, model=model,
                 method=weighting.make_method(config.weighting, len(tasks)), tx=tx)


def build(config) -> Setup:
    """The `Setup` of a config that passed `config_check.validate`. What only the data source, the
    model's constructors or the batch sizes can tell (a sequence length the source cannot generate, a
    patch size the image does not divide, batches larger than the host's memory) is a one-line
    `config_check.ConfigError` too, found before the workdir is touched."""
    parts = build_parts(config)
    tasks, source, train_source = parts.tasks, parts.source, parts.train_source
    model, method, tx = parts.model, parts.method, parts.tx
    memory_check.check_host_batches(train_source, config.batch_size, config.eval_batch_size,
                                    config.prefetch)

    # --- Mesh -----------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.axis_rules)
    sharding.check_batch_divisible(config.batch_size, mesh)

    # --- Shard: shapes from eval_shape, shardings from logical names ----------------------------------
    sample_batch = source.train_batch(0, config.batch_size)
    init = lambda rng: steps.init_state(rng, model, method, tx, jnp.asarray(sample_batch["inputs"]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _as_config_error():  # modules check in setup
        abstract_state = jax.eval_shape(init, jax.random.key(config.seed))
    train_sample = sample_batch if train_source is source else train_source.train_batch(0, config.batch_size)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
    batch_shardings = sharding.batch_shardings(train_sample, mesh, train_source.layout)
    try:
        sharding.check_divisible(abstract_state, state_shardings)
    except ValueError as e:
        raise config_check.ConfigError(f"mesh {dict(mesh.shape)}: {e}") from None
    checkpoint = config.model.get("checkpoint", "")
    if checkpoint:  # every tensor there and of a shape that fits, read from the file's header
        with _as_config_error():
            pretrained.check_tensors(pretrained.open_checkpoint(checkpoint), abstract_state.params["model"],
                                     num_positions(model.input_spec, model.patch_size),
                                     _has_task_tokens(model))
    _log_parameter_counts(config, abstract_state.params)
    return Setup(tasks=tasks, source=source, train_source=train_source, mesh=mesh, rules=rules,
                 model=model, method=method, tx=tx, init=init, abstract_state=abstract_state,
                 state_shardings=state_shardings,
                 batch_shardings=batch_shardings, abstract_batch=_abstract(train_sample, batch_shardings),
                 seed=config.seed, checkpoint=checkpoint)


def _log_parameter_counts(config, abstract_params) -> None:
    """The parameters a run trains, on the console, for runs where that is not all of them or is the
    point (a pretrained checkpoint, adapters, a frozen encoder; `mtt_jax.models.adapters`)."""
    freeze = config.optimizer.get("freeze", "none")
    adapters_on = config.model.get("adapters", "none") != "none"
    if freeze == "none" and not adapters_on and not config.model.get("checkpoint"):
        return
    counts = adapters.parameter_counts(abstract_params, freeze)
    if jax.process_index() == 0:
        logging.info("parameters: %s in all, %s trained (%.2f%%), %s in adapters", f"{counts['total']:,}",
                     f"{counts['trained']:,}", 100 * counts["trained"] / counts["total"],
                     f"{counts['adapters']:,}")


def _has_task_tokens(model: nn.Module) -> bool:
    """Whether the model prepends task tokens, which a ViT checkpoint's [CLS] starts."""
    return task_encoder_form(model.task_encoder, model.layout) == "tokens"


def _check_aligned_rows(config, train_source) -> None:
    """Aligned task attention reads row b of every task as one instance: the train batches must come
    from a source whose class declares aligned rows, as `config_check` asks before any work (runs that
    skip it, such as `mtt_jax.seed_runs`, are refused here; a flat mixture declares none). The class,
    not the instance: a source may serve its rows shuffled across tasks as a negative control (multiview's
    ``shuffle_rows``), on which the same aligned model is meant to run."""
    if config.model.task_attention == "aligned" and not getattr(type(train_source), "aligned_rows", False):
        raise config_check.ConfigError(
            f"model.task_attention='aligned' needs train batches whose rows are aligned across tasks; "
            f"{type(train_source).__name__} ({config.data.source}) does not declare aligned_rows")


@contextlib.contextmanager
def _as_config_error(prefix: str = ""):
    """A ValueError raised in the block (a data source's or a module's own check of its options) as a
    one-line `config_check.ConfigError`; a missing dataset keeps its own error and instructions."""
    try:
        yield
    except (config_check.ConfigError, data.DatasetNotPreparedError):
        raise
    except ValueError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise config_check.ConfigError(f"{prefix}{first_line}") from None


def step_work(setup: Setup, config) -> tuple[flops.FlopCount, int, int]:
    """One train step's model FLOPs (`flops.training_flops`, the global batch), sequences, and tokens
    (0 without token inputs)."""
    spec = setup.source.input_spec
    count = flops.training_flops(config.model, setup.tasks, setup.layout, spec.kind, spec.shape,
                                 config.batch_size)
    sequences = config.batch_size * (len(setup.tasks) if setup.layout == "multi" else 1)
    return count, sequences, sequences * spec.shape[0] if spec.kind == "tokens" else 0


def device_peak_memory_mib() -> float | None:
    """The peak memory in use on this process's first device so far, where the runtime reports it (GPU
    and TPU runtimes do; XLA:CPU does not)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def compile_train_step(setup: Setup, grad_accum_steps: int = 1, rep_grad: bool = False,
                       diagnostics_every: int = 0, grad_accum_unroll: int = 1) -> Callable:
    """``(state, batch) -> (state, metrics)``, jitted with explicit shardings and the state donated."""
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        steps.bind(steps.train_step, model=setup.model, tasks=setup.tasks, layout=setup.layout,
                   method=setup.method, tx=setup.tx, grad_accum_steps=grad_accum_steps,
                   rep_grad=rep_grad, diagnostics_every=diagnostics_every,
                   grad_accum_unroll=grad_accum_unroll),
        in_shardings=(setup.state_shardings, setup.batch_shardings),
        out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def config_train_step(setup: Setup, config) -> Callable:
    """`compile_train_step` with the config's microbatching, representation gradients and diagnostics."""
    return compile_train_step(setup, config.grad_accum_steps, config.weighting.rep_grad,
                              config.weighting.diagnostics_every, config.grad_accum_unroll)


def train_batches(setup: Setup, config, first_step: int, last_step: int):
    """``(step, device batch)`` for the steps in ``[first_step, last_step)``, built ahead on a host
    thread; each process builds only its rows."""
    make_batch = lambda step: sharding.shard_local_batch(
        setup.train_source.train_batch(step, config.batch_size, shard=sharding.process_shard()),
        setup.batch_shardings, setup.layout)
    return prefetch(make_batch, first_step, last_step, config.prefetch)


def affinity_step(model: nn.Module, tasks, layout: str, schedule, fixed_lr: float) -> Callable:
    """``(state, batch) -> [T, T]`` TAG lookahead affinity of the current state on a batch
    (`mtt_jax.affinity`), with step size ``fixed_lr`` (0: the schedule's current learning rate)."""
    loss_fn = lambda outputs, b: steps.task_losses(tasks, outputs, b, layout)

    def affinity_fn(state, batch):
        lr = fixed_lr if fixed_lr > 0 else schedule(state.step)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        return affinity.lookahead_affinity(model, state.params["model"], batch, tasks, layout, rng,
                                           loss_fn, lr)
    return affinity_fn


def compile_affinity(setup: Setup, config, schedule) -> Callable:
    """`affinity_step` of the setup, jitted with its shardings."""
    return jax.jit(affinity_step(setup.model, setup.tasks, setup.layout, schedule, config.affinity.lr),
                   in_shardings=(setup.state_shardings, setup.batch_shardings))


@dataclasses.dataclass
class Steps:
    """The loop's jitted steps, compiled ahead of time (`compile_steps`)."""
    train: Callable           # (state, batch) -> (state, metrics)
    eval: Callable            # (state, eval batch) -> outputs
    eval_batch_shardings: Any


def compile_steps(setup: Setup, config) -> Steps:
    """The train and eval steps, compiled on abstract arguments with the loop's shardings (jit's cache
    then serves the loop's first calls) and refused in one line if they cannot fit in device memory
    (`memory_check`): found before the workdir is touched, not as an out-of-memory error mid-run."""
    train_step = config_train_step(setup, config)
    first_eval_batch = next(iter(setup.source.eval_batches(config.eval_batch_size)))
    eval_batch_shardings = sharding.batch_shardings(first_eval_batch, setup.mesh, setup.source.layout)
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    eval_step = jax.jit(steps.bind(steps.eval_step, model=setup.model, tasks=setup.tasks,
                                   layout=setup.source.layout),
                        in_shardings=(setup.state_shardings, eval_batch_shardings), out_shardings=replicated)
    abstract_state = checkpoint.abstract_like(nn.unbox(setup.abstract_state), setup.state_shardings)
    with setup.context():
        memory_check.check_compiled_step(
            train_step.lower(abstract_state, setup.abstract_batch).compile(), "train step",
            "lower batch_size, or set grad_accum_steps or model.remat, or use more devices")
        memory_check.check_compiled_step(
            eval_step.lower(abstract_state, _abstract(first_eval_batch, eval_batch_shardings)).compile(),
            "eval step", "lower eval_batch_size")
    return Steps(train=train_step, eval=eval_step, eval_batch_shardings=eval_batch_shardings)


def _abstract(host_batch, shardings):
    """The global ``jax.ShapeDtypeStruct``s of a host batch placed with ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
                        host_batch, shardings)


