"""Batch-level latent terms: ``fastvae.tc_decomposition`` (β-TCVAE, MSS) and ``fastvae.mmd`` (InfoVAE's imq),
forward and forward+backward, against the peers' eager formulation (the (B, B, D) matrix of
disentangling-vae's ``_get_log_pz_qz_prodzi_qzCx`` with the paper's MSS weights; PyTorch-VAE's
``compute_kernel``), torch.compile of it, and the fastvae paths, with the peak memory above the inputs.

Grid: B 1024 to 65536 on CUDA (the eager ones run out of memory first: skipped as such), up to 2048 on the
CPU; D in {10, 32, 64}. The CPU's curve is the memory: eager (B, B, D) against fastvae's chunks of rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Batch, Bench, Case, bench_device, is_quick

import fastvae

LOG_2PI = math.log(2 * math.pi)
N_DATA = 1 << 20


def _sizes(config: pytest.Config) -> list[tuple[int, int]]:
    if is_quick(config):
        return [(64, 10)]
    if bench_device().type == "cuda":
        return [(b, d) for d in (10, 32, 64) for b in (1024, 4096, 16384, 65536)]
    return [(b, d) for d in (10, 32) for b in (256, 1024, 2048)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bd" in metafunc.fixturenames:
        sizes = _sizes(metafunc.config)
        metafunc.parametrize("bd", sizes, ids=[f"{b}x{d}" for b, d in sizes])


def eager_tc(z, mu, logvar):
    """disentangling-vae's formulation with the paper's MSS weights: the (B, B, D) log-densities held."""
    b = z.shape[0]
    mat = -0.5 * (LOG_2PI + logvar[None] + (z[:, None] - mu[None]) ** 2 * torch.exp(-logvar[None]))
    m = b - 1
    i = torch.arange(b, device=z.device)
    w = torch.full((b, b), 1.0 / m, device=z.device)
    w[i, (i + 1) % b] = (N_DATA - m) / (N_DATA * m)
    w[i, i] = 1.0 / N_DATA
    lw = w.log()
    log_qzx = (-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))).sum(1)
    log_pz = (-0.5 * (LOG_2PI + z * z)).sum(1)
    log_qz = torch.logsumexp(mat.sum(2) + lw, 1)
    log_prod = torch.logsumexp(mat + lw[:, :, None], 1).sum(1)
    return (log_qzx - log_qz).mean(), (log_qz - log_prod).mean(), (log_prod - log_pz).mean()


def eager_mmd(z, prior):
    """PyTorch-VAE's compute_mmd with the imq kernel (C = 2 D), normalized by B (B - 1) as its loss does."""
    def k(a, b):
        c = 2.0 * a.shape[1]
        kern = c / (c + ((a[:, None] - b[None]) ** 2).sum(-1))
        return kern.sum() - kern.diag().sum()

    n = z.shape[0]
    return (k(prior, prior) + k(z, z) - 2 * k(prior, z)) / (n * (n - 1))


def _make(b: int, d: int, mode: str, device: torch.device, n: int) -> Batch:
    grad = mode == "fwdbwd"
    ts = [torch.randn(b, d, device=device) * (0.5 if k == 2 else 1.0) - (1.0 if k == 2 else 0.0)
          for k in range(n)]
    return Batch(tuple(t.requires_grad_(grad) for t in ts))


def _sum(out):
    return sum(out) if isinstance(out, tuple) else out


def test_tc_decomposition(benchmark, bench: Bench, bd, mode, impl):
    b, d = bd
    case = Case("tc_decomposition", mode, impl, torch.float32, (b, d))

    def fv(backend):
        return lambda z, mu, lv: sum(fastvae.tc_decomposition(z, mu, lv, dataset_size=N_DATA,
                                                              backend=backend)[:3])

    bench.run_op(benchmark, case, lambda z, mu, lv: _sum(eager_tc(z, mu, lv)), fv,
                 lambda: _make(b, d, mode, bench.device, 3), items=b)


def test_mmd(benchmark, bench: Bench, bd, mode, impl):
    b, d = bd
    case = Case("mmd", mode, impl, torch.float32, (b, d))

    def fv(backend):
        return lambda z, prior: fastvae.mmd(z, prior, kernel="imq", scale=2.0 * d, unbiased="paired",
                                            backend=backend)

    bench.run_op(benchmark, case, eager_mmd, fv, lambda: _make(b, d, mode, bench.device, 2), items=b)
