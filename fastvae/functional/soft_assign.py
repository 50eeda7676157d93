"""Soft assignment of tokens over a learned codebook (IBQ's soft one-hot, vector-quantize-pytorch's codebook
diversity loss, soft VQ), fused as flash attention: on the Triton path no N x K logit or probability exists,
in forward or backward."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_dim, check_positive, check_same_device, check_tensor, use_triton
from ..reference import soft_assign as sa_ref
from .vq import _token_view

__all__ = ["SoftAssignOutput", "soft_assign"]


class SoftAssignOutput(NamedTuple):
    """``quantized``: p.E in z's shape and layout (the promoted dtype); ``lse``, ``entropy``: per token (z's
    shape without the feature dim); ``mean_probs``: pbar (K,); ``codebook_entropy``: H(pbar), 0-d. Statistics
    in fp32 for 16-bit inputs; entropies in nats. The diversity loss of vector-quantize-pytorch is
    ``-codebook_entropy``."""

    quantized: Tensor
    lse: Tensor
    entropy: Tensor
    mean_probs: Tensor
    codebook_entropy: Tensor


def soft_assign(
    z: Tensor,
    codebook: Tensor,
    *,
    temperature: float = 1.0,
    metric: str = "dot",
    dim: int = -1,
    backend: str | None = None,
) -> SoftAssignOutput:
    """The softmax of each token's logits over the K codes, its statistics and the expected code:

        s_nk = f(z_n, e_k) / temperature,   f = z.e ("dot": IBQ's logits), -||z - e|| ("euclidean":
               vector-quantize-pytorch's -cdist), -||z - e||^2 ("sqeuclidean")
        p_n = softmax_k s_n,   lse_n = logsumexp_k s_nk,   entropy_n = H(p_n) = lse_n - sum_k p_nk s_nk
        mean_probs = pbar = (1/N) sum_n p_n,   codebook_entropy = H(pbar),   quantized_n = sum_k p_nk e_k

    ``z``: features along ``dim`` (-1 for channels-last tokens, 1 for (B, D, H, W) maps, read in place);
    ``codebook``: (K, D). Distances use ||z||^2 + ||e||^2 - 2 z.e clamped at 0; a distance's gradient is 0
    where it is 0 (as torch's cdist). With no tokens, ``mean_probs`` and ``codebook_entropy`` are NaN (the
    mean of nothing). On the Triton path memory is O(N D + K D + N + K): backward recomputes p from lse.
    """
    check_tensor("z", z)
    check_tensor("codebook", codebook)
    check_same_device(z=z, codebook=codebook)
    check_dim("z", z, dim)
    tau = check_positive("temperature", temperature)
    if metric not in sa_ref.METRICS:
        raise ValueError(f"metric must be one of {', '.join(sa_ref.METRICS)}, got {metric!r}")
    d = z.shape[dim]
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook must be (K, D) with K >= 1 codes of D >= 1 features, got shape "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[1] != d:
        raise ValueError(f"codebook has codes of {codebook.shape[1]} features but z has {d} along dim {dim}")

    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    stat_dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    zt = z.movedim(dim, -1)  # a view
    lead = zt.shape[:-1]
    n = math.prod(lead)
    if use_triton(backend, z, codebook):
        from .. import _triton

        pe, lse, ent, pbar = _triton.codebook_soft_assign(_token_view(zt, d), codebook, 1.0 / tau, metric)
        quantized = pe.reshape(zt.shape)
    else:
        pe, lse, ent, pbar = sa_ref.soft_assign(zt.reshape(n, d).to(stat_dtype), codebook.to(stat_dtype),
                                                1.0 / tau, metric)
        quantized = pe.to(out_dtype).reshape(zt.shape)
    quantized = quantized.movedim(-1, dim)
    if z.is_contiguous():  # z's layout back (the eager path computes features-last)
        quantized = quantized.contiguous()
    return SoftAssignOutput(quantized, lse.reshape(lead), ent.reshape(lead), pbar,
                            sa_ref.codebook_entropy(pbar))
