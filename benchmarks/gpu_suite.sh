#!/usr/bin/env bash
# One command for a GPU node: kernel benchmark, the 1B preset at bf16 and FP8 with and without
# torch.compile (tokens/s, MFU, peak memory), one dated section appended to benchmarks/RESULTS.md.
# Usage: bash benchmarks/gpu_suite.sh [--cpu-smoke] [--results FILE] [--steps N] [-- OVERRIDES]
# Details: benchmarks/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" -m benchmarks.gpu_suite "$@"
