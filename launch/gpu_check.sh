#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one NVIDIA GPU and JAX with CUDA installed:
#   1. the GPU-only tests (tests/test_gpu.py): cuDNN's fused attention against einsums, values and
#      gradients, and a bf16 train step that calls it in every layer;
#   2. the benchmark of the `base` model in bf16 (12 layers, d_model 768, 49k tokens per step), with
#      cuDNN's attention (`auto`) and XLA's side by side; MFU against the datasheet bf16 peak, and the
#      GPU time of the first variant by source op (a `jax.profiler` trace in OUT_DIR/trace);
#   3. 30 updates of the same model in the training loop, bf16, updates 21-23 traced: the log's
#      throughput, MFU and peak memory per record, and the window's op table (OUT_DIR/run/profile).
#
#   bash launch/gpu_check.sh [OUT_DIR]        # default /tmp/mtt_jax_gpu_check; not yet run on a GPU (minutes expected)
#
# Writes OUT_DIR/{versions.txt,test_gpu.txt,benchmark.txt,benchmark.json,trace/,run.txt,run/}. Every
# step runs; the exit status is non-zero if any failed. STEPS (timed steps, default 20) and PYTHON (default
# python3) can be set in the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/mtt_jax_gpu_check}
steps=${STEPS:-20}
python=${PYTHON:-python3}
mkdir -p "$out" || exit 2
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
             'optax', optax.__version__, jax.devices())"; } 2>&1 | tee "$out/versions.txt" || exit 1

"$python" -m pytest -q -n 0 -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
tests=$?

"$python" -m mtt_jax.benchmark --config configs/benchmark.py:base --dtypes bfloat16 \
    --attention_kernels auto,xla --steps "$steps" --out "$out/benchmark.json" --profile "$out/trace" \
    2>&1 | tee "$out/benchmark.txt"
benchmark=$?

"$python" -m mtt_jax.main --config configs/benchmark.py:base --config.dtype=bfloat16 \
    --config.total_steps=30 --config.log_every=5 --config.profile.first_step=21 --workdir "$out/run" \
    --overwrite 2>&1 | tee "$out/run.txt"
run=$?

echo "gpu_check: tests exit ${tests}, benchmark exit ${benchmark}, run exit ${run}; results in ${out}"
[ "$tests" -eq 0 ] && [ "$benchmark" -eq 0 ] && [ "$run" -eq 0 ]
