"""Batch-level latent terms in eager PyTorch: the β-TCVAE decomposition's per-sample log-densities and the MMD.

Total-correlation decomposition (Chen et al. 2018). For a batch of B posteriors q(z|x_j) = N(mu_j, diag e^lv_j)
from a dataset of N points and one sample z_i of each, with log w_ij the estimator's log importance weights:

    log q(z_i|x_i)    = sum_d log N(z_i^d; mu_i^d, e^lv_i^d)                               (log_qzx)
    log p(z_i)        = sum_d log N(z_i^d; 0, 1)                                           (log_pz)
    log q(z_i)       ~= logsumexp_j [log w_ij + sum_d log N(z_i^d; mu_j^d, e^lv_j^d)]      (log_qz)
    log prod_d q(z_i^d) ~= sum_d logsumexp_j [log w_ij + log N(z_i^d; mu_j^d, e^lv_j^d)]   (log_prod_qzi)

    MWS (minibatch weighted sampling):    log w_ij = -log(B N)
    MSS (minibatch stratified sampling, the paper's appendix, M = B - 1):
        w_ii = 1/N,   w_i,(i+1) mod B = (N - M) / (N M),   w_ij = 1/M for the other B - 2 columns

The MSS weights of a row add up to 1. Rows are chunked so that memory is O(chunk * B * D), and each chunk is
recomputed in backward (checkpointed) rather than kept: the eager formula's (B, B, D) is never held whole.

MMD^2 between samples x (n, D) and y (m, D) with k(a, b) = sum_s f(|a - b|^2 / s) over the scales s,
f(t) = exp(-t) ("rbf") or 1 / (1 + t) ("imq", i.e. s / (s + |a - b|^2)):

    biased (V-statistic):    mean_{i,j} k(x_i, x_j) + mean_{i,j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)
    unbiased:                the x-x and y-y means over i != j only (Gretton et al. 2012, eq. 3)
    paired (n = m):          all three means over i != j (the U-statistic of their Lemma 6)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .common import HALF_LOG_2PI

# elements of one chunk's (rows, columns, D) intermediates
CHUNK_ELEMENTS = 1 << 22


def _checkpointing(*ts: Tensor) -> bool:
    """Whether a chunk is recomputed in backward rather than kept: when a gradient is wanted, except under
    torch.func transforms, which do not take checkpoint's saved-tensor hooks (the chunks' graphs are kept
    there: memory O(R B D) for grad, the price of torch.func.grad)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in ts)
            and not torch._C._are_functorch_transforms_active())

MMD_MODES = ("biased", "unbiased", "paired")


def tc_log_weights(rows: Tensor, batch: int, dataset_size: int, mss: bool, dtype: torch.dtype) -> Tensor:
    """log w for the global row indices ``rows`` against every column 0..batch-1: (len(rows), batch)."""
    cols = torch.arange(batch, device=rows.device)
    if not mss:
        return torch.full((rows.numel(), batch), -math.log(batch * dataset_size), dtype=dtype, device=rows.device)
    m = batch - 1
    lw = torch.full((rows.numel(), batch), -math.log(m), dtype=dtype, device=rows.device)
    strat = math.log(dataset_size - m) - math.log(dataset_size) - math.log(m)
    lw = torch.where(cols[None, :] == ((rows[:, None] + 1) % batch), strat, lw)
    return torch.where(cols[None, :] == rows[:, None], -math.log(dataset_size), lw)


def _tc_chunk(z: Tensor, mu: Tensor, logvar: Tensor, rows: Tensor, dataset_size: int, mss: bool
              ) -> tuple[Tensor, Tensor]:
    """(log_qz, log_prod_qzi) of the rows z (R, D) against every column of mu/logvar (B, D)."""
    lw = tc_log_weights(rows, mu.shape[0], dataset_size, mss, z.dtype)
    diff = z[:, None, :] - mu[None, :, :]
    dens = -0.5 * (diff * diff * torch.exp(-logvar)[None] + logvar[None]) - HALF_LOG_2PI  # (R, B, D)
    log_qz = torch.logsumexp(dens.sum(2) + lw, dim=1)
    log_prod = torch.logsumexp(dens + lw[:, :, None], dim=1).sum(1)
    return log_qz, log_prod


