"""The train step as a GPU or a TPU traces it, lowered for CUDA and for TPU on this CPU.

The model makes two choices by `jax.default_backend()` when it is traced: the attention kernel
(`layers.select_attention_kernel`: cuDNN's fused attention on GPUs, einsums on CPUs and TPUs) and, on
CPUs only, dense kernels split into blocks of 64 (`layers.matmul`). With the backend reported as
"gpu" or "tpu" (and JAX's cuDNN probes stubbed), the benchmark model's bf16 step, microbatched on a
2 x 2 x 2 data / fsdp / tensor mesh, is lowered as that device would be handed it to compile, and read
as the benchmark reads it. No device is needed; what XLA:GPU and XLA:TPU then make of it is not
checked here (`launch/gpu_check.sh`).
"""

import re

import jax
import pytest

from mtt_jax import benchmark, sharding, train
from mtt_jax.perf import flops

BACKENDS = {"cuda": "gpu", "tpu": "tpu"}  # lowering platform -> what `jax.default_backend()` says there


@pytest.fixture(scope="module")
def reference():
    """The tasks8 benchmark model (2 layers, d_model 128, MLP 512) in bf16, two microbatches, on the
    2 x 2 x 2 mesh of the 8 simulated devices: setup, initial state, step 0's batch, the formula."""
    from configs import benchmark as benchmark_config
    config = benchmark_config.get_config("tasks8")
    config.dtype, config.grad_accum_steps = "bfloat16", 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    setup = train.build(config)
    batch = sharding.shard_batch(setup.train_source.train_batch(0, config.batch_size),
                                 setup.batch_shardings, setup.layout)
    model_flops = train.step_work(setup, config)[0].training
    return config, setup, setup.create_state(), batch, model_flops


@pytest.fixture(params=sorted(BACKENDS))
def platform(request, monkeypatch, cudnn_probes_stubbed):
    """A lowering platform, with `jax.default_backend()` answering as on it while the step is traced."""
    monkeypatch.setattr(jax, "default_backend", lambda: BACKENDS[request.param])
    return request.param


def custom_call_targets(lowered_text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$]+)\(", lowered_text))


def test_the_sharded_step_lowers_without_host_calls(reference, platform):
    """The step the training loop runs, lowered for the platform: no host callback or CPU-only call.
    On CUDA its only custom calls are the mesh's wrappers of cuDNN's attention, one forward and one
    backward per layer (the microbatch loop's body holds each layer once); on TPU there are none."""
    config, setup, state, batch, _ = reference
    with setup.context():
        lowered = train.config_train_step(setup, config).trace(state, batch).lower(
            lowering_platforms=(platform,))
    text = lowered.as_text()
    if platform == "cuda":
        assert custom_call_targets(text) == {"CustomSPMDPartitioning"}
        assert text.count("custom_call @CustomSPMDPartitioning(") == 2 * config.model.num_layers
    else:
        assert custom_call_targets(text) == set()
    assert "callback" not in text


def test_the_benchmark_reads_cudnn_and_every_matmul_of_a_multi_device_step(reference, platform):
    """`benchmark.counting_lowering` reads the step on one device with the global shapes: cuDNN's calls
    on CUDA (none on TPU) and the formula's matmul FLOPs, all bf16 x bf16. The 8-device program itself
    holds cuDNN's attention only inside its opaque wrappers: read as it is, it shows no cuDNN call and
    misses attention's matmuls."""
    config, setup, state, batch, model_flops = reference
    counted = benchmark.counting_lowering(config, setup, state, batch, platform=platform)
    layers = config.model.num_layers
    expected_calls = layers if platform == "cuda" else 0
    assert benchmark.cudnn_attention_calls(counted.as_text()) == {"forward": expected_calls,
                                                                 "backward": expected_calls}
    matmuls = flops.hlo_matmul_flops(counted.compiler_ir("hlo").as_hlo_text())
    assert sum(matmuls.values()) == pytest.approx(model_flops, rel=1e-4)
    assert flops.low_precision_share(matmuls) == 1.0, matmuls
    if platform == "cuda":  # what the benchmark read before it lowered on one device
        plain = config.copy_and_resolve_references()
        plain.grad_accum_steps = 1
        with setup.context():
            sharded = train.config_train_step(setup, plain).trace(state, batch).lower(
                lowering_platforms=(platform,))
        assert benchmark.cudnn_attention_calls(sharded.as_text()) == {"forward": 0, "backward": 0}
        hidden = sum(flops.hlo_matmul_flops(sharded.compiler_ir("hlo").as_hlo_text()).values())
        assert hidden / model_flops < 0.95


def test_only_the_cpu_program_splits_kernels_into_blocks_of_64(reference, monkeypatch):
    """The MLP's input kernel ``[128, 512]`` is split as ``[128, 8, 64]`` (`layers.matmul`) in the
    program a CPU compiles, and not in the one a TPU is handed."""
    config, setup, state, batch, _ = reference
    blocked = "bf16[128,8,64]"
    cpu = benchmark.counting_lowering(config, setup, state, batch).compiler_ir("hlo").as_hlo_text()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    tpu = benchmark.counting_lowering(config, setup, state, batch, platform="tpu")
    assert blocked in cpu
    assert blocked not in tpu.compiler_ir("hlo").as_hlo_text()
