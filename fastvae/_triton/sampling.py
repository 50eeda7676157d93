"""Reparameterized sampling fused with the KL: launches of ``kernels/sampling.py`` as custom ops.

eps is drawn inside the kernel from a seed that torch's generator draws into a one-element device tensor and
regenerated in backward: the seed (8 bytes) is all the noise costs in memory. Under ``create_graph=True``
backward regenerates eps as a tensor (the op's z for mu = 0, logvar = 0) and differentiates the formulas with
the graph kept. mu and logvar broadcast (expanded views, copied in the op); the two halves of one tensor
(``h.chunk(2, dim)``) are read in place.
"""

import math
from typing import Callable, Optional

import torch
import triton
from torch import Tensor

from .. import reference
from .._checks import broadcast_shapes
from ..kernels import sampling as sampling_k
from ..reference.common import clamp_grad_at_bounds
from . import common
from .common import Reduction, launch_config

KL_OFF, KL_ELEMENTWISE, KL_REDUCED = 0, 1, 2
FORM_LOGVAR, FORM_CLAMPED, FORM_SCALE = 0, 1, 2  # what the second input (and the prior's) holds: kernels/sampling.py
# torch.clamp's gradient on its bounds, as the installed torch computes it (ldm's clamped logvar follows it)
CLAMP_CLOSED = clamp_grad_at_bounds()
INT32_OFFSETS = 2**31  # offsets at or past this take the kernels' int64 arithmetic (WIDE)


