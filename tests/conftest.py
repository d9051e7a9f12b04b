"""Every test process simulates 8 CPU devices, so sharded code paths run in every test."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test subprocesses (CLI, resume, multi-process) compile the same programs again: share a persistent
# compilation cache between them so each program compiles once per test session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/mtt_jax_test_compilation_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
