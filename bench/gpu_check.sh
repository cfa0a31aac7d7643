#!/usr/bin/env bash
# The GPU check (issue #20): on a machine with a GPU, the README's main job on the JAX backend, the MC dropout
# and head-cache benches, and mixed precision against float32, each timed, in one run.
#
#   bash bench/gpu_check.sh [OUT_DIR]      (default: a temporary folder)
#
# Needs transferkit's dependencies (TensorFlow for tf.data, JAX with CUDA for the compute); prints one line per
# job: its wall time and test accuracy, then the ratios of mixed precision to float32.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-$(mktemp -d)}
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
$PY -c "import jax; d = jax.devices(); print('jax', jax.__version__, 'devices', d); assert d[0].platform == 'gpu', 'no GPU'"

timed() {  # timed NAME COMMAND...: run, print NAME, seconds and the last line that states a test accuracy
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name: $((SECONDS - start)) s; $(grep -h 'test accuracy' "$OUT/$name.log" | tail -1)"
}

timed pretrain $PY -m transferkit.cli pretrain --recipe recipes/digits.toml --out "$OUT/encoder"
for precision in float32 mixed_float16 mixed_bfloat16; do
  timed "finetune-$precision" $PY -m transferkit.cli finetune --recipe recipes/digits.toml --from "$OUT/encoder" \
    --unfreeze-top 2 --label-fraction 0.05 --precision "$precision" --out "$OUT/classifier-$precision"
done
timed export $PY -m transferkit.cli export "$OUT/classifier-float32"
timed mc_predict $PY bench/mc_predict.py
timed head_cache $PY bench/head_cache.py
for name in mc_predict head_cache; do tail -3 "$OUT/$name.log"; done
echo "logs in $OUT"
