#!/usr/bin/env bash
# The paper's tables at a size one GPU trains in a session: plain BLT, BLT-D-4, BLT-D-8 and BLT-D-16
# with the same entropy model, data, batches and schedule, each evaluated on code_completion with every
# method and setting of the paper's tables (fastblt eval; blt_d and blt_dv each with the paper's
# settings for it) as soon as it is trained, beside the next model's training; the first BLT-D block
# after natural and forced patch ends (forced_boundary.py, BLT-D-4) and the one-step chain
# (blt_d_consistency.py); and the exact
# mode's greedy identity on the trained plain BLT and BLT-D-4 (greedy_identity.py). Results:
# experiments/results/paper_tables.md.
#
#   bash experiments/benchmarks/reproduce_gpu.sh ROOT             # everything, in order; log: ROOT/log.txt
#   bash experiments/benchmarks/reproduce_gpu.sh ROOT collect OUT # tables, plot and an archive into OUT
#
# A device call is capped (10 minutes) but a started process session outlives it while the machine
# is held, so on the GPU the run is started with `setsid nohup ... &` and later calls wait on and
# collect it; run it from a copy of the repository under ROOT/src (left out of the archive), so that a
# later call's fresh working tree never rewrites a file the run is reading. Finished phases leave
# ROOT/<phase>.done and are skipped on a rerun; a training cut short resumes from its last checkpoint.
#
# Environment (defaults: the reproduction of experiments/results/paper_tables.md):
#   PLAIN, BLT_D   experiments (blt_mid, blt_d_mid); BLT-D gets ":block=B"
#   SIZE           overrides giving the model size (default: the mid model with a 768 x 8 global model
#                  and 384-wide local models, a 2-layer decoder: the four trainings' estimated ~10
#                  minutes fit one device session; experiments/results/paper_tables.md)
#   STEPS          steps per model (2000: 10x the 200-step runs of blt_d_mid.md, at 16 x 4096 bytes)
#   ENTROPY_STEPS  the entropy model's steps (400); BLOCKS (4 8 16)
#   DATA           overrides of the data section; "" for the stdlib corpus (~10.5 MB: 131 M bytes are
#                  ~12 epochs of it); default "auto": the installed packages' Python sources
#                  (sysconfig's purelib) when they hold >= 200 MB, else the stdlib corpus
#   LIMIT, EVAL_BATCH, PROMPT_BYTES, GEN_BYTES   the evaluation: prompts, prompts per call, a prompt's
#                  last bytes kept, bytes generated (64, 32, 3072, 128)
#   IDENTITY_BATCH batch of the identity checks (32; empty: none)
#   ANCHORS        BLT-D block anchors evaluated (forced; "forced,patch" for both: on the 2026-12-05
#                  run patch was no better and cost more passes)
set -uo pipefail
root=${1:?usage: reproduce_gpu.sh ROOT [collect OUT]}
mkdir -p "$root/eval"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(cd "$here/../.." && pwd)  # greedy_identity.py imports experiments/

if [ "${2:-}" = collect ]; then
  out=${3:?usage: reproduce_gpu.sh ROOT collect OUT}
  mkdir -p "$out"
  python3 "$here/paper_tables.py" "$root" --out "$out" || echo "paper_tables.py failed" >&2
  (cd "$root" && find . \( -path ./jax-cache -o -path ./src -o -name 'checkpoints' -o -name '*.tfevents*' \) -prune -o \
    -type f \( -name '*.jsonl' -o -name '*.md' -o -name '*.txt' -o -name '*.png' \) -print |
    tar czf "$out/reproduction.tgz" -T -)
  ls -la "$out"
  exit 0
fi

plain=${PLAIN:-blt_mid}
blt_d=${BLT_D:-blt_d_mid}
read -r -a size <<<"${SIZE:---config.model.global_model.dim=768 --config.model.global_model.n_layers=8 --config.model.global_model.n_heads=12 --config.model.encoder.dim=384 --config.model.encoder.n_heads=6 --config.model.decoder.dim=384 --config.model.decoder.n_layers=2 --config.model.decoder.n_heads=6}"
steps=${STEPS:-2000}
entropy_steps=${ENTROPY_STEPS:-400}
read -r -a blocks <<<"${BLOCKS:-4 8 16}"
if [ "${DATA-auto}" = auto ]; then
  # The installed packages' Python sources when they are a corpus of >= 200 MB, else the stdlib's.
  purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  megabytes=$(python3 -c 'import pathlib, sys; print(sum(p.stat().st_size for p in pathlib.Path(sys.argv[1]).rglob("*.py") if p.is_file()) >> 20)' "$purelib")
  data=()
  [ "$megabytes" -ge 200 ] && data=(--config.data.source=text "--config.data.paths=$purelib/**/*.py")
else
  read -r -a data <<<"$DATA"
fi
limit=${LIMIT:-64}
eval_batch=${EVAL_BATCH:-32}
prompt_bytes=${PROMPT_BYTES:-3072}
gen_bytes=${GEN_BYTES:-128}
identity_batch=${IDENTITY_BATCH-32}
anchors=${ANCHORS:-forced}
log="$root/log.txt"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax-cache}

