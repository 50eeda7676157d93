"""Gumbel-softmax posteriors (DALL-E's dVAE, taming's GumbelQuantize): relaxed samples with the noise drawn
in the kernel and regenerated in backward, and the KL of the categorical to the uniform prior."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._checks import check_dim, check_generator, check_positive, check_reduction, check_tensor, use_triton
from ..reference import gumbel as gumbel_ref

__all__ = ["gumbel_softmax", "gumbel_softmax_kl"]

KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _check(logits: Tensor, tau: float, dim: int) -> float:
    check_tensor("logits", logits)
    check_dim("logits", logits, dim)
    return check_positive("tau", tau)


def _as_bks(logits: Tensor, dim: int) -> Tensor:
    """logits as a (B, K, S) view: the dims before ``dim`` merged into B, those after into S (read in place;
    a layout that does not merge is copied once)."""
    d = dim % logits.dim()
    b = math.prod(logits.shape[:d])
    s = math.prod(logits.shape[d + 1:])
    try:
        return logits.view(b, logits.shape[d], s)
    except RuntimeError:
        return logits.reshape(b, logits.shape[d], s)


def _sample(logits, tau, hard, dim, kl, generator, backend):
    generator = check_generator(generator, logits.device)
    if use_triton(backend, logits):
        from .. import _triton

        y, kl_pos = _triton.gumbel_softmax(_as_bks(logits, dim), tau, hard, kl, generator)
        d = dim % logits.dim()
        kl_shape = logits.shape[:d] + logits.shape[d + 1:]
        return y.reshape(logits.shape), (kl_pos.reshape(kl_shape) if kl else None)
    y = gumbel_ref.gumbel_softmax(logits, gumbel_ref.gumbel_noise(logits, generator), tau, hard, dim)
    return y, (gumbel_ref.kl_to_uniform(logits, dim) if kl else None)


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.gumbel_softmax`` (same arguments; ``eps`` unused there too):

        y = softmax((logits + g) / tau),  g = -log(-log U);  hard: one-hot of argmax y, straight-through

    The eager path is torch's computation op for op (bitwise its numbers for the same generator state). On
    the Triton path the noise is Philox in the kernel (from a seed torch's generator draws: ``torch.manual_seed``
    reproduces it), regenerated in backward: neither the noise nor the soft sample is kept, and (B, K, H, W)
    logits with ``dim=1`` are read in place.
    """
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=2)
    tau = _check(logits, tau, dim)
    return _sample(logits, tau, bool(hard), dim, False, generator, backend)[0]


def gumbel_softmax_kl(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    *,
    reduction: str = "batchmean",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(the relaxed sample of ``gumbel_softmax``, KL(q || uniform over the K codes)) from one read of the logits:

        KL = log K - H(q) = log K + sum_k q_k log q_k per position, q = softmax(logits along ``dim``)

    ``reduction``: "none" (one KL a position: logits' shape without ``dim``), "sum", "mean" (over positions:
    B H W of them for (B, K, H, W) logits) or "batchmean" (the sum over positions / B, the size of dim 0: the
    per-example KL of the ELBO, which is what F.kl_div's "batchmean" in DALLE-pytorch gives; "mean" is
    smaller by the positions per example, H W = 1024 for DALL-E's 32 x 32). The KL comes out in fp32 for half
    logits, as torch's losses under autocast.
    """
    tau = _check(logits, tau, dim)
    check_reduction(reduction, KL_REDUCTIONS)
    y, kl = _sample(logits, tau, bool(hard), dim, True, generator, backend)
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    elif reduction == "batchmean":
        kl = kl.sum() / (logits.shape[0] if logits.dim() > 1 else 1)
    return y, kl
