#!/usr/bin/env bash
# Declared support is tested support: what pyproject.toml declares (requires-python, the torch and triton
# minimums, the Python classifiers) is installed and tested here, beside the main pass of ci/test.sh.
#
#   package  the wheel (`pip wheel .`) and the sdist, built from a copy of the tree, hold every module, the
#            license and the version of fastvae/__init__.py
#   floor    the oldest Python declared, torch and triton at exactly their declared minimums, the wheel
#            installed with pip; the op tests on both backends
#   newest   the newest Python classifier, the newest torch and triton the registry serves for it, the sdist
#            installed with pip; the op tests on both backends
#   pythons  every other classifier Python but python3's own (the main pass runs on it): the newest torch for
#            it, install, import and one call on each backend
#   numpy    the triton floor with the newest numpy, on python3's own Python (numpy >= 2.4 needs 3.11; the
#            floor's 3.9 stops at numpy 2.0, so the floor check cannot see this pair) and the main pass's torch
#            (this machine's CPU wheel when its find-links folder has one); ci/interpreter_smoke.py: each
#            kernel family once under the interpreter against float64 eager. The interpreter of triton 3.3 to
#            3.6 takes a range() bound through int() of a 1-element array, which numpy 2.4 rejects
#
# Each check is a fresh venv: torch (and, for the op tests, the test extra) from uv, fastvae from the artifact
# (pip, no deps, then `pip check`: the declared requirements must hold for exactly these versions), imported
# from outside the tree (the custom ops register at import, which is where an old torch rejected them). The op
# tests run on the eager reference and on the Triton kernels under TRITON_INTERPRET=1, on the subset that
# FASTVAE_TEST_SUBSET=1 selects (tests/conftest.py: every test, each parameter value at least once, no large
# sizes, no slow tests).
#
# Usage: bash ci/compat.sh [package|floor|newest|numpy|pythons]...   (no argument: all five, in that order)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(package floor newest numpy pythons)

# the op tests: all but the training script, the example models, the GPU-only file and the SASS tooling, which
# the main pass covers, and the inductor test of the eager path (40 s on the floor; the Triton pass compiles a
# training step through fastvae's dispatch in test_triton.py)
OP_TESTS=()
for f in tests/test_*.py; do
    case $f in
        tests/test_train.py | tests/test_models.py | tests/test_cuda.py | tests/test_sass_report.py) ;;
        tests/test_ci_gpu.py) ;;  # ci/gpu.py's own parts, on the main pass's Python
        tests/test_compile.py) ;;
        tests/test_packaging.py) ;;  # the tree's metadata and docs: the main pass's
        *) OP_TESTS+=("$f") ;;
    esac
done

# A CUDA build of torch with its libraries is 5-7 GB in a venv. On disk (mounted with `discard` on these
# machines) deleting one takes over a minute, so the venvs live in memory where /dev/shm has room for two
# (one installing while the other tests).
ROOT=${TMPDIR:-/tmp}
if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt $((16 << 20)) ]; then
    ROOT=/dev/shm
