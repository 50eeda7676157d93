"""Bernoulli, Poisson, NB and ZINB NLLs with their gradients in the same pass: launches of
``kernels/bernoulli.py``, ``kernels/poisson.py`` and ``kernels/negative_binomial.py`` as custom ops.

Each tensor is loaded in its own dtype and computed in fp32; the loss comes out in ``out_dtype`` (torch's
promotion, fp32 under autocast), each gradient in its input's dtype, kept in ``common.grad_dtype`` until
grad_output arrives. A broadcast operand (weight, pos_weight, theta) is indexed by the kernel; its gradient,
when it has one, is written per element in fp32 and summed over the broadcast dims in backward.
"""

from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import bernoulli as bce_k
from ..kernels import negative_binomial as nb_k
from ..kernels import poisson as poisson_k
from ..reference.common import HALF_LOG_2PI
from . import common
from .common import Reduction, grad_dtype, launch_config
from .gaussian_nll import VAR_FULL, VAR_SCALAR, _var_index

OP_ABSENT = 3
_NO_INDEX = (OP_ABSENT, 1, 1, 1, 1)


def operand_index(in_shape: torch.Size, t: Optional[Tensor]) -> "Optional[tuple[int, int, int, int, int]]":
    """(MODE, div, mod, mul, mod2) of an operand broadcast to in_shape (see kernels/bernoulli.load_bcast), or
    None when the broadcast is not one the kernel's index formula covers."""
    if t is None:
        return _NO_INDEX
    if t.dim() > len(in_shape):
        return None
    shape = (1,) * (len(in_shape) - t.dim()) + tuple(t.shape)
    if any(s not in (1, i) for s, i in zip(shape, in_shape)):
        return None
    return _var_index(in_shape, torch.Size(shape))


def _operand(t: Optional[Tensor], mode: int, like: Tensor) -> Tensor:
    """What the kernel reads for an operand: a contiguous copy only where the kernel reads it as laid out."""
    if t is None:
        return like  # never read (constexpr-absent)
    if mode == VAR_SCALAR:
        return t.reshape(-1)[:1]
    return t.contiguous()


# -------------------------------------------------------------------------------------------- Bernoulli


def bce_supported(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor]) -> bool:
    return (
        input.shape == target.shape
        and operand_index(input.shape, weight) is not None
        and operand_index(input.shape, pos_weight) is not None
    )


def _xt_grad_buffers(input: Tensor, target: Tensor, grad_input: bool, grad_target: bool,
                     alloc) -> "tuple[Tensor, Tensor]":
    """The input's and the target's forward-written gradients (empty when not asked for), for BCE and Poisson."""
    return (alloc(input, input.shape if grad_input else (0,), grad_dtype(input.dtype)),
            alloc(input, input.shape if grad_target else (0,), grad_dtype(target.dtype)))


def _xt_fake(input: Tensor, target: Tensor, reduction: str, grad_input: bool, grad_target: bool,
             out_dtype: torch.dtype) -> "tuple[Tensor, Tensor, Tensor]":
    """The fake (meta) outputs of the BCE and Poisson ops: the reduced loss and the two gradients."""
    loss = input.new_empty(Reduction.plan(reduction, tuple(input.shape)).out_shape, dtype=out_dtype)
    return (loss, *_xt_grad_buffers(input, target, grad_input, grad_target,
                                    lambda like, shape, dtype: like.new_empty(shape, dtype=dtype)))


@torch.library.custom_op("fastvae::bce_with_logits", mutates_args=())
def _bce_op(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    reduction: str,
    grad_input: bool,
    grad_target: bool,
    out_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor, Tensor]":
    """(loss, dloss/dinput, dloss/dtarget); the gradients scaled by the reduction."""
    n = input.numel()
    w_idx, p_idx = operand_index(input.shape, weight), operand_index(input.shape, pos_weight)
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(input.shape))
    loss = red.buffer(input, grid, out_dtype)
    gx, gt = _xt_grad_buffers(input, target, grad_input, grad_target, common.alloc)
    if n:
        bce_k.bce_logits_fwd_kernel[(grid,)](
            input, target, _operand(weight, w_idx[0], input), _operand(pos_weight, p_idx[0], input),
            loss, gx, gt,
            n, *w_idx[1:], *p_idx[1:], red.scale, red.row_len,
            W_MODE=w_idx[0], P_MODE=p_idx[0], **red.constexprs(block),
            GRAD_X=grad_input, GRAD_T=grad_target, BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gx, gt


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction, grad_input, grad_target, out_dtype):
    return _xt_fake(input, target, reduction, grad_input, grad_target, out_dtype)


