"""The discretized likelihoods and the mixture's sampler: launches of ``kernels/discretized.py`` as custom ops.

The mixture's gradient to the params is written by the forward (scaled by the reduction), kept in
``common.grad_dtype`` until grad_output arrives; the image x is data and gets none. Under
``create_graph=True`` the backward is the eager formula differentiated with the graph kept
(``common.differentiable_backward``): torch's second-order numbers.

Layouts: every tensor is read where it lies. The mixture's kernels take each tensor's (batch, spatial,
channel) strides, so a permuted conv output (VDVAE's (B, C, H, W) -> (B, H, W, C)), channels_last images or
params and a chunk of a larger tensor cost no copy; only spatial dims that do not collapse to one stride
(e.g. H and W transposed) are copied. Gradients and samples come back dense in the params' dim order. The
one-component kernel walks x, mean and log_scale in their shared memory order (contiguous, channels_last,
any dense permutation) and returns its outputs in that layout.
"""

import math
from typing import Callable, Optional

import torch
import triton
from torch import Tensor

from .. import reference
from ..kernels import discretized as disc_k
from ..reference.common import clamp_grad_at_bounds
from . import common
from .common import Reduction, grad_dtype, launch_config

KIND_LOGISTIC, KIND_GAUSSIAN = 0, 1
TILE = 256  # pixels x padded components a program holds in registers: 2 a thread at 4 warps (sm_90: 512
# spills at M = 10, three channels and the gradient; bench/sass_report.py)
INT32_OFFSETS = 2**31  # an offset or Philox counter at or past this takes the kernels' int64 arithmetic (WIDE)
CLAMP_CLOSED = clamp_grad_at_bounds()  # torch.clamp's gradient at log_scale = -7 itself, as installed


# ------------------------------------------------------------------------------------------------- layouts


def _pixels(t: Tensor, cdim: int) -> "tuple[int, int]":
    """(pixels, spatial size) of a tensor whose dim 0 is the batch and ``cdim`` the channel dim."""
    spatial = 1
    for d, s in enumerate(t.shape):
        if d not in (0, cdim):
            spatial *= s
    return t.shape[0] * spatial, spatial


def _decompose(shape: "tuple[int, ...]", strides: "tuple[int, ...]", cdim: int
               ) -> "Optional[tuple[int, int, int]]":
    """(batch stride, spatial stride, channel stride) such that pixel (b, s) channel c lies at
    b sb + s ss + c sc, s the row-major index over the spatial dims; None when those dims do not collapse
    to one stride. Degenerate dims get the strides that make sb = ss * spatial (one pixel stride)."""
    spatial_dims = [d for d in range(len(shape)) if d not in (0, cdim) and shape[d] != 1]
    for i, j in zip(spatial_dims, spatial_dims[1:]):
        if strides[i] != strides[j] * shape[j]:
            return None
    spatial = math.prod(shape[d] for d in spatial_dims)
    sb = strides[0]
    ss = strides[spatial_dims[-1]] if spatial_dims else sb
    if shape[0] == 1:
        sb = ss * spatial
    return sb, ss, strides[cdim]


def _ordered_strides(shape: "tuple[int, ...]", order_of: "tuple[int, ...]") -> "tuple[int, ...]":
    """Dense strides for ``shape`` with the dims nested as in a tensor of strides ``order_of`` (the largest
    stride outermost; ties keep the earlier dim outside)."""
    order = sorted(range(len(shape)), key=lambda d: (-order_of[d], d))
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= max(shape[d], 1)
    return tuple(strides)


def _out_strides(like: Tensor, shape: "tuple[int, ...]", cdim: int) -> "tuple[int, ...]":
    """A gradient's or sample's strides: dense in ``like``'s dim order (its memory format), or contiguous
    where that order's spatial dims would not collapse."""
    strides = _ordered_strides(shape, tuple(like.stride()))
    if _decompose(shape, strides, cdim) is None:
        strides = _ordered_strides(shape, tuple(range(len(shape), 0, -1)))
    return strides


