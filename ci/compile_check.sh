#!/usr/bin/env bash
# Compile every Triton kernel specialization the public ops launch for sm_90, on this CPU-only machine, under
# the GPU image's triton (3.6.0; COMPILE_CI_TRITON=1: the CI's own as well), and fail on a compile error or a
# register spill.
# The interpreter accepts code a real compile rejects; finding that here is far cheaper than on a GPU. CI
# (ci/test.sh) runs it on the recording of its interpreter pass, beside ci/compat.sh.
#
#   (a) record the specializations: the test suite under TRITON_INTERPRET=1 with every launch recorded
#       (needs the CI venv: torch + triton, active or given as $PYTHON), or take the recording the
#       interpreter pass of ci/run_tests.sh wrote to $FASTVAE_SPECS;
#   (b) with COMPILE_CI_TRITON=1, compile them all for sm_90 under that triton;
#   (c) compile the same set in a venv holding only triton==$GPU_TRITON (kernels/ imports only triton), kept
#       under ~/.cache so a cached CI home skips the install (pip's own cache makes a rebuild quick too).
#
# Outputs (recording, per-specialization JSON of both compiles) go to $OUT (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
GPU_TRITON="${GPU_TRITON:-3.6.0}"
VENV_GPU="${VENV_GPU:-${XDG_CACHE_HOME:-$HOME/.cache}/fastvae/triton-$GPU_TRITON-py$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
start=$SECONDS

# (c, first half) the triton-only venv installs in the background while (a) and (b) use the CPUs
(
    if ! "$VENV_GPU/bin/python" -c "import sys, triton; sys.exit(triton.__version__ != '$GPU_TRITON')" 2>/dev/null; then
        rm -rf "$VENV_GPU"
        "$PY" -m venv "$VENV_GPU"
        "$VENV_GPU/bin/python" -m pip install -q --disable-pip-version-check "triton==$GPU_TRITON"
    fi
) > "$OUT/venv.log" 2>&1 &
venv_pid=$!

status=0
SPECS="$OUT/specializations.json"
if [ -s "${FASTVAE_SPECS:-}" ]; then
    SPECS="$FASTVAE_SPECS"
    echo "+ the interpreter pass's recording: $SPECS"
else
    echo "+ record the kernel launches of the test suite"
    $PY bench/sass_report.py --record "$SPECS"
fi
HEADLINE=bench/results/sass/headline_specializations.json
# the CI's own triton too only when asked (COMPILE_CI_TRITON=1): the GPU image's is the one kernels run under,
# and a second compile of every specialization is CI's largest cost after the interpreter pass
if [ "${COMPILE_CI_TRITON:-0}" = 1 ]; then
    echo "+ compile for sm_90 with $($PY -c 'import triton; print("triton", triton.__version__)')"
    $PY bench/sass_report.py --specs "$SPECS" "$HEADLINE" --arch 90 --check-only --out "$OUT/ci" || status=1
fi

# with the headline benchmarks' launches (recorded from bench/ at the CUDA shapes: large tiles in modes no test
# launches at that size; how to record them again: bench/results/sass/README.md)
if wait "$venv_pid"; then
    echo "+ compile for sm_90 with triton $GPU_TRITON (no torch)"
    "$VENV_GPU/bin/python" bench/sass_report.py --specs "$SPECS" "$HEADLINE" --arch 90 --check-only \
        --out "$OUT/gpu-image" || status=1
else
    cat "$OUT/venv.log"
    echo "could not install triton==$GPU_TRITON"
    status=1
fi
echo "compile check: status $status, $((SECONDS - start)) s, outputs in $OUT"
exit $status
