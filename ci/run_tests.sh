#!/usr/bin/env bash
# The test command of the README: the op suite on the eager reference, the same suite again on the Triton
# kernels under the interpreter (TRITON_INTERPRET must be set before triton is imported, hence a separate
# process; the recorder sets it), and the dry run of ci/gpu.sh, which smoke-runs the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
# both passes on pytest-xdist's workers (FASTVAE_TEST_WORKERS, default 2: the CI machine's cores)
WORKERS="${FASTVAE_TEST_WORKERS:-2}"
python -m pytest -q -n "$WORKERS" tests
# pytest runs inside the launch recorder: every kernel specialization the pass launches is written to
# $FASTVAE_SPECS (default: a temp file), which ci/compile_check.sh compiles for sm_90
# the op suite of the Triton pass, one file a line (ci/gpu.sh runs the same list on CUDA)
mapfile -t OP_TESTS < ci/op_tests.txt
python bench/sass_report.py --record "${FASTVAE_SPECS:-$(mktemp -t fastvae-specs.XXXXXX)}" --strict -- \
    -q -m "not torch_only" -n "$WORKERS" "${OP_TESTS[@]}"
# the dry run of the one GPU call (ci/gpu.sh): every phase on this CPU at small sizes, its packing checked;
# its last phase is the smoke run of every benchmark (each body once, torch.compile left to its headline cases)
bash ci/gpu.sh --dry-run --install shim --budget 420
