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
from .._checks import check_dim, check_generator, check_same_device, check_tensor, use_triton

__all__ = ["CodebookEMA", "CodebookUsage", "VQ_PRESETS", "VQOutput", "codebook_ema_update", "codebook_usage", "kmeans",
           "residual_vector_quantize", "vector_quantize"]

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


def _search(zt: Tensor, cb: Tensor, cosine: bool, backend: str | None) -> Tensor:
    """Indices (N, H) of the nearest codes of the tokens of ``zt`` (features last), codebook (H, K, Dh)."""
    heads, _, dh = cb.shape
    if use_triton(backend, zt, cb):
        from .. import _triton

        return _triton.vq_search(_token_view(zt, heads * dh), cb, cosine)
    return reference.vq_search(zt.detach().reshape(-1, heads, dh), cb.detach(), cosine)


def _check_common(z: Tensor, codebook: Tensor, dim: int, metric: str) -> None:
    check_tensor("z", z)
    check_tensor("codebook", codebook)
    check_same_device(z=z, codebook=codebook)
    check_dim("z", z, dim)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def _weights(preset: str, commitment_weight: float | None, codebook_weight: float | None) -> tuple[float, float]:
    if preset not in VQ_PRESETS:
        raise ValueError(f"preset must be one of {', '.join(VQ_PRESETS)}, got {preset!r}")
    cw, bw = VQ_PRESETS[preset]
    return (cw if commitment_weight is None else float(commitment_weight),
            bw if codebook_weight is None else float(codebook_weight))


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
    _check_common(z, codebook, dim, metric)
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
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    cw, bw = _weights(preset, commitment_weight, codebook_weight)
    cosine = metric == "cosine"

    zt = z.movedim(dim, -1)  # a view
    lead = zt.shape[:-1]
    n = math.prod(lead)
    if use_triton(backend, zt, cb):
        # one kernel: search, z_q (or the rotation's output) written in z's layout, the squared error summed
        from .._triton import vq as vq_triton

        q3, indices, commit_sq, code_sq = vq_triton.vq_quantize(_token_view(zt, d), cb, cosine, estimator)
        loss_dtype, _ = reference.dtypes(z, cb)
        commitment, codebook_loss = (commit_sq / (n * d)).to(loss_dtype), (code_sq / (n * d)).to(loss_dtype)
        quantized = q3.view(zt.shape).movedim(-1, dim)
        indices = indices.reshape(*lead, heads) if heads > 1 else indices.reshape(lead)
        return VQOutput(quantized, indices, cw * commitment + bw * codebook_loss, commitment, codebook_loss)
    indices = _search(zt, cb, cosine, backend)
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


class CodebookEMA(NamedTuple):
    """The EMA codebook and its new running statistics; ``dead``: the codes replaced (bool, (K,))."""

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    dead: Tensor


def _tokens(z: Tensor, dim: int) -> Tensor:
    zt = z.movedim(dim, -1)
    return zt.reshape(-1, zt.shape[-1])


