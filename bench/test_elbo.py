"""One negative-ELBO loss step: sample z and the KL from (mu, logvar) of shape (B, 64), decode with a fixed
linear layer (the decoder stand-in, 64 -> 784) and take the Gaussian NLL of the (B, 784) reconstruction;
backward reaches mu and logvar through the decoder. "formula" is the same step with the NLL written by hand
(``F.gaussian_nll_loss`` materializes ``var * ones_like(x_hat)``: see bench/test_gaussian_nll.py)."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import Batch, Case

import fastvae

LATENT, FEATURES, VAR = 64, 784, 0.5


def eager_elbo(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    x_hat = z @ w
    recon = F.gaussian_nll_loss(x_hat, x, VAR, reduction="sum") / x.shape[0]
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kld


def formula_elbo(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    x_hat = z @ w
    recon = torch.sum(0.5 * (math.log(VAR) + (x - x_hat) ** 2 / VAR)) / x.shape[0]
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kld


def fastvae_elbo(backend: str) -> Callable[..., torch.Tensor]:
    def elbo(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z, kld = fastvae.reparameterize_kl(mu, logvar, reduction="batchmean", backend=backend)
        x_hat = z @ w
        return fastvae.gaussian_nll_loss(x_hat, x, VAR, reduction="batchmean", backend=backend) + kld

    return elbo


def min_bytes(mode: str, batch: int, itemsize: int) -> int:
    """The sum of the stages' ideal traffic (each stage reads its inputs once and writes its outputs once;
    the decoder's weight, 64 x 784, is not counted):

    fwd:    sample+KL reads mu, logvar, writes z (3 BD); the decoder reads z, writes x_hat (BD + BF);
            the NLL reads x_hat, x (2 BF)
    fwdbwd: sample+KL also reads grad_z, writes grad_mu, grad_logvar (+3 BD); the decoder also reads
            grad_x_hat, writes grad_z (+BD + BF); the NLL also writes grad_x_hat (+BF)
    """
    bd, bf = batch * LATENT, batch * FEATURES
    fwd = 4 * bd + 3 * bf
    return itemsize * (fwd + (4 * bd + 2 * bf if mode == "fwdbwd" else 0))


def make_elbo(batch: int, dtype: torch.dtype, mode: str, device: torch.device) -> Batch:
    grad = mode == "fwdbwd"
    mu = torch.randn(batch, LATENT, dtype=dtype, device=device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(batch, LATENT, device=device)).to(dtype).requires_grad_(grad)
    x = torch.rand(batch, FEATURES, dtype=dtype, device=device)
    w = (torch.randn(LATENT, FEATURES, device=device) / LATENT**0.5).to(dtype)
    return Batch((mu, logvar, x, w), (None,) if grad else ())


@pytest.mark.by_hand
def test_elbo(benchmark, bench, elbo_batch, dtype, mode, impl):
    case = Case("elbo", mode, impl, dtype, (elbo_batch, LATENT))
    itemsize = torch.empty((), dtype=dtype).element_size()
    bench.run_op(benchmark, case, eager_elbo, fastvae_elbo,
                 lambda: make_elbo(elbo_batch, dtype, mode, bench.device), formula=formula_elbo,
                 nbytes=min_bytes(mode, elbo_batch, itemsize), items=elbo_batch)
