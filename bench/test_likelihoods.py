"""Count and binary likelihoods, summed: Bernoulli (BCE with logits) of a (B, 784) image batch, and the
Poisson, negative binomial and zero-inflated NB of a (cells, genes) count matrix with one theta per gene, as
scVI trains them (the gradient flows to the logits / mean, theta and the dropout logits).

Eager and compile run the formulas users write (torch's BCE with logits and Poisson NLL, scvi-tools'
log_nb_positive / log_zinb_positive); the sizes of the issue (4096 x 784, 4096 x 20000 cells x genes) on
CUDA with small ones (about 2^16 and 2^20 elements) before them, smaller ones on CPU (up to 2^22 elements, as
bench/conftest.py's CPU grid). Torch's BCE and Poisson functions are their formulas (no materialized constant,
no host sync): no separate hand-written baseline."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import Batch, Bench, Case, bench_device, is_quick

import fastvae
from fastvae.reference.likelihoods import log_nb_positive, log_zinb_positive


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The shapes of this module (conftest's hook parametrizes dtype, mode and impl)."""
    quick = is_quick(metafunc.config)
    cuda = bench_device().type == "cuda"
    if "image_shape" in metafunc.fixturenames:
        shapes = [(64, 784)] if quick else ([(128, 784), (1024, 784), (4096, 784), (65536, 784)] if cuda
                                            else [(512, 784), (4096, 784)])
        metafunc.parametrize("image_shape", shapes, ids=[f"{b}x{f}" for b, f in shapes])
    if "counts_shape" in metafunc.fixturenames:
        shapes = [(16, 2000)] if quick else ([(8, 8192), (64, 16384), (1024, 20000), (4096, 20000)] if cuda
                                             else [(32, 20000), (200, 20000)])
        metafunc.parametrize("counts_shape", shapes, ids=[f"{b}x{g}" for b, g in shapes])


def eager_bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def eager_poisson(log_rate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.poisson_nll_loss(log_rate, x, reduction="sum")


def eager_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return -log_nb_positive(x, mu, theta).sum()


def eager_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    return -log_zinb_positive(x, mu, theta, pi).sum()


EAGER = {"bce_logits": eager_bce, "poisson_nll": eager_poisson, "nb_nll": eager_nb, "zinb_nll": eager_zinb}


def fastvae_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    if op == "bce_logits":
        return lambda a, x: fastvae.binary_cross_entropy_with_logits(a, x, reduction="sum", backend=backend)
    if op == "poisson_nll":
        return lambda a, x: fastvae.poisson_nll_loss(a, x, reduction="sum", backend=backend)
    if op == "nb_nll":
        return lambda x, mu, th: fastvae.negative_binomial_nll(x, mu, th, reduction="sum", backend=backend)
    return lambda x, mu, th, pi: fastvae.zinb_nll(x, mu, th, pi, reduction="sum", backend=backend)


def min_bytes(op: str, mode: str, shape: tuple[int, int], itemsize: int) -> int:
    """Bytes an ideal implementation moves: every N-sized tensor read once, every N-sized gradient written
    once (the per-gene theta and its gradient, G values, not counted; the loss is a scalar)."""
    n = shape[0] * shape[1]
    reads, writes = {"bce_logits": (2, 1), "poisson_nll": (2, 1), "nb_nll": (2, 1), "zinb_nll": (3, 2)}[op]
    return n * itemsize * (reads + (writes if mode == "fwdbwd" else 0))


def _counts(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rate = torch.distributions.Gamma(torch.tensor(0.7, device=device), torch.tensor(0.3, device=device))
    return torch.poisson(rate.sample(shape)).to(dtype)


def make(op: str, shape: tuple[int, int], dtype: torch.dtype, mode: str, device: torch.device) -> Batch:
    grad = mode == "fwdbwd"
    go = (None,) if grad else ()
    if op == "bce_logits":
        logits = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_(grad)
        return Batch((logits, torch.rand(shape, device=device).to(dtype)), go)
    x = _counts(shape, dtype, device)
    if op == "poisson_nll":
        return Batch((torch.randn(shape, device=device).to(dtype).requires_grad_(grad), x), go)
    mu = (torch.rand(shape, device=device) * 5 + 0.1).to(dtype).requires_grad_(grad)
    theta = (torch.rand(shape[1], device=device) + 0.5).to(dtype).requires_grad_(grad)
    if op == "nb_nll":
        return Batch((x, mu, theta), go)
    pi = torch.randn(shape, device=device).to(dtype).requires_grad_(grad)
    return Batch((x, mu, theta, pi), go)


def run(op: str, benchmark, bench: Bench, shape, dtype, mode, impl) -> None:
    case = Case(op, mode, impl, dtype, tuple(shape))
    itemsize = torch.empty((), dtype=dtype).element_size()
    bench.run_op(benchmark, case, EAGER[op], lambda backend: fastvae_fn(op, backend),
                 lambda: make(op, tuple(shape), dtype, mode, bench.device),
                 nbytes=min_bytes(op, mode, tuple(shape), itemsize))


def test_bce_logits(benchmark, bench, image_shape, dtype, mode, impl):
    run("bce_logits", benchmark, bench, image_shape, dtype, mode, impl)


def test_poisson_nll(benchmark, bench, counts_shape, dtype, mode, impl):
    run("poisson_nll", benchmark, bench, counts_shape, dtype, mode, impl)


def test_nb_nll(benchmark, bench, counts_shape, dtype, mode, impl):
    run("nb_nll", benchmark, bench, counts_shape, dtype, mode, impl)


def test_zinb_nll(benchmark, bench, counts_shape, dtype, mode, impl):
    run("zinb_nll", benchmark, bench, counts_shape, dtype, mode, impl)
