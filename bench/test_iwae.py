"""K latent samples with their log importance ratios (``fastvae.sample_log_weights``), the sampling half of
the IWAE objective and of held-out log-likelihood estimates, against the eager formulation.

Training: K = 64 samples of a (B, 64) posterior, forward and backward (B = 4096 on CUDA, 512 on CPU).
Evaluation: K = 5000 samples, forward only, as ``estimate_log_likelihood`` draws them (B = 256 on CUDA,
32 on CPU; chunks of K in practice, the whole K here).
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from conftest import Batch, Bench, Case, bench_device, is_quick, op_step

import fastvae

LATENT = 64


def eager_log_weights(mu: torch.Tensor, logvar: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As IWAE code writes it: eps drawn and kept, z, then log p(z) - log q(z|x) summed over the latent."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn((k, *mu.shape), dtype=mu.dtype, device=mu.device)
    z = mu + std * eps
    log_ratio = (0.5 * (eps**2 - z**2 + logvar)).sum(-1)
    return z, log_ratio


def _sizes(config: pytest.Config) -> dict[str, tuple[int, int]]:
    """(K, B) per case."""
    if is_quick(config):
        return {"train": (4, 64), "eval": (16, 8)}
    if bench_device().type == "cuda":
        return {"train": (64, 4096), "eval": (5000, 256)}
    return {"train": (64, 512), "eval": (5000, 32)}


def impl_fn(impl: str, k: int, bench: Bench) -> Callable[..., object]:
    if impl == "eager":
        return lambda mu, lv: eager_log_weights(mu, lv, k)
    if impl == "compile":
        compiled = bench.compile(eager_log_weights)
        return lambda mu, lv: compiled(mu, lv, k)
    backend = impl.replace("fastvae-", "")
    return lambda mu, lv: fastvae.sample_log_weights(mu, lv, num_samples=k, backend=backend)


def make_posterior(k: int, b: int, mode: str, device: torch.device) -> Batch:
    grad = mode == "fwdbwd"
    mu = torch.randn(b, LATENT, device=device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(b, LATENT, device=device)).requires_grad_(grad)
    if not grad:
        return Batch((mu, logvar))
    return Batch((mu, logvar), (torch.randn(k, b, LATENT, device=device), torch.randn(k, b, device=device)))


def min_bytes(k: int, b: int, mode: str) -> int:
    """fp32: reads mu and logvar, writes z and the (K, B) log-ratios; backward also reads grad_z and the
    log-ratios' gradient and writes grad_mu and grad_logvar. eps is never stored."""
    n = b * LATENT
    fwd = 2 * n + k * n + k * b
    return 4 * (fwd + (k * n + k * b + 2 * n if mode == "fwdbwd" else 0))


@pytest.mark.parametrize("use", ["train", "eval"])
def test_log_weights(benchmark, bench, use, mode, impl, pytestconfig):
    if use == "eval" and mode == "fwdbwd":
        pytest.skip("the estimate runs without gradients")
    k, b = _sizes(pytestconfig)[use]
    case = Case(f"log_weights_{use}", mode, impl, torch.float32, (k, b, LATENT))
    bench.run(
        benchmark,
        case,
        op_step(impl_fn(impl, k, bench), mode),
        lambda: make_posterior(k, b, mode, bench.device),
        nbytes=min_bytes(k, b, mode),
    )
