"""Shared fixtures. The op suite runs twice: once on the eager reference (``FASTVAE_TEST_BACKEND=torch``, the
default) and once on the Triton kernels (``FASTVAE_TEST_BACKEND=triton``), which on a CPU-only machine runs
them through ``TRITON_INTERPRET=1`` and on a GPU on CUDA tensors (``FASTVAE_TEST_DEVICE=cuda``)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

BACKEND = os.environ.get("FASTVAE_TEST_BACKEND", "torch")
DEVICE = os.environ.get("FASTVAE_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
# triton is not a requirement of fastvae (a CUDA torch brings its own, a CPU torch none): the kernel pass says so
if BACKEND == "triton" and importlib.util.find_spec("triton") is None:
    raise pytest.UsageError("FASTVAE_TEST_BACKEND=triton needs triton: pip install -e '.[triton]' (a CPU torch)")
if BACKEND == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise pytest.UsageError("FASTVAE_TEST_BACKEND=triton on CPU needs TRITON_INTERPRET=1 set before start")

# dtypes each backend computes; the kernels take half and single precision, fp64 is the reference's
DTYPES = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if BACKEND == "torch" else [])
# tolerances (rtol, atol) of a result against the float64 reference, per input dtype
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


@pytest.fixture
def backend() -> str:
    return BACKEND


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels write starts as NaN (or -1 for ints): an unwritten element shows up."""
    from fastvae._triton import common  # imports triton: only the kernel tests that ask for it pay for that

    def alloc(like, shape, dtype=None):
        dtype = dtype if dtype is not None else like.dtype
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=like.device)

    monkeypatch.setattr(common, "alloc", alloc)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


# FASTVAE_TEST_SUBSET=1 (the compatibility smoke runs of ci/compat.sh): every test still runs, but with only
# enough of its parameter cases that each value of each parameter appears at least once (every dtype, every
# var form, every reduction...), in collection order, and without sizes of 2^16 elements or more (the same
# kernel code on more programs, minutes under the interpreter). Tests marked slow are left out there too.
SUBSET = os.environ.get("FASTVAE_TEST_SUBSET", "0") == "1"
SUBSET_MAX_SIZE = 1 << 16


def _large(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= SUBSET_MAX_SIZE


def pytest_collection_modifyitems(config, items):
    if not SUBSET:
        return
    seen: dict[str, set] = {}  # test (file and function) -> (parameter, value) pairs already run
    kept, dropped = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        params = spec.params if spec is not None else {}
        if item.get_closest_marker("slow") is not None or any(_large(v) for v in params.values()):
            dropped.append(item)
            continue
        pairs = {(name, repr(value)) for name, value in params.items()}
        covered = seen.setdefault(item.nodeid.split("[")[0], set())
        if not params or pairs - covered:
            covered |= pairs
            kept.append(item)
        else:
            dropped.append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


@pytest.fixture
def gpu_math(monkeypatch):
    """The GPU's fp32 tl.exp, tl.log and division as Triton compiles them: ex2.approx.ftz, lg2.approx.ftz and the
    approximate division flush subnormal arguments and results to (signed) zero, which the interpreter (numpy,
    with subnormals) does not. Patched into the interpreter's builder for one test."""
    import numpy as np
    from triton.runtime import interpreter as interp

    tiny = np.float32(2.0**-126)

    def ftz(a):
        if a.dtype != np.float32:
            return a
        return np.where(np.abs(a) < tiny, np.copysign(np.float32(0.0), a), a).astype(np.float32)

    def unary(fn):
        def op(self, arg):
            with np.errstate(all="ignore"):  # the flushed values' infinities are the point, not a warning
                return interp.TensorHandle(ftz(fn(ftz(arg.data))), arg.dtype.scalar)

        return op

    fdiv = interp.InterpreterBuilder.create_fdiv

    def div(self, lhs, rhs):
        with np.errstate(all="ignore"):
            out = fdiv(self, interp.TensorHandle(ftz(lhs.data), lhs.dtype.scalar),
                       interp.TensorHandle(ftz(rhs.data), rhs.dtype.scalar))
            return interp.TensorHandle(ftz(out.data), out.dtype.scalar)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_exp", unary(np.exp))
    monkeypatch.setattr(interp.InterpreterBuilder, "create_log", unary(np.log))
    monkeypatch.setattr(interp.InterpreterBuilder, "create_fdiv", div)


@pytest.fixture
def no_host_reads(monkeypatch):
    """Every way a tensor's value reaches the host, and a list copied to the device, raises inside the test.
    Under the interpreter the launches themselves copy tensors to numpy (the kernels run on the host), so
    there ``cpu`` and ``numpy`` stay allowed; what fastvae's own code would read is still refused."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the op path")

    if BACKEND == "triton":  # imported first: its import probes torch once on the host (not a step's read)
        import fastvae._triton  # noqa: F401

    copies = () if BACKEND == "triton" and DEVICE == "cpu" else ("cpu", "numpy")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", *copies):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
