#!/usr/bin/env bash
# The test command of the README: the op suite on the eager reference, the same suite again on the Triton
# kernels under the interpreter (TRITON_INTERPRET must be set before triton is imported, hence a separate
# process; the recorder sets it), and a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests
# pytest runs inside the launch recorder: every kernel specialization the pass launches is written to
# $FASTVAE_SPECS (default: a temp file), which ci/compile_check.sh compiles for sm_90
python bench/sass_report.py --record "${FASTVAE_SPECS:-$(mktemp -t fastvae-specs.XXXXXX)}" --strict -- \
    -q -m "not torch_only" \
    tests/test_functional.py tests/test_nn.py tests/test_torch_parity.py tests/test_triton.py \
    tests/test_amp.py tests/test_iwae.py tests/test_likelihoods.py tests/test_latent.py
python -m pytest -q bench --benchmark-disable
