#!/usr/bin/env bash
# Everything a GPU must check, in one command, on a machine with one CUDA GPU (11.5 minutes of step limits on
# an H100-class GPU; at most 12.5 with the 15 s each step gets to stop). Fills the GPU cells of docs/benchmarks.md and writes the GPU study's document
# (OUT_DIR/results_gpu.md, for docs/results_gpu.md); writes every table and log under OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR             run it (OUT_DIR must be new or empty)
#   scripts/gpu_check.sh --dry-run OUT_DIR   anywhere, no GPU needed: checks that every step's command exists
#                                            and parses its arguments; trains and measures nothing
#
# Steps (each with a time limit: 60 + 150 + 450 + 30 s = 11.5 minutes; a step still running 15 s after its
# limit's SIGTERM is killed, so the whole stays within 12.5 minutes):
#   1. tests:     the CUDA-only tests (pytest -m cuda)                       -> OUT_DIR/tests.log
#   2. benchmark: scripts/benchmark.py --quick --device cuda: d (AMP vs fp32 at 32^3 and 64^3, compile on/off,
#                 volumes cached on the device), f (k runs per GPU)         -> OUT_DIR/benchmark.md
#   3. study:     experiment=norm_study_gpu_short: the batch-1 questions at GPU scale, seeds in rounds,
#                 capped at 7 minutes of sweep                               -> OUT_DIR/study/
#   4. report:    norm-exp-report on that study, as a document              -> OUT_DIR/results_gpu.md
# Then a summary (step, ok/failed, seconds, where its output is) on stdout and in OUT_DIR/summary.md.
# Exit status: 0 every step ok, 1 a step failed, 2 bad command line or OUT_DIR, 3 no CUDA GPU.
# PYTHON=... chooses the interpreter (default: python, else python3); it needs the project installed
# (pip install -e .) or the repository on PYTHONPATH.
set -uo pipefail

usage() {
    echo "usage: scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
}

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || usage
OUT=$1
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}

# The GPU study: its preset as it is (the sweep folder inside OUT_DIR).
STUDY=(experiment=norm_study_gpu_short)
# The GPU-only sections: a run stopped by its time limit keeps the tables written so far.
BENCHMARK=(scripts/benchmark.py --quick --device cuda --only cuda --only runs_per_gpu)

# Fail fast, before any work: no GPU (unless dry), or an OUT_DIR that holds something (never overwritten).
if [[ $DRY_RUN -eq 0 ]]; then
    gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
    if [[ -z "$gpus" || "$gpus" -lt 1 ]]; then
        echo "gpu_check: no CUDA GPU visible to torch (python: $PY): run it on a machine with one, or use --dry-run" >&2
        exit 3
    fi
fi
if [[ -e "$OUT" && ( ! -d "$OUT" || -n "$(ls -A "$OUT")" ) ]]; then
    echo "gpu_check: $OUT exists and is not an empty folder: choose a new OUT_DIR (nothing is overwritten)" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1

SUMMARY=()
FAILED=0
step() {  # step NAME LIMIT_S OUTPUT COMMAND...: run COMMAND with a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2 output=$3 start=$SECONDS rc status
    shift 3
    if declare -F "$1" >/dev/null; then
        echo "[gpu_check] $name (a check of this script, no time limit): $*" >&2
        "$@" >"$OUT/$name.log" 2>&1  # a function of this script (the dry run's checks): quick, no limit
    else
        echo "[gpu_check] $name (at most ${limit}s): $*" >&2
        timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    fi
    rc=$?
    if [[ $rc -eq 0 ]]; then
        status=ok
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="failed (time limit ${limit}s)"
    else
        status="failed (exit $rc)"
    fi
    [[ $rc -eq 0 ]] || FAILED=1
    SUMMARY+=("| $name | $status | $((SECONDS - start)) | $output |")
}

if [[ $DRY_RUN -eq 1 ]]; then
    collect_cuda_tests() {  # pytest collects the CUDA tests, at least one
        "$PY" -m pytest -m cuda -n 0 --collect-only -q -p no:cacheprovider tests || return 1
    }
    check_study() {  # the study's config composes and validates, as norm-exp-train would run it
        "$PY" -m norm_experiments.train "${STUDY[@]}" hydra.mode=RUN --cfg job --resolve >"$OUT/study.yaml" || return 1
        "$PY" -c 'import sys
from omegaconf import OmegaConf
from norm_experiments.config import validate_config
validate_config(OmegaConf.load(sys.argv[1]))
print(sys.argv[1], "validates")' "$OUT/study.yaml" || return 1
        "$PY" -m norm_experiments.train "${STUDY[@]}" --cfg hydra | grep -q "StudySweeper"
    }
    step tests 120 "$OUT/tests.log" collect_cuda_tests
    step benchmark 120 "$OUT/benchmark.log" "$PY" "${BENCHMARK[@]}" --out "$OUT/benchmark.md" --dry-run
    step study 120 "$OUT/study.log, $OUT/study.yaml" check_study
    step report 60 "$OUT/report.log" "$PY" -m norm_experiments.report.cli --help
else
    step tests 60 "$OUT/tests.log, $OUT/tests.xml" \
        "$PY" -m pytest -m cuda -n 0 -q -rs -p no:cacheprovider tests --junitxml "$OUT/tests.xml"
    step benchmark 150 "$OUT/benchmark.md" "$PY" "${BENCHMARK[@]}" --out "$OUT/benchmark.md"
    step study 450 "$OUT/study/ (study.json, report.md, runs' metrics.json)" "$PY" -m norm_experiments.train \
        "${STUDY[@]}" hydra.sweep.dir="$OUT/study"
    step report 30 "$OUT/results_gpu.md" "$PY" -m norm_experiments.report.cli "$OUT/study" --doc "$OUT/results_gpu.md"
fi

{
    echo "# gpu_check $([[ $DRY_RUN -eq 1 ]] && echo '--dry-run ')$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    if [[ $DRY_RUN -eq 0 ]]; then
        echo "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
        echo
    fi
    echo "| step | status | seconds | output |"
    echo "|---|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.md"
exit $FAILED
