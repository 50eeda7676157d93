#!/usr/bin/env bash
# The test command of the README: the op suite on the eager reference, the same suite again on the Triton
# kernels under the interpreter (TRITON_INTERPRET must be set before triton is imported, hence a separate
# process), and a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests
TRITON_INTERPRET=1 FASTVAE_TEST_BACKEND=triton python -m pytest -q -m "not torch_only" \
    tests/test_functional.py tests/test_nn.py tests/test_torch_parity.py tests/test_triton.py \
    tests/test_amp.py tests/test_iwae.py tests/test_likelihoods.py
python -m pytest -q bench --benchmark-disable