def _xt_setup(ctx, input, target, reduction, output):
    _, gx, gt = output
    ctx.mark_non_differentiable(gx, gt)
    # scaling the saved gradients in place bumps their version: a second backward fails loudly
    ctx.save_for_backward(gx, gt)
    ctx.red = Reduction.plan(reduction, tuple(input.shape))
    ctx.dtypes = (input.dtype, target.dtype)


def _xt_grads(ctx, grad_loss):
    gx, gt = ctx.saved_tensors
    t_in, t_t = ctx.dtypes
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = common.apply_grad_output(gx, grad_loss, ctx.red, t_in)
    if ctx.needs_input_grad[1]:
        grad_target = common.apply_grad_output(gt, grad_loss, ctx.red, t_t)
    return grad_input, grad_target


def _bce_setup(ctx, inputs, output):
    input, target, _, _, reduction, *_ = inputs
    _xt_setup(ctx, input, target, reduction, output)


def _bce_backward(ctx, grad_loss, _gx, _gt):
    return (*_xt_grads(ctx, grad_loss), None, None, None, None, None, None)


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)


def bce_with_logits(
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], *, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments in (see bce_supported), loss out. weight and pos_weight take no gradient, as in
    torch."""
    grad = torch.is_grad_enabled()
    loss, _, _ = _bce_op(
        input.contiguous(), target.contiguous(), weight, pos_weight, reduction,
        grad and input.requires_grad, grad and target.requires_grad, out_dtype,
    )
    return loss


# ---------------------------------------------------------------------------------------------- Poisson


@torch.library.custom_op("fastvae::poisson_nll", mutates_args=())
def _poisson_op(
    input: Tensor,
    target: Tensor,
    log_input: bool,
    full: bool,
    eps: float,
    reduction: str,
    grad_input: bool,
    grad_target: bool,
    out_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor, Tensor]":
    """(loss, dloss/dinput, dloss/dtarget); the gradients scaled by the reduction."""
    n = input.numel()
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(input.shape))
    loss = red.buffer(input, grid, out_dtype)
    gx, gt = _xt_grad_buffers(input, target, grad_input, grad_target, common.alloc)
    if n:
        poisson_k.poisson_nll_fwd_kernel[(grid,)](
            input, target, loss, gx, gt,
            n, eps, HALF_LOG_2PI, red.scale, red.row_len,
            LOG_INPUT=log_input, FULL=full, **red.constexprs(block),
            GRAD_X=grad_input, GRAD_T=grad_target, BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gx, gt


@_poisson_op.register_fake
def _(input, target, log_input, full, eps, reduction, grad_input, grad_target, out_dtype):
    return _xt_fake(input, target, reduction, grad_input, grad_target, out_dtype)


def _poisson_setup(ctx, inputs, output):
    input, target, _, _, _, reduction, *_ = inputs
    _xt_setup(ctx, input, target, reduction, output)


def _poisson_backward(ctx, grad_loss, _gx, _gt):
    return (*_xt_grads(ctx, grad_loss), None, None, None, None, None, None, None)


_poisson_op.register_autograd(_poisson_backward, setup_context=_poisson_setup)


def poisson_nll(
    input: Tensor, target: Tensor, *, log_input: bool, full: bool, eps: float, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments of one shape in, loss out."""
    grad = torch.is_grad_enabled()
    loss, _, _ = _poisson_op(
        input.contiguous(), target.contiguous(), log_input, full, float(eps), reduction,
        grad and input.requires_grad, grad and target.requires_grad, out_dtype,
    )
    return loss


# ------------------------------------------------------------------------------------------- NB / ZINB