def tc_log_densities(
    z: Tensor, mu: Tensor, logvar: Tensor, *, dataset_size: int, mss: bool, row_offset: int = 0,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log_qz, log_prod_qzi, log_qzx, log_pz), each (R,), for the rows z (R, D) whose global indices start at
    ``row_offset`` in the batch of posteriors mu/logvar (B, D), in the compute dtype (fp32 for half inputs)."""
    dt = torch.float64 if torch.float64 in (z.dtype, mu.dtype, logvar.dtype) else torch.float32
    z, mu, logvar = z.to(dt), mu.to(dt), logvar.to(dt)
    r, d = z.shape
    batch = mu.shape[0]
    own_mu, own_lv = mu[row_offset:row_offset + r], logvar[row_offset:row_offset + r]
    diff = z - own_mu
    log_qzx = (-0.5 * (diff * diff * torch.exp(-own_lv) + own_lv) - HALF_LOG_2PI).sum(1)
    log_pz = (-0.5 * z * z - HALF_LOG_2PI).sum(1)
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(1, batch * d))
    grad = _checkpointing(z, mu, logvar)
    parts_qz, parts_prod = [], []
    for start in range(0, r, chunk):
        rows = torch.arange(row_offset + start, row_offset + min(r, start + chunk), device=z.device)
        args = (z[start:start + chunk], mu, logvar, rows, dataset_size, mss)
        # recomputed in backward: the autograd graph keeps O(B D) per chunk, not the chunk's (R, B, D)
        qz, prod = checkpoint(_tc_chunk, *args, use_reentrant=False) if grad else _tc_chunk(*args)
        parts_qz.append(qz)
        parts_prod.append(prod)
    if not parts_qz:
        empty = z.new_zeros((0,))
        return empty, empty, log_qzx, log_pz
    return torch.cat(parts_qz), torch.cat(parts_prod), log_qzx, log_pz


def _kernel_sum(a: Tensor, b: Tensor, kernel: str, inv_scales: Sequence[float], skip_diagonal: bool,
                offset: int) -> Tensor:
    """sum over rows a (R, D) and columns b (C, D) of k(a_i, b_j), leaving out j = offset + i if asked."""
    diff = a[:, None, :] - b[None, :, :]
    d2 = (diff * diff).sum(2)
    k = sum((torch.exp(-d2 * s) if kernel == "rbf" else 1.0 / (1.0 + d2 * s)) for s in inv_scales)
    if skip_diagonal:
        i = torch.arange(a.shape[0], device=a.device)[:, None] + offset
        k = torch.where(torch.arange(b.shape[0], device=a.device)[None, :] == i, 0.0, k)
    return k.sum()


def _pair_sum(a: Tensor, b: Tensor, kernel: str, inv_scales: Sequence[float], skip_diagonal: bool) -> Tensor:
    chunk = max(1, CHUNK_ELEMENTS // max(1, b.shape[0] * a.shape[1]))
    grad = _checkpointing(a, b)
    total = a.new_zeros(())
    for start in range(0, a.shape[0], chunk):
        args = (a[start:start + chunk], b, kernel, inv_scales, skip_diagonal, start)
        total = total + (checkpoint(_kernel_sum, *args, use_reentrant=False) if grad else _kernel_sum(*args))
    return total


def mmd_coefficients(n: int, m: int, mode: str) -> tuple[float, float, float]:
    """(c_xx, c_yy, c_xy): MMD^2 = c_xx S_xx + c_yy S_yy - 2 c_xy S_xy for the kernel sums S over the pairs
    the mode keeps (the diagonals of S_xx and S_yy left out unless biased, of S_xy too when paired)."""
    if mode == "biased":
        return 1.0 / (n * n), 1.0 / (m * m), 1.0 / (n * m)
    cxy = 1.0 / (n * (n - 1)) if mode == "paired" else 1.0 / (n * m)
    return 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), cxy


def mmd(x: Tensor, y: Tensor, *, kernel: str, scales: Sequence[float], mode: str) -> Tensor:
    """MMD^2 of the samples x (n, D) and y (m, D), a 0-d tensor in the compute dtype."""
    dt = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dt), y.to(dt)
    inv = [1.0 / s for s in scales]
    cxx, cyy, cxy = mmd_coefficients(x.shape[0], y.shape[0], mode)
    skip = mode != "biased"
    return (cxx * _pair_sum(x, x, kernel, inv, skip) + cyy * _pair_sum(y, y, kernel, inv, skip)
            - 2.0 * cxy * _pair_sum(x, y, kernel, inv, mode == "paired"))
