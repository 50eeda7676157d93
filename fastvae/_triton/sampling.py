"""Reparameterized sampling fused with the KL: launches of ``kernels/sampling.py`` as custom ops.

eps is drawn inside the kernel from a seed that torch's generator draws into a one-element device tensor and
regenerated in backward: the seed (8 bytes) is all the noise costs in memory.
"""

import math
from typing import Optional

import torch
import triton
from torch import Tensor

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


@torch.library.custom_op("fastvae::sample_kl", mutates_args=())
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
    ``parameters`` whose halves along dim 1 are mu and logvar, split = C * the trailing sizes."""
    shape = _shape(mu, split)
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
            mu, logvar, mu_p, logvar_p, seed, z, kl_buf, lr_buf, n, k, rows.row_len, lr_stride, split,
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


@torch.library.custom_op("fastvae::sample_kl_backward", mutates_args=())
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
    grad_mu, grad_logvar, grad_mu_p, grad_logvar_p = _sample_kl_grads(mu, logvar, mu_p, logvar_p, common.alloc)
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
            n, max(num_samples, 1), red.scale, rows.row_len, rows.rows, split,
            HAS_GZ=has_gz, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            LOG_RATIO=grad_lr is not None, PER_ROW=red.reduction == "per_sample", LONG_ROWS=rows.row_len >= block,
            BLOCK=block, ROW=row, WIDE=wide, FORM=form, HAS_SPLIT=split > 0,
            CLAMP_CLOSED=CLAMP_CLOSED or form != FORM_CLAMPED, num_warps=warps,
        )
    return grad_mu, grad_logvar, grad_mu_p, grad_logvar_p


def _sample_kl_grads(mu, logvar, mu_p, logvar_p, alloc) -> "tuple[Tensor, ...]":
    """Each gradient in its input's dtype."""
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


def _sample_kl_backward(ctx, grad_z, grad_kl, grad_lr):
    mu, logvar, mu_p, logvar_p, seed = ctx.saved_tensors
    gmu, glv, gmup, glvp = _sample_kl_backward_op(
        grad_z if ctx.num_samples != 0 else None,
        grad_kl if ctx.reduction != "" else None,
        grad_lr if ctx.log_ratio else None,
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
        mu, logvar = mu.contiguous(), logvar.contiguous()
        shape = tuple(mu.shape)
    # a broadcast prior is expanded once; autograd's expand backward reduces its gradient
    if mu_p is not None:
        mu_p = mu_p.expand(shape).contiguous()
    if logvar_p is not None:
        logvar_p = logvar_p.expand(shape).contiguous()
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
    z, _, lr = _sample_kl_op(mu.contiguous(), logvar.contiguous(), None, None, seed, num_samples, "", True,
                             out_dtype, FORM_LOGVAR, 0)
    return z, lr
