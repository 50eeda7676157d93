"""Vector quantization (VQ-VAE, VQGAN, the audio codecs): the nearest-code search without an N x K matrix,
the commitment and codebook losses with the peers' weightings, straight-through or rotation-trick gradients,
and codebook usage without a one-hot."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._checks import check_same_device, check_tensor, use_triton

__all__ = ["CodebookUsage", "VQ_PRESETS", "VQOutput", "codebook_usage", "vector_quantize"]

# (commitment_weight, codebook_weight) of loss = commitment_weight * commitment + codebook_weight * codebook
VQ_PRESETS: dict[str, tuple[float, float]] = {
    # taming-transformers' VectorQuantizer2 with legacy=True, its default (and diffusers' VectorQuantizer):
    # beta = 0.25 lands on the codebook term, the commitment term has weight 1
    "taming_legacy": (1.0, 0.25),
    # taming's legacy=False, the VQ-VAE paper's weighting: beta on the commitment term
    "taming": (0.25, 1.0),
    # vqtorch's VectorQuant: (1 - beta) * commitment + beta * codebook, beta = 0.95 by default
    "vqtorch": (0.05, 0.95),
    # descript-audio-codec: lambdas vq/commitment_loss 0.25 and vq/codebook_loss 1.0
    "dac": (0.25, 1.0),
}
METRICS = ("euclidean", "cosine")
ESTIMATORS = ("straight_through", "rotation")


class VQOutput(NamedTuple):
    """``quantized``: z_q in z's shape, carrying the estimator's gradient to z; ``indices``: int64, z's shape
    without the feature dim (with a trailing heads dim for several codebooks); ``loss`` = commitment_weight *
    ``commitment`` + codebook_weight * ``codebook_loss``, each a mean over the elements (F.mse_loss)."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    commitment: Tensor
    codebook_loss: Tensor


class CodebookUsage(NamedTuple):
    counts: Tensor
    perplexity: Tensor
    active: Tensor


def _token_view(zt: Tensor, d: int) -> Tensor:
    """The tokens of ``zt`` (features last) as a (B, S, d) view the kernel reads in place through its
    strides: (N, 1, d) for channels-last tokens, (B, H*W, d) for a channels-first map moved to features-last
    (its spatial dims merge); a layout neither covers is copied once."""
    for shape in ((-1, 1, d), (zt.shape[0] if zt.dim() > 1 else 1, -1, d)):
        try:
            return zt.view(shape)
        except RuntimeError:
            continue
    return zt.reshape(-1, 1, d)


def vector_quantize(
    z: Tensor,
    codebook: Tensor,
    *,
    dim: int = -1,
    metric: str = "euclidean",
    estimator: str = "straight_through",
    preset: str = "taming",
    commitment_weight: float | None = None,
    codebook_weight: float | None = None,
    backend: str | None = None,
) -> VQOutput:
    """Quantize each token of ``z`` (features along ``dim``: -1 for channels-last tokens, 1 for (B, D, H, W)
    maps) to its nearest code.

        index = argmin_k ||z - e_k||^2   (euclidean; ties to the lowest k, as torch.argmin)
        index = argmax_k z . e_k / ||e_k||   (cosine: tokens and codes l2-normalized, as vector-quantize-pytorch's
                                              use_cosine_sim; the losses then compare the unit vectors)

    ``codebook``: (K, D), or (H, K, D / H) for one codebook per head (the token split into H chunks).
    ``estimator``: "straight_through" (z + sg(z_q - z)) or "rotation" (Fifty et al. 2024: z rotated onto z_q
    and rescaled, per token and head). ``preset`` names the peers' loss weightings (``VQ_PRESETS``);
    ``commitment_weight`` / ``codebook_weight`` override it. The codebook gets its gradient from the codebook
    term only (z_q's gather), z from the commitment term and the estimator.

    On the Triton path the search streams the codebook through ``tl.dot`` with an online argmin: memory
    O(N D + K D), never N x K (the eager path chunks the tokens: 4096 x K distances at a time).
    """
    check_tensor("z", z)
    check_tensor("codebook", codebook)
    check_same_device(z=z, codebook=codebook)
    if z.dim() == 0:
        raise ValueError("z must have at least one dim (the features)")
    if not -z.dim() <= dim < z.dim():
        raise ValueError(f"dim must be in [{-z.dim()}, {z.dim() - 1}] for z of shape {tuple(z.shape)}, got {dim}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must be (K, D) or (heads, K, D / heads), got shape {tuple(codebook.shape)}")
    cb = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    heads, k, dh = cb.shape
    d = z.shape[dim]
    if heads * dh != d:
        raise ValueError(f"z has {d} features along dim {dim} but codebook {tuple(codebook.shape)} codes "
                         f"{heads} x {dh}")
    if k == 0:
        raise ValueError("codebook must hold at least one code")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if preset not in VQ_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(VQ_PRESETS)}, got {preset!r}")
    cw, bw = VQ_PRESETS[preset]
    cw = cw if commitment_weight is None else float(commitment_weight)
    bw = bw if codebook_weight is None else float(codebook_weight)
    cosine = metric == "cosine"

    zt = z.movedim(dim, -1)  # a view
    lead = zt.shape[:-1]
    n = math.prod(lead)
    if use_triton(backend, z, codebook):
        from .. import _triton

        indices = _triton.vq_search(_token_view(zt, d), cb, cosine)
    else:
        indices = reference.vq_search(zt.detach().reshape(n, heads, dh), cb.detach(), cosine)

    zf = zt.reshape(n, heads, dh)
    if cosine:
        zf, cb = F.normalize(zf, dim=-1), F.normalize(cb, dim=-1)
    z_q = reference.gather_codes(cb, indices)
    commitment, codebook_loss = reference.vq_losses(zf, z_q)
    z_q = z_q.to(torch.promote_types(z.dtype, z_q.dtype))
    est = reference.straight_through if estimator == "straight_through" else reference.rotation_trick
    quantized = est(zf, z_q).reshape(*lead, d).movedim(-1, dim)
    if z.is_contiguous():  # z's layout back (the channels-first map moved through features-last)
        quantized = quantized.contiguous()
    indices = indices.reshape(*lead, heads) if heads > 1 else indices.reshape(lead)
    return VQOutput(quantized, indices, cw * commitment + bw * codebook_loss, commitment, codebook_loss)


def codebook_usage(indices: Tensor, codebook_size: int) -> CodebookUsage:
    """Per-code counts (K,), perplexity exp(H(p)) with p = counts / N, and the number of codes used, from
    integer ``indices`` of one codebook (for several heads pass ``indices[..., h]``): a histogram on the
    device, no one-hot and no host read."""
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got {type(indices).__name__}"
                        + (f" of {indices.dtype}" if isinstance(indices, Tensor) else ""))
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
    return CodebookUsage(*reference.codebook_usage(indices, codebook_size))
