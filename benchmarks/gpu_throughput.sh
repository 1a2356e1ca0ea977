#!/usr/bin/env bash
# The single-GPU measurements behind benchmarks/RESULTS.md's GPU section, in one go:
# the machine and versions, ResNet-50 throughput per precision (with the chip's bf16 matmul
# ceiling measured in the same run), jaxscale's step against a hand-written jit step, and the
# time that async and sync checkpoints add; with LARGE_BATCH_EPOCHS set, also the large-batch
# grid (benchmarks/large_batch.py, BatchNorm groups as micro-batches, 4 runs at a time; extra
# trainer flags, e.g. the Fashion-MNIST directory, in LARGE_BATCH_FLAGS).
#
#   bash benchmarks/gpu_throughput.sh [output dir, default gpu_results]
#   LARGE_BATCH_EPOCHS=24 LARGE_BATCH_FLAGS=--config.fashion_mnist_idx_dir=DIR \
#     bash benchmarks/gpu_throughput.sh
#
# Each part has its own time limit, so one slow or failing part does not lose the others.
set -u
out=${1:-gpu_results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

part() {  # part NAME SECONDS COMMAND...: runs COMMAND with a limit, output to NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name exit ${PIPESTATUS[0]}"
}

part machine 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv; $py -c 'import jax, jaxlib, flax, optax; print(jax.devices());
print(\"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__,
      \"optax\", optax.__version__)'; $py -m pip list 2>/dev/null | grep -iE \
  '^(orbax|grain|tensorflow.datasets|array.record|ml.collections|tensorboardx|etils|numpy) '"
part throughput "${THROUGHPUT_LIMIT:-240}" $py benchmarks/resnet50_throughput.py \
  --image-size 224 --per-device-batch "${BATCH:-256}" --policies "${POLICIES:-bf16,fp16,fp32}" \
  --steps 20 --rounds 3 --warmup 3 --matmul
part step_overhead "${OVERHEAD_LIMIT:-150}" $py benchmarks/step_overhead.py --model resnet50 \
  --image-size 224 --channels 3 --num-classes 1000 --global-batch "${BATCH:-256}" \
  --precision bf16 --steps 20 --rounds 5
part checkpoint "${CHECKPOINT_LIMIT:-120}" $py benchmarks/checkpoint.py --model resnet50 \
  --image-size 224 --num-classes 1000 --global-batch "${BATCH:-256}" --precision bf16 \
  --every 200 --rounds 2
if [ -n "${LARGE_BATCH_EPOCHS:-}" ]; then
  part large_batch "${LARGE_BATCH_LIMIT:-420}" $py benchmarks/large_batch.py \
    --epochs "$LARGE_BATCH_EPOCHS" --bn-groups micro-batches --jobs 4 \
    --deadline "$(( ${LARGE_BATCH_LIMIT:-420} - 120 ))" --timeout 300 \
    --out-dir "$out/large_batch" ${LARGE_BATCH_FLAGS:-}
fi
