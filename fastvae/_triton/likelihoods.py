"""Bernoulli, Poisson, NB and ZINB NLLs with their gradients in the same pass: launches of
``kernels/bernoulli.py``, ``kernels/poisson.py`` and ``kernels/negative_binomial.py`` as custom ops.

Each tensor is loaded in its own dtype and computed in fp32; the loss comes out in ``out_dtype`` (torch's
promotion, fp32 under autocast), each gradient in its input's dtype, kept in ``common.grad_dtype`` until
grad_output arrives. A broadcast operand (weight, pos_weight, theta) is indexed by the kernel; its gradient,
when it has one, is written per element in fp32 and summed over the broadcast dims in backward.

Layout: the kernels walk their elements in memory order. Full-shape operands that share one dense layout
(contiguous, channels_last, any dense permutation) are read where they lie and the elementwise loss and the
gradients come back in that layout (``common.flat`` / ``common.alloc_like``); a contiguous copy is made only
where the kernel cannot index the layout: operands of different layouts, a non-dense view, a broadcast
operand's row-major index formula over a non-contiguous input, per_sample rows that are not outermost.

Backward: the forward-written gradients scaled by grad_output (one pass); under ``create_graph=True`` the
eager formulas of ``fastvae.reference`` differentiated with the graph kept (``common.differentiable_backward``),
so second-order terms are torch's.

Offsets: every kernel forms its element offsets as int64 (``pid.to(tl.int64) * BLOCK``), and the broadcast
index (``load_bcast``) and row arithmetic (``reduce.row_col``) derive from them: no int32 product can wrap
whatever the size, so there is no narrow/wide switch to choose.
"""

from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import bernoulli as bce_k
from ..kernels import negative_binomial as nb_k
from ..kernels import poisson as poisson_k
from ..reference import likelihoods as ref_lik
from ..reference.common import HALF_LOG_2PI
from . import common
from .common import GO_ELEMENTWISE, Reduction, grad_dtype, launch_config
from .gaussian_nll import VAR_FULL, VAR_INDEXED, VAR_SCALAR, _var_index

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


def walks_in_place(base: Tensor, fulls: "list[Tensor]", modes: "list[int]", red: Reduction) -> bool:
    """Whether the kernel reads ``base`` and the full-shape operands ``fulls`` where they lie, in base's
    memory order (shape and strides only: the real op and its fake agree). A contiguous base always does
    (a full operand of another layout is then copied alone); otherwise base must be dense with every full
    operand in its exact layout, no broadcast operand indexed (the index formula is row-major), and per_sample
    rows outermost (a row is then a contiguous run of the memory order)."""
    if base.is_contiguous():
        return True
    if any(m == VAR_INDEXED for m in modes):
        return False
    if red.reduction == "per_sample" and not common.rows_outermost(base):
        return False
    return common.same_dense_layout(base, *fulls)


def _full(t: Tensor, base: Tensor) -> Tensor:
    """A full-shape operand as the kernel reads it: its memory-order view when it is laid out as the
    (walkable) base, else a contiguous copy (base is contiguous then)."""
    if t.shape == base.shape and t.stride() == base.stride() and common.dense(t):
        return common.flat(t)
    return t.contiguous()


def _operand(t: Optional[Tensor], mode: int, base: Tensor) -> Tensor:
    """What the kernel reads for a broadcast operand: one value, the index formula's row-major buffer, or a
    full-shape operand (``_full``)."""
    if t is None:
        return base  # never read (constexpr-absent)
    if mode == VAR_SCALAR:
        return t.reshape(-1)[:1]
    if mode == VAR_FULL and t.shape == base.shape:
        return _full(t, base)
    return t.contiguous()


def _grad_buffer(like: Tensor, wanted: bool, dtype: torch.dtype) -> Tensor:
    """A forward-written gradient in ``like``'s layout, or an empty placeholder when not asked for."""
    return common.alloc_like(like, dtype) if wanted else common.alloc(like, (0,), dtype)


