#!/usr/bin/env bash
# The mid-size GPU runs: plain BLT, BLT-D-4 and BLT-D-8 trained on the default corpus with the same
# entropy model and patching, then the generation benchmark on the trained checkpoints.
# Results: experiments/results/train_blt_mid.md, blt_d_mid.md, sampler_mid.md.
#
#   bash experiments/benchmarks/gpu_mid.sh OUT_DIR [SECONDS]
#
# Phases run in order until SECONDS (default 540) are spent: plain (entropy stage + BLT), d4, d8,
# identity (where bf16 blt_s / blt_dv part ways with ar: experiments/benchmarks/greedy_identity.py,
# with the model's attention kernels and with XLA attention), sample. A phase cut by the deadline gets SIGTERM, saves a checkpoint (preemption handling) and
# resumes on the next invocation; finished phases are skipped (marker files under $ROOT), so the same
# command can be repeated on a machine that keeps $ROOT. Environment: ROOT (default /tmp/fastblt-gpu),
# STEPS (BLT steps, default 300), ENTROPY_STEPS (default 200), SKIP_D8 (non-empty: no BLT-D-8),
# SKIP_IDENTITY, SKIP_SAMPLE (non-empty: skip that phase).
# Compiled programs go to a persistent cache under $ROOT, so a phase resumed on the same machine
# does not compile its train step again.
set -uo pipefail
out=${1:?usage: gpu_mid.sh OUT_DIR [SECONDS]}
budget=${2:-540}
root=${ROOT:-/tmp/fastblt-gpu}
steps=${STEPS:-300}
entropy_steps=${ENTROPY_STEPS:-200}
deadline=$((SECONDS + budget))
mkdir -p "$out" "$root"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="$root/jax-cache"

# Same schedule for all three; max_patch_length=8 is BLT-D's patching (experiments/base.py blt_d),
# given to plain BLT too so the objective is the only difference.
common=(--config.train.steps="$steps" --config.optimizer.warmup_steps=100 --config.train.log_every=25
  --config.train.eval_every="$steps" --config.checkpoint.save_every=100
  --config.model.patcher.max_patch_length=8)

train() {  # name, then fastblt train arguments
  local name=$1
  shift
  [ -e "$root/$name.done" ] && return 0
  local left=$((deadline - SECONDS - 15))
  if [ "$left" -lt 60 ]; then
    echo "[$name] not started: ${left}s left" | tee -a "$out/gpu_mid_log.txt"
    return 1
  fi
  echo "[$name] start, ${left}s left $(date -u +%FT%TZ)" | tee -a "$out/gpu_mid_log.txt"
  timeout -s TERM -k 60 "$left" python3 -m fastblt.cli train --workdir "$root/$name" "$@" "${common[@]}" \
    2>&1 | grep -v '^W[0-9]' | tee -a "$out/${name}_log.txt"
  local rc=${PIPESTATUS[0]}
  echo "[$name] exit $rc $(date -u +%FT%TZ)" | tee -a "$out/gpu_mid_log.txt"
  [ "$rc" -eq 0 ] && grep -q "step $steps: held-out" "$out/${name}_log.txt" && touch "$root/$name.done"
  [ -e "$root/$name.done" ]
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu_mid_log.txt"
train plain --config blt_mid --config.entropy_stage.steps="$entropy_steps" &&
  train d4 --config blt_d_mid:block=4 --config.entropy_stage.checkpoint="$root/plain/entropy" &&
  { [ -n "${SKIP_D8:-}" ] || train d8 --config blt_d_mid:block=8 --config.entropy_stage.checkpoint="$root/plain/entropy"; }
trained=$?

# Time left for a phase that has no checkpoint to resume from; prints why when there is too little.
phase_time() {  # name
  local left=$((deadline - SECONDS - 10))
  if [ "$left" -lt 60 ]; then
    echo "[$1] not started: ${left}s left" | tee -a "$out/gpu_mid_log.txt" >&2
    return 1
  fi
  echo "$left"
}

if [ "$trained" -eq 0 ] && [ -z "${SKIP_IDENTITY:-}" ] && [ ! -e "$root/identity.done" ] &&
  left=$(phase_time identity); then
  echo "[identity] start, ${left}s left" | tee -a "$out/gpu_mid_log.txt"
  rm -f "$out/identity_mid.jsonl"
  # Four checks side by side (timings do not matter here): each process allocates as it goes.
  # stderr per check under $ROOT ($OUT returns few files); the tail of a failed one goes to the log.
  pids=() logs=()
  for impl in auto xla; do
    for job in "plain blt_s" "d4 blt_dv"; do
      read -r run method <<<"$job"
      logs+=("$root/identity_${run}_${impl}.err")
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s TERM "$left" python3 \
        experiments/benchmarks/greedy_identity.py --checkpoint "$root/$run" --method "$method" \
        --batch 32 --max-bytes 256 --attention-impl "$impl" --out "$out/identity_mid.jsonl" \
        >/dev/null 2>"${logs[-1]}" &
      pids+=($!)
    done
  done
  ok=0
  for k in "${!pids[@]}"; do
    if ! wait "${pids[$k]}"; then
      ok=1
      { echo "[identity] failed: ${logs[$k]}"; grep -v '^W[0-9]' "${logs[$k]}" | tail -5; } | tee -a "$out/gpu_mid_log.txt"
    fi
  done
  grep -v '"row"' "$out/identity_mid.jsonl" | tee -a "$out/gpu_mid_log.txt"
  [ "$ok" -eq 0 ] && touch "$root/identity.done"
fi

if [ "$trained" -eq 0 ] && [ -z "${SKIP_SAMPLE:-}" ] && [ ! -e "$root/sample.done" ] &&
  left=$(phase_time sample); then
  echo "[sample] start, ${left}s left" | tee -a "$out/gpu_mid_log.txt"
  d_runs=("$root/d4")
  [ -n "${SKIP_D8:-}" ] || d_runs+=("$root/d8")
  timeout -s TERM "$left" python3 experiments/benchmarks/sampler_trained.py --blt "$root/plain" \
    --blt-d "${d_runs[@]}" --batch 1 32 --max-bytes 256 --hf-bytes 32 --compile-workers 12 \
    --out "$out/sampler_mid.jsonl" 2>&1 |
    grep -v '^W[0-9]' | tee -a "$out/sample_log.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] && touch "$root/sample.done"
fi

# Metrics of every stage that ran so far (one archive: the device returns few files).
(cd "$root" && find . -name metrics.jsonl | tar czf "$out/metrics.tgz" -T -) || true
ls "$root"