fi
WORK=$(mktemp -d "$ROOT/fastvae-compat.XXXXXX")
# On exit, a failure included, an install still running in the background is stopped (it and its children, by
# their ids) before WORK is removed
PIDS=()
stop_installs() {
    local pid
    for pid in "${PIDS[@]}"; do
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap 'stop_installs; rm -rf "$WORK"' EXIT
# uv installs a torch stack in 30-60 s where pip takes about 4 min. Each check has its own uv cache (and
# temporary files) in WORK, removed with its venv: every run downloads as a new machine would, nothing stays
# behind, and the venv's files are hard links into the cache rather than a second copy
export PYTHONUNBUFFERED=1
# the interpreters are the machine's (pyenv): uv must not try to download one, which only GitHub serves
export UV_PYTHON_DOWNLOADS=never
SECONDS=0
stamp() { echo "[$(date +%T) +${SECONDS}s] $*"; }

# ---- what pyproject declares -------------------------------------------------------------------------------
# python3 is 3.11 or newer on CI (tomllib); the numbers come from pyproject alone, so a new floor there is
# what the next run tests
eval "$(python3 - <<'PY'
import re, shlex, sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
key = lambda v: tuple(map(int, v.split(".")))
# triton is not a requirement (a CUDA torch brings its own): its floor is the triton extra's
triton_extra = p["optional-dependencies"]["triton"]
lower = lambda name, reqs: next(re.match(rf"{name}\s*>=\s*([\d.]+)", d).group(1) for d in reqs
                                if re.match(rf"{name}\s*>=", d))
pythons = sorted((c.rsplit(":: ", 1)[1] for c in p["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)), key=key)
floor = re.fullmatch(r">=\s*(3\.\d+)", p["requires-python"]).group(1)
main = "%d.%d" % sys.version_info[:2]
out = {
    "PY_FLOOR": floor,
    "PY_NEWEST": pythons[-1],
    "PY_OTHERS": " ".join(v for v in pythons if v not in (floor, pythons[-1], main)),
    "PY_MAIN": main,
    "TORCH_FLOOR": lower("torch", p["dependencies"]),
    "TRITON_FLOOR": lower("triton", triton_extra),
    "TEST_DEPS": " ".join(p["optional-dependencies"]["test"]),
    # what fastvae and its triton extra need besides torch and triton, which each check names itself (every
    # check installs triton and runs the interpreter, which computes with numpy)
    "OTHER_DEPS": " ".join(d for d in p["dependencies"] + triton_extra if not re.match(r"(torch|triton)\b", d)),
}
if pythons[0] != floor:
    sys.exit(f"requires-python >= {floor} but the oldest classifier is {pythons[0]}")
for k, v in out.items():
    print(f"{k}={shlex.quote(v)}")
PY
)"
stamp "declared: Python >= $PY_FLOOR (classifiers up to $PY_NEWEST), torch >= $TORCH_FLOOR, triton >= $TRITON_FLOOR"

# find_python X.Y: an interpreter of that version under pyenv (where CI machines have 3.9 to 3.13) or on PATH;
# one that runs, since a pyenv shim answers `command -v` for versions it will not start
find_python() {
    local v=$1 p
    for p in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v" "$(command -v "python$v" || true)"; do
        if [ -n "$p" ] && "$p" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$v'" >/dev/null 2>&1; then
            echo "$p"
            return
        fi
    done
    echo "no working Python $v under ${PYENV_ROOT:-$HOME/.pyenv}/versions or on PATH" >&2
    return 1
}

# local_torch X.Y: install arguments for the CPU torch wheel this machine's find-links folder holds for that
# Python (the one the main pass installs, ci/test.sh), else the registry's torch
local_torch() {
    local links wheel
    links="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
    wheel=$(compgen -G "$links/torch-*+cpu-cp${1/./}-*.whl" | sort -V | tail -n 1 || true)
    if [ -n "$links" ] && [ -n "$wheel" ]; then
        wheel=$(basename "$wheel")
        wheel=${wheel#torch-}
        echo "--find-links|$links|torch==${wheel%%-*}"
    else
        echo torch
    fi
}

# ---- tools, and the artifacts every check installs ---------------------------------------------------------
stamp "tools: uv, build"
python3 -m venv "$WORK/tools"
"$WORK/tools/bin/python" -m pip install -q uv build
UV="$WORK/tools/bin/uv"

# build from a copy of what git tracks (plus new files it does not ignore), so that nothing ignored, such as
# the egg-info of an editable install, can make a broken artifact look whole
python3 - "$WORK/src" <<'PY'
import os, shutil, subprocess, sys
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        check=True, capture_output=True, text=True).stdout.split("\0")
for f in filter(os.path.isfile, listed):  # a tracked file deleted in the work tree is not copied
    os.makedirs(os.path.join(sys.argv[1], os.path.dirname(f)), exist_ok=True)
    shutil.copy2(f, os.path.join(sys.argv[1], f))
PY
stamp "build: pip wheel ., python -m build --sdist"
"$WORK/tools/bin/python" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
# build prints its isolated environment's setup even with -q: shown on a failure only
"$WORK/tools/bin/python" -m build -q --sdist -o "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
WHEEL=$(echo "$WORK"/dist/fastvae-*.whl)
SDIST=$(echo "$WORK"/dist/fastvae-*.tar.gz)

check_artifacts() {
    "$WORK/tools/bin/python" - "$WHEEL" "$SDIST" "$WORK/src" <<'PY'
import pathlib, re, sys, tarfile, zipfile
wheel, sdist, src = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
version = re.search(r'^__version__ = "([^"]+)"$', (src / "fastvae/__init__.py").read_text(), re.M).group(1)
# every module of the tree, where the wheel must have it (kernels/ is installed as fastvae/kernels/)
modules = {str(p.relative_to(src)) for p in (src / "fastvae").rglob("*.py")}
modules |= {"fastvae/kernels/" + p.name for p in (src / "kernels").glob("*.py")}
names = set(zipfile.ZipFile(wheel).namelist())
errors = [f"wheel lacks {m}" for m in sorted(modules - names)]
info = f"fastvae-{version}.dist-info"
if f"{info}/licenses/LICENSE" not in names:
    errors.append(f"wheel lacks {info}/licenses/LICENSE (or its version is not {version})")
else:
    meta = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    for field in (f"Version: {version}", "License-Expression: MIT", "Requires-Python: >="):
        if field not in meta:
            errors.append(f"wheel METADATA lacks {field!r}")
root = f"fastvae-{version}/"
members = {m[len(root):] for m in tarfile.open(sdist).getnames() if m.startswith(root)}
needed = {"LICENSE", "README.md", "pyproject.toml", "PKG-INFO"}
needed |= {str(p.relative_to(src)) for p in (src / "kernels").glob("*.py")}
needed |= {m for m in modules if not m.startswith("fastvae/kernels/")}
errors += [f"sdist lacks {m}" for m in sorted(needed - members)]
if errors:
    sys.exit("\n".join(errors))
print(f"  fastvae {version}: the wheel holds all {len(modules)} modules and the license; the sdist the tree")
PY
}

# prepare NAME PYTHON ARTIFACT TESTS SPEC...: a fresh venv on PYTHON with SPECs (and, for TESTS=ops, the test
# extra), fastvae from ARTIFACT, `pip check`, import. Runs in the background, in WORK/NAME, with its own uv cache
prepare() {
    local name=$1 python=$2 artifact=$3 tests=$4
    shift 4
    local dir="$WORK/$name"
    export UV_CACHE_DIR="$dir/uv-cache" TMPDIR="$dir/tmp"
    mkdir -p "$TMPDIR"
    stamp "$name: venv on $("$python" -V 2>&1), installing $*"
    "$UV" venv -q --seed -p "$python" "$dir/venv"
    # shellcheck disable=SC2206  # OTHER_DEPS and TEST_DEPS are lists of requirement words
    local extra=($OTHER_DEPS)
    # shellcheck disable=SC2206
    [ "$tests" = ops ] && extra+=($TEST_DEPS)
    "$UV" pip install -q -p "$dir/venv/bin/python" "$@" "${extra[@]}"
    stamp "$name: pip install $(basename "$artifact")"
    "$dir/venv/bin/python" -m pip install -q --no-deps "$artifact"
    "$dir/venv/bin/python" -m pip check
    # from outside the tree, so that the installed package is the one imported
    cd "$WORK"
    "$dir/venv/bin/python" - <<'PY'
import platform
from importlib.metadata import version
import numpy, torch, triton
import fastvae, fastvae._triton  # the custom ops register here: a schema torch rejects fails here
assert "site-packages" in fastvae.__file__, fastvae.__file__
assert fastvae.__version__ == version("fastvae"), (fastvae.__version__, version("fastvae"))
print(f"  python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"numpy {numpy.__version__}, fastvae {fastvae.__version__}")
PY
}

# run_tests NAME TESTS: TESTS=ops runs both op passes on the subset, TESTS=smoke ci/interpreter_smoke.py,
# TESTS=call one call on each backend
run_tests() {
    local name=$1 tests=$2
    local venv="$WORK/$name/venv"
    if [ "$tests" = smoke ]; then
        stamp "$name: each kernel family under the interpreter (ci/interpreter_smoke.py)"
        (cd "$WORK" && TRITON_INTERPRET=1 "$venv/bin/python" "$WORK/src/ci/interpreter_smoke.py")
    elif [ "$tests" = ops ]; then
        # the venv's pytest script, not `python -m pytest`: the tree's fastvae/ must not shadow the installed one
        stamp "$name: op tests, eager reference"
        FASTVAE_TEST_SUBSET=1 "$venv/bin/pytest" -q -p no:cacheprovider -n "${FASTVAE_TEST_WORKERS:-2}" "${OP_TESTS[@]}"
        # the newest torch's triton is the main pass's (which runs every kernel test under it): there the
        # kernel pass is what the torch version can change, the custom ops' registration, autograd and dispatch
        local kernel_tests=("${OP_TESTS[@]}")
        [ "$name" = newest ] && kernel_tests=(tests/test_functional.py tests/test_triton.py tests/test_distributions.py)
        stamp "$name: op tests, Triton kernels under the interpreter (${#kernel_tests[@]} files)"
        FASTVAE_TEST_SUBSET=1 TRITON_INTERPRET=1 FASTVAE_TEST_BACKEND=triton "$venv/bin/pytest" -q \
            -p no:cacheprovider -m "not torch_only" -n "${FASTVAE_TEST_WORKERS:-2}" "${kernel_tests[@]}"
    else
        local backend
        for backend in torch triton; do
            # TRITON_INTERPRET must be set before triton is imported: one process per backend
            (cd "$WORK" && TRITON_INTERPRET=1 "$venv/bin/python" - "$backend" <<'PY'
import sys
import torch
import fastvae
backend = sys.argv[1]
mu, lv, x = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean", backend=backend)
nll = fastvae.gaussian_nll_loss(z, x, torch.ones(4, 1), reduction="batchmean", backend=backend)
ref = fastvae.gaussian_nll_loss(z, x, torch.ones(4, 1), reduction="batchmean", backend="torch")
torch.testing.assert_close(nll, ref)
print(f"  {backend}: kl {kl.item():.4f}, nll {nll.item():.4f}")
PY
            )
        done
    fi
    rm -rf "${WORK:?}/$name"
    stamp "$name: passed"
}

# the checks, in order: NAME|PYTHON|ARTIFACT|TESTS|SPEC...
CHECKS=()
for step in "${STEPS[@]}"; do
    case $step in
        package) check_artifacts ;;
        # torch at its declared minimum (==2.7 is 2.7.0) with the declared triton minimum, which must be the
        # triton that torch pins: a floor that pip cannot install together fails the install or `pip check`
        floor) CHECKS+=("floor|$(find_python "$PY_FLOOR")|$WHEEL|ops|torch==$TORCH_FLOOR|triton==$TRITON_FLOOR") ;;
        # no pins: what the registry serves newest for that Python is what a new user gets
        newest) CHECKS+=("newest|$(find_python "$PY_NEWEST")|$SDIST|ops|torch|triton") ;;
        # numpy 2.4 is the first to reject int() of a 1-element array; the main pass's torch, as the local CPU
        # wheel when there is one (a registry torch is a CUDA build: gigabytes for a CPU-only check)
        numpy)
            torch_spec=$(local_torch "$PY_MAIN")
            CHECKS+=("numpy|$(find_python "$PY_MAIN")|$WHEEL|smoke|$torch_spec|triton==$TRITON_FLOOR|numpy>=2.4")
            ;;
        pythons)
            for v in $PY_OTHERS; do
                CHECKS+=("python$v|$(find_python "$v")|$WHEEL|call|torch|triton")
            done
            ;;
        *) echo "unknown step $step (package, floor, newest, pythons)" >&2; exit 2 ;;
    esac
done

# The next check installs (network and disk) while the current one tests (CPU): two venvs at most at a time.
# The install's output is shown when it is waited for.
start_install() {
    local f
    IFS='|' read -r -a f <<<"${CHECKS[$1]}"
    mkdir -p "$WORK/${f[0]}"
    (prepare "${f[@]}") >"$WORK/${f[0]}.log" 2>&1 &
    PIDS[$1]=$!
}
[ ${#CHECKS[@]} -eq 0 ] || start_install 0
for i in "${!CHECKS[@]}"; do
    IFS='|' read -r -a f <<<"${CHECKS[$i]}"
    status=0
    wait "${PIDS[$i]}" || status=$?
    cat "$WORK/${f[0]}.log"
    [ "$status" -eq 0 ] || { echo "${f[0]}: install failed (exit $status)" >&2; exit 1; }
    [ $((i + 1)) -ge ${#CHECKS[@]} ] || start_install $((i + 1))
    run_tests "${f[0]}" "${f[3]}"
done
stamp "compat: ${STEPS[*]} passed"
