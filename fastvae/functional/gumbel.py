"""Gumbel-softmax posteriors (DALL-E's dVAE, taming's GumbelQuantize): relaxed samples with the noise drawn
in the kernel and regenerated in backward, the KL of the categorical to the uniform prior, and the sample's
product with a codebook (z_q = y . E) without the sample ever written."""

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


def _check_codebook(codebook: Tensor, logits: Tensor, dim: int) -> None:
    """A (K, D) floating tensor of logits' dtype and device, K = logits.shape[dim]."""
    check_tensor("codebook", codebook)
    k = logits.shape[dim]
    if codebook.dim() != 2 or codebook.shape[0] != k:
        raise ValueError(f"codebook must be (K, D) with K = {k} (logits' size along dim {dim}), got shape "
                         f"{tuple(codebook.shape)}")
    if codebook.dtype != logits.dtype or codebook.device != logits.device:
        raise ValueError(f"codebook must have logits' dtype and device ({logits.dtype}, {logits.device}), got "
                         f"{codebook.dtype} on {codebook.device}")


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


def _sample(logits, tau, hard, dim, kl, generator, backend, codebook=None, indices=False):
    """(y, or z_q = y . codebook when a codebook is given; the per-position KL or None; the argmax indices
    (logits' shape without ``dim``) when ``indices``, else None)."""
    generator = check_generator(generator, logits.device)
    d = dim % logits.dim()
    pos_shape = logits.shape[:d] + logits.shape[d + 1:]
    if use_triton(backend, logits):
        from .._triton import gumbel as gumbel_t

        if codebook is None:
            y, kl_pos = gumbel_t.gumbel_softmax(_as_bks(logits, dim), tau, hard, kl, generator)
            out, idx = y.reshape(logits.shape), (y.argmax(d) if indices else None)
        else:
            zq, kl_pos, idx = gumbel_t.gumbel_codebook(_as_bks(logits, dim), codebook, tau, hard, kl, generator)
            out = zq.reshape(logits.shape[:d] + codebook.shape[1:] + logits.shape[d + 1:])
            idx = idx.reshape(pos_shape) if indices else None
        return out, (kl_pos.reshape(pos_shape) if kl else None), idx
    y = gumbel_ref.gumbel_softmax(logits, gumbel_ref.gumbel_noise(logits, generator), tau, hard, dim)
    idx = y.argmax(d) if indices else None
    out = y if codebook is None else gumbel_ref.codebook_product(y, codebook, dim)
    return out, (gumbel_ref.kl_to_uniform(logits, dim) if kl else None), idx


def _reduce_kl(kl: Tensor, reduction: str, logits: Tensor) -> Tensor:
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    if reduction == "batchmean":
        return kl.sum() / (logits.shape[0] if logits.dim() > 1 else 1)
    return kl


def gumbel_softmax(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
    codebook: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.gumbel_softmax`` (same arguments; ``eps`` unused there too):

        y = softmax((logits + g) / tau),  g = -log(-log U);  hard: one-hot of argmax y, straight-through

    With ``codebook`` E (K, D), K = logits.shape[dim], the result is instead z_q = sum_k y_k E_k, the D
    features where the K codes were: (B, D, H, W) for (B, K, H, W) logits and ``dim=1`` (taming's
    GumbelQuantize and DALL-E's dVAE, ``einsum('b n h w, n d -> b d h w', y, E)``), (N, D) for (N, K). Hard
    mode's value is E[argmax] with the soft sample's gradient to the logits (straight-through) and the
    one-hot's to E. On the Triton path y is never written: the kernel forms z_q from y tiles in registers as
    flash attention forms P V (bytes: the logits read twice, E once per 32 positions from L2, z_q written;
    backward regenerates the noise and recomputes y, the (B, K, H, W) sample never exists).

    The eager path is torch's computation op for op (bitwise its numbers for the same generator state). On
    the Triton path the noise is Philox in the kernel (from a seed torch's generator draws: ``torch.manual_seed``
    reproduces it), regenerated in backward: neither the noise nor the soft sample is kept, and (B, K, H, W)
    logits with ``dim=1`` are read in place.
    """
    if eps != 1e-10:
        warnings.warn("`eps` parameter is deprecated and has no effect.", stacklevel=2)
    tau = _check(logits, tau, dim)
    if codebook is not None:
        _check_codebook(codebook, logits, dim)
    return _sample(logits, tau, bool(hard), dim, False, generator, backend, codebook)[0]


def gumbel_softmax_kl(
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    dim: int = -1,
    *,
    reduction: str = "batchmean",
    generator: torch.Generator | None = None,
    codebook: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(the relaxed sample of ``gumbel_softmax``, KL(q || uniform over the K codes)) from one read of the logits
    (with ``codebook``: z_q = y . E in place of the sample, as ``gumbel_softmax(codebook=...)``, in the same
    kernel pass):

        KL = log K - H(q) = log K + sum_k q_k log q_k per position, q = softmax(logits along ``dim``)

    ``reduction``: "none" (one KL a position: logits' shape without ``dim``), "sum", "mean" (over positions:
    B H W of them for (B, K, H, W) logits) or "batchmean" (the sum over positions / B, the size of dim 0: the
    per-example KL of the ELBO, which is what F.kl_div's "batchmean" in DALLE-pytorch gives; "mean" is
    smaller by the positions per example, H W = 1024 for DALL-E's 32 x 32). The KL comes out in fp32 for half
    logits, as torch's losses under autocast.
    """
    tau = _check(logits, tau, dim)
    check_reduction(reduction, KL_REDUCTIONS)
    if codebook is not None:
        _check_codebook(codebook, logits, dim)
    y, kl, _ = _sample(logits, tau, bool(hard), dim, True, generator, backend, codebook)
    return y, _reduce_kl(kl, reduction, logits)


def gumbel_quantize(logits: Tensor, codebook: Tensor, tau: float, hard: bool, dim: int, reduction: str,
                    generator: torch.Generator | None, backend: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """(z_q, the reduced KL, the argmax indices): ``gumbel_softmax_kl(codebook=...)`` and taming's
    ``soft_one_hot.argmax(1)`` from one pass (nn.GumbelQuantize's forward; not exported)."""
    tau = _check(logits, tau, dim)
    check_reduction(reduction, KL_REDUCTIONS)
    _check_codebook(codebook, logits, dim)
    zq, kl, idx = _sample(logits, tau, bool(hard), dim, True, generator, backend, codebook, indices=True)
    return zq, _reduce_kl(kl, reduction, logits), idx