def _fake_grad(like: Tensor, wanted: bool, dtype: torch.dtype) -> Tensor:
    if not wanted:
        return like.new_empty((0,), dtype=dtype)
    return torch.empty_strided(like.shape, like.stride(), dtype=dtype, device=like.device)


def _loss_buffer(like: Tensor, red: Reduction, grid: int, out_dtype: torch.dtype) -> Tensor:
    """The elementwise loss in ``like``'s layout (as torch's elementwise losses keep channels_last), or the
    reduction's buffer."""
    if not red.reduced and tuple(red.out_shape) == tuple(like.shape):
        return common.alloc_like(like, out_dtype)
    return red.buffer(like, grid, out_dtype)


def _fake_loss(like: Tensor, red: Reduction, out_dtype: torch.dtype) -> Tensor:
    if not red.reduced and tuple(red.out_shape) == tuple(like.shape):
        return torch.empty_strided(like.shape, like.stride(), dtype=out_dtype, device=like.device)
    return like.new_empty(red.out_shape, dtype=out_dtype)


def scale_saved_grad(g: Tensor, grad_output: Tensor, red: Reduction, dtype: torch.dtype) -> Tensor:
    """``common.apply_grad_output`` for a gradient in any dense layout: both walked in g's memory order (an
    elementwise grad_output laid out as g first: its one copy when autograd hands another layout, e.g. the
    expanded ones of a ``.sum()``)."""
    if g.is_contiguous():
        return common.apply_grad_output(g, grad_output, red, dtype)
    go = grad_output
    if red.go_mode == GO_ELEMENTWISE:
        if go.stride() != g.stride() or not common.dense(go):
            go = torch.empty_strided(g.shape, g.stride(), dtype=go.dtype, device=go.device).copy_(go)
        go = common.flat(go)
    out = common.apply_grad_output(common.flat(g), go, red, dtype)
    return out.as_strided(g.shape, g.stride())


# -------------------------------------------------------------------------------------------- Bernoulli


def bce_supported(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor]) -> bool:
    return (
        input.shape == target.shape
        and operand_index(input.shape, weight) is not None
        and operand_index(input.shape, pos_weight) is not None
    )


def _bce_layout(input, target, weight, pos_weight, red) -> bool:
    idx = [operand_index(input.shape, t) for t in (weight, pos_weight)]
    fulls = [t for t, i in zip((weight, pos_weight), idx) if t is not None and i[0] == VAR_FULL]
    return walks_in_place(input, [target, *[t for t in fulls if t.shape == input.shape]],
                          [i[0] for i in idx] + [VAR_INDEXED] * any(t.shape != input.shape for t in fulls), red)


@common.custom_op("fastvae::bce_with_logits")
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
    """(loss, dloss/dinput, dloss/dtarget); the gradients scaled by the reduction, in the input's layout."""
    n = input.numel()
    w_idx, p_idx = operand_index(input.shape, weight), operand_index(input.shape, pos_weight)
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(input.shape))
    if not _bce_layout(input, target, weight, pos_weight, red):
        input = input.contiguous()
    loss = _loss_buffer(input, red, grid, out_dtype)
    gx = _grad_buffer(input, grad_input, grad_dtype(input.dtype))
    gt = _grad_buffer(input, grad_target, grad_dtype(target.dtype))
    if n:
        bce_k.bce_logits_fwd_kernel[(grid,)](
            common.flat(input), _full(target, input), _operand(weight, w_idx[0], input),
            _operand(pos_weight, p_idx[0], input), loss, gx, gt,
            n, *w_idx[1:], *p_idx[1:], red.scale, red.row_len,
            W_MODE=w_idx[0], P_MODE=p_idx[0], **red.constexprs(block),
            GRAD_X=grad_input, GRAD_T=grad_target, BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gx, gt


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction, grad_input, grad_target, out_dtype):
    red = Reduction.plan(reduction, tuple(input.shape))
    like = input if _bce_layout(input, target, weight, pos_weight, red) else input.contiguous()
    return (_fake_loss(like, red, out_dtype), _fake_grad(like, grad_input, grad_dtype(input.dtype)),
            _fake_grad(like, grad_target, grad_dtype(target.dtype)))


