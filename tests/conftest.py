"""Shared fixtures. The op suite runs twice: once on the eager reference (``FASTVAE_TEST_BACKEND=torch``, the
default) and once on the Triton kernels (``FASTVAE_TEST_BACKEND=triton``), which on a CPU-only machine runs
them through ``TRITON_INTERPRET=1`` and on a GPU on CUDA tensors (``FASTVAE_TEST_DEVICE=cuda``)."""

from __future__ import annotations

import os

import pytest
import torch

BACKEND = os.environ.get("FASTVAE_TEST_BACKEND", "torch")
DEVICE = os.environ.get("FASTVAE_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