say() { echo "[$(date -u +%T)] $*" | tee -a "$log"; }

# Same schedule and patching for all four: max_patch_length=8 is BLT-D's (experiments/base.py blt_d),
# given to plain BLT too, so the objective is the only difference.
common=("${size[@]}" "${data[@]}" --config.train.steps="$steps" --config.train.log_every=100
  --config.train.eval_every="$steps" --config.checkpoint.save_every=1000
  --config.model.patcher.max_patch_length=8)

train() {  # name, then fastblt train arguments
  local name=$1
  shift
  [ -e "$root/$name.done" ] && return 0
  say "train $name: start"
  # The training takes ~60% of the GPU's memory; the evaluations beside it allocate as they go.
  XLA_PYTHON_CLIENT_MEM_FRACTION=${TRAIN_MEM_FRACTION:-0.6} python3 -m fastblt.cli train \
    --workdir "$root/$name" "$@" "${common[@]}" 2>&1 | grep -v '^W[0-9]' >>"$root/train_$name.txt"
  local rc=${PIPESTATUS[0]}
  say "train $name: exit $rc"
  [ "$rc" -eq 0 ] && touch "$root/$name.done"
  [ "$rc" -eq 0 ]
}

job() {  # kind, name, then the command: runs once (ROOT/<kind>_<name>.done), output in <kind>_<name>.txt
  local kind=$1 name=$2
  shift 2
  [ -e "$root/${kind}_$name.done" ] && return 0
  say "$kind $name: start"
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$@" >"$root/${kind}_$name.txt" 2>&1
  local rc=$?
  say "$kind $name: exit $rc"
  [ "$rc" -eq 0 ] && touch "$root/${kind}_$name.done"
}

evaluate() {  # job name, model, then fastblt eval's --method/--setting arguments (one --out per model)
  local job_name=$1 name=$2
  shift 2
  job eval "$job_name" python3 -m fastblt.cli eval --checkpoint "$root/$name" \
    --task code_completion --limit "$limit" --batch-size "$eval_batch" --max-bytes "$gen_bytes" \
    --max-prompt-bytes "$prompt_bytes" --compile-workers 8 --out "$root/eval/$name" "$@"
}

identity() {  # name, then greedy_identity.py's --methods ... arguments
  local name=$1
  shift
  [ -z "$identity_batch" ] && return 0
  job identity "$name" python3 "$here/greedy_identity.py" --checkpoint "$root/$name" \
    --batch "$identity_batch" --max-bytes "$gen_bytes" --dtypes model --modes exact default \
    --out "$root/identity_$name.jsonl" "$@"
}

diagnose() {  # name, then "boundary" to run forced_boundary.py too
  # the chain from training's masked accuracy to the sampler's one-step draft (two programs)
  job consistency "$1" python3 "$here/blt_d_consistency.py" --checkpoint "$root/$1" --rows 8 \
    --blocks 16 --out "$root/consistency_$1.jsonl"
  # BLT-D's first block after natural and forced patch ends, and both anchors (~10 programs: d4 only,
  # so that the last model's tail stays short)
  [ "${2:-}" = boundary ] || return 0
  job boundary "$1" python3 "$here/forced_boundary.py" --checkpoint "$root/$1" --prompts 64 \
    --prompt-bytes 512 --out "$root/boundary_$1.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$log"
say "start: $plain / $blt_d, ${size[*]}, ${data[*]:-stdlib corpus}, $steps steps"
pids=()
if train plain --config "$plain" --config.entropy_stage.steps="$entropy_steps"; then
  evaluate plain plain --method blt_s --setting draft=4,8,16 &
  pids+=($!)
  identity plain --methods blt_s ar_batch1 &
  pids+=($!)
fi
for b in "${blocks[@]}"; do
  [ -e "$root/plain.done" ] || break
  if train "d$b" --config "$blt_d:block=$b" --config.entropy_stage.checkpoint="$root/plain/entropy"; then
    # alpha, gamma and one_step are alternative rules: each value is one run
    # (fastblt.evaluation.harness.plan); each method with the paper's settings for it (blt_dv's are
    # permissive: alpha 0.3, gamma 1.5 / 2.0). One eval after the other: they share ar's run.
    {
      evaluate "d$b" "d$b" --method blt_d --setting block_size="$b" --setting anchor="$anchors" \
        --setting alpha=0.7,0.9 --setting gamma=0.5,1.0 --setting one_step=true
      evaluate "dv$b" "d$b" --method blt_dv --setting block_size="$b" --setting anchor="$anchors" \
        --setting alpha=0.3 --setting gamma=1.5,2.0 --setting one_step=true
    } &
    pids+=($!)
    if [ "$b" = 4 ]; then
      diagnose d4 boundary &
      pids+=($!)
      identity d4 --methods blt_dv --block-size 4 &
      pids+=($!)
    else
      diagnose "d$b" &
      pids+=($!)
    fi
  fi
done
for p in ${pids[@]+"${pids[@]}"}; do wait "$p"; done  # empty under set -u on bash < 4.4
say "done"
