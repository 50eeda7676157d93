"""Gumbel-softmax with its KL, and its product with a codebook (z_q = y . E, y never written): launches of
``kernels/gumbel.py`` as custom ops with autograd."""

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import gumbel as gumbel_k
from ..reference import gumbel as gumbel_ref
from . import common

BLOCK_P, BLOCK_K = 32, 128
# the codebook kernels: [32, 64] tiles of y against [64, BLOCK_D] code tiles through tl.dot
CB_BLOCK_P, CB_BLOCK_K = 32, 64


def _block_d(d: int, cap: int) -> int:
    """The feature tile: tl.dot needs 16 at least; ``cap`` bounds the fp32 accumulator a program holds in
    registers (the forward's [32, 128], the codebook gradient's [64, 128]) and the fp32 code tile staged in
    shared memory per pipeline stage ([64, 128]: 32 KiB); longer codes take more programs (the forward's pass 1
    and Philox repeated per feature tile: twice at DALL-E's D = 256)."""
    return min(cap, max(16, triton.next_power_of_2(d)))


def _dims(t: Tensor) -> "tuple[int, int, int, int, int, int]":
    b, k, s = t.shape
    return b * s, s, k, t.stride(0), t.stride(2), t.stride(1)


def _launch_fwd(logits: Tensor, seed: Tensor, tau: float, hard: bool, kl: bool, noise: bool):
    p, s, k, sb, ss, sk = _dims(logits)
    y = common.alloc(logits, logits.shape, logits.dtype if not noise else torch.float32)
    stats = common.alloc(logits, ((3 if kl else 1) * p,), torch.float32)
    kl_out = common.alloc(logits, (p if kl else 0,), torch.float32)
    if p and k:
        gumbel_k.gumbel_softmax_fwd_kernel[(triton.cdiv(p, BLOCK_P),)](
            logits, seed, y, stats, kl_out, p, s, k, 1.0 / tau, math.log(k),
            sb, ss, sk, y.stride(0), y.stride(2), y.stride(1),
            HARD=hard, KL=kl, NOISE=noise, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=4,
        )
    return y, kl_out, stats


@common.custom_op("fastvae::gumbel_softmax")
def _gumbel_op(logits: Tensor, seed: Tensor, tau: float, hard: bool, kl: bool) -> "tuple[Tensor, Tensor, Tensor]":
    """(y in logits' (B, K, S) shape, per-position KL (B S,) fp32 or (0,), saved stats); logits a (B, K, S) view
    read in place through its strides."""
    return _launch_fwd(logits, seed, tau, hard, kl, False)


@_gumbel_op.register_fake
def _(logits, seed, tau, hard, kl):
    p = logits.shape[0] * logits.shape[2]
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            logits.new_empty((p if kl else 0,), dtype=torch.float32),
            logits.new_empty(((3 if kl else 1) * p,), dtype=torch.float32))


@common.custom_op("fastvae::gumbel_noise")
def _noise_op(logits: Tensor, seed: Tensor) -> Tensor:
    """The Gumbel noise the sampler draws for ``seed`` (fp32, logits' (B, K, S) shape)."""
    return _launch_fwd(logits, seed, 1.0, False, False, True)[0]


@_noise_op.register_fake
def _(logits, seed):
    return torch.empty_like(logits, dtype=torch.float32, memory_format=torch.contiguous_format)


@common.custom_op("fastvae::gumbel_softmax_backward")
def _gumbel_bwd_op(logits: Tensor, seed: Tensor, stats: Tensor, grad_y: Optional[Tensor], grad_kl: Optional[Tensor],
                   tau: float) -> Tensor:
    p, s, k, sb, ss, sk = _dims(logits)
    dl = common.alloc(logits, logits.shape, logits.dtype)
    gy = grad_y if grad_y is not None else dl
    gkl = grad_kl.contiguous() if grad_kl is not None else stats
    if p and k:
        gumbel_k.gumbel_softmax_bwd_kernel[(triton.cdiv(p, BLOCK_P),)](
            logits, seed, stats, gy, gkl, dl, p, s, k, 1.0 / tau,
            sb, ss, sk, gy.stride(0), gy.stride(2), gy.stride(1), dl.stride(0), dl.stride(2), dl.stride(1),
            GRAD_Y=grad_y is not None, KL=grad_kl is not None, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=4,
        )
    return dl


