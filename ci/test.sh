#!/usr/bin/env bash
# CI entry point: a fresh venv, torch's CPU build, the package in editable mode, lint, then the README's test
# command (the reference pass and the Triton-interpreter pass, each in its own pytest process), then the
# packaging and version-range checks of ci/compat.sh.
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
# the declared support range: the wheel and sdist, then the op suite at the floor and at the newest torch
bash ci/compat.sh package floor newest
