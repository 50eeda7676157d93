"""Lookup-free quantization (MAGVIT-v2): sign quantization and its entropy penalty, computed exactly.

Tokens z_n in R^d, codes c in {-s, s}^d (s the codebook scale), K = 2^d, tau the inverse temperature:

    q = s sign(z),  index = sum_i 2^i [z_i > 0]
    p_n(c) = softmax_c(2 tau z_n . c) = prod_i sigmoid((2 b_i - 1) x_ni),   x_ni = 4 tau s z_ni, b_i = [c_i > 0]
    log p_n(c) = A_n + x_n . b(c),   A_n = -sum_i softplus(x_ni)     (the softmax factorizes over the bits)

so the per-sample entropy is a sum of binary entropies, O(N d), and the codebook's mean distribution

    pbar(c) = (1/N) sum_n exp(A_n + x_n . b(c))

is a column mean of exp of an (N x d) by (d x K) product: streamed over code tiles it never needs N x K.

    loss = entropy_weight * (E_n[H(p_n)] - gamma H(pbar)) + commitment_weight * mean((z - sg(q))^2)

BSQ's grouped form splits the d bits into G groups and sums the groups' codebook entropies: an upper bound of
H(pbar) (entropy is subadditive over the groups' marginals), exact when the groups are independent under pbar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def binary_entropy_of_logits(x: Tensor) -> Tensor:
    """H(sigmoid(x)) in nats, elementwise: softplus(-|x|) + |x| sigmoid(-|x|) (symmetric in x; no
    cancellation at large |x|, where softplus(x) - x sigmoid(x) would subtract two numbers near x)."""
    a = x.abs()
    return F.softplus(-a) + a * torch.sigmoid(-a)


def code_bits(start: int, count: int, d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """b(c) for codes start .. start + count - 1: (count, d), bit i of code c = (c >> i) & 1."""
    codes = torch.arange(start, start + count, device=device)
    return ((codes[:, None] >> torch.arange(d, device=device)) & 1).to(dtype)


def codebook_log_probs(x: Tensor, chunk: int = 1 << 12) -> Tensor:
    """log pbar(c) for every code (K = 2^d values), x (N, d) the logits 4 tau s z; ``chunk`` codes at a time
    (N x chunk logits live at once). Differentiable."""
    n, d = x.shape
    a = -F.softplus(x).sum(-1, keepdim=True)  # (N, 1)
    out = []
    for start in range(0, 1 << d, chunk):
        bits = code_bits(start, min(chunk, (1 << d) - start), d, x.device, x.dtype)
        out.append(torch.logsumexp(a + x @ bits.t(), dim=0) - torch.log(torch.tensor(float(n), dtype=x.dtype)))
    return torch.cat(out)


def codebook_entropy(x: Tensor, groups: int = 1) -> Tensor:
    """H(pbar) in nats, summed over ``groups`` groups of the bits (1: the exact entropy); x (N, d)."""
    n, d = x.shape
    total = x.new_zeros(())
    for g in x.reshape(n, groups, d // groups).unbind(1):
        log_p = codebook_log_probs(g)
        total = total - (log_p.exp() * log_p).sum()
    return total


def enumerated_entropies(z: Tensor, inv_temperature: float, codebook_scale: float) -> tuple[Tensor, Tensor]:
    """(mean per-sample entropy, codebook entropy) by the peers' enumeration of all 2^d codes: the softmax of
    2 tau z . c over an explicit codebook (vector-quantize-pytorch's LFQ without its log clamp): the oracle."""
    n, d = z.shape
    codebook = (code_bits(0, 1 << d, d, z.device, z.dtype) * 2 - 1) * codebook_scale
    logits = 2 * inv_temperature * z @ codebook.t()
    log_p = torch.log_softmax(logits, dim=-1)
    per_sample = -(log_p.exp() * log_p).sum(-1).mean()
    avg = log_p.exp().mean(0)
    return per_sample, -torch.special.xlogy(avg, avg).sum()


def lfq_quantize(z: Tensor, codebook_scale: float) -> tuple[Tensor, Tensor]:
    """(q = s sign(z) with sign(0) = -1, as the peers' where(z > 0, s, -s); index = sum_i 2^i [z_i > 0])."""
    positive = z > 0
    q = torch.where(positive, codebook_scale, -codebook_scale).to(z.dtype)
    weights = 1 << torch.arange(z.shape[-1], device=z.device)
    return q, (positive.long() * weights).sum(-1)
