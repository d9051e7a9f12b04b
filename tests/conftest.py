"""Every test process simulates 8 CPU devices, so sharded code paths run in every test."""

import os

import pytest

from mtt_jax.perf import huge_pages

# The suite's cost is compiling, not running, its tiny programs: LLVM's cheaper pipeline compiles them
# about 30% faster (a cold test_zoo subset: 45 s -> 32 s), and XLA's older elemental emitters instead of
# its fusion emitters (which lower each fusion through MLIR first) cut a train step's compile to a third
# (a PCGrad step on 8 devices: 8.9 -> 2.5 CPU-seconds). Test processes only; subprocesses inherit them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test subprocesses (CLI, resume, multi-process) compile the same programs again: share a persistent
# compilation cache between them so each program compiles once per test session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/mtt_jax_test_compilation_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# pytest-xdist starts its workers after reading this file: they start with host allocations on huge
# pages, as the command lines do (`mtt_jax.perf.huge_pages`; test_zoo.py with a warm compilation cache: 57
# -> 50 s). The command-line subprocesses then find the tunable set and do not re-execute.
os.environ.update(huge_pages.this_machine_environment() or {})

# pytest-xdist hands whole modules to its two workers in collection order, so a long module collected
# last leaves one worker alone at the end. The longest ones go first (longest-processing-time-first
# scheduling); the others keep their order, and every module's tests keep theirs.
LONGEST_MODULES = ("test_zoo.py", "test_experiments.py", "test_scale.py", "test_flops.py", "test_mechanisms.py",
                   "test_resilience.py", "test_models.py", "test_faults.py", "test_cli.py", "test_splits.py",
                   "test_bucket_workdir.py", "test_train.py", "test_flat_mixture.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def cudnn_probes_stubbed(monkeypatch):
    """JAX's cuDNN version and compute-capability probes answer as on a recent GPU, so that a model
    with the cuDNN kernel lowers for CUDA on this CPU."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda capability: False)
