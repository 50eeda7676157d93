#!/usr/bin/env bash
# Everything that needs a GPU, in one call: the op suite on CUDA (reference path, then the Triton kernels,
# including the > 2^31-element cases, CUDA-graph capture/replay and torch.compile), then the benchmarks.
# Leaves logs, the benchmark JSON, table and plot in RESULTS (default bench/results/<gpu name>).
# Works offline with the torch/triton already installed (no dependency is downloaded).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || $PY -m pip install -q --no-deps --no-build-isolation --user -e . \
    || { echo "could not install fastvae"; exit 1; }
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
RESULTS="${RESULTS:-bench/results/$GPU}"
mkdir -p "$RESULTS"
$PY - <<PY | tee "$RESULTS/env.json"
import json, platform, torch, triton
print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}))
PY
status=0
# run LOG CMD...: run CMD, keep its output in LOG, remember a failure
run() { local log=$1; shift; echo "+ $*"; "$@" 2>&1 | tee "$log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; }
run "$RESULTS/tests_torch.log" $PY -m pytest -q -p no:cacheprovider tests
run "$RESULTS/tests_triton.log" env FASTVAE_TEST_BACKEND=triton $PY -m pytest -q -p no:cacheprovider \
    -m "not torch_only" tests/test_functional.py tests/test_nn.py tests/test_torch_parity.py \
    tests/test_triton.py tests/test_cuda.py
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    run "$RESULTS/bench.log" $PY -m pytest -q -p no:cacheprovider bench --benchmark-only \
        --benchmark-json "$RESULTS/results.json"
    run "$RESULTS/report.log" $PY bench/report.py "$RESULTS/results.json" --out "$RESULTS"
fi
echo "results in $RESULTS; status $status"
exit $status
