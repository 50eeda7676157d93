"""Reparameterized sampling fused with the KL: launches of ``kernels/sampling.py`` as custom ops.

eps is drawn inside the kernel from a seed that torch's generator draws into a one-element device tensor and
regenerated in backward: the seed (8 bytes) is all the noise costs in memory.
"""

from typing import Optional

import torch
import triton
from torch import Tensor

from ..kernels import sampling as sampling_k
from . import common
from .common import Reduction, launch_config

KL_OFF, KL_ELEMENTWISE, KL_REDUCED = 0, 1, 2


def _z_shape(mu: Tensor, num_samples: int) -> "tuple[int, ...]":
    if num_samples == 0:  # not sampling
        return (0,)
    return ((num_samples,) if num_samples > 0 else ()) + tuple(mu.shape)


def _plan(mu: Tensor, reduction: str) -> Reduction:
    return Reduction.plan("none" if reduction == "" else reduction, tuple(mu.shape))


def _kl_mode(reduction: str, red: Reduction) -> int:
    if reduction == "":
        return KL_OFF
    return KL_REDUCED if red.reduced else KL_ELEMENTWISE


@torch.library.custom_op("fastvae::sample_kl", mutates_args=())
def _sample_kl_op(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    seed: Tensor,
    num_samples: int,
    reduction: str,
    out_dtype: torch.dtype,
) -> "tuple[Tensor, Tensor]":
    """num_samples: 0 = no sampling, -1 = one sample shaped like mu, K >= 1 = K samples stacked in dim 0.
    reduction: "" = no KL, else the KL's reduction. z comes out in mu's and logvar's promoted dtype, the KL
    in ``out_dtype`` (fp32 under autocast, as torch's losses)."""
    n = mu.numel()
    red = _plan(mu, reduction)
    kl_mode = _kl_mode(reduction, red)
    z = common.alloc(mu, _z_shape(mu, num_samples), torch.promote_types(mu.dtype, logvar.dtype))
    block, warps = launch_config(n)
    grid = triton.cdiv(n, block)
    kl_buf = red.buffer(mu, grid, out_dtype) if kl_mode != KL_OFF else common.alloc(mu, (0,), out_dtype)
    if n:
        sampling_k.sample_kl_fwd_kernel[(grid,)](
            mu, logvar, mu_p, logvar_p, seed, z, kl_buf, n, max(num_samples, 1), red.row_len,
            SAMPLE=num_samples != 0, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            PER_ROW=red.reduction == "per_sample", LONG_ROWS=red.row_len >= block, BLOCK=block, num_warps=warps,
        )
    if kl_mode == KL_REDUCED:
        kl_buf = red.finish(kl_buf, block, out_dtype)
    return z, kl_buf


@_sample_kl_op.register_fake
def _(mu, logvar, mu_p, logvar_p, seed, num_samples, reduction, out_dtype):
    kl_shape = (0,) if reduction == "" else _plan(mu, reduction).out_shape
    z_dtype = torch.promote_types(mu.dtype, logvar.dtype)
    return mu.new_empty(_z_shape(mu, num_samples), dtype=z_dtype), mu.new_empty(kl_shape, dtype=out_dtype)


@torch.library.custom_op("fastvae::sample_kl_backward", mutates_args=())
def _sample_kl_backward_op(
    grad_z: Optional[Tensor],
    grad_kl: Optional[Tensor],
    mu: Tensor,
    logvar: Tensor,
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    seed: Tensor,
    num_samples: int,
    reduction: str,
) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    n = mu.numel()
    grad_mu, grad_logvar, grad_mu_p, grad_logvar_p = _sample_kl_grads(mu, logvar, mu_p, logvar_p, common.alloc)
    has_gz = grad_z is not None and num_samples != 0
    red = _plan(mu, reduction)
    kl_mode = _kl_mode(reduction, red) if grad_kl is not None else KL_OFF
    block, warps = launch_config(n)
    if n:
        sampling_k.sample_kl_bwd_kernel[(triton.cdiv(n, block),)](
            grad_z.contiguous() if has_gz else None, grad_kl.contiguous() if kl_mode != KL_OFF else None,
            mu, logvar, mu_p, logvar_p, seed,
            grad_mu, grad_logvar, grad_mu_p, grad_logvar_p,
            n, max(num_samples, 1), red.scale, red.row_len,
            HAS_GZ=has_gz, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            PER_ROW=red.reduction == "per_sample", LONG_ROWS=red.row_len >= block, BLOCK=block, num_warps=warps,
        )
    return grad_mu, grad_logvar, grad_mu_p, grad_logvar_p


def _sample_kl_grads(mu, logvar, mu_p, logvar_p, alloc) -> "tuple[Tensor, ...]":
    """Each gradient in its input's dtype."""
    return (
        alloc(mu, mu.shape),
        alloc(logvar, logvar.shape),
        alloc(mu_p if mu_p is not None else mu, mu_p.shape if mu_p is not None else (0,)),
        alloc(logvar_p if logvar_p is not None else mu, logvar_p.shape if logvar_p is not None else (0,)),
    )


@_sample_kl_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, mu_p, logvar_p, seed, num_samples, reduction):
    return _sample_kl_grads(mu, logvar, mu_p, logvar_p, lambda like, shape: like.new_empty(shape))


def _sample_kl_setup(ctx, inputs, output):
    mu, logvar, mu_p, logvar_p, seed, num_samples, reduction, out_dtype = inputs
    ctx.save_for_backward(mu, logvar, mu_p, logvar_p, seed)
    ctx.num_samples, ctx.reduction = num_samples, reduction


def _sample_kl_backward(ctx, grad_z, grad_kl):
    mu, logvar, mu_p, logvar_p, seed = ctx.saved_tensors
    gmu, glv, gmup, glvp = _sample_kl_backward_op(
        grad_z if ctx.num_samples != 0 else None,
        grad_kl if ctx.reduction != "" else None,
        mu, logvar, mu_p, logvar_p, seed, ctx.num_samples, ctx.reduction,
    )
    return (
        gmu, glv,
        gmup if mu_p is not None else None,
        glvp if logvar_p is not None else None,
        None, None, None, None,
    )


_sample_kl_op.register_autograd(_sample_kl_backward, setup_context=_sample_kl_setup)
common.register_autocast_fp32(_sample_kl_op, 7)


def sample_kl(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    *,
    sample: bool,
    num_samples: Optional[int],
    generator: Optional[torch.Generator],
    reduction: Optional[str],
    out_dtype: torch.dtype,
) -> "tuple[Optional[Tensor], Optional[Tensor]]":
    """Validated arguments in, (z or None, kl or None) out, the KL in ``out_dtype``."""
    mu, logvar = mu.contiguous(), logvar.contiguous()
    # a broadcast prior is expanded once; autograd's expand backward reduces its gradient
    if mu_p is not None:
        mu_p = mu_p.expand(mu.shape).contiguous()
    if logvar_p is not None:
        logvar_p = logvar_p.expand(mu.shape).contiguous()
    k = (-1 if num_samples is None else num_samples) if sample else 0
    seed = common.new_seed(mu.device, generator) if sample else torch.zeros(1, dtype=torch.int64, device=mu.device)
    z, kl = _sample_kl_op(mu, logvar, mu_p, logvar_p, seed, k, reduction or "", out_dtype)
    return (z if sample else None), (kl if reduction is not None else None)