@_gumbel_bwd_op.register_fake
def _(logits, seed, stats, grad_y, grad_kl, tau):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, seed, tau, hard, kl = inputs
    ctx.save_for_backward(logits, seed, output[2])
    ctx.tau, ctx.hard, ctx.kl = tau, hard, kl
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_y, grad_kl, _grad_stats):
    logits, seed, stats = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: torch's formulas around the regenerated noise
        noise = _noise_op(logits.detach(), seed)

        def formula(lg):
            y = gumbel_ref.gumbel_softmax(lg, noise.to(lg.dtype), ctx.tau, ctx.hard, 1)
            kl = gumbel_ref.kl_to_uniform(lg, 1).reshape(-1) if ctx.kl else lg.new_zeros(0)
            return y, kl

        grads = common.differentiable_backward(formula, (logits,), ctx.needs_input_grad[:1],
                                               (grad_y, grad_kl if ctx.kl else None))
        return grads[0], None, None, None, None
    grad_y = grad_y.contiguous() if grad_y is not None else None
    grad_kl = grad_kl if ctx.kl else None
    return _gumbel_bwd_op(logits, seed, stats, grad_y, grad_kl, ctx.tau), None, None, None, None


_gumbel_op.register_autograd(_backward, setup_context=_setup)


def _seed(logits3: Tensor, generator: "Optional[torch.Generator]") -> Tensor:
    if generator is None or generator.device.type == logits3.device.type:
        return common.new_seed(logits3.device, generator)
    return common.new_seed(generator.device, generator).to(logits3.device)


def gumbel_softmax(logits3: Tensor, tau: float, hard: bool, kl: bool,
                   generator: "Optional[torch.Generator]") -> "tuple[Tensor, Tensor]":
    """Validated arguments in: logits3 a (B, K, S) view; (y (B, K, S), per-position KL (B S,) or empty)."""
    y, kl_out, _ = _gumbel_op(logits3, _seed(logits3, generator), float(tau), bool(hard), bool(kl))
    return y, kl_out


# --------------------------------------------------------------------------------------------------------
# z_q = y . E in the sampling pass
# --------------------------------------------------------------------------------------------------------


