#!/usr/bin/env bash
# fastvae.integrations against the real libraries: one venv per version set with diffusers and scvi-tools,
# fastvae from the tree, then tests/test_integrations_*.py on the eager reference and on the Triton kernels under
# TRITON_INTERPRET=1 (each its own pytest process), then scvi-tools' own tests of what fastvae patches (its
# distribution tests and the SCVI model tests, from the sdist of the installed version: the wheel ships no tests)
# unpatched and with fastvae.integrations.scvi applied: every test that passes on scvi's code must pass patched
# (ci/scvi_own_tests.py: four tests, a few minutes a run on two cores).
#
#   newest   the newest diffusers and scvi-tools the registry serves (what a new user gets)
#   lowest   the lowest versions pyproject's extras declare (diffusers with the huggingface_hub it was released
#            with: the newer hub no longer has the cached_download it imports)
#
# torch is the local CPU build that pip installs from its find-links folder (uv, given that folder, installs the
# same wheel: one uv call for everything, about 25 s where pip's torch and then uv's rest took 2.5 min; uv on the
# registry alone would resolve a CUDA build), with the main venv's triton. uv has its own cache in WORK, removed at
# the end, so each run downloads as a new machine would. Usage: bash ci/integrations.sh [newest|lowest]...
# (default: newest)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(newest)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastvae-integrations.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 UV_PYTHON_DOWNLOADS=never UV_CACHE_DIR="$WORK/uv-cache"
SECONDS=0
stamp() { echo "[integrations $(date +%T) +${SECONDS}s] $*"; }

# the extras' lowest versions, from pyproject alone
eval "$(python3 - <<'PY'
import re, tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
low = lambda extra, dist: re.fullmatch(rf"{dist}\s*>=\s*([\d.]+)", extras[extra][0]).group(1)
print(f"DIFFUSERS_LOW={low('diffusers', 'diffusers')} SCVI_LOW={low('scvi', 'scvi-tools')}")
PY
)"
TORCH=torch==2.13.0
# the main venv's triton (ci/test.sh runs this inside it), else the newest
TRITON_VERSION="$(python3 -c 'import triton; print(triton.__version__)' 2>/dev/null || true)"
TRITON="triton${TRITON_VERSION:+==$TRITON_VERSION}"

# the local CPU build of torch, where pip finds it (this machine's find-links folder)
FIND_LINKS="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
LOCAL_TORCH=""
if [ -n "$FIND_LINKS" ] && compgen -G "$FIND_LINKS/${TORCH/==/-}+cpu-*.whl" >/dev/null; then
    LOCAL_TORCH="$TORCH+cpu"
fi

stamp "tools: uv"
python3 -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q uv
UV="$WORK/tools/bin/uv"

for step in "${STEPS[@]}"; do
    case $step in
        newest) SPECS=(diffusers scvi-tools) ;;
        lowest) SPECS=("diffusers==$DIFFUSERS_LOW" "huggingface_hub<0.26" "scvi-tools==$SCVI_LOW") ;;
        *) echo "unknown step $step (newest, lowest)" >&2; exit 2 ;;
    esac
    venv="$WORK/$step"
    python3 -m venv "$venv"
    if [ -n "$LOCAL_TORCH" ]; then
        stamp "$step: $LOCAL_TORCH (local) $TRITON pytest ${SPECS[*]} (uv)"
        "$UV" pip install -q -p "$venv/bin/python" --find-links "$FIND_LINKS" "$LOCAL_TORCH" "$TRITON" pytest \
            "${SPECS[@]}"
    else
        stamp "$step: $TORCH $TRITON pytest (pip), ${SPECS[*]} (uv)"
        "$venv/bin/python" -m pip install -q "$TORCH" "$TRITON" pytest
        # torch pinned: a dependency that wanted another torch fails here rather than replacing the CPU build
        echo "$TORCH" >"$WORK/constraints.txt"
        "$UV" pip install -q -p "$venv/bin/python" -c "$WORK/constraints.txt" "${SPECS[@]}"
    fi
    stamp "$step: fastvae from the tree"
    "$UV" pip install -q -p "$venv/bin/python" --no-deps -e .
    "$venv/bin/python" -c "from importlib.metadata import version as v
print('  ' + ', '.join(d + ' ' + v(d) for d in ('torch', 'triton', 'diffusers', 'scvi-tools', 'huggingface_hub')))"
    stamp "$step: tests, eager reference"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_integrations_diffusers.py \
        tests/test_integrations_scvi.py
    stamp "$step: tests, Triton kernels under the interpreter"
    TRITON_INTERPRET=1 FASTVAE_TEST_BACKEND=triton "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        -m "not torch_only" tests/test_integrations_diffusers.py tests/test_integrations_scvi.py
    scvi_version="$("$venv/bin/python" -c "from importlib.metadata import version; print(version('scvi-tools'))")"
    stamp "$step: scvi-tools $scvi_version's own tests, unpatched and patched"
    "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: "scvi-tools==$scvi_version" -d "$WORK/sdist-$step"
    tar xzf "$WORK/sdist-$step/scvi_tools-$scvi_version.tar.gz" -C "$WORK/sdist-$step"
    "$venv/bin/python" ci/scvi_own_tests.py "$WORK/sdist-$step/scvi_tools-$scvi_version"
    rm -rf "$venv" "$WORK/sdist-$step"
    stamp "$step: passed"
done
