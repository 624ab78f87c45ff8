#!/usr/bin/env bash
# Runs one worker's command of a multi-host fastblt job and reports how it ended.
#
#   bash launch/worker.sh LOGDIR -- COMMAND [ARG...]
#
# * worker id: FASTBLT_WORKER_ID, else SLURM_PROCID (srun task), else TPU_WORKER_ID (GKE), else the
#   TPU VM metadata server (agent-worker-number), else the "-w-N" suffix of a TPU VM hostname;
#   "unknown" if none of these says.
# * the command's output goes to LOGDIR/worker-<id>.log (appended: one header line per attempt);
#   worker 0 also streams it to stdout, so a launcher that shows every worker's stdout shows one log.
# * a failing worker prints the last 30 lines of its log, prefixed "[worker <id>] ".
# * every worker writes its exit status to LOGDIR/worker-<id>.rc and ends with the line
#       FASTBLT_WORKER_EXIT worker=<id> host=<hostname> rc=<status>
#   which the launchers parse to name the workers that failed (or never reported).
# The script exits with the command's status (under SLURM, 0 for status 75: see the end).
set -u

if [ $# -lt 3 ] || [ "$2" != "--" ]; then
  echo "usage: bash launch/worker.sh LOGDIR -- COMMAND [ARG...]" >&2
  exit 2
fi
logdir=$1
shift 2

id=${FASTBLT_WORKER_ID:-${SLURM_PROCID:-${TPU_WORKER_ID:-}}}
if [ -z "$id" ] && command -v curl >/dev/null 2>&1; then
  id=$(curl -sf --max-time 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || true)
fi
if [ -z "$id" ]; then
  case "$(hostname)" in
    *-w-[0-9]*) id=$(hostname); id=${id##*-w-} ;;
    *) id=unknown ;;
  esac
fi
host=$(hostname)

mkdir -p "$logdir"
log="$logdir/worker-$id.log"
rm -f "$logdir/worker-$id.rc"
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $id on $host: $*" >>"$log"
if [ "$id" = "0" ]; then
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
else
  "$@" >>"$log" 2>&1
  rc=$?
fi
if [ "$rc" -ne 0 ] && [ "$id" != "0" ]; then
  tail -n 30 "$log" | sed "s/^/[worker $id] /"
fi
echo "$rc" >"$logdir/worker-$id.rc"
echo "FASTBLT_WORKER_EXIT worker=$id host=$host rc=$rc"
# 75: saved on SIGTERM, unfinished. srun --kill-on-bad-exit would kill the other tasks before they
# report, so under SLURM the status lives in the .rc file and srun sees 0 (slurm.sbatch requeues).
if [ "$rc" -eq 75 ] && [ -n "${SLURM_PROCID:-}" ]; then
  exit 0
fi
exit "$rc"
