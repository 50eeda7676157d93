"""The Gaussian NLL with its gradient in the same pass: launches of ``kernels/gaussian_nll.py`` as custom ops.

Each tensor is loaded in its own dtype and computed in fp32; the loss comes out in torch's promoted dtype
(fp32 under autocast, as torch's losses), each gradient in its input's dtype. The gradient the forward writes
is kept in ``common.grad_dtype`` until grad_output arrives; under ``create_graph=True`` backward instead
differentiates the eager formula on the saved inputs (second-order terms). A dense input of any layout
(channels_last, a transpose) is walked in memory order through a permuted view, the loss per element and the
gradients coming back in its layout. An integer target is loaded as it is.
"""

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import gaussian_nll as nll_k
from ..reference import gaussian as ref_gaussian
from . import common
from .common import GO_SCALAR, Reduction, grad_dtype, launch_config

VAR_FULL, VAR_SCALAR, VAR_INDEXED = 0, 1, 2
GV_OFF, GV_ELEMENTWISE, GV_PARTIAL = 0, 1, 2
INT32_OFFSETS = 2**31  # element offsets at or past this take the kernel's int64 arithmetic (WIDE)


def _var_index(in_shape: torch.Size, var_shape: torch.Size) -> "Optional[tuple[int, int, int, int, int]]":
    """(VAR_MODE, v_div, v_mod, v_mul, v_mod2) for a variance of var_shape (same ndim) broadcast over
    in_shape, or None when the broadcast has more groups than the kernel's index formula covers."""
    groups: list[list] = []  # [kept?, size] runs of input dims, size-1 input dims dropped
    for i, v in zip(in_shape, var_shape):
        if i == 1:
            continue
        kept = v == i
        if groups and groups[-1][0] == kept:
            groups[-1][1] *= i
        else:
            groups.append([kept, i])
    kinds = tuple(k for k, _ in groups)
    sizes = [s for _, s in groups]
    if all(kinds):
        return VAR_FULL, 1, 1, 1, 1
    if not any(kinds):
        return VAR_SCALAR, 1, 1, 1, 1
    if kinds == (True, False):  # per-row: var[i // m]
        return VAR_INDEXED, sizes[1], sizes[0], 1, 1
    if kinds == (False, True):  # per-feature: var[i % b]
        return VAR_INDEXED, 1, sizes[1], 1, 1
    if kinds == (True, False, True):  # one broadcast dim in the middle
        a, m, b = sizes
        return VAR_INDEXED, m * b, a, b, b
    if kinds == (False, True, False):  # per-channel
        return VAR_INDEXED, sizes[2], sizes[1], 1, 1
    return None


def _var_grad_plan(var_mode: int, red: Reduction, grad_var: bool, dtype: torch.dtype) -> "tuple[int, torch.dtype]":
    """How the variance's gradient is written: per program and summed (a scalar variance under a full
    reduction), per element in var's gradient dtype (a full variance), or per element in fp32 and summed over
    the broadcast dims in backward (any other broadcast, and the reductions whose grad_output is not one
    value)."""
    if not grad_var:
        return GV_OFF, dtype
    if var_mode == VAR_SCALAR and red.go_mode == GO_SCALAR:
        return GV_PARTIAL, torch.float32
    if var_mode == VAR_FULL:
        return GV_ELEMENTWISE, grad_dtype(dtype)
    return GV_ELEMENTWISE, torch.float32


def nll_supported(input: Tensor, target: Tensor, var: Tensor) -> bool:
    """What the kernel covers (any mix of fp32/bf16/fp16); anything else takes the eager reference, with
    torch's semantics."""
    return (
        input.shape == target.shape
        and var.dim() == input.dim()
        and _var_index(input.shape, var.shape) is not None
    )


