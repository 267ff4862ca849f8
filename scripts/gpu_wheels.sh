#!/usr/bin/env bash
# Fetch, on a machine with network, the pure-Python packages the project needs beyond what a GPU
# machine's image holds (hydra-core, omegaconf, its antlr4 runtime, torch-pruning), as wheels for
# Python 3.12 in .whl/ (git-ignored). scripts/gpu_check.sh installs .whl/*.whl into a temporary folder
# when it is there, so the check runs on a machine that can fetch nothing.
#   bash scripts/gpu_wheels.sh          # then carry .whl/ to the GPU machine with the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
    -d .whl hydra-core==1.3.2 omegaconf==2.3.0 torch-pruning==1.6.0
"$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # published as a source archive only
ls -l .whl
