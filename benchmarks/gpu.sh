#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu.py): real-depth FLUX and Wan in bf16, DraftAttention end to
# end and at kernel level, fp16/bf16 NaN checks; under 8 minutes on one H100; writes JSON.
#
#   benchmarks/gpu.sh [out.json] [more gpu.py options]     (default: benchmarks/results/gpu.json)
#
# Needs only the checkout and a Python environment with attnctl's dependencies: $PYTHON if set, else
# the repository's .venv if it has one, else python3. Nothing is downloaded. gpu.py keeps within its
# --budget (400 s); a hard stop at 470 s (SIGINT) keeps the JSON of the sections already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/benchmarks/results/gpu.json}"
shift $(($# > 0 ? 1 : 0))
python="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=20 470 "$python" "$root/benchmarks/gpu.py" --json "$out" "$@"
