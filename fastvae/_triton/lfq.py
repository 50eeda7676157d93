"""LFQ's exact codebook entropy: launches of ``kernels/lfq.py`` as custom ops with autograd."""

import math

import torch
import triton
from torch import Tensor

from ..kernels import lfq as lfq_k
from ..reference import lfq as lfq_ref
from . import common

BLOCK_N, BLOCK_K = 64, 128


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot's smallest side


@common.custom_op("fastvae::lfq_codebook_entropy")
def _lfq_entropy_op(x: Tensor) -> "tuple[Tensor, Tensor]":
    """(sum over the groups of H(pbar), log pbar (G, K)); x (G, N, d) the fp32 logits 4 tau s z, contiguous."""
    groups, n, d = x.shape
    k = 1 << d
    log_p = common.alloc(x, (groups, k), torch.float32)
    if n == 0:  # the mean of no distributions: undefined, as torch's mean of nothing
        return torch.full((), math.nan, dtype=torch.float32, device=x.device), log_p.fill_(math.nan)
    grid = triton.cdiv(k, BLOCK_K)
    parts = common.alloc(x, (groups * grid,), torch.float32)
    lfq_k.lfq_entropy_fwd_kernel[(grid, groups)](
        x, log_p, parts, n, d, k, math.log(n),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(d), num_warps=8,
    )
    return common.finish_sum(parts, 1.0, torch.float32), log_p


@_lfq_entropy_op.register_fake
def _(x):
    return x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0], 1 << x.shape[2]), dtype=torch.float32)


@common.custom_op("fastvae::lfq_codebook_entropy_backward")
def _lfq_entropy_bwd_op(x: Tensor, log_p: Tensor, grad: Tensor) -> Tensor:
    groups, n, d = x.shape
    dx = common.alloc(x, x.shape, torch.float32)
    if n:
        lfq_k.lfq_entropy_bwd_kernel[(triton.cdiv(n, BLOCK_N), groups)](
            x, log_p, grad.reshape(1).to(torch.float32).contiguous(), dx, n, d, 1 << d, 1.0 / n,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(d), num_warps=8,
        )
    return dx


@_lfq_entropy_bwd_op.register_fake
def _(x, log_p, grad):
    return torch.empty_like(x)


def _entropy_formula(x: Tensor) -> Tensor:
    return sum(lfq_ref.codebook_entropy(g) for g in x.unbind(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_h, _grad_logp):
    x, log_p = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: the formula, differentiable again
        return common.differentiable_backward(_entropy_formula, (x,), ctx.needs_input_grad, (grad_h,))
    return (_lfq_entropy_bwd_op(x, log_p, grad_h),)


_lfq_entropy_op.register_autograd(_backward, setup_context=_setup)


def lfq_codebook_entropy(x: Tensor) -> Tensor:
    """Validated logits in (G, N, d) fp32 contiguous; the summed codebook entropy out (0-d fp32)."""
    return _lfq_entropy_op(x)[0]
