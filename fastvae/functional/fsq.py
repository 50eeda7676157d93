"""Finite scalar quantization (Mentzer et al. 2023): bound, round with a straight-through gradient, the code
index and the code-usage histogram, never building the implicit codebook of prod(levels) codes."""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from .._checks import check_dim, check_tensor, use_triton
from ..reference import fsq as fsq_ref
from ..reference import vq as vq_ref
from .vq import _token_view

__all__ = ["FSQOutput", "finite_scalar_quantize"]

MAX_HISTOGRAM_CODES = 1 << 24  # the histogram is a (K,) tensor: past 16M codes, count the indices yourself


class FSQOutput(NamedTuple):
    """``quantized``: in z's shape, each channel on its L_i levels scaled to [-1, 1], with the
    straight-through gradient; ``indices``: int64, z's shape without the channel dim; ``counts``: per-code
    usage (K,) int64 when asked for (``histogram=True``), else None."""

    quantized: Tensor
    indices: Tensor
    counts: Tensor | None


def finite_scalar_quantize(
    z: Tensor,
    levels: list[int] | tuple[int, ...],
    *,
    dim: int = -1,
    histogram: bool = False,
    backend: str | None = None,
) -> FSQOutput:
    """FSQ of the d = len(levels) channels along ``dim`` (vector-quantize-pytorch's ``FSQ(levels)``):

        bound(z) = tanh(z + atanh(offset / half_l)) half_l - offset,  half_l = (L - 1)(1 + 1e-3) / 2,
                   offset = 0.5 for even L
        q = round(bound(z)) / (L // 2),  index = sum_i (round(bound(z_i)) + L_i // 2) prod_{j<i} L_j

    Rounds half to even (torch.round). K = prod(levels) may be astronomically large (``FSQ(levels=[4]*16)``
    is 4.3e9 codes): nothing of size K exists unless ``histogram=True`` (K at most 2^24). On the Triton path
    bound, round, index and histogram are one elementwise pass that reads z in place (channels-last or
    channels-first) and backward one more.
    """
    check_tensor("z", z)
    if isinstance(levels, (str, bytes)) or not isinstance(levels, (list, tuple)) or not levels:
        raise TypeError(f"levels must be a non-empty list of ints, got {levels!r}")
    if any(isinstance(lv, bool) or not isinstance(lv, int) or lv < 2 for lv in levels):
        raise ValueError(f"levels must be ints >= 2, got {list(levels)}")
    check_dim("z", z, dim)
    d = z.shape[dim]
    if d != len(levels):
        raise ValueError(f"z has {d} channels along dim {dim} but levels has {len(levels)} entries")
    k = math.prod(levels)
    if k >= 1 << 63:
        raise ValueError(f"prod(levels) = {k} codes: indices past int64")
    if histogram and k > MAX_HISTOGRAM_CODES:
        raise ValueError(f"histogram=True needs prod(levels) <= {MAX_HISTOGRAM_CODES}, got {k} codes")

    zt = z.movedim(dim, -1)
    lead = zt.shape[:-1]
    if use_triton(backend, z):
        from .. import _triton

        q, indices, counts = _triton.fsq(_token_view(zt, d), tuple(levels), k if histogram else 0)
        q = q.reshape(*lead, d)
        counts = counts if histogram else None
    else:
        q, indices = fsq_ref.fsq(zt, list(levels))
        counts = vq_ref.histogram(indices.reshape(-1), k) if histogram else None
    quantized = q.movedim(-1, dim)
    if z.is_contiguous():
        quantized = quantized.contiguous()
    return FSQOutput(quantized, indices.reshape(lead), counts)
