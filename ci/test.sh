#!/usr/bin/env bash
# CI entry point: a fresh venv, torch's CPU build, the package in editable mode, lint, then the README's test
# command (the reference pass and the Triton-interpreter pass, each in its own pytest process).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ruff check .
bash ci/run_tests.sh