@common.custom_op("fastvae::gaussian_nll")
def _gaussian_nll_op(
    input: Tensor,
    target: Tensor,
    var: Tensor,
    full: bool,
    eps: float,
    reduction: str,
    logvar_form: bool,
    grad_input: bool,
    grad_var: bool,
    out_dtype: torch.dtype,
    gx_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor, Tensor]":
    """(loss, dloss/dinput, dloss/dvar); the gradients scaled by the reduction, dloss/dinput kept in
    ``gx_dtype``. ``input`` and ``target`` contiguous (the caller permutes a dense layout to that), ``target``
    of any floating or integer dtype."""
    n = input.numel()
    var = var if var.numel() == 1 else var.contiguous()  # var-sized (often tiny); a full var is already
    mode, v_div, v_mod, v_mul, v_mod2 = _var_index(input.shape, var.shape)
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(input.shape))
    loss = red.buffer(input, grid, out_dtype)
    gx = common.alloc(input, input.shape if grad_input else (0,), gx_dtype)
    gv_mode, gv_dtype = _var_grad_plan(mode, red, grad_var, var.dtype)
    gv = common.alloc(input, {GV_OFF: (0,), GV_PARTIAL: (grid,)}.get(gv_mode, input.shape), gv_dtype)
    if n:
        nll_k.gaussian_nll_fwd_kernel[(grid,)](
            input, target.contiguous(), var if mode != VAR_SCALAR else var.reshape(-1)[:1],
            loss, gx, gv,
            n, v_div, v_mod, v_mul, v_mod2,
            eps, 0.5 * math.log(2 * math.pi) if full else 0.0, red.scale, red.row_len,
            LOGVAR=logvar_form, VAR_MODE=mode, **red.constexprs(block),
            GRAD_X=grad_input, GRAD_VAR=gv_mode, BLOCK=block, WIDE=n + block >= INT32_OFFSETS, num_warps=warps,
        )
    loss = red.finish(loss, block, out_dtype)
    if gv_mode == GV_PARTIAL:
        gv = common.finish_sum(gv, red.scale, torch.float32)
    return loss, gx, gv


@_gaussian_nll_op.register_fake
def _(input, target, var, full, eps, reduction, logvar_form, grad_input, grad_var, out_dtype, gx_dtype):
    red = Reduction.plan(reduction, tuple(input.shape))
    loss = input.new_empty(red.out_shape, dtype=out_dtype)
    gx = input.new_empty(input.shape if grad_input else (0,), dtype=gx_dtype)
    gv_mode, gv_dtype = _var_grad_plan(_var_index(input.shape, var.shape)[0], red, grad_var, var.dtype)
    gv = input.new_empty({GV_OFF: (0,), GV_PARTIAL: ()}.get(gv_mode, input.shape), dtype=gv_dtype)
    return loss, gx, gv


def _nll_setup(ctx, inputs, output):
    input, target, var, full, eps, reduction, logvar_form, grad_input, grad_var, out_dtype, gx_dtype = inputs
    _, gx, gv = output
    ctx.mark_non_differentiable(gx, gv)
    # the gradients the forward wrote are what backward needs; scaling them in place bumps their
    # version, so a second backward through the same graph fails loudly instead of double-scaling. The
    # inputs (alive in the caller anyway) serve a create_graph backward only.
    ctx.save_for_backward(gx, gv, input, target, var)
    ctx.red = Reduction.plan(reduction, tuple(input.shape))
    ctx.dtypes = (input.dtype, target.dtype, var.dtype)
    ctx.var_shape = var.shape
    ctx.formula = ref_gaussian._nll_formula(logvar_form, full, eps, reduction)