def _xt_setup(ctx, input, target, reduction, out_dtype, output, extra=()):
    _, gx, gt = output
    ctx.mark_non_differentiable(gx, gt)
    # scaling the saved gradients in place bumps their version: a second backward fails loudly. The inputs
    # are kept for create_graph=True's differentiable backward (torch's own losses keep them too).
    ctx.save_for_backward(gx, gt, input, target, *extra)
    ctx.red = Reduction.plan(reduction, tuple(input.shape))
    ctx.dtypes = (input.dtype, target.dtype)
    ctx.out_dtype = out_dtype


def _xt_grads(ctx, grad_loss, formula):
    gx, gt, input, target, *extra = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the eager formula, differentiable to any order
        return common.differentiable_backward(
            lambda i, t: formula(i, t, *extra).to(ctx.out_dtype), (input, target), ctx.needs_input_grad[:2],
            (grad_loss,))
    t_in, t_t = ctx.dtypes
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_input = scale_saved_grad(gx, grad_loss, ctx.red, t_in)
    if ctx.needs_input_grad[1]:
        grad_target = scale_saved_grad(gt, grad_loss, ctx.red, t_t)
    return grad_input, grad_target


def _bce_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction, _, _, out_dtype = inputs
    _xt_setup(ctx, input, target, reduction, out_dtype, output, (weight, pos_weight))
    ctx.reduction = reduction


def _bce_backward(ctx, grad_loss, _gx, _gt):
    def formula(i, t, w, p):
        return ref_lik.bce_with_logits(i, t, w, p, ctx.reduction)

    return (*_xt_grads(ctx, grad_loss, formula), None, None, None, None, None, None)


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)


