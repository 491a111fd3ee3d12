#!/usr/bin/env bash
# Training throughput of MicroDiT_XL_2 at 256 px (32x32x4 latents, 77 caption tokens of width 1024), bf16, with
# the fused AdamW step, at the recipe's per-GPU batch of 256 (halved where it runs out of memory): the code before
# a change (a git worktree of BEFORE) and the working tree after it, side by side in one run, as one table.
#
#   benchmarks/gpu_throughput.sh [BEFORE]     # on one GPU; BEFORE defaults to 392e255, the last commit before
#                                             # issue 17 (regional compilation); pass any commit to compare with
#   CPU_TINY=1 benchmarks/gpu_throughput.sh   # the same steps on the CPU with a tiny preset (checks the script)
#
# Rows, and the GPU time each is expected to take on an H100/H200 (issue 6: whole-graph compile about 230 s per
# mask ratio), sized to about 6 minutes in all:
#   before  eager  0.00, 0.75   the landed code without compile                           ~30 s
#   before  bare   0.75         the landed code's compile (the whole network as one graph) ~240 s
#   after   bare   0.00, 0.75   regional compile, per mask ratio                           ~60-120 s
#   after   fsdp   0.75         Composer + the stage config's FSDP, compile on             ~60 s
# Each row runs under its own time limit (ROW_LIMIT seconds), so an over-long one drops out of the table instead
# of taking the rest with it. JSON lines and the table are kept in OUT (default /tmp/gpu_throughput).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
BEFORE="${1:-392e2557989462bafa3b9281e679987e5b1438ae}"
OUT="${OUT:-/tmp/gpu_throughput}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
ROW_LIMIT="${ROW_LIMIT:-300}"
BENCH="$REPO/benchmarks/train_throughput.py"
EXTRA=()
if [ -n "${CPU_TINY:-}" ]; then
    EXTRA=(--cpu-tiny)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

mkdir -p "$OUT"
rm -f "$OUT/results.jsonl"
WORKTREE="$(mktemp -d /tmp/before_XXXXXX)"
git -C "$REPO" worktree add --detach "$WORKTREE" "$BEFORE" >/dev/null || exit 1
trap 'git -C "$REPO" worktree remove --force "$WORKTREE"' EXIT

row() {  # row CODE_DIR LABEL MODE MASK_RATIOS...: one benchmark process, its JSON lines appended to results.jsonl
    local code="$1" label="$2" mode="$3"
    shift 3
    local launcher=("$PYTHON")
    if [ "$mode" = fsdp ] && [ -z "${CPU_TINY:-}" ]; then
        launcher=("$PYTHON" -m composer.cli.launcher -n 1)
    fi
    echo "[gpu_throughput] $label $mode mask $* ($(date +%T))" >&2
    (cd "$code" && PYTHONPATH="$code" timeout "$ROW_LIMIT" "${launcher[@]}" "$BENCH" --label "$label" --mode "$mode" \
        --mask-ratios "$@" "${EXTRA[@]}") | tee -a "$OUT/results.jsonl" | grep '^{' >&2
}

START=$SECONDS
row "$WORKTREE" before eager 0.0 0.75
row "$WORKTREE" before bare 0.75
row "$REPO" after bare 0.0 0.75
row "$REPO" after fsdp 0.75
echo "[gpu_throughput] all rows: $((SECONDS - START)) s" >&2
"$PYTHON" "$BENCH" --table "$OUT/results.jsonl" | tee "$OUT/table.md"
