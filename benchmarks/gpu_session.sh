#!/usr/bin/env bash
# The benchmarks on one GPU, sized for a short GPU session (under 10 minutes on an H100/H200):
#   OUT=/some/dir bash benchmarks/gpu_session.sh          # on the GPU machine
#   OUT=/tmp/x bash benchmarks/gpu_session.sh --tiny      # every step, small, on CPU
# Runs under the machine's own python3 and packages (jax with a CUDA plugin, flax, optax, torch;
# not this project's CPU pins), JAX in bfloat16 and PyTorch under CUDA autocast bfloat16. Each step
# has its own time limit and writes its JSON under $OUT, its Markdown into $OUT/report.md and its stderr into
# $OUT/log.txt (at most 8 files come back from a remote session), so a step cut off loses only itself.
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}  # the GPU machine's own python3; the tests pass this project's
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  "$PY" -c "import sys, jax, flax, optax, torch; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$OUT/log.txt"

step() {  # step NAME SECONDS COMMAND...: one process; JSON per step, Markdown to report.md
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  echo "== $name" >>"$OUT/log.txt"
  echo "## $name" >>"$OUT/report.md"
  timeout "$limit" "$@" >>"$OUT/report.md" 2>>"$OUT/log.txt"
  echo "exit $? after ${SECONDS}s"; tail -3 "$OUT/log.txt"
}
bench() {  # bench NAME SECONDS ARGS...: a benchmarks.run step
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$PY" -m benchmarks.run "$@" --out "$OUT/$name.json"
}
# STEPS picks and orders the steps. Default: the training-step grid of t8, sa12 and ma36 at the batch
# sizes GRID_BATCHES (default 128 256): JAX before/after the accelerator work vs PyTorch channels_last
# eager (benchmarks/train_grid.py; t8's step also profiled into trace_t8_train.json.gz). Each JAX
# training step compiles for ~35 s (t8) to minutes (ma36) on an H200, so the whole grid needs more
# than one 10-minute call: GRID_BATCHES=128 halves it, STEPS=train_ma36 runs one variant. `inference`
# times fused inference at batch 128 against torch.compile. `--tiny` runs train_t8 and inference
# small on CPU (the tests do).
if [ "${1:-}" = "--tiny" ]; then TINY=1; else TINY=0; fi
grid() {  # grid VARIANT SECONDS [ARGS...]
  local v=$1 limit=$2; shift 2
  # shellcheck disable=SC2086  # GRID_BATCHES is a list of numbers
  if [ $TINY = 1 ]; then set -- --tiny "$@"; else set -- --variants "$v" --batch_sizes ${GRID_BATCHES:-128 256} "$@"; fi
  [ $TINY = 1 ] && limit=900  # small, but compiled on a 2-core CPU
  step train_$v "$limit" "$PY" -m benchmarks.train_grid "$@" --out "$OUT/train_$v.json"
}
[ $TINY = 1 ] && DEFAULT_STEPS="train_t8 inference" || DEFAULT_STEPS="train_t8 train_sa12 train_ma36"
for name in ${STEPS:-$DEFAULT_STEPS}; do
  case $name in
    train_t8) grid t8 ${T_T8:-240} --trace_file "$OUT/trace_t8_train.json.gz" ;;
    train_sa12) grid sa12 ${T_SA12:-300} ;;
    train_ma36) grid ma36 ${T_MA36:-540} ;;
    inference)
      if [ $TINY = 1 ]; then
        bench $name 300 --only inference --variants t8 --batch_sizes 2 --image_size 32 --repeats 2 --no_experiments
      else
        bench $name ${T_INFER:-130} --only inference --variants t8 sa12 --batch_sizes 128 --repeats 20 \
          --torch_compile --no_experiments
      fi ;;
    inference_t8) bench $name ${T_T8:-210} --only flops inference --variants t8 --flops_variants t8 \
      --batch_sizes 8 128 --repeats 20 --torch_compile ;;
    train_t8_shift) bench $name ${T_TRAIN:-150} --only flops train --train_variants t8 --flops_variants t8 \
      --batch_sizes 128 --repeats 10 --lowering shift ;;
    profile) bench $name ${T_PROFILE:-150} --only profile --profile_variants t8 sa12 --profile_batch 128 ;;
    *) echo "unknown step $name (train_t8 train_sa12 train_ma36 inference inference_t8 train_t8_shift profile)"
       exit 2 ;;
  esac
done
grep -v "^_load" "$OUT/report.md"
