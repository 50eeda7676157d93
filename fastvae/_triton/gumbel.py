"""Gumbel-softmax with its KL: launches of ``kernels/gumbel.py`` as custom ops with autograd."""

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import gumbel as gumbel_k
from ..reference import gumbel as gumbel_ref
from . import common

BLOCK_P, BLOCK_K = 32, 128


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


def gumbel_softmax(logits3: Tensor, tau: float, hard: bool, kl: bool,
                   generator: "Optional[torch.Generator]") -> "tuple[Tensor, Tensor]":
    """Validated arguments in: logits3 a (B, K, S) view; (y (B, K, S), per-position KL (B S,) or empty)."""
    seed = common.new_seed(logits3.device, generator) if generator is None or \
        generator.device.type == logits3.device.type else common.new_seed(generator.device, generator).to(
            logits3.device)
    y, kl_out, _ = _gumbel_op(logits3, seed, float(tau), bool(hard), bool(kl))
    return y, kl_out