def codebook_ema_update(
    z: Tensor,
    indices: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    dead_threshold: float = 0.0,
    dim: int = -1,
    generator: torch.Generator | None = None,
    group: object = None,
) -> CodebookEMA:
    """One EMA step of a codebook (VQ-VAE-2, Sonnet, vector-quantize-pytorch's ``ema_update``):

        n_k <- decay n_k + (1 - decay) count_k,     m_k <- decay m_k + (1 - decay) sum_{index = k} z
        e_k  = m_k / ((n_k + eps) / (sum n + K eps) * sum n)          (Laplace smoothing)

    ``cluster_size`` (K,) and ``embed_sum`` (K, D) are the running n and m (fp32 buffers); the batch's counts
    and per-code sums are reduced in a fixed order (no float atomics: bitwise the same every run) and, with
    ``group``, all-reduced over that process group first, so every rank computes the same codebook. Codes
    whose smoothed size falls below ``dead_threshold`` are replaced by tokens of the batch drawn with
    ``generator`` (from rank 0's batch under ``group``), their statistics reset to one of the threshold's size
    (as vector-quantize-pytorch's ``expire_codes_``). Returns new tensors; nothing is read on the host.
    """
    check_tensor("z", z)
    check_tensor("cluster_size", cluster_size)
    check_tensor("embed_sum", embed_sum)
    check_same_device(z=z, indices=indices, cluster_size=cluster_size, embed_sum=embed_sum)
    if indices.is_floating_point() or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    check_dim("z", z, dim)
    tokens = _tokens(z.detach(), dim)
    k = cluster_size.shape[0] if cluster_size.dim() == 1 else -1
    if cluster_size.dim() != 1 or embed_sum.shape != (k, tokens.shape[1]):
        raise ValueError(f"cluster_size must be (K,) and embed_sum (K, D): got {tuple(cluster_size.shape)} and "
                         f"{tuple(embed_sum.shape)} for tokens of {tokens.shape[1]} features")
    if indices.numel() != tokens.shape[0]:
        raise ValueError(f"indices must hold one code per token: got {indices.numel()} for {tokens.shape[0]} tokens")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    generator = check_generator(generator, z.device)
    with torch.no_grad():
        counts, sums = reference.code_sums(tokens.float(), indices.reshape(-1), k)
        if group is not None:
            import torch.distributed as dist

            stats = torch.cat([counts.float().unsqueeze(1), sums], 1)  # one all-reduce for both
            dist.all_reduce(stats, group=group)
            counts, sums = stats[:, 0], stats[:, 1:]
        new_size = cluster_size.float() * decay + counts.float() * (1.0 - decay)
        new_sum = embed_sum.float() * decay + sums * (1.0 - decay)
        codebook = reference.ema_codebook(new_size, new_sum, eps)
        dead = new_size < dead_threshold
        if dead_threshold > 0 and tokens.shape[0] > 0:
            pick = torch.randint(0, tokens.shape[0], (k,), device=z.device, generator=generator)
            fresh = tokens[pick].float()
            if group is not None:
                dist.broadcast(fresh, src=dist.get_global_rank(group, 0) if hasattr(dist, "get_global_rank")
                               else 0, group=group)
            codebook = torch.where(dead.unsqueeze(1), fresh, codebook)
            new_size = torch.where(dead, torch.full_like(new_size, dead_threshold), new_size)
            new_sum = torch.where(dead.unsqueeze(1), fresh * dead_threshold, new_sum)
    return CodebookEMA(codebook.to(embed_sum.dtype), new_size.to(cluster_size.dtype), new_sum.to(embed_sum.dtype),
                       dead)