def nb_supported(x: Tensor, mu: Tensor, theta: Tensor, pi: Optional[Tensor]) -> bool:
    """x, mu (and pi) of one shape, theta any broadcast the index formula covers, and no gradient asked of
    the data x (the kernel writes none)."""
    return (
        x.shape == mu.shape
        and (pi is None or pi.shape == x.shape)
        and operand_index(x.shape, theta) is not None
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def _nb_grad_dtypes(mu: Tensor, theta: Tensor, pi: Optional[Tensor], th_mode: int):
    th_dt = grad_dtype(theta.dtype) if th_mode == VAR_FULL else torch.float32
    return grad_dtype(mu.dtype), th_dt, grad_dtype(pi.dtype if pi is not None else mu.dtype)


@torch.library.custom_op("fastvae::nb_nll", mutates_args=())
def _nb_op(
    x: Tensor,
    mu: Tensor,
    theta: Tensor,
    pi: Optional[Tensor],
    eps: float,
    reduction: str,
    grad_mu: bool,
    grad_theta: bool,
    grad_pi: bool,
    out_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(loss, dloss/dmu, dloss/dtheta (per element), dloss/dpi); NB when pi is None, else ZINB."""
    n = x.numel()
    th_idx = operand_index(x.shape, theta)
    block, warps = launch_config(n, per_thread=4)  # three lgammas and two digammas an element
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(x.shape))
    loss = red.buffer(x, grid, out_dtype)
    mu_dt, th_dt, pi_dt = _nb_grad_dtypes(mu, theta, pi, th_idx[0])
    gmu = common.alloc(x, x.shape if grad_mu else (0,), mu_dt)
    gth = common.alloc(x, x.shape if grad_theta else (0,), th_dt)
    gpi = common.alloc(x, x.shape if grad_pi and pi is not None else (0,), pi_dt)
    if n:
        nb_k.nb_nll_fwd_kernel[(grid,)](
            x, mu, _operand(theta, th_idx[0], x), pi if pi is not None else x,
            loss, gmu, gth, gpi,
            n, *th_idx[1:], eps, red.scale, red.row_len,
            TH_MODE=th_idx[0], ZI=pi is not None, **red.constexprs(block),
            GRAD_MU=grad_mu, GRAD_TH=grad_theta, GRAD_PI=grad_pi and pi is not None,
            BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gmu, gth, gpi


@_nb_op.register_fake
def _(x, mu, theta, pi, eps, reduction, grad_mu, grad_theta, grad_pi, out_dtype):
    red = Reduction.plan(reduction, tuple(x.shape))
    mu_dt, th_dt, pi_dt = _nb_grad_dtypes(mu, theta, pi, operand_index(x.shape, theta)[0])
    return (
        x.new_empty(red.out_shape, dtype=out_dtype),
        x.new_empty(x.shape if grad_mu else (0,), dtype=mu_dt),
        x.new_empty(x.shape if grad_theta else (0,), dtype=th_dt),
        x.new_empty(x.shape if grad_pi and pi is not None else (0,), dtype=pi_dt),
    )


def _nb_setup(ctx, inputs, output):
    x, mu, theta, pi, eps, reduction, *_ = inputs
    _, gmu, gth, gpi = output
    ctx.mark_non_differentiable(gmu, gth, gpi)
    ctx.save_for_backward(gmu, gth, gpi)
    ctx.red = Reduction.plan(reduction, tuple(x.shape))
    ctx.dtypes = (mu.dtype, theta.dtype, pi.dtype if pi is not None else None)
    ctx.theta_shape = theta.shape


def _nb_backward(ctx, grad_loss, _gmu, _gth, _gpi):
    gmu, gth, gpi = ctx.saved_tensors
    red = ctx.red
    t_mu, t_th, t_pi = ctx.dtypes
    grad_mu = grad_theta = grad_pi = None
    if ctx.needs_input_grad[1]:
        grad_mu = common.apply_grad_output(gmu, grad_loss, red, t_mu)
    if ctx.needs_input_grad[2]:
        if gth.shape == ctx.theta_shape:
            grad_theta = common.apply_grad_output(gth, grad_loss, red, t_th)
        else:  # per-element terms of a broadcast theta, summed over the broadcast dims
            go = grad_loss.reshape(grad_loss.shape + (1,) * (gth.dim() - 1)) \
                if red.reduction == "per_sample" else grad_loss
            g = gth * go
            grad_theta = (g.sum().reshape(ctx.theta_shape) if ctx.theta_shape.numel() == 1
                          else g.sum_to_size(ctx.theta_shape)).to(t_th)
    if ctx.needs_input_grad[3]:
        grad_pi = common.apply_grad_output(gpi, grad_loss, red, t_pi)
    return None, grad_mu, grad_theta, grad_pi, None, None, None, None, None, None


_nb_op.register_autograd(_nb_backward, setup_context=_nb_setup)


def nb_nll(
    x: Tensor, mu: Tensor, theta: Tensor, pi: Optional[Tensor], *, eps: float, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments in (see nb_supported), loss out: NB, or ZINB with dropout logits ``pi``."""
    grad = torch.is_grad_enabled()
    th = theta if theta.numel() == 1 else theta.contiguous()
    loss, _, _, _ = _nb_op(
        x.contiguous(), mu.contiguous(), th, pi.contiguous() if pi is not None else None, float(eps), reduction,
        grad and mu.requires_grad, grad and theta.requires_grad, grad and pi is not None and pi.requires_grad,
        out_dtype,
    )
    return loss
