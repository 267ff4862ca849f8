#!/usr/bin/env bash
# The device check in one command: every CUDA path (pytest -m gpu) and the performance figures.
#   bash scripts/gpu_check.sh                      # CUDA, full sizes (about 8 minutes on one H100/H200)
#   bash scripts/gpu_check.sh --device cpu --quick # the same commands at small sizes, on a CPU
# Extra options go to python -m pipelines.gpu_check (--help lists them). Results: outputs/gpu_check/<date-time>/
# (report.md, report.json, logs, results.tar.gz). Needs no network; PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out="outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels from scripts/gpu_wheels.sh, for a machine without network
    site="${TMPDIR:-/tmp}/repopt-site"
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
fi
exec "${PYTHON:-python3}" -m pipelines.gpu_check --device cuda --out "$out" "$@"
