"""Finite scalar quantization (Mentzer et al. 2023): each of d channels bounded and rounded to L_i levels,
the implicit codebook prod_i L_i never built.

    half_l = (L - 1)(1 + eps) / 2,  offset = 0.5 [L even],  shift = atanh(offset / half_l)
    bound(z) = tanh(z + shift) half_l - offset
    q = round(bound(z)) / (L // 2)                       straight-through: dq/dz = bound'(z) / (L // 2)
    index = sum_i (q_i (L_i // 2) + L_i // 2) prod_{j < i} L_j

(the paper's and vector-quantize-pytorch's FSQ; round half to even, as torch.round).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-3


def fsq_constants(levels: list[int]) -> tuple[list[float], list[float], list[float], list[float], list[int]]:
    """Per channel: (half_l, offset, shift, half_width, basis), in Python floats and ints."""
    half_l = [(lv - 1) * (1 + EPS) / 2 for lv in levels]
    offset = [0.5 if lv % 2 == 0 else 0.0 for lv in levels]
    shift = [math.atanh(o / h) for o, h in zip(offset, half_l)]
    half_width = [float(lv // 2) for lv in levels]
    basis = [math.prod(levels[:i]) for i in range(len(levels))]
    return half_l, offset, shift, half_width, basis


def fsq(z: Tensor, levels: list[int]) -> tuple[Tensor, Tensor]:
    """(q in z's dtype with the straight-through gradient, indices int64); z (..., d), features last."""
    constants = fsq_constants(levels)
    half_l, offset, shift, half_width = (torch.tensor(c, dtype=torch.float64 if z.dtype == torch.float64
                                                      else torch.float32, device=z.device)
                                         for c in constants[:4])
    zf = z.to(half_l.dtype)
    bounded = torch.tanh(zf + shift) * half_l - offset
    rounded = bounded + (torch.round(bounded) - bounded).detach()
    q = rounded / half_width
    codes = torch.round(bounded.detach()) + half_width
    # int64 (exact past 2^24 codes, where a float sum is not), one channel at a time: an (N, d) int64 product
    # would double the peak of the whole quantizer
    indices = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=z.device)
    for i, b in enumerate(constants[4]):
        indices.add_(codes[..., i].to(torch.int64), alpha=b)
    return q.to(z.dtype), indices
