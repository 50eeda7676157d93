"""Gumbel-softmax relaxed samples of a categorical posterior and its KL to the uniform prior.

    g = -log(E), E ~ Exp(1) (= -log(-log U)),   y = softmax((logits + g) / tau)
    hard: y_hard - sg(y) + y, y_hard the one-hot of argmax y (straight-through)
    KL(q || U_K) = log K - H(q) = log K + sum_k q_k log q_k,   q = softmax(logits)
    z_q = sum_k y_k e_k (codebook E (K, D)): taming's einsum('b n h w, n d -> b d h w', y, E)

``gumbel_softmax`` is torch.nn.functional.gumbel_softmax's computation op for op, so the eager path gives its
numbers bitwise for the same generator state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gumbel_noise(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """torch's draw: -log of an exponential sample, in logits' dtype and layout."""
    return -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(
        generator=generator).log()


def gumbel_softmax(logits: Tensor, gumbels: Tensor, tau: float, hard: bool, dim: int) -> Tensor:
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def codebook_product(y: Tensor, codebook: Tensor, dim: int) -> Tensor:
    """sum_k y_k codebook[k] along ``dim``, the D features where the K codes were: taming's GumbelQuantize
    einsum for (B, K, H, W) samples and ``dim=1`` (the same einsum, so its numbers), (N, D) for (N, K)."""
    d = dim % y.dim()
    letters = "abcdefghijklmnopqrstuvwxy"[: y.dim()]
    out = letters[:d] + "z" + letters[d + 1:]
    return torch.einsum(f"{letters},{letters[d]}z->{out}", y, codebook)


def kl_to_uniform(logits: Tensor, dim: int) -> Tensor:
    """log K + sum_k q_k log q_k per position (``dim`` reduced), in fp32 for half logits."""
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_q = torch.log_softmax(lf, dim)
    return math.log(logits.shape[dim]) + (log_q.exp() * log_q).sum(dim)
