#!/usr/bin/env bash
# Compile the Triton kernel specializations the public ops launch for sm_90, on this CPU-only machine, under
# the GPU image's triton (3.6.0; COMPILE_CI_TRITON=1: the CI's own as well), and fail on a compile error or a
# register spill. Incremental: only the specializations the compile record holds no clean result for compile.
# The interpreter accepts code a real compile rejects; finding that here is far cheaper than on a GPU. CI
# (ci/test.sh) runs it on the recording of its interpreter pass, beside ci/compat.sh.
#
#   bash ci/compile_check.sh                   # check: compile what the record has not seen, fail as before
#   bash ci/compile_check.sh --update-record   # the same, then write what it compiled into the record
#   COMPILE_CHECK_FULL=1 bash ci/compile_check.sh   # ignore the record: compile every specialization
#
#   (a) record the specializations: the op suite under TRITON_INTERPRET=1 with every launch recorded, as the
#       interpreter pass of ci/run_tests.sh does (needs the CI venv: torch + triton, active or given as
#       $PYTHON), or take the recording that pass wrote to $FASTVAE_SPECS;
#   (b) with COMPILE_CI_TRITON=1, check them all for sm_90 under that triton;
#   (c) check the same set in a venv holding only triton==$GPU_TRITON (kernels/ imports only triton), kept
#       under ~/.cache so a cached CI home skips the install (pip's own cache makes a rebuild quick too).
#
# The compile record (bench/results/sass/compile_record.json, $COMPILE_RECORD) holds each checked
# specialization's result (ok or the error, registers, spills, shared memory) under the hash triton.compile
# names its kernel by, computed without compiling: the triton build, the kernel's source and every jit
# function it calls, dtypes, constexprs, specialization attributes, num_warps/num_stages, the target and its
# ptxas. A specialization whose hash the record holds as clean is skipped; any other is compiled and checked as
# before, so a changed kernel compiles again and a stale entry never stands in for it. A recorded failure or
# spill is compiled again and fails the check even if it now compiles clean (then the record is stale:
# refresh it). Refresh the record after kernel changes land, and commit it:
#
#   bash ci/compile_check.sh --update-record   # with $FASTVAE_SPECS set: that recording, else the op suite's
#
# --update-record compiles what the record has not seen (or holds a failure for), adds it, and drops the
# entries of the same triton that no specialization of the recording has any more.
#
# Outputs (recording, per-specialization JSON of each check) go to $OUT (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATE=()
for arg in "$@"; do
    case "$arg" in
        --update-record) UPDATE=(--update-record) ;;
        *) echo "usage: $0 [--update-record]" >&2; exit 2 ;;
    esac
done
PY="${PYTHON:-python}"
GPU_TRITON="${GPU_TRITON:-3.6.0}"
VENV_GPU="${VENV_GPU:-${XDG_CACHE_HOME:-$HOME/.cache}/fastvae/triton-$GPU_TRITON-py$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
OUT="${OUT:-$(mktemp -d)}"
RECORD="${COMPILE_RECORD:-bench/results/sass/compile_record.json}"
mkdir -p "$OUT"
start=$SECONDS

# with COMPILE_CHECK_FULL=1 every specialization compiles (the record is neither read nor written)
if [ "${COMPILE_CHECK_FULL:-0}" = 1 ]; then
    [ ${#UPDATE[@]} -eq 0 ] || { echo "--update-record and COMPILE_CHECK_FULL=1 exclude each other" >&2; exit 2; }
    RECORD_ARGS=()
    echo "+ full check: the compile record is not used"
else
    RECORD_ARGS=(--compile-record "$RECORD" "${UPDATE[@]}")
fi

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
    # the launches of ci/run_tests.sh's interpreter pass, so that a record updated from here is the one CI hits;
    # a failing test still records its launches
    echo "+ record the kernel launches of the op suite"
    mapfile -t OP_TESTS < ci/op_tests.txt
    $PY bench/sass_report.py --record "$SPECS" --strict -- -q -m "not torch_only" \
        -n "${FASTVAE_TEST_WORKERS:-2}" "${OP_TESTS[@]}" > "$OUT/record.log" 2>&1 \
        || echo "  (test failures while recording: $OUT/record.log)"
    [ -s "$SPECS" ] || { tail -20 "$OUT/record.log"; echo "no recording"; exit 1; }
fi
HEADLINE=bench/results/sass/headline_specializations.json
# the CI's own triton too only when asked (COMPILE_CI_TRITON=1): the GPU image's is the one kernels run under,
# and a second compile of every specialization is CI's largest cost after the interpreter pass
if [ "${COMPILE_CI_TRITON:-0}" = 1 ]; then
    echo "+ compile for sm_90 with $($PY -c 'import triton; print("triton", triton.__version__)')"
    $PY bench/sass_report.py --specs "$SPECS" "$HEADLINE" --arch 90 --check-only --out "$OUT/ci" \
        "${RECORD_ARGS[@]}" || status=1
fi

# with the headline benchmarks' launches (recorded from bench/ at the CUDA shapes: large tiles in modes no test
# launches at that size; how to record them again: bench/results/sass/README.md)
if wait "$venv_pid"; then
    echo "+ compile for sm_90 with triton $GPU_TRITON (no torch)"
    "$VENV_GPU/bin/python" bench/sass_report.py --specs "$SPECS" "$HEADLINE" --arch 90 --check-only \
        --out "$OUT/gpu-image" "${RECORD_ARGS[@]}" || status=1
else
    cat "$OUT/venv.log"
    echo "could not install triton==$GPU_TRITON"
    status=1
fi
echo "compile check: status $status, $((SECONDS - start)) s, outputs in $OUT"
exit $status
