"""Lookup-free quantization (MAGVIT-v2, Open-MAGVIT2, Cosmos, MaskBit) with its entropy penalty computed
exactly in O(N d + K) memory, where the peers enumerate the K = 2^d codes for every token (several N x K
buffers kept for backward)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_dim, check_positive, check_tensor, use_triton
from ..reference import lfq as lfq_ref

__all__ = ["LFQOutput", "lookup_free_quantize"]

MAX_GROUP_BITS = 24  # 16M codes a group: N x 2^24 exponentials a step is already seconds on a GPU


class LFQOutput(NamedTuple):
    """``quantized``: s sign(z) in z's shape with the straight-through gradient to z; ``indices``: int64,
    sum_i 2^i [z_i > 0], z's shape without the bits dim; ``loss`` = entropy_weight * (per_sample_entropy -
    diversity_gamma * codebook_entropy) + commitment_weight * commitment; entropies in nats."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    commitment: Tensor


def lookup_free_quantize(
    z: Tensor,
    *,
    dim: int = -1,
    inv_temperature: float = 100.0,
    codebook_scale: float = 1.0,
    entropy_weight: float = 0.1,
    commitment_weight: float = 0.25,
    diversity_gamma: float = 1.0,
    groups: int = 1,
    backend: str | None = None,
) -> LFQOutput:
    """LFQ of the d bits along ``dim`` (K = 2^d codes {-s, s}^d, s = ``codebook_scale``), tau =
    ``inv_temperature`` (vector-quantize-pytorch's names and defaults):

        q = s sign(z) (z = 0 maps to -s, as the peers' where(z > 0, s, -s)),  index = sum_i 2^i [z_i > 0]
        p_n = softmax over all codes c of 2 tau z_n . c
        per_sample_entropy = E_n[H(p_n)] = E_n[sum_i H_b(sigmoid(4 tau s z_ni))]     (exact, O(N d))
        codebook_entropy   = H(E_n[p_n])        (exact: streamed over code tiles, never N x K)
        commitment         = mean((z - sg(q))^2)

    ``groups`` > 1 is BSQ's grouped entropy: the bits split into that many equal groups, the codebook
    entropy summed over their marginals, an upper bound of the exact one (equal when the groups are
    independent) for d past ``MAX_GROUP_BITS``. Unlike vector-quantize-pytorch, no clamp of p at 1e-5 inside
    the log: the entropies are exact (its clamp moves them by up to K * 1e-5 * log(1e5) nats).
    """
    check_tensor("z", z)
    check_dim("z", z, dim)
    tau = check_positive("inv_temperature", inv_temperature)
    scale = check_positive("codebook_scale", codebook_scale)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    d = z.shape[dim]
    if d == 0 or d % groups:
        raise ValueError(f"groups must divide the {d} bits along dim {dim}, got {groups}")
    if d // groups > MAX_GROUP_BITS:
        raise ValueError(f"{d // groups} bits a group is 2^{d // groups} codes; at most {MAX_GROUP_BITS} bits a "
                         f"group: pass groups= (BSQ's grouped entropy) to split the {d} bits")
    if d > 62:
        raise ValueError(f"indices of {d} bits do not fit int64: at most 62 bits along dim")

    zt = z.movedim(dim, -1)
    lead = zt.shape[:-1]
    tokens = zt.reshape(-1, d)
    q, indices = lfq_ref.lfq_quantize(tokens, scale)
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32  # half inputs computed in fp32
    x = tokens.to(dt) * (4.0 * tau * scale)
    per_sample = lfq_ref.binary_entropy_of_logits(x).sum(-1).mean()
    xg = x.reshape(-1, groups, d // groups).transpose(0, 1)  # (G, N, d / G)
    if use_triton(backend, z):
        from .. import _triton

        codebook = _triton.lfq_codebook_entropy(xg.contiguous())
    else:
        codebook = sum(lfq_ref.codebook_entropy(g) for g in xg.unbind(0))
    commitment = torch.nn.functional.mse_loss(tokens.to(dt), q.to(dt).detach())
    loss = entropy_weight * (per_sample - diversity_gamma * codebook) + commitment_weight * commitment
    out_dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    quantized = (tokens + (q - tokens).detach()).reshape(*lead, d).movedim(-1, dim)
    return LFQOutput(quantized, indices.reshape(lead), loss.to(out_dtype), per_sample.to(out_dtype),
                     codebook.to(out_dtype), commitment.to(out_dtype))
