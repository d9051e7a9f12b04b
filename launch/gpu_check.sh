#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one NVIDIA GPU and JAX with CUDA installed:
#   1. the GPU-only tests (tests/test_gpu.py): cuDNN's fused attention against einsums, values and
#      gradients, and a bf16 train step that calls it in every layer;
#   2. the benchmark of the `base` model in bf16 (12 layers, d_model 768, 49k tokens per step), with
#      cuDNN's attention (`auto`) and XLA's side by side; MFU against the datasheet bf16 peak, and the
#      GPU time of the first variant by source op (a `jax.profiler` trace in OUT_DIR/trace).
#
#   bash launch/gpu_check.sh [OUT_DIR]        # default /tmp/mtt_jax_gpu_check; about 5 minutes on an H200
#
# Writes OUT_DIR/{versions.txt,test_gpu.txt,benchmark.txt,benchmark.json,trace/}. Both steps always run;
# the exit status is non-zero if either failed. STEPS (timed steps, default 20) and PYTHON (default
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

echo "gpu_check: tests exit ${tests}, benchmark exit ${benchmark}; results in ${out}"
[ "$tests" -eq 0 ] && [ "$benchmark" -eq 0 ]