def bce_with_logits(
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], *, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments in (see bce_supported), loss out. weight and pos_weight take no gradient, as in
    torch."""
    # an integer weight is promoted here (a copy of a small broadcast operand, typically): the kernel loads floats
    weight, pos_weight = (t if t is None or t.is_floating_point() else t.to(torch.float32)
                          for t in (weight, pos_weight))
    grad = torch.is_grad_enabled()
    loss, _, _ = _bce_op(
        input, target, weight, pos_weight, reduction,
        grad and input.requires_grad, grad and target.requires_grad, out_dtype,
    )
    return loss


# ---------------------------------------------------------------------------------------------- Poisson


def _poisson_layout(input, target, red) -> bool:
    return walks_in_place(input, [target], [], red)


@common.custom_op("fastvae::poisson_nll")
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
    """(loss, dloss/dinput, dloss/dtarget); the gradients scaled by the reduction, in the input's layout."""
    n = input.numel()
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(input.shape))
    if not _poisson_layout(input, target, red):
        input = input.contiguous()
    loss = _loss_buffer(input, red, grid, out_dtype)
    gx = _grad_buffer(input, grad_input, grad_dtype(input.dtype))
    gt = _grad_buffer(input, grad_target, grad_dtype(target.dtype))
    if n:
        poisson_k.poisson_nll_fwd_kernel[(grid,)](
            common.flat(input), _full(target, input), loss, gx, gt,
            n, eps, HALF_LOG_2PI, red.scale, red.row_len,
            LOG_INPUT=log_input, FULL=full, **red.constexprs(block),
            GRAD_X=grad_input, GRAD_T=grad_target, BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gx, gt


@_poisson_op.register_fake
def _(input, target, log_input, full, eps, reduction, grad_input, grad_target, out_dtype):
    red = Reduction.plan(reduction, tuple(input.shape))
    like = input if _poisson_layout(input, target, red) else input.contiguous()
    return (_fake_loss(like, red, out_dtype), _fake_grad(like, grad_input, grad_dtype(input.dtype)),
            _fake_grad(like, grad_target, grad_dtype(target.dtype)))


def _poisson_setup(ctx, inputs, output):
    input, target, log_input, full, eps, reduction, _, _, out_dtype = inputs
    _xt_setup(ctx, input, target, reduction, out_dtype, output)
    ctx.args = (log_input, full, eps, reduction)


def _poisson_backward(ctx, grad_loss, _gx, _gt):
    def formula(i, t):
        return ref_lik.poisson_nll(i, t, *ctx.args)

    return (*_xt_grads(ctx, grad_loss, formula), None, None, None, None, None, None, None)


_poisson_op.register_autograd(_poisson_backward, setup_context=_poisson_setup)


def poisson_nll(
    input: Tensor, target: Tensor, *, log_input: bool, full: bool, eps: float, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments of one shape in, loss out (integer ones promoted first: the kernel's gradient
    buffers take floating dtypes)."""
    dt = ref_lik.float_dtypes(input, target)[1]
    input = input if input.is_floating_point() else input.to(dt)
    target = target if target.is_floating_point() else target.to(dt)
    grad = torch.is_grad_enabled()
    loss, _, _ = _poisson_op(
        input, target, log_input, full, float(eps), reduction,
        grad and input.requires_grad, grad and target.requires_grad, out_dtype,
    )
    return loss


# ------------------------------------------------------------------------------------------- NB / ZINB


def nb_supported(shape: torch.Size, x: Tensor, theta: Tensor) -> bool:
    """theta any broadcast to the loss's ``shape`` the index formula covers, and no gradient asked of the
    data x (the kernel writes none)."""
    return operand_index(shape, theta) is not None and not (torch.is_grad_enabled() and x.requires_grad)


def _nb_grad_dtypes(mu: Tensor, theta: Tensor, pi: Optional[Tensor], th_mode: int):
    th_dt = grad_dtype(theta.dtype) if th_mode == VAR_FULL else torch.float32
    return grad_dtype(mu.dtype), th_dt, grad_dtype(pi.dtype if pi is not None else mu.dtype)


def _nb_layout(x, mu, theta, pi, red) -> bool:
    th_mode = operand_index(mu.shape, theta)[0]
    fulls = [x, *([pi] if pi is not None else [])]
    if th_mode == VAR_FULL:
        if theta.shape != mu.shape:
            return mu.is_contiguous()
        fulls.append(theta)
    return walks_in_place(mu, fulls, [th_mode], red)


@common.custom_op("fastvae::nb_nll")
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
    """(loss, dloss/dmu, dloss/dtheta (per element), dloss/dpi); NB when pi is None, else ZINB. x, mu and pi
    of one shape; the per-element gradients in mu's layout."""
    n = mu.numel()
    th_idx = operand_index(mu.shape, theta)
    block, warps = launch_config(n, per_thread=4)  # three lgammas and two digammas an element
    grid = triton.cdiv(n, block)
    red = Reduction.plan(reduction, tuple(mu.shape))
    if not _nb_layout(x, mu, theta, pi, red):
        mu = mu.contiguous()
    loss = _loss_buffer(mu, red, grid, out_dtype)
    mu_dt, th_dt, pi_dt = _nb_grad_dtypes(mu, theta, pi, th_idx[0])
    gmu = _grad_buffer(mu, grad_mu, mu_dt)
    gth = _grad_buffer(mu, grad_theta, th_dt)
    gpi = _grad_buffer(mu, grad_pi and pi is not None, pi_dt)
    if n:
        nb_k.nb_nll_fwd_kernel[(grid,)](
            _full(x, mu), common.flat(mu), _operand(theta, th_idx[0], mu),
            _full(pi, mu) if pi is not None else mu,
            loss, gmu, gth, gpi,
            n, *th_idx[1:], eps, red.scale, red.row_len,
            TH_MODE=th_idx[0], ZI=pi is not None, **red.constexprs(block),
            GRAD_MU=grad_mu, GRAD_TH=grad_theta, GRAD_PI=grad_pi and pi is not None,
            BLOCK=block, num_warps=warps,
        )
    return red.finish(loss, block, out_dtype), gmu, gth, gpi


@_nb_op.register_fake
def _(x, mu, theta, pi, eps, reduction, grad_mu, grad_theta, grad_pi, out_dtype):
    red = Reduction.plan(reduction, tuple(mu.shape))
    like = mu if _nb_layout(x, mu, theta, pi, red) else mu.contiguous()
    mu_dt, th_dt, pi_dt = _nb_grad_dtypes(mu, theta, pi, operand_index(mu.shape, theta)[0])
    return (_fake_loss(like, red, out_dtype), _fake_grad(like, grad_mu, mu_dt), _fake_grad(like, grad_theta, th_dt),
            _fake_grad(like, grad_pi and pi is not None, pi_dt))


def _nb_setup(ctx, inputs, output):
    x, mu, theta, pi, eps, reduction, _, _, _, out_dtype = inputs
    _, gmu, gth, gpi = output
    ctx.mark_non_differentiable(gmu, gth, gpi)
    ctx.save_for_backward(gmu, gth, gpi, x, mu, theta, pi)
    ctx.red = Reduction.plan(reduction, tuple(mu.shape))
    ctx.dtypes = (mu.dtype, theta.dtype, pi.dtype if pi is not None else None)
    ctx.theta_shape = theta.shape
    ctx.args = (float(eps), reduction, out_dtype)


def _nb_formula(eps: float, reduction: str, out_dtype: torch.dtype):
    def formula(x, mu, theta, pi):
        if pi is None:
            return ref_lik.negative_binomial_nll(x, mu, theta, eps, reduction).to(out_dtype)
        return ref_lik.zinb_nll(x, mu, theta, pi, eps, reduction).to(out_dtype)

    return formula


def _nb_backward(ctx, grad_loss, _gmu, _gth, _gpi):
    gmu, gth, gpi, x, mu, theta, pi = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the eager formula, differentiable to any order
        return common.differentiable_backward(
            _nb_formula(*ctx.args), (x, mu, theta, pi), ctx.needs_input_grad[:4], (grad_loss,)
        ) + (None,) * 6
    red = ctx.red
    t_mu, t_th, t_pi = ctx.dtypes
    grad_mu = grad_theta = grad_pi = None
    if ctx.needs_input_grad[1]:
        grad_mu = scale_saved_grad(gmu, grad_loss, red, t_mu)
    if ctx.needs_input_grad[2]:
        if gth.shape == ctx.theta_shape:
            grad_theta = scale_saved_grad(gth, grad_loss, red, t_th)
        else:  # per-element terms of a broadcast theta, summed over the broadcast dims
            go = grad_loss.reshape(grad_loss.shape + (1,) * (gth.dim() - 1)) \
                if red.reduction == "per_sample" else grad_loss
            g = gth * go
            grad_theta = (g.sum().reshape(ctx.theta_shape) if ctx.theta_shape.numel() == 1
                          else g.sum_to_size(ctx.theta_shape)).to(t_th)
    if ctx.needs_input_grad[3]:
        grad_pi = scale_saved_grad(gpi, grad_loss, red, t_pi)
    return None, grad_mu, grad_theta, grad_pi, None, None, None, None, None, None


_nb_op.register_autograd(_nb_backward, setup_context=_nb_setup)


def nb_nll(
    x: Tensor, mu: Tensor, theta: Tensor, pi: Optional[Tensor], *, eps: float, reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Validated arguments in, x, mu and pi of the loss's shape (see nb_supported), loss out: NB, or ZINB
    with dropout logits ``pi``. Integer counts are promoted first (the kernel loads floats)."""
    x = x if x.is_floating_point() else x.to(ref_lik.float_dtypes(x, mu, theta)[1])
    grad = torch.is_grad_enabled()
    loss, _, _, _ = _nb_op(
        x, mu, theta, pi, float(eps), reduction,
        grad and mu.requires_grad, grad and theta.requires_grad, grad and pi is not None and pi.requires_grad,
        out_dtype,
    )
    return loss