@common.custom_op("fastvae::gumbel_codebook")
def _codebook_op(logits: Tensor, codebook: Tensor, seed: Tensor, tau: float, hard: bool,
                 kl: bool) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(z_q (B, D, S) in logits' dtype, per-position KL (B S,) fp32 or (0,), argmax indices (B S,) int64, saved
    stats); logits a (B, K, S) view read in place, codebook (K, D). Bytes: the logits read twice (once for
    hard), the codebook once per position tile (from L2), z_q written once; y exists only in registers."""
    p, s, k, sb, ss, sk = _dims(logits)
    d = codebook.shape[1]
    e = codebook.contiguous()  # a parameter already is: no copy
    zq = common.alloc(logits, (logits.shape[0], d, s), logits.dtype)
    idx = common.alloc(logits, (p,), torch.int64)
    stats = common.alloc(logits, ((3 if kl else 1) * p,), torch.float32)
    kl_out = common.alloc(logits, (p if kl else 0,), torch.float32)
    if p and k:
        block_d = _block_d(d, 128)
        gumbel_k.gumbel_codebook_fwd_kernel[(triton.cdiv(p, CB_BLOCK_P), max(1, triton.cdiv(d, block_d)))](
            logits, e, seed, zq, idx, stats, kl_out, p, s, k, d, 1.0 / tau, math.log(k),
            sb, ss, sk, e.stride(0), zq.stride(0), zq.stride(2), zq.stride(1),
            HARD=hard, KL=kl, BLOCK_P=CB_BLOCK_P, BLOCK_K=CB_BLOCK_K, BLOCK_D=block_d, num_warps=8,
        )
    elif p:  # no codes: the empty sum
        zq.zero_()
    return zq, kl_out, idx, stats


@_codebook_op.register_fake
def _(logits, codebook, seed, tau, hard, kl):
    p = logits.shape[0] * logits.shape[2]
    return (logits.new_empty((logits.shape[0], codebook.shape[1], logits.shape[2])),
            logits.new_empty((p if kl else 0,), dtype=torch.float32),
            logits.new_empty((p,), dtype=torch.int64),
            logits.new_empty(((3 if kl else 1) * p,), dtype=torch.float32))


@common.custom_op("fastvae::gumbel_codebook_backward")
def _codebook_bwd_op(logits: Tensor, codebook: Tensor, seed: Tensor, stats: Tensor, idx: Tensor,
                     grad_zq: Optional[Tensor], grad_kl: Optional[Tensor], tau: float, hard: bool,
                     need_logits: bool, need_codes: bool) -> "tuple[Tensor, Tensor]":
    """(dlogits in logits' (B, K, S) shape or (0,), dE (K, D) or (0,)): dlogits from the soft sample's
    softmax backward with gy = grad_zq . E^T, dE = y^T grad_zq (y: the soft sample, or hard's one-hot)."""
    p, s, k, sb, ss, sk = _dims(logits)
    d = codebook.shape[1]
    e = codebook.contiguous()
    dl = common.alloc(logits, logits.shape if need_logits else (0,), logits.dtype)
    de = common.alloc(codebook, (k, d) if need_codes else (0,), codebook.dtype)
    gz = grad_zq if grad_zq is not None else logits  # unread without GRAD_Z
    gs = (gz.stride(0), gz.stride(2), gz.stride(1)) if grad_zq is not None else (0, 0, 0)
    if need_logits and p and k:
        gkl = grad_kl.contiguous() if grad_kl is not None else stats
        ds = dl.stride()
        gumbel_k.gumbel_codebook_bwd_logits_kernel[(triton.cdiv(p, CB_BLOCK_P),)](
            logits, e, seed, stats, gz, gkl, dl, p, s, k, d, 1.0 / tau,
            sb, ss, sk, e.stride(0), *gs, ds[0], ds[2], ds[1],
            GRAD_Z=grad_zq is not None and d > 0, KL=grad_kl is not None,
            BLOCK_P=CB_BLOCK_P, BLOCK_K=CB_BLOCK_K, BLOCK_D=_block_d(d, 64), num_warps=8,
        )
    if need_codes and k and d:
        if p and grad_zq is not None:
            block_d = _block_d(d, 128)
            gumbel_k.gumbel_codebook_bwd_codes_kernel[(triton.cdiv(k, CB_BLOCK_K), triton.cdiv(d, block_d))](
                logits, seed, stats, idx, gz, de, p, s, k, d, 1.0 / tau,
                sb, ss, sk, *gs, de.stride(0),
                HARD=hard, BLOCK_P=CB_BLOCK_P, BLOCK_K=CB_BLOCK_K, BLOCK_D=block_d, num_warps=4,
            )
        else:
            de.zero_()
    return dl, de


@_codebook_bwd_op.register_fake
def _(logits, codebook, seed, stats, idx, grad_zq, grad_kl, tau, hard, need_logits, need_codes):
    return (logits.new_empty(logits.shape if need_logits else (0,)),
            codebook.new_empty(codebook.shape if need_codes else (0,)))


def _codebook_setup(ctx, inputs, output):
    logits, codebook, seed, tau, hard, kl = inputs
    ctx.save_for_backward(logits, codebook, seed, output[2], output[3])
    ctx.tau, ctx.hard, ctx.kl = tau, hard, kl
    ctx.mark_non_differentiable(output[2], output[3])


def _codebook_backward(ctx, grad_zq, grad_kl, _grad_idx, _grad_stats):
    logits, codebook, seed, idx, stats = ctx.saved_tensors
    grad_kl = grad_kl if ctx.kl else None
    if torch.is_grad_enabled():  # create_graph: torch's formulas around the regenerated noise
        noise = _noise_op(logits.detach(), seed)

        def formula(lg, e):
            y = gumbel_ref.gumbel_softmax(lg, noise.to(lg.dtype), ctx.tau, ctx.hard, 1)
            kl = gumbel_ref.kl_to_uniform(lg, 1).reshape(-1) if ctx.kl else lg.new_zeros(0)
            return gumbel_ref.codebook_product(y, e, 1), kl

        grads = common.differentiable_backward(formula, (logits, codebook), ctx.needs_input_grad[:2],
                                               (grad_zq, grad_kl))
        return grads[0], grads[1], None, None, None, None
    need_logits = ctx.needs_input_grad[0] and (grad_zq is not None or grad_kl is not None)
    need_codes = ctx.needs_input_grad[1] and grad_zq is not None
    if not (need_logits or need_codes):
        return None, None, None, None, None, None
    dl, de = _codebook_bwd_op(logits, codebook, seed, stats, idx, grad_zq, grad_kl, ctx.tau, ctx.hard,
                              need_logits, need_codes)
    return (dl if need_logits else None), (de if need_codes else None), None, None, None, None


_codebook_op.register_autograd(_codebook_backward, setup_context=_codebook_setup)


def gumbel_codebook(logits3: Tensor, codebook: Tensor, tau: float, hard: bool, kl: bool,
                    generator: "Optional[torch.Generator]") -> "tuple[Tensor, Tensor, Tensor]":
    """Validated arguments in: logits3 a (B, K, S) view, codebook (K, D) of logits' dtype and device;
    (z_q (B, D, S), per-position KL (B S,) or empty, argmax indices (B S,)). The noise is the sampler's for
    the same seed: ``gumbel_softmax`` and this draw the same sample from the same generator state."""
    zq, kl_out, idx, _ = _codebook_op(logits3, codebook, _seed(logits3, generator), float(tau), bool(hard),
                                      bool(kl))
    return zq, kl_out, idx
