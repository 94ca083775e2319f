#!/usr/bin/env bash
# The benchmarks on one GPU, sized for a short GPU session (~8 minutes on an H100/H200):
#   OUT=/some/dir bash benchmarks/gpu_session.sh
# Runs under the machine's own python3 and packages (jax with a CUDA plugin, flax, optax, torch;
# not this project's CPU pins), JAX in bfloat16 and PyTorch under CUDA autocast bfloat16. Each step
# has its own time limit and writes its JSON under $OUT, its Markdown into $OUT/report.md and its stderr into
# $OUT/log.txt (at most 8 files come back from a remote session), so a step cut off loses only itself.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys, jax, flax, optax, torch; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
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
  step "$name" "$limit" python3 -m benchmarks.run "$@" --out "$OUT/$name.json"
}
# STEPS picks and orders the steps (default: these four, ~7.5 minutes on an H200).
for name in ${STEPS:-inference_t8 inference_sa12 train_t8 trace_train}; do
  case $name in
    inference_t8) bench $name ${T_T8:-210} --only flops inference --variants t8 --flops_variants t8 \
      --batch_sizes 8 128 --repeats 20 --torch_compile ;;
    inference_sa12) bench $name ${T_SA12:-150} --only flops inference --variants sa12 --flops_variants sa12 \
      --batch_sizes 128 --repeats 20 --torch_compile ;;
    train_t8) bench $name ${T_TRAIN:-150} --only flops train --train_variants t8 --flops_variants t8 \
      --batch_sizes 128 --repeats 10 ;;
    train_t8_shift) bench $name ${T_TRAIN:-150} --only flops train --train_variants t8 --flops_variants t8 \
      --batch_sizes 128 --repeats 10 --lowering shift ;;
    profile) bench $name ${T_PROFILE:-150} --only profile --profile_variants t8 sa12 --profile_batch 128 ;;
    trace_train|trace_forward)  # where one call's time goes, per HLO op and per model scope
      step $name ${T_TRACE:-150} python3 -m benchmarks.trace --what ${name#trace_} --variant t8 --batch 128 \
        --trace_dir /tmp/trace_$name --json "$OUT/$name.json" ;;
    *) echo "unknown step $name (inference_t8 inference_sa12 train_t8 train_t8_shift profile trace_train" \
         "trace_forward)"; exit 2 ;;
  esac
done
grep -v "^_load" "$OUT/report.md"
