"""Vector quantization: the nearest-code search, its losses and gradient estimators, codebook usage.

For tokens z_n (N x D, one codebook per head: z split into H heads of D/H) and a codebook e_k (K x D/H):

    index_n = argmin_k ||z_n - e_k||^2 = argmin_k (||e_k||^2 - 2 z_n . e_k)        (euclidean)
    index_n = argmax_k z_n . e_k / ||e_k||                                           (cosine: unit z and e)
    z_q     = e[index]
    commitment = mean((z - sg(z_q))^2),   codebook = mean((sg(z) - z_q)^2)

ties going to the lowest index, as ``torch.argmin``. The search here is chunked over tokens, so at most
``chunk`` x K distances exist at a time (the kernel holds one tile of them).

Gradient estimators to z (the value is z_q either way):
    straight-through:  z + sg(z_q - z)
    rotation trick:    (Fifty et al. 2024, sec. 4.2) sg(||z_q|| / ||z||) * (z - 2 (z . w) w + 2 (z . sg(u)) sg(q)),
                       u = z / ||z||, q = z_q / ||z_q||, w = sg((u + q) / ||u + q||): the rotation taking u to q
                       applied to z (so the gradient is rotated and scaled, not copied), O(D) per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import dtypes

# the safe_div floor of the rotation trick's norms (vector-quantize-pytorch uses the same 1e-6)
NORM_EPS = 1e-6


def vq_search(z: Tensor, codebook: Tensor, cosine: bool, chunk: int = 4096) -> Tensor:
    """Indices (N, H) of the nearest code of each head of each token; z (N, H, Dh), codebook (H, K, Dh).

    The distances are those of the expanded form ||e||^2 - 2 z . e in the compute dtype (float64 for float64,
    else fp32: the search a fp32 model runs), ``chunk`` tokens at a time."""
    _, dt = dtypes(z, codebook, loss=False)
    e = codebook.to(dt)
    if cosine:
        e = F.normalize(e, dim=-1)
        score_bias = torch.zeros(e.shape[:2], dtype=dt, device=e.device)
    else:
        score_bias = e.square().sum(-1)  # (H, K)
    out = torch.empty(z.shape[:2], dtype=torch.int64, device=z.device)
    for start in range(0, z.shape[0], chunk):
        zc = z[start:start + chunk].to(dt).transpose(0, 1)  # (H, n, Dh)
        scores = torch.baddbmm(score_bias[:, None, :], zc, e.transpose(1, 2), alpha=-2.0)  # (H, n, K)
        out[start:start + chunk] = scores.argmin(-1).transpose(0, 1)
    return out


def gather_codes(codebook: Tensor, indices: Tensor) -> Tensor:
    """z_q (N, H, Dh) = codebook[h, indices[n, h]]: a gather, never a one-hot."""
    heads = torch.arange(codebook.shape[0], device=codebook.device)
    return codebook[heads, indices]


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    return z + (z_q - z).detach()


def rotation_trick(z: Tensor, z_q: Tensor) -> Tensor:
    """R z scaled by sg(||z_q|| / ||z||), R the rotation taking z's direction to z_q's (module docstring);
    16-bit inputs computed in fp32 (a chain of five rounded bf16 ops moves the value by several ulps)."""
    out_dtype, dt = dtypes(z, z_q, loss=False)
    if dt != out_dtype:
        return rotation_trick(z.to(dt), z_q.to(dt)).to(out_dtype)
    nz = z.norm(dim=-1, keepdim=True)
    nq = z_q.detach().norm(dim=-1, keepdim=True)
    u = (z / nz.clamp_min(NORM_EPS)).detach()
    q = z_q.detach() / nq.clamp_min(NORM_EPS)
    w = F.normalize(u + q, dim=-1)
    rotated = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * q
    return rotated * (nq / nz.clamp_min(NORM_EPS)).detach()


def vq_losses(z: Tensor, z_q: Tensor) -> tuple[Tensor, Tensor]:
    """(commitment, codebook): mean((z - sg(z_q))^2) and mean((sg(z) - z_q)^2), as F.mse_loss computes them
    (torch's promoted dtype, fp32 under autocast for half inputs, as torch's losses)."""
    out_dtype, dt = dtypes(z, z_q)
    zf, qf = z.to(dt), z_q.to(dt)
    commitment = F.mse_loss(zf, qf.detach())
    codebook = F.mse_loss(qf, zf.detach())
    return commitment.to(out_dtype), codebook.to(out_dtype)


def histogram(indices: Tensor, size: int) -> Tensor:
    """Counts of each value in [0, size) of int ``indices``: a scatter-add of ones into a (size,) int64 buffer.
    torch.bincount reads the largest index back to the host on CUDA (a sync every call); integer adds are
    exact in any order, so this is as deterministic."""
    return torch.zeros(size, dtype=torch.int64, device=indices.device).scatter_add_(
        0, indices.long(), torch.ones_like(indices, dtype=torch.int64))


def codebook_usage(indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(counts (K,) int64, perplexity exp(H(p)) with p = counts / N and 0 log 0 = 0, active codes): from the
    indices by a histogram, no one-hot; computed on the device, nothing read on the host."""
    counts = histogram(indices.reshape(-1), codebook_size)
    p = counts.to(torch.float32) / max(indices.numel(), 1)
    entropy = -torch.special.xlogy(p, p).sum()
    return counts, entropy.exp(), (counts > 0).sum()


def code_sums(z: Tensor, indices: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(counts (K,), per-code sums of the tokens (K, D)) in a fixed order: the tokens sorted by code (a stable
    sort) and each code's run summed in sequence, so the result is bitwise the same on every run; index_add_
    would take float atomics on CUDA, whose order (and rounding) changes between runs."""
    counts = histogram(indices, codebook_size)
    order = torch.argsort(indices, stable=True)
    sums = torch.segment_reduce(z[order], "sum", lengths=counts, axis=0, unsafe=True, initial=0)
    return counts, sums


def ema_codebook(cluster_size: Tensor, embed_sum: Tensor, eps: float) -> Tensor:
    """The EMA codebook from its running statistics, Laplace-smoothed as vector-quantize-pytorch and
    Sonnet do: e_k = embed_sum_k / n_k, n_k = (cluster_size_k + eps) / (sum + K eps) * sum."""
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.numel() * eps) * total
    return embed_sum / smoothed.unsqueeze(-1)
