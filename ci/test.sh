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
# torch first, the build CI tests (this machine's find-links folder has its CPU wheel; elsewhere name the CPU
# index, --index-url https://download.pytorch.org/whl/cpu); fastvae requires only torch>=2.7, which keeps it
python -m pip install -q torch==2.13.0
# triton explicitly, for the interpreter pass: fastvae does not require it (a CPU torch brings none)
python -m pip install -q -e ".[test,triton]"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
ruff check .
# the interpreter pass records the kernel specializations it launches here
export FASTVAE_SPECS="${FASTVAE_SPECS:-$(mktemp -d)/specializations.json}"
bash ci/run_tests.sh
# Three checks side by side: every kernel specialization the interpreter pass launched, compiled for sm_90
# under the GPU image's triton (CPU-bound, niced: it takes what the others leave); fastvae.integrations
# against the real diffusers and scvi-tools in a venv of their own; and the declared support range (the wheel
# and sdist, the op suite at the floor and at the newest torch, each kernel family on the floor's triton with
# the newest numpy).
compile_log="$(mktemp)"
nice -n 10 bash ci/compile_check.sh >"$compile_log" 2>&1 &
compile_pid=$!
integrations_log="$(mktemp)"
bash ci/integrations.sh newest >"$integrations_log" 2>&1 &
integrations_pid=$!
compat_status=0
bash ci/compat.sh package floor newest numpy || compat_status=$?
integrations_status=0
wait "$integrations_pid" || integrations_status=$?
cat "$integrations_log"
compile_status=0
wait "$compile_pid" || compile_status=$?
cat "$compile_log"
echo "compat: exit $compat_status; integrations: exit $integrations_status; compile check: exit $compile_status"
[ "$compat_status" -eq 0 ] && [ "$integrations_status" -eq 0 ] && [ "$compile_status" -eq 0 ]