def _nll_backward(ctx, grad_loss, _gx, _gv):
    gx, gv, input, target, var = ctx.saved_tensors
    need_input, need_target, need_var = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        # create_graph=True: the formula differentiated with the graph kept, torch's second-order terms (the
        # forward-written gradient is a plain value: differentiating it would drop them silently)
        return common.differentiable_backward(ctx.formula, (input, target, var), ctx.needs_input_grad[:3],
                                              (grad_loss,)) + (None,) * 8
    red = ctx.red
    t_in, t_t, t_v = ctx.dtypes
    grad_input = grad_target = grad_var = None
    if need_input and need_target and t_in == t_t:
        grad_input = common.apply_grad_output(gx, grad_loss, red, t_in)
        grad_target = grad_input.neg()
    elif need_input or need_target:
        # the one that may scale gx in place goes last
        for which, dtype in sorted(((0, t_in), (1, t_t)), key=lambda w: w[1] == gx.dtype):
            if which == 0 and need_input:
                grad_input = common.apply_grad_output(gx, grad_loss, red, dtype)
            elif which == 1 and need_target:
                grad_target = common.apply_grad_output(gx, grad_loss, red, dtype).neg_()
    if need_var:
        if gv.shape == ctx.var_shape:
            grad_var = common.apply_grad_output(gv, grad_loss, red, t_v)
        else:  # a scalar total, or per-element terms of a broadcast variance
            go = grad_loss.reshape(grad_loss.shape + (1,) * (gv.dim() - 1)) if red.reduction == "per_sample" \
                else grad_loss
            g = gv * go
            grad_var = (g.reshape(ctx.var_shape) if g.numel() == 1 else g.sum_to_size(ctx.var_shape)).to(t_v)
    return grad_input, grad_target, grad_var, None, None, None, None, None, None, None, None


_gaussian_nll_op.register_autograd(_nll_backward, setup_context=_nll_setup)
common.register_autocast_fp32(_gaussian_nll_op, 9)


def _dims_by_stride(t: Tensor) -> "list[int]":
    """t's dims outermost first in memory (largest stride first; ties, size-1 dims, keep their order)."""
    return sorted(range(t.dim()), key=lambda i: -t.stride(i) if t.shape[i] != 1 else -math.inf)


def _memory_order(input: Tensor, target: Tensor, reduction: str) -> "Optional[list[int]]":
    """The permutation that makes a dense, non-contiguous ``input`` (channels_last, a transpose, any dense
    permutation) contiguous, so the kernel walks it in memory order: input and a target of the same layout
    are then read in place, var permuted alike (indexed as before, copied only if its layout differs), and a
    per-element loss and the gradients come back in the input's layout. None: nothing to permute. Reductions
    over dim 0 (per_sample's rows, batchmean's 1/B) need dim 0 to stay outermost."""
    if input.dim() < 2 or input.is_contiguous() or not common.dense(input):
        return None
    if not common.same_dense_layout(input, target):
        return None
    perm = _dims_by_stride(input)
    if perm == list(range(input.dim())):
        return None
    if reduction in ("per_sample", "batchmean") and perm[0] != 0 and input.shape[0] != 1:
        return None
    return perm


def gaussian_nll(
    input: Tensor, target: Tensor, var: Tensor, *, logvar_form: bool, full: bool, eps: float, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments in (var already shaped to input's ndim, see nll_supported), loss out."""
    grad = torch.is_grad_enabled()
    need_x = grad and (input.requires_grad or target.requires_grad)
    need_v = grad and var.requires_grad
    # one gradient serves input and target: kept in the input's dtype (a 16-bit model output against fp32
    # data writes 16 bits and scales in place), in the promoted one when the target needs it too
    gx_dtype = grad_dtype(torch.promote_types(input.dtype, target.dtype) if grad and target.requires_grad
                          else input.dtype)
    perm = _memory_order(input, target, reduction)
    if perm is not None:  # views: autograd permutes the gradients back, into the input's layout
        input, target, var = input.permute(perm), target.permute(perm), var.permute(perm)
    # a layout the kernel cannot walk in memory order (overlapping, a gap, mixed layouts) is copied
    loss = _gaussian_nll_op(input.contiguous(), target, var, full, float(eps), reduction, logvar_form, need_x,
                            need_v, out_dtype, gx_dtype)[0]
    if perm is not None and reduction == "none":
        loss = loss.permute([perm.index(i) for i in range(len(perm))])
    return loss