def _shape(mu: Tensor, split: int) -> "tuple[int, ...]":
    """The posterior's shape: mu's, or with ``split`` (mu is ldm's ``parameters``) that of one half along dim 1."""
    if not split:
        return tuple(mu.shape)
    return (mu.shape[0], mu.shape[1] // 2, *mu.shape[2:])


def _halves(mu: Tensor, logvar: Optional[Tensor]) -> int:
    """S > 0 when mu and logvar are the two halves of one contiguous tensor split along one dim (``mu, logvar
    = h.chunk(2, dim)``): logvar lies S elements after mu and mu's strides are a contiguous tensor's, doubled
    outside the split dim; the kernels then read both in place (split mode). 0 otherwise (including halves
    that are each contiguous already, which are read in place as they are)."""
    if (logvar is None or mu.is_contiguous() or mu.dtype != logvar.dtype or mu.shape != logvar.shape
            or mu.stride() != logvar.stride() or mu.device != logvar.device
            or mu.untyped_storage().data_ptr() != logvar.untyped_storage().data_ptr()):
        return 0
    s = logvar.storage_offset() - mu.storage_offset()
    if s <= 0:
        return 0
    inner, doubled = 1, False  # inner: the size of the half inside the current dim
    for size, stride in zip(reversed(mu.shape), reversed(mu.stride())):
        doubled = doubled or inner == s
        if size != 1 and stride != (2 * inner if doubled else inner):
            return 0
        inner *= size
    return s if doubled else 0


def _posterior(mu: Tensor, logvar: Optional[Tensor], split: int) -> "tuple[Tensor, Optional[Tensor], int, bool]":
    """(mu, logvar, SPLIT, SPLIT_GRAD) as the kernels read them: ldm's ``parameters`` (split given), two halves
    of one tensor in place (``_halves``), or contiguous tensors (a copy only for another layout: an expanded
    broadcast input, a transpose)."""
    if split:
        return mu, logvar, split, True
    halves = _halves(mu, logvar)
    if halves:
        return mu, logvar, halves, False
    return mu.contiguous(), (logvar.contiguous() if logvar is not None else None), 0, False


def _z_shape(shape: "tuple[int, ...]", num_samples: int) -> "tuple[int, ...]":
    if num_samples == 0:  # not sampling
        return (0,)
    return ((num_samples,) if num_samples > 0 else ()) + tuple(shape)


def _plan(shape: "tuple[int, ...]", reduction: str) -> Reduction:
    return Reduction.plan("none" if reduction == "" else reduction, tuple(shape))


def _tile_config(n: int, k: int, per_thread: int, *tiles: "Optional[Tensor | torch.dtype]"
                 ) -> "tuple[int, int, int, bool]":
    """(BLOCK, num_warps, ROW, WIDE) for a kernel reading and writing ``tiles`` (tensors or dtypes) per
    element: a row of ROW elements is 16 bytes of the narrowest, one 128-bit access a thread, which needs
    ROW elements a thread at least; WIDE when an offset (K samples of n) could pass int32."""
    row = 16 // min((t if isinstance(t, torch.dtype) else t.dtype).itemsize for t in tiles if t is not None)
    block, warps = launch_config(n, per_thread=max(per_thread, row))
    return block, warps, row, k * n + block >= INT32_OFFSETS


def _kl_mode(reduction: str, red: Reduction) -> int:
    if reduction == "":
        return KL_OFF
    return KL_REDUCED if red.reduced else KL_ELEMENTWISE


def _z_dtype(mu: Tensor, logvar: Optional[Tensor]) -> torch.dtype:
    return mu.dtype if logvar is None else torch.promote_types(mu.dtype, logvar.dtype)


@common.custom_op("fastvae::sample_kl")
def _sample_kl_op(
    mu: Tensor,
    logvar: Optional[Tensor],
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    seed: Tensor,
    num_samples: int,
    reduction: str,
    log_ratio: bool,
    out_dtype: torch.dtype,
    form: int,
    split: int,
) -> "tuple[Tensor, Tensor, Tensor]":
    """(z, kl, log_ratio). num_samples: 0 = no sampling, -1 = one sample shaped like mu, K >= 1 = K samples
    stacked in dim 0. reduction: "" = no KL, else the KL's reduction. log_ratio: also each sample's per-row
    log p(z) - log q(z|x), shape (K, B), in fp32 at least (the KL must be off). z comes out in mu's and
    logvar's promoted dtype, the KL in ``out_dtype`` (fp32 under autocast, as torch's losses).
    form: what logvar and logvar_p hold (FORM_*). split > 0: logvar is None and mu is a contiguous (B, 2C, ...)
    ``parameters`` whose halves along dim 1 are mu and logvar, split = C * the trailing sizes. mu and logvar
    of one shape (the prior's broadcast to it: expanded views are copied here), in any layout."""
    shape = _shape(mu, split)
    mu, logvar, split, _ = _posterior(mu, logvar, split)
    mu_p = mu_p.contiguous() if mu_p is not None else None
    logvar_p = logvar_p.contiguous() if logvar_p is not None else None
    n = math.prod(shape)
    red = _plan(shape, reduction)
    kl_mode = _kl_mode(reduction, red)
    k = max(num_samples, 1)
    z = common.alloc(mu, _z_shape(shape, num_samples), _z_dtype(mu, logvar))
    kl_tile = out_dtype if kl_mode == KL_ELEMENTWISE else None
    per_thread = 4 if log_ratio or red.reduction == "per_sample" else 8
    block, warps, row, wide = _tile_config(n, max(k, 2 if split else 1), per_thread, mu, logvar, mu_p, logvar_p,
                                           z, kl_tile)
    grid = triton.cdiv(n, block)
    kl_buf = red.buffer(mu, grid, out_dtype) if kl_mode != KL_OFF else common.alloc(mu, (0,), out_dtype)
    rows = _lr_plan(shape) if log_ratio else red
    lr_stride = grid + rows.rows  # slots of one sample's row segments
    lr_buf = common.alloc(mu, (k * lr_stride,) if log_ratio else (0,), torch.float32)
    if n:
        sampling_k.sample_kl_fwd_kernel[(grid,)](
            mu, logvar, mu_p, logvar_p, seed, z, kl_buf, lr_buf, n, (n + 3) // 4, k, rows.row_len, lr_stride, split,
            SAMPLE=num_samples != 0, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            LOG_RATIO=log_ratio, PER_ROW=red.reduction == "per_sample", LONG_ROWS=rows.row_len >= block,
            BLOCK=block, ROW=row, WIDE=wide, FORM=form, HAS_SPLIT=split > 0, num_warps=warps,
        )
    if kl_mode == KL_REDUCED:
        kl_buf = red.finish(kl_buf, block, out_dtype)
    lr = common.alloc(mu, (k, rows.rows) if log_ratio else (0,), _lr_dtype(out_dtype))
    if log_ratio:
        if n:
            common.finish_rows(lr_buf, lr, rows.rows, rows.row_len, block, 1.0, sets=k, set_stride=lr_stride)
        else:
            lr.zero_()
    return z, kl_buf, lr


def _lr_plan(shape: "tuple[int, ...]") -> Reduction:
    """The rows of the log-ratio: one per sample of the batch (dim 0), as reduction="per_sample"."""
    n = math.prod(shape)
    return Reduction("per_sample", n, shape[0], n // shape[0] if shape[0] else 0, 1.0, (shape[0],))


def _lr_dtype(out_dtype: torch.dtype) -> torch.dtype:
    # a sum over a row, then exponentiated in a logsumexp: 16 bits would lose the differences that count
    return torch.promote_types(out_dtype, torch.float32)


@_sample_kl_op.register_fake
def _(mu, logvar, mu_p, logvar_p, seed, num_samples, reduction, log_ratio, out_dtype, form, split):
    shape = _shape(mu, split)
    kl_shape = (0,) if reduction == "" else _plan(shape, reduction).out_shape
    lr_shape = (max(num_samples, 1), shape[0]) if log_ratio else (0,)
    return (mu.new_empty(_z_shape(shape, num_samples), dtype=_z_dtype(mu, logvar)),
            mu.new_empty(kl_shape, dtype=out_dtype), mu.new_empty(lr_shape, dtype=_lr_dtype(out_dtype)))


@common.custom_op("fastvae::sample_kl_backward")
def _sample_kl_backward_op(
    grad_z: Optional[Tensor],
    grad_kl: Optional[Tensor],
    grad_lr: Optional[Tensor],
    mu: Tensor,
    logvar: Optional[Tensor],
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    seed: Tensor,
    num_samples: int,
    reduction: str,
    form: int,
    split: int,
) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(grad_mu, grad_logvar, grad_mu_p, grad_logvar_p); with ``split`` grad_mu is the gradient of the whole
    ``parameters`` (both halves) and grad_logvar is empty."""
    shape = _shape(mu, split)
    n = math.prod(shape)
    # the gradients contiguous, each of its input's shape (ldm's: the whole parameters; halves: two tensors)
    grad_mu, grad_logvar, grad_mu_p, grad_logvar_p = _sample_kl_grads(mu, logvar, mu_p, logvar_p, common.alloc)
    mu, logvar, split, split_grad = _posterior(mu, logvar, split)
    mu_p = mu_p.contiguous() if mu_p is not None else None
    logvar_p = logvar_p.contiguous() if logvar_p is not None else None
    has_gz = grad_z is not None and num_samples != 0
    red = _plan(shape, reduction)
    kl_mode = _kl_mode(reduction, red) if grad_kl is not None else KL_OFF
    rows = _lr_plan(shape) if grad_lr is not None else red
    gz = grad_z.contiguous() if has_gz else None
    gkl = grad_kl.contiguous() if kl_mode != KL_OFF else None
    # the noise regenerated beside up to three gradients: 8 fp32 elements a thread spill on sm_90
    block, warps, row, wide = _tile_config(n, max(num_samples, 2 if split else 1), 4, gz,
                                           gkl if kl_mode == KL_ELEMENTWISE else None, mu, logvar, mu_p, logvar_p)
    if n:
        sampling_k.sample_kl_bwd_kernel[(triton.cdiv(n, block),)](
            gz, gkl, grad_lr.contiguous() if grad_lr is not None else None,
            mu, logvar, mu_p, logvar_p, seed,
            grad_mu, grad_logvar, grad_mu_p, grad_logvar_p,
            n, (n + 3) // 4, max(num_samples, 1), red.scale, rows.row_len, rows.rows, split,
            HAS_GZ=has_gz, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            LOG_RATIO=grad_lr is not None, PER_ROW=red.reduction == "per_sample", LONG_ROWS=rows.row_len >= block,
            BLOCK=block, ROW=row, WIDE=wide, FORM=form, HAS_SPLIT=split > 0,
            CLAMP_CLOSED=CLAMP_CLOSED or form != FORM_CLAMPED, SPLIT_GRAD=split_grad, num_warps=warps,
        )
    return grad_mu, grad_logvar, grad_mu_p, grad_logvar_p


def _sample_kl_grads(mu, logvar, mu_p, logvar_p, alloc) -> "tuple[Tensor, ...]":
    """Each gradient in its input's dtype and shape, contiguous."""
    return (
        alloc(mu, mu.shape),
        alloc(logvar if logvar is not None else mu, logvar.shape if logvar is not None else (0,)),
        alloc(mu_p if mu_p is not None else mu, mu_p.shape if mu_p is not None else (0,)),
        alloc(logvar_p if logvar_p is not None else mu, logvar_p.shape if logvar_p is not None else (0,)),
    )


@_sample_kl_backward_op.register_fake
def _(grad_z, grad_kl, grad_lr, mu, logvar, mu_p, logvar_p, seed, num_samples, reduction, form, split):
    return _sample_kl_grads(mu, logvar, mu_p, logvar_p, lambda like, shape: like.new_empty(shape))


def _sample_kl_setup(ctx, inputs, output):
    mu, logvar, mu_p, logvar_p, seed, num_samples, reduction, log_ratio, out_dtype, form, split = inputs
    ctx.save_for_backward(mu, logvar, mu_p, logvar_p, seed)
    ctx.num_samples, ctx.reduction, ctx.log_ratio, ctx.form, ctx.split = num_samples, reduction, log_ratio, form, split
    ctx.out_dtype = out_dtype


def _noise_of(seed: Tensor, shape: "tuple[int, ...]", num_samples: int, device: torch.device) -> Tensor:
    """The kernel's eps, bit for bit: the op's own z for mu = 0, logvar = 0 under the same seed (0 + 1 * eps is
    exact, fused or not). Element e of sample k depends on e and k only, so it is the eps of every form and
    layout the forward read (split, halves, contiguous)."""
    zeros = torch.zeros(shape, dtype=torch.float32, device=device)
    return _sample_kl_op(zeros, zeros, None, None, seed, num_samples, "", False, torch.float32, FORM_LOGVAR, 0)[0]


def _differentiable_formula(ctx, eps: Optional[Tensor]) -> Callable:
    """(z, kl, log_ratio) as plain torch ops of (mu, logvar, mu_p, logvar_p) with the kernel's eps: what a
    create_graph backward differentiates (torch's second-order terms, any order). Mirrors the kernel's forms
    (kernels/sampling.py): FORM_CLAMPED through torch.clamp, FORM_SCALE from the standard deviations."""
    num_samples, reduction, log_ratio, form, split = (ctx.num_samples, ctx.reduction, ctx.log_ratio, ctx.form,
                                                      ctx.split)
    out_dtype = ctx.out_dtype

    def formula(mu, logvar, mu_p, logvar_p):
        z_dtype = _z_dtype(mu, logvar)
        if split:  # ldm's parameters: the halves along dim 1
            mu, logvar = mu.chunk(2, dim=1)
        mu, raw = mu.float(), logvar.float()
        if form == FORM_SCALE:
            std, lv, var = raw, 2.0 * torch.log(raw), raw * raw
        else:
            lv = torch.clamp(raw, -30.0, 20.0) if form == FORM_CLAMPED else raw
            std, var = torch.exp(0.5 * lv), torch.exp(lv)
        z = kl = lr = None
        if eps is not None:
            zf = mu + std * eps
            z = zf.to(z_dtype) if num_samples != 0 else None
            if log_ratio:
                lr = (0.5 * (eps * eps - zf * zf + lv)).reshape(eps.shape[0], eps.shape[1], -1).sum(-1)
                lr = lr.to(_lr_dtype(out_dtype))
        if reduction != "":
            d = mu if mu_p is None else mu - mu_p.float()
            if logvar_p is None:
                lvp, inv_var_p = 0.0, 1.0
            elif form == FORM_SCALE:
                sp = logvar_p.float()
                lvp, inv_var_p = 2.0 * torch.log(sp), 1.0 / (sp * sp)
            else:
                lvp = logvar_p.float()
                inv_var_p = torch.exp(-lvp)
            elementwise = 0.5 * (lvp - lv + (var + d * d) * inv_var_p - 1.0)
            kl = reference.reduce(elementwise, reduction).to(out_dtype)
        return z, kl, lr

    return formula


def _sample_kl_backward(ctx, grad_z, grad_kl, grad_lr):
    mu, logvar, mu_p, logvar_p, seed = ctx.saved_tensors
    grad_z = grad_z if ctx.num_samples != 0 else None
    grad_kl = grad_kl if ctx.reduction != "" else None
    grad_lr = grad_lr if ctx.log_ratio else None
    if torch.is_grad_enabled():
        # create_graph=True: the formulas on the saved inputs and the regenerated eps, differentiated with the
        # graph kept (the kernel's one-pass backward writes plain values, which would drop second-order terms)
        eps = None
        if grad_z is not None or grad_lr is not None:
            eps = _noise_of(seed, _shape(mu, ctx.split), ctx.num_samples, mu.device)
            if ctx.log_ratio and ctx.num_samples == -1:
                eps = eps.unsqueeze(0)
        return common.differentiable_backward(
            _differentiable_formula(ctx, eps), (mu, logvar, mu_p, logvar_p), ctx.needs_input_grad[:4],
            (grad_z, grad_kl, grad_lr),
        ) + (None,) * 7
    gmu, glv, gmup, glvp = _sample_kl_backward_op(
        grad_z, grad_kl, grad_lr,
        mu, logvar, mu_p, logvar_p, seed, ctx.num_samples, ctx.reduction, ctx.form, ctx.split,
    )
    return (
        gmu, glv if logvar is not None else None,
        gmup if mu_p is not None else None,
        glvp if logvar_p is not None else None,
        None, None, None, None, None, None, None,
    )


_sample_kl_op.register_autograd(_sample_kl_backward, setup_context=_sample_kl_setup)
common.register_autocast_fp32(_sample_kl_op, 8)


def sample_kl(
    mu: Tensor,
    logvar: Optional[Tensor],
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    *,
    sample: bool,
    num_samples: Optional[int],
    generator: Optional[torch.Generator],
    reduction: Optional[str],
    out_dtype: torch.dtype,
    form: int = FORM_LOGVAR,
) -> "tuple[Optional[Tensor], Optional[Tensor]]":
    """Validated arguments in, (z or None, kl or None) out, the KL in ``out_dtype``. ``form``: what logvar and
    logvar_p hold (FORM_SCALE: standard deviations). ``logvar=None``: mu is ldm's ``parameters`` (B, 2C, ...),
    its halves along dim 1 the mean and the log-variance, read in place."""
    split = 0
    if logvar is None:
        mu = mu.contiguous()  # a view already contiguous is read in place
        split = mu[0, : mu.shape[1] // 2].numel() if mu.shape[0] else 0
        shape = _shape(mu, 1)
    else:
        # mu and logvar broadcast together (a shared (1, D) logvar, say): expanded views, which the op copies
        # (autograd's expand backward sums the gradient back); halves of one tensor are read in place there
        shape = tuple(broadcast_shapes(mu.shape, logvar.shape, *(t.shape for t in (mu_p, logvar_p) if t is not None)))
        mu = mu if mu.shape == shape else mu.expand(shape)
        logvar = logvar if logvar.shape == shape else logvar.expand(shape)
    # a broadcast prior is expanded (a view); the op copies it, autograd's expand backward reduces its gradient
    if mu_p is not None and mu_p.shape != shape:
        mu_p = mu_p.expand(shape)
    if logvar_p is not None and logvar_p.shape != shape:
        logvar_p = logvar_p.expand(shape)
    if logvar is None and split == 0:  # an empty batch: nothing to split, the halves as plain tensors
        mu, logvar = mu.chunk(2, dim=1)
    k = (-1 if num_samples is None else num_samples) if sample else 0
    if not sample:
        seed = torch.zeros(1, dtype=torch.int64, device=mu.device)
    elif generator is not None and generator.device.type != mu.device.type:  # a CPU generator for CUDA tensors
        seed = common.new_seed(generator.device, generator).to(mu.device)
    else:
        seed = common.new_seed(mu.device, generator)
    z, kl, _ = _sample_kl_op(mu, logvar, mu_p, logvar_p, seed, k, reduction or "", False, out_dtype, form, split)
    return (z if sample else None), (kl if reduction is not None else None)


def sample_log_weights(mu: Tensor, logvar: Tensor, *, num_samples: int, generator: Optional[torch.Generator],
                       out_dtype: torch.dtype) -> "tuple[Tensor, Tensor]":
    """Validated arguments in, (z of shape (K, *mu.shape), log_ratio of shape (K, B)) out."""
    seed = common.new_seed(mu.device, generator)
    z, _, lr = _sample_kl_op(mu, logvar, None, None, seed, num_samples, "", True, out_dtype, FORM_LOGVAR, 0)
    return z, lr