def _readable(t: Tensor, cdim: int) -> Tensor:
    """t itself, or a contiguous copy where its spatial dims do not collapse (the kernels index one
    spatial stride)."""
    return t if _decompose(tuple(t.shape), tuple(t.stride()), cdim) is not None else t.contiguous()


def _max_offset(t: Tensor) -> int:
    return sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)


def _int64_offsets(extent: int, *tensors: Tensor) -> bool:
    """WIDE: whether an index (``extent``: pixels or Philox counters plus a program's padding) or any
    element offset of ``tensors`` reaches 2^31, where the kernels' int32 products would wrap."""
    return max([extent, *(_max_offset(t) for t in tensors)]) >= INT32_OFFSETS


def _empty(like: Tensor, shape: "tuple[int, ...]", strides: "tuple[int, ...]", dtype: torch.dtype,
           fake: bool = False) -> Tensor:
    """A buffer of ``shape`` and dense ``strides``, from common.alloc (the tests' poisoning covers it)."""
    if fake:
        return like.new_empty_strided(shape, strides, dtype=dtype)
    buf = common.alloc(like, (math.prod(shape),), dtype)
    return buf.as_strided(shape, strides)


def _scaled(g: Tensor, grad_output: Tensor, red: Reduction, dtype: torch.dtype, go_rows: Optional[Tensor],
            broadcast: Callable[[Tensor], Tensor]) -> Tensor:
    """g (written by the forward, already scaled by the reduction) times grad_output, in ``dtype`` and g's
    layout. ``go_rows``: grad_output as one value per run of consecutive elements of g's memory (per sample
    with the batch outermost, per pixel with its params innermost, per element in g's own layout), scaled
    by the kernel in memory order; None: ``broadcast(grad_output)`` multiplies g (in place when g is kept
    in ``dtype``, else into a buffer of g's layout)."""
    if grad_output.numel() == 1:
        go_rows = grad_output
    if go_rows is not None:
        red = red._replace(row_len=g.numel() // max(go_rows.numel(), 1))
        if g.is_contiguous():
            return common.apply_grad_output(g, go_rows, red, dtype)
        # the scaling kernel walks raw memory: g's elements in memory order, back in g's strides
        out = common.apply_grad_output(common.flat(g), go_rows, red, dtype)
        return out.as_strided(g.shape, g.stride())
    go = broadcast(grad_output)
    if g.dtype == dtype:
        return g.mul_(go)
    out = _empty(g, tuple(g.shape), tuple(g.stride()), dtype)
    return torch.mul(g, go, out=out)


def _per_sample(g: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda go: go.reshape((-1,) + (1,) * (g.dim() - 1))


# ------------------------------------------------------------------------------------------------- mixture


def _mix_config(num_mixtures: int, n_pix: int, per_row: bool = False) -> "tuple[int, int]":
    """(MP, BLOCK): the components padded to a power of two, and the pixels of a program. The per-row
    reduction's segment scan keeps more live: half the tile there (triton 3.6 spilled at M = 10)."""
    mp = triton.next_power_of_2(num_mixtures)
    tile = TILE // 2 if per_row else TILE
    return mp, max(1, min(tile // mp, triton.next_power_of_2(max(n_pix, 1))))


def _loss_shape(x: Tensor, cdim: int) -> "tuple[int, ...]":
    return tuple(s for d, s in enumerate(x.shape) if d != cdim)


def _cdim(t: Tensor, channels_first: bool) -> int:
    return 1 if channels_first else t.dim() - 1


@common.custom_op("fastvae::dmol_nll")
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
    cdim = _cdim(x, channels_first)
    shape = _loss_shape(x, cdim)
    n_pix, spatial = _pixels(x, cdim)
    channels = x.shape[cdim]
    red = Reduction.plan(reduction, shape)
    mp, block = _mix_config(num_mixtures, n_pix, red.reduction == "per_sample")
    grid = triton.cdiv(n_pix, block)
    loss = red.buffer(x, grid, out_dtype)
    g_shape = tuple(params.shape) if grad else (0,)
    g = _empty(params, g_shape, _out_strides(params, g_shape, cdim) if grad else (1,), grad_dtype(params.dtype))
    levels = 2.0**bits - 1.0
    if n_pix:
        x, params = _readable(x, cdim), _readable(params, cdim)
        xb, xs, xc = _decompose(tuple(x.shape), tuple(x.stride()), cdim)
        pb, ps, pc = _decompose(tuple(params.shape), tuple(params.stride()), cdim)
        gb, gs, gc = _decompose(g_shape, tuple(g.stride()), cdim) if grad else (pb, ps, pc)
        flat = all(sb == ss * spatial for sb, ss in ((xb, xs), (pb, ps), (gb, gs)))
        wide = _int64_offsets(n_pix + block, x, params, g)
        disc_k.dmol_fwd_kernel[(grid,)](
            x, params, loss, g, n_pix, spatial, xb, xs, xc, pb, ps, pc, gb, gs, gc,
            1.0 / levels, math.log(2.0 / levels), math.log(levels / 2.0), red.scale, red.row_len,
            M=num_mixtures, MP=mp, C=channels, GRAD=grad, FLAT=flat, WIDE=wide, CLAMP_GRAD_AT_MIN=CLAMP_CLOSED,
            **red.constexprs(block), BLOCK=block, num_warps=4,
        )
    return red.finish(loss, block, out_dtype), g


@_dmol_op.register_fake
def _(x, params, num_mixtures, bits, channels_first, reduction, grad, out_dtype):
    cdim = _cdim(x, channels_first)
    red = Reduction.plan(reduction, _loss_shape(x, cdim))
    g_shape = tuple(params.shape) if grad else (0,)
    return (x.new_empty(red.out_shape, dtype=out_dtype),
            _empty(params, g_shape, _out_strides(params, g_shape, cdim) if grad else (1,),
                   grad_dtype(params.dtype), fake=True))


def _dmol_setup(ctx, inputs, output):
    x, params, num_mixtures, bits, channels_first, reduction, grad, out_dtype = inputs
    _, g = output
    ctx.mark_non_differentiable(g)
    ctx.save_for_backward(g, x, params)
    ctx.cdim = _cdim(x, channels_first)
    ctx.red = Reduction.plan(reduction, _loss_shape(x, ctx.cdim))
    ctx.args = (num_mixtures, bits, "channels_first" if channels_first else "channels_last", reduction, out_dtype)
    ctx.dtype = params.dtype


def _dmol_backward(ctx, grad_loss, _g):
    g, x, params = ctx.saved_tensors
    m, bits, layout, reduction, out_dtype = ctx.args
    if torch.is_grad_enabled():  # create_graph=True: the eager formula's differentiable gradient

        def formula(x, params):
            return reference.discretized_mix_logistic_nll(x, params, m, bits, layout, reduction).to(out_dtype)

        grads = common.differentiable_backward(formula, (x, params), ctx.needs_input_grad[:2], (grad_loss,))
        return grads + (None,) * 6
    grad_params = None
    if ctx.needs_input_grad[1]:
        red, cdim = ctx.red, ctx.cdim
        if red.reduction == "per_sample":
            rows, broadcast = common.rows_outermost(g), _per_sample(g)
        else:  # "none": a pixel's params are a run of memory when they are innermost, pixels in order
            rows, broadcast = g.movedim(cdim, -1).is_contiguous(), lambda go: go.unsqueeze(cdim)
        grad_params = _scaled(g, grad_loss, red, ctx.dtype, grad_loss if rows else None, broadcast)
    return None, grad_params, None, None, None, None, None, None


_dmol_op.register_autograd(_dmol_backward, setup_context=_dmol_setup)
common.register_autocast_fp32(_dmol_op, 7)


def dmol_nll(x: Tensor, params: Tensor, *, num_mixtures: int, bits: int, channels_first: bool, reduction: str,
             out_dtype: torch.dtype) -> Tensor:
    """Validated arguments in (x needs no gradient), loss out."""
    grad = torch.is_grad_enabled() and params.requires_grad
    loss, _ = _dmol_op(x, params, int(num_mixtures), int(bits), bool(channels_first), reduction, grad, out_dtype)
    return loss


def _sample_shape(params: Tensor, channels: int, channels_first: bool) -> "tuple[int, ...]":
    if channels_first:
        return (params.shape[0], channels, *params.shape[2:])
    return (*params.shape[:-1], channels)


@common.custom_op("fastvae::dmol_sample")
def _dmol_sample_op(params: Tensor, seed: Tensor, num_mixtures: int, channels: int,
                    channels_first: bool) -> Tensor:
    """An image drawn from the mixture, in params' layout, memory format and dtype."""
    cdim = _cdim(params, channels_first)
    shape = _sample_shape(params, channels, channels_first)
    out = _empty(params, shape, _out_strides(params, shape, cdim), params.dtype)
    n_pix, spatial = _pixels(out, cdim)
    mp, block = _mix_config(num_mixtures, n_pix)
    if n_pix:
        params = _readable(params, cdim)
        pb, ps, pc = _decompose(tuple(params.shape), tuple(params.stride()), cdim)
        ob, os_, oc = _decompose(shape, tuple(out.stride()), cdim)
        flat = pb == ps * spatial and ob == os_ * spatial
        wide = _int64_offsets((n_pix + block) * (mp + 1), params, out)
        disc_k.dmol_sample_kernel[(triton.cdiv(n_pix, block),)](
            params, seed, out, n_pix, spatial, pb, ps, pc, ob, os_, oc,
            M=num_mixtures, MP=mp, C=channels, FLAT=flat, WIDE=wide, BLOCK=block, num_warps=4,
        )
    return out


@_dmol_sample_op.register_fake
def _(params, seed, num_mixtures, channels, channels_first):
    shape = _sample_shape(params, channels, channels_first)
    return _empty(params, shape, _out_strides(params, shape, _cdim(params, channels_first)), params.dtype,
                  fake=True)


def sample_dmol(params: Tensor, *, num_mixtures: int, channels: int, channels_first: bool,
                generator: Optional[torch.Generator]) -> Tensor:
    seed = common.new_seed(params.device, generator)
    return _dmol_sample_op(params.detach(), seed, int(num_mixtures), int(channels), bool(channels_first))


# ----------------------------------------------------------------------------------------- one component


def _in_place(x: Tensor, mean: Tensor, log_scale: Tensor, reduction: str) -> bool:
    """Whether the kernel walks the three where they lie: one shared dense layout, with the batch outermost
    for a per-sample reduction (its rows are then runs of memory)."""
    return common.same_dense_layout(x, mean, log_scale) and (reduction != "per_sample" or common.rows_outermost(x))


def _disc_outputs(x: Tensor, mean: Tensor, log_scale: Tensor, reduction: str, grad_mean: bool, grad_ls: bool,
                  out_dtype: torch.dtype, grid: int, fake: bool) -> "tuple[Tensor, Tensor, Tensor]":
    """(loss buffer, dloss/dmean, dloss/dlog_scale): per-element buffers in x's layout when the kernel walks
    the inputs where they lie, else contiguous."""
    shape = tuple(x.shape)
    strides = tuple(x.stride()) if _in_place(x, mean, log_scale, reduction) and x.numel() > 1 else \
        _ordered_strides(shape, tuple(range(len(shape), 0, -1)))
    red = Reduction.plan(reduction, shape)
    if red.reduced:
        loss = (x.new_empty(red.out_shape, dtype=out_dtype) if fake  # the finished value's shape
                else red.buffer(x, grid, out_dtype))
    else:
        loss = _empty(x, red.out_shape, strides if red.out_shape == shape else (1,), out_dtype, fake)
    gm = _empty(mean, shape if grad_mean else (0,), strides if grad_mean else (1,), grad_dtype(mean.dtype), fake)
    gs = _empty(log_scale, shape if grad_ls else (0,), strides if grad_ls else (1,), grad_dtype(log_scale.dtype),
                fake)
    return loss, gm, gs


@common.custom_op("fastvae::discretized_nll")
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
    loss, gm, gs = _disc_outputs(x, mean, log_scale, reduction, grad_mean, grad_ls, out_dtype, grid, False)
    if n:
        if _in_place(x, mean, log_scale, reduction):
            x, mean, log_scale = common.flat(x), common.flat(mean), common.flat(log_scale)
        else:  # no shared dense layout: one contiguous walk (the outputs are contiguous too)
            x, mean, log_scale = x.contiguous(), mean.contiguous(), log_scale.contiguous()
        log_bin = math.log(bin_param) if kind == KIND_LOGISTIC else math.log(2.0 * bin_param)
        disc_k.discretized_fwd_kernel[(grid,)](
            x, mean, log_scale, loss, gm, gs, n, bin_param, log_bin, red.scale, red.row_len,
            KIND=kind, GRAD_MEAN=grad_mean, GRAD_LS=grad_ls, WIDE=_int64_offsets(n + block),
            **red.constexprs(block), BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gm, gs


@_disc_op.register_fake
def _(x, mean, log_scale, kind, bin_param, reduction, grad_mean, grad_ls, out_dtype):
    return _disc_outputs(x, mean, log_scale, reduction, grad_mean, grad_ls, out_dtype, 0, True)


def _disc_setup(ctx, inputs, output):
    x, mean, log_scale, kind, bin_param, reduction, _, _, out_dtype = inputs
    _, gm, gs = output
    ctx.mark_non_differentiable(gm, gs)
    ctx.save_for_backward(gm, gs, x, mean, log_scale)
    ctx.red = Reduction.plan(reduction, tuple(x.shape))
    ctx.args = (kind, bin_param, reduction, out_dtype)
    ctx.dtypes = (mean.dtype, log_scale.dtype)


def _disc_formula(kind: int, bin_param: float, reduction: str, out_dtype: torch.dtype) -> Callable:
    """The eager formula of the op (its inputs x, mean, log_scale), for create_graph."""
    if kind == KIND_LOGISTIC:
        return lambda x, m, s: reference.discretized_logistic_nll(x, m, s, bin_param, reduction).to(out_dtype)
    bits = round(math.log2(1.0 / bin_param + 1.0))
    return lambda x, m, s: reference.discretized_gaussian_nll(x, m, s, bits, reduction).to(out_dtype)


def _disc_backward(ctx, grad_loss, _gm, _gs):
    gm, gs, x, mean, log_scale = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the eager formula's differentiable gradient
        grads = common.differentiable_backward(_disc_formula(*ctx.args), (x, mean, log_scale),
                                               ctx.needs_input_grad[:3], (grad_loss,))
        return grads + (None,) * 6
    grads = [_disc_scaled(g, grad_loss, ctx.red, dtype) if need else None
             for g, dtype, need in zip((gm, gs), ctx.dtypes, ctx.needs_input_grad[1:3])]
    return None, *grads, None, None, None, None, None, None


def _disc_scaled(g: Tensor, grad_loss: Tensor, red: Reduction, dtype: torch.dtype) -> Tensor:
    if red.reduction == "per_sample":
        return _scaled(g, grad_loss, red, dtype, grad_loss if common.rows_outermost(g) else None, _per_sample(g))
    # "none": one value per element; in g's memory order when grad_output shares g's layout
    if common.same_dense_layout(g, grad_loss):
        go_rows = common.flat(grad_loss)
    else:
        go_rows = grad_loss if g.is_contiguous() else None
    return _scaled(g, grad_loss, red, dtype, go_rows, lambda go: go)


_disc_op.register_autograd(_disc_backward, setup_context=_disc_setup)
common.register_autocast_fp32(_disc_op, 8)


def discretized_nll(x: Tensor, mean: Tensor, log_scale: Tensor, *, kind: int, bin_param: float, reduction: str,
                    out_dtype: torch.dtype) -> Tensor:
    """Validated arguments of one shape in (x needs no gradient), loss out."""
    grad = torch.is_grad_enabled()
    loss, _, _ = _disc_op(x, mean, log_scale, int(kind), float(bin_param), reduction,
                          grad and mean.requires_grad, grad and log_scale.requires_grad, out_dtype)
    return loss