def residual_vector_quantize(
    z: Tensor,
    codebooks: Tensor,
    *,
    dim: int = -1,
    metric: str = "euclidean",
    estimator: str = "straight_through",
    preset: str = "taming",
    commitment_weight: float | None = None,
    codebook_weight: float | None = None,
    backend: str | None = None,
) -> VQOutput:
    """Residual VQ (SoundStream, EnCodec, DAC): S stages, codebooks (S, K, D), stage s quantizing the residual

        r_0 = z,   q_s = e_s[argmin_k ||r_s - e_s,k||^2],   r_{s+1} = r_s - sg(q_s)

    ``quantized`` is sum_s q_s with the estimator applied once to the whole stack (straight-through: z +
    sg(sum q - z)), so the encoder gets the decoder's gradient once, not S times; each stage's commitment
    mean((r_s - sg(q_s))^2) reaches the encoder through r_s (its residual is detached only from the codes
    already taken: the detach the papers intend; EnCodec's and DAC's residual r_s - q_s with q_s already
    straight-through cuts it, so their later stages' commitments train nothing), and the codebook term
    mean((sg(r_s) - q_s)^2) trains stage s's codes. ``commitment``/``codebook_loss`` are sums over the stages
    (as DAC sums them); ``indices`` has a trailing stage dim.
    """
    _check_common(z, codebooks, dim, metric)
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be (stages, K, D), got shape {tuple(codebooks.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    stages, k, d = codebooks.shape
    if z.shape[dim] != d:
        raise ValueError(f"z has {z.shape[dim]} features along dim {dim} but the codebooks code {d}")
    if k == 0 or stages == 0:
        raise ValueError("codebooks must hold at least one stage of at least one code")
    if metric != "euclidean":
        # a residual is not a direction: after the first stage the cosine search has nothing to compare
        raise ValueError(f"metric must be 'euclidean' for residual stages, got {metric!r}")
    cw, bw = _weights(preset, commitment_weight, codebook_weight)
    zt = z.movedim(dim, -1)
    lead = zt.shape[:-1]
    base = zt.reshape(-1, 1, d)
    n = base.shape[0]
    residual = base
    total = torch.zeros_like(base, dtype=torch.promote_types(z.dtype, codebooks.dtype))
    all_indices, commitment, codebook_loss = [], 0.0, 0.0
    fused = use_triton(backend, zt, codebooks)
    if fused:
        from .._triton import vq as vq_triton

        loss_dtype, _ = reference.dtypes(z, codebooks)
    for s in range(stages):
        cb = codebooks[s].unsqueeze(0)
        if fused:
            # one kernel a stage: search, z_q (a value: the stack's estimator comes last) and both squared
            # errors; the first stage reads z where it lies, later residuals are new (N, 1, D) tensors
            q, idx, c, b = vq_triton.vq_quantize(_token_view(zt, d) if s == 0 else residual, cb, False, "value")
            q = q.reshape(residual.shape)
            c, b = (c / (n * d)).to(loss_dtype), (b / (n * d)).to(loss_dtype)
        else:
            idx = _search(zt if s == 0 else residual.reshape(*lead, d), cb, False, backend)
            q = reference.gather_codes(cb, idx)
            c, b = reference.vq_losses(residual, q)
        commitment, codebook_loss = commitment + c, codebook_loss + b
        total = total + q
        residual = residual - q.detach()
        all_indices.append(idx.reshape(lead))
    est = reference.straight_through if estimator == "straight_through" else reference.rotation_trick
    quantized = est(base, total).reshape(*lead, d).movedim(-1, dim)
    if z.is_contiguous():
        quantized = quantized.contiguous()
    return VQOutput(quantized, torch.stack(all_indices, -1), cw * commitment + bw * codebook_loss, commitment,
                    codebook_loss)


def kmeans(
    z: Tensor,
    num_codes: int,
    *,
    iters: int = 10,
    dim: int = -1,
    metric: str = "euclidean",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """A codebook (num_codes, D) from Lloyd's k-means on the tokens of ``z``: the centres start at distinct
    tokens drawn with ``generator`` (with replacement when there are fewer tokens than codes), each iteration
    assigns every token with the same streamed search as ``vector_quantize`` (no N x K matrix, unlike EnCodec's
    N x K x D difference) and moves each centre to its tokens' mean (sums in a fixed order); a centre left
    without tokens stays where it was. ``metric="cosine"`` runs spherical k-means (unit tokens and centres)."""
    check_tensor("z", z)
    check_dim("z", z, dim)
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    generator = check_generator(generator, z.device)
    tokens = _tokens(z.detach(), dim)
    n, d = tokens.shape
    if n == 0:
        raise ValueError("z must hold at least one token to initialize a codebook from")
    cosine = metric == "cosine"
    work = F.normalize(tokens.float(), dim=-1) if cosine else tokens.float()
    if n >= num_codes:
        pick = torch.randperm(n, device=z.device, generator=generator)[:num_codes]
    else:
        pick = torch.randint(0, n, (num_codes,), device=z.device, generator=generator)
    centres = work[pick]
    for _ in range(iters):
        idx = _search(tokens, centres.unsqueeze(0), cosine, backend)[:, 0]
        counts, sums = reference.code_sums(work, idx, num_codes)
        means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
        if cosine:
            means = F.normalize(means, dim=-1)
        centres = torch.where((counts > 0).unsqueeze(1), means, centres)
    return centres.to(z.dtype)
