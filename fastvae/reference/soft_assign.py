"""Soft assignment of tokens to a codebook (IBQ's soft one-hot, vector-quantize-pytorch's codebook diversity
loss): the eager formulas, the CPU path and the backward of ``create_graph=True``.

Tokens z_n (N x D), codes e_k (K x D), t = 1 / temperature:

    s_nk   = t f(z_n, e_k),   f = z.e | -||z - e||^2 | -||z - e||,  ||z - e||^2 = max(||z||^2 + ||e||^2 - 2 z.e, 0)
    lse_n  = logsumexp_k s_nk,   p_nk = exp(s_nk - lse_n),   H_n = lse_n - sum_k p_nk s_nk
    pbar_k = (1/N) sum_n p_nk,   pE_n = sum_k p_nk e_k

The tokens are taken a chunk at a time: without autograd (evaluation) at most ``CHUNK_ELEMENTS`` logits exist
at once; with autograd each chunk's tiles are kept for backward, N x K in all (the Triton path keeps none).
The gradient of a distance is 0 where the distance is 0, as torch's cdist backward defines it.
"""

from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("dot", "euclidean", "sqeuclidean")
CHUNK_ELEMENTS = 1 << 20  # logits a chunk: 4 MiB in fp32 whatever K is (IBQ's K = 16384: 64 tokens)


def logits(z: Tensor, codebook: Tensor, t: float, metric: str) -> Tensor:
    """s (n, K) of tokens z (n, D); differentiable to every order (the distance's sqrt only where it is > 0)."""
    dot = z @ codebook.t()
    if metric == "dot":
        return dot * t
    q = (z.square().sum(-1, keepdim=True) + codebook.square().sum(-1) - 2.0 * dot).clamp_min(0.0)
    if metric == "sqeuclidean":
        return q * -t
    pos = q > 0
    dist = torch.where(pos, torch.where(pos, q, 1.0).sqrt(), 0.0)  # no inf * 0 in sqrt's gradient at 0
    return dist * -t


def soft_assign(z: Tensor, codebook: Tensor, t: float, metric: str,
                chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pE (N, D), lse (N,), H (N,), pbar (K,)) of tokens z (N, D) and codebook (K, D), computed in their dtype
    (the caller promotes), ``chunk`` tokens at a time (default: CHUNK_ELEMENTS // K); pbar of no tokens is
    NaN, as torch's mean of nothing."""
    n = z.shape[0]
    chunk = chunk or max(1, CHUNK_ELEMENTS // codebook.shape[0])
    pes, lses, ents = [], [], []
    col = codebook.new_zeros(codebook.shape[0])
    for start in range(0, max(n, 1), chunk):  # no tokens: one empty chunk, so the outputs stay in the graph
        s = logits(z[start:start + chunk], codebook, t, metric)
        lse = torch.logsumexp(s, dim=-1)
        log_p = s - lse[:, None]
        p = log_p.exp()
        # H = -sum p log p: the same as lse - sum p s, without subtracting two logits of size t |z||e|
        ents.append(-(p * log_p).sum(-1))
        lses.append(lse)
        pes.append(p @ codebook)
        col = col + p.sum(0)
    return torch.cat(pes), torch.cat(lses), torch.cat(ents), col / n


def codebook_entropy(pbar: Tensor) -> Tensor:
    """H(pbar) = -sum_k pbar_k log pbar_k, with vector-quantize-pytorch's log clamp at 1e-20: the same value
    (the clamp moves it by < K 5e-19) and a finite gradient at a code no token reaches (pbar_k = 0)."""
    return -(pbar * pbar.clamp_min(1e-20).log()).sum(-1)
