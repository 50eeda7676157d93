"""Reparameterized sampling, the KL against N(0, I), and both from one call, on latents of shape (B, D).

The eager formulas are written as VAE code writes them (the PyTorch examples, PyTorch-VAE); "compile" is
torch.compile of those same functions.
"""

from __future__ import annotations

from typing import Callable

import torch
from conftest import Batch, Bench, Case

import fastvae


def eager_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    return mu + eps * std


def eager_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def eager_sample_kl(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return z, kld


EAGER = {"sample": eager_sample, "kl": eager_kl, "sample_kl": eager_sample_kl}


def fastvae_fn(op: str, backend: str) -> Callable[..., object]:
    if op == "sample":
        return lambda mu, logvar: fastvae.reparameterize(mu, logvar, backend=backend)
    if op == "kl":
        return lambda mu, logvar: fastvae.gaussian_kl(mu, logvar, reduction="sum", backend=backend)
    return lambda mu, logvar: fastvae.reparameterize_kl(mu, logvar, reduction="sum", backend=backend)


def min_bytes(op: str, mode: str, n: int, itemsize: int) -> int:
    """Bytes an ideal implementation moves for n latent elements: every tensor the call reads is read once,
    every tensor it produces is written once; eps lives in registers, scalars (the KL) are not counted.

    fwd reads mu, logvar and writes z (when sampling); fwdbwd also reads grad_z (when sampling) and writes
    grad_mu, grad_logvar.
    """
    sample = op in ("sample", "sample_kl")
    fwd = 2 + sample
    fwdbwd = fwd + sample + 2
    return n * itemsize * (fwdbwd if mode == "fwdbwd" else fwd)


def make_latent(
    shape: tuple[int, int], dtype: torch.dtype, mode: str, op: str, device: torch.device
) -> Batch:
    grad = mode == "fwdbwd"
    mu = torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_(grad)
    grad_outputs: tuple[torch.Tensor | None, ...] = ()
    if grad:
        grad_z = torch.randn(shape, dtype=dtype, device=device)
        grad_outputs = {"sample": (grad_z,), "kl": (None,), "sample_kl": (grad_z, None)}[op]
    return Batch((mu, logvar), grad_outputs)


def run_latent(op: str, benchmark, bench: Bench, latent, dtype, mode, impl) -> None:
    case = Case(op, mode, impl, dtype, tuple(latent))
    itemsize = torch.empty((), dtype=dtype).element_size()
    bench.run_op(benchmark, case, EAGER[op], lambda backend: fastvae_fn(op, backend),
                 lambda: make_latent(latent, dtype, mode, op, bench.device),
                 nbytes=min_bytes(op, mode, case.numel, itemsize))


def test_sample(benchmark, bench, latent, dtype, mode, impl):
    run_latent("sample", benchmark, bench, latent, dtype, mode, impl)


def test_kl(benchmark, bench, latent, dtype, mode, impl):
    run_latent("kl", benchmark, bench, latent, dtype, mode, impl)


def test_sample_kl(benchmark, bench, latent, dtype, mode, impl):
    run_latent("sample_kl", benchmark, bench, latent, dtype, mode, impl)
