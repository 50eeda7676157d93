"""The discretized likelihoods and the mixture's sampler: launches of ``kernels/discretized.py`` as custom ops.

The mixture's gradient to the params is written by the forward (scaled by the reduction), kept in
``common.grad_dtype`` until grad_output arrives; the image x is data and gets none.
"""

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import discretized as disc_k
from . import common
from .common import Reduction, grad_dtype, launch_config

KIND_LOGISTIC, KIND_GAUSSIAN = 0, 1
TILE = 256  # pixels x padded components a program holds in registers: 2 a thread at 4 warps (sm_90: 512
# spills at M = 10, three channels and the gradient; bench/sass_report.py)


def _geometry(x: Tensor, channels_first: bool) -> "tuple[tuple[int, ...], int, int]":
    """(loss shape, pixels, spatial size): the loss has x's shape without the channel dim."""
    if channels_first:
        shape = (x.shape[0], *x.shape[2:])
        spatial = 1
        for s in x.shape[2:]:
            spatial *= s
    else:
        shape, spatial = tuple(x.shape[:-1]), 1
    n = 1
    for s in shape:
        n *= s
    return shape, n, spatial


def _mix_config(num_mixtures: int, n_pix: int, per_row: bool = False) -> "tuple[int, int]":
    """(MP, BLOCK): the components padded to a power of two, and the pixels of a program. The per-row
    reduction's segment scan keeps more live: half the tile there (triton 3.6 spilled at M = 10)."""
    mp = triton.next_power_of_2(num_mixtures)
    tile = TILE // 2 if per_row else TILE
    return mp, max(1, min(tile // mp, triton.next_power_of_2(max(n_pix, 1))))


@torch.library.custom_op("fastvae::dmol_nll", mutates_args=())
def _dmol_op(
    x: Tensor,
    params: Tensor,
    num_mixtures: int,
    bits: int,
    channels_first: bool,
    reduction: str,
    grad: bool,
    out_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor]":
    """(loss, dloss/dparams scaled by the reduction, or empty)."""
    shape, n_pix, spatial = _geometry(x, channels_first)
    channels = x.shape[1] if channels_first else x.shape[-1]
    red = Reduction.plan(reduction, shape)
    mp, block = _mix_config(num_mixtures, n_pix, red.reduction == "per_sample")
    grid = triton.cdiv(n_pix, block)
    loss = red.buffer(x, grid, out_dtype)
    g = common.alloc(params, params.shape if grad else (0,), grad_dtype(params.dtype))
    levels = 2.0**bits - 1.0
    if n_pix:
        disc_k.dmol_fwd_kernel[(grid,)](
            x, params, loss, g, n_pix, spatial, 1.0 / levels, math.log(levels / 2.0),
            red.scale, red.row_len,
            M=num_mixtures, MP=mp, C=channels, CHANNELS_FIRST=channels_first, GRAD=grad,
            **red.constexprs(block), BLOCK=block, num_warps=4,
        )
    return red.finish(loss, block, out_dtype), g


@_dmol_op.register_fake
def _(x, params, num_mixtures, bits, channels_first, reduction, grad, out_dtype):
    shape, _, _ = _geometry(x, channels_first)
    red = Reduction.plan(reduction, shape)
    return (x.new_empty(red.out_shape, dtype=out_dtype),
            params.new_empty(params.shape if grad else (0,), dtype=grad_dtype(params.dtype)))


def _dmol_setup(ctx, inputs, output):
    x, params, num_mixtures, bits, channels_first, reduction, grad, out_dtype = inputs
    _, g = output
    ctx.mark_non_differentiable(g)
    ctx.save_for_backward(g)
    shape, _, spatial = _geometry(x, channels_first)
    ctx.red = Reduction.plan(reduction, shape)
    ctx.channels_first = channels_first
    ctx.spatial = spatial
    ctx.dtype = params.dtype


def _dmol_backward(ctx, grad_loss, _g):
    (g,) = ctx.saved_tensors
    grad_params = None
    if ctx.needs_input_grad[1]:
        red = ctx.red
        per_pixel = g.numel() // max(red.n, 1)  # params per pixel
        if red.reduction == "none" and ctx.channels_first and g.numel():
            # grad_output is per pixel, the params of a pixel lie spatial apart: a broadcast multiply
            b = g.shape[0]
            go = grad_loss.reshape(b, 1, ctx.spatial)
            grad_params = (g.reshape(b, per_pixel, ctx.spatial) * go).reshape(g.shape).to(ctx.dtype)
        else:
            # the rows of grad elements one grad_output value scales: a pixel's (none, channels last) or
            # a sample's (per_sample); a full reduction has one value
            grad_params = common.apply_grad_output(g, grad_loss, red._replace(row_len=red.row_len * per_pixel),
                                                   ctx.dtype)
    return None, grad_params, None, None, None, None, None, None


_dmol_op.register_autograd(_dmol_backward, setup_context=_dmol_setup)
common.register_autocast_fp32(_dmol_op, 7)


def dmol_nll(x: Tensor, params: Tensor, *, num_mixtures: int, bits: int, channels_first: bool, reduction: str,
             out_dtype: torch.dtype) -> Tensor:
    """Validated arguments in (x needs no gradient), loss out."""
    grad = torch.is_grad_enabled() and params.requires_grad
    loss, _ = _dmol_op(x.contiguous(), params.contiguous(), int(num_mixtures), int(bits), bool(channels_first),
                       reduction, grad, out_dtype)
    return loss


@torch.library.custom_op("fastvae::dmol_sample", mutates_args=())
def _dmol_sample_op(params: Tensor, seed: Tensor, num_mixtures: int, channels: int,
                    channels_first: bool) -> Tensor:
    """An image drawn from the mixture, in params' layout and dtype."""
    if channels_first:
        out_shape = (params.shape[0], channels, *params.shape[2:])
    else:
        out_shape = (*params.shape[:-1], channels)
    out = common.alloc(params, out_shape)
    _, n_pix, spatial = _geometry(out, channels_first)
    mp, block = _mix_config(num_mixtures, n_pix)
    if n_pix:
        disc_k.dmol_sample_kernel[(triton.cdiv(n_pix, block),)](
            params, seed, out, n_pix, spatial,
            M=num_mixtures, MP=mp, C=channels, CHANNELS_FIRST=channels_first, BLOCK=block, num_warps=4,
        )
    return out


@_dmol_sample_op.register_fake
def _(params, seed, num_mixtures, channels, channels_first):
    if channels_first:
        return params.new_empty((params.shape[0], channels, *params.shape[2:]))
    return params.new_empty((*params.shape[:-1], channels))


def sample_dmol(params: Tensor, *, num_mixtures: int, channels: int, channels_first: bool,
                generator: Optional[torch.Generator]) -> Tensor:
    seed = common.new_seed(params.device, generator)
    return _dmol_sample_op(params.detach().contiguous(), seed, int(num_mixtures), int(channels),
                           bool(channels_first))


@torch.library.custom_op("fastvae::discretized_nll", mutates_args=())
def _disc_op(
    x: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    kind: int,
    bin_param: float,
    reduction: str,
    grad_mean: bool,
    grad_ls: bool,
    out_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor, Tensor]":
    """(loss, dloss/dmean, dloss/dlog_scale), the gradients scaled by the reduction."""
    n = x.numel()
    block, warps = launch_config(n, per_thread=4)
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(x.shape))
    loss = red.buffer(x, grid, out_dtype)
    gm = common.alloc(mean, mean.shape if grad_mean else (0,), grad_dtype(mean.dtype))
    gs = common.alloc(log_scale, log_scale.shape if grad_ls else (0,), grad_dtype(log_scale.dtype))
    if n:
        disc_k.discretized_fwd_kernel[(grid,)](
            x, mean, log_scale, loss, gm, gs, n, bin_param, red.scale, red.row_len,
            KIND=kind, GRAD_MEAN=grad_mean, GRAD_LS=grad_ls, **red.constexprs(block), BLOCK=block,
            num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gm, gs


@_disc_op.register_fake
def _(x, mean, log_scale, kind, bin_param, reduction, grad_mean, grad_ls, out_dtype):
    red = Reduction.plan(reduction, tuple(x.shape))
    return (x.new_empty(red.out_shape, dtype=out_dtype),
            mean.new_empty(mean.shape if grad_mean else (0,), dtype=grad_dtype(mean.dtype)),
            log_scale.new_empty(log_scale.shape if grad_ls else (0,), dtype=grad_dtype(log_scale.dtype)))


def _disc_setup(ctx, inputs, output):
    x, mean, log_scale, _, _, reduction, *_ = inputs
    _, gm, gs = output
    ctx.mark_non_differentiable(gm, gs)
    ctx.save_for_backward(gm, gs)
    ctx.red = Reduction.plan(reduction, tuple(x.shape))
    ctx.dtypes = (mean.dtype, log_scale.dtype)


def _disc_backward(ctx, grad_loss, _gm, _gs):
    gm, gs = ctx.saved_tensors
    grad_mean = grad_ls = None
    if ctx.needs_input_grad[1]:
        grad_mean = common.apply_grad_output(gm, grad_loss, ctx.red, ctx.dtypes[0])
    if ctx.needs_input_grad[2]:
        grad_ls = common.apply_grad_output(gs, grad_loss, ctx.red, ctx.dtypes[1])
    return None, grad_mean, grad_ls, None, None, None, None, None, None


_disc_op.register_autograd(_disc_backward, setup_context=_disc_setup)
common.register_autocast_fp32(_disc_op, 8)


def discretized_nll(x: Tensor, mean: Tensor, log_scale: Tensor, *, kind: int, bin_param: float, reduction: str,
                    out_dtype: torch.dtype) -> Tensor:
    """Validated arguments of one shape in (x needs no gradient), loss out."""
    grad = torch.is_grad_enabled()
    loss, _, _ = _disc_op(x.contiguous(), mean.contiguous(), log_scale.contiguous(), int(kind), float(bin_param),
                          reduction, grad and mean.requires_grad, grad and log_scale.requires_grad, out_dtype)
    return loss
