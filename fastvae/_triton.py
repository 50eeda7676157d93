"""Launches of the Triton kernels, wrapped as ``torch.library`` custom ops with autograd.

Custom ops (rather than bare ``autograd.Function``s) make every launch opaque to ``torch.compile``: a
training step that calls fastvae compiles with ``fullgraph=True`` and the kernels run as they are. They also
run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how CI tests the kernels.

Nothing here reads a device value on the host: the RNG seed is drawn into a one-element device tensor, the
reductions are finished on the device, and grad_output is read by the kernels themselves.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
from torch import Tensor

from .kernels import gaussian_nll as nll_k
from .kernels import reduce as reduce_k
from .kernels import sampling as sampling_k
from .reference import reduction_scale

KL_OFF, KL_ELEMENTWISE, KL_REDUCED = 0, 1, 2
VAR_FULL, VAR_SCALAR, VAR_INDEXED = 0, 1, 2
GV_OFF, GV_ELEMENTWISE, GV_PARTIAL = 0, 1, 2


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 8 elements a thread keeps enough bytes in flight to saturate HBM with few
    programs; small tensors get one small block."""
    block = min(2048, max(128, triton.next_power_of_2(max(n, 1))))
    return block, max(1, min(8, block // 256))


def _alloc(like: Tensor, shape, dtype: torch.dtype | None = None) -> Tensor:
    """Every buffer a kernel writes comes from here (the tests poison them to prove full coverage)."""
    return like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)


def _finish_sum(partials: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    out = _alloc(partials, (), dtype)
    reduce_k.sum_partials_kernel[(1,)](partials, out, partials.numel(), scale, BLOCK=1024)
    return out


def _z_shape(mu: Tensor, num_samples: int) -> tuple[int, ...]:
    if num_samples == 0:  # not sampling
        return (0,)
    return ((num_samples,) if num_samples > 0 else ()) + tuple(mu.shape)


# --------------------------------------------------------------------------------------------------------
# sampling + KL
# --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvae::sample_kl", mutates_args=())
def _sample_kl_op(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Optional[Tensor],
    logvar_p: Optional[Tensor],
    seed: Tensor,
    num_samples: int,
    kl_mode: int,
    kl_scale: float,
) -> tuple[Tensor, Tensor]:
    """num_samples: 0 = no sampling, -1 = one sample shaped like mu, K >= 1 = K samples stacked in dim 0."""
    n = mu.numel()
    sample = num_samples != 0
    k = max(num_samples, 1)
    z = _alloc(mu, _z_shape(mu, num_samples))
    block, warps = _launch_config(n)
    grid = (triton.cdiv(n, block),)
    kl_buf = _alloc(mu, {KL_ELEMENTWISE: mu.shape, KL_REDUCED: grid}.get(kl_mode, (0,)),
                    torch.float32 if kl_mode == KL_REDUCED else None)
    if n:
        sampling_k.sample_kl_fwd_kernel[grid](
            mu, logvar, mu_p, logvar_p, seed, z, kl_buf, n, k,
            SAMPLE=sample, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            BLOCK=block, num_warps=warps,
        )
    if kl_mode == KL_REDUCED:
        kl_buf = _finish_sum(kl_buf, kl_scale, mu.dtype)
    return z, kl_buf


@_sample_kl_op.register_fake
def _(mu, logvar, mu_p, logvar_p, seed, num_samples, kl_mode, kl_scale):
    return mu.new_empty(_z_shape(mu, num_samples)), mu.new_empty({KL_ELEMENTWISE: mu.shape, KL_REDUCED: ()}
                                                                  .get(kl_mode, (0,)))


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
    kl_mode: int,
    kl_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = mu.numel()
    grad_mu, grad_logvar, grad_mu_p, grad_logvar_p = _sample_kl_grads(mu, mu_p, logvar_p, _alloc)
    has_gz = grad_z is not None and num_samples != 0
    if grad_kl is None:
        kl_mode = KL_OFF
    block, warps = _launch_config(n)
    if n:
        sampling_k.sample_kl_bwd_kernel[(triton.cdiv(n, block),)](
            grad_z.contiguous() if has_gz else None, grad_kl.contiguous() if kl_mode != KL_OFF else None,
            mu, logvar, mu_p, logvar_p, seed,
            grad_mu, grad_logvar, grad_mu_p, grad_logvar_p,
            n, max(num_samples, 1), kl_scale,
            HAS_GZ=has_gz, KL_MODE=kl_mode, HAS_MU_P=mu_p is not None, HAS_LV_P=logvar_p is not None,
            BLOCK=block, num_warps=warps,
        )
    return grad_mu, grad_logvar, grad_mu_p, grad_logvar_p


def _sample_kl_grads(mu: Tensor, mu_p: Tensor | None, logvar_p: Tensor | None, alloc) -> tuple[Tensor, ...]:
    return (
        alloc(mu, mu.shape),
        alloc(mu, mu.shape),
        alloc(mu, mu_p.shape if mu_p is not None else (0,)),
        alloc(mu, logvar_p.shape if logvar_p is not None else (0,)),
    )


@_sample_kl_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, mu_p, logvar_p, seed, num_samples, kl_mode, kl_scale):
    return _sample_kl_grads(mu, mu_p, logvar_p, lambda like, shape: like.new_empty(shape))


def _sample_kl_setup(ctx, inputs, output):
    mu, logvar, mu_p, logvar_p, seed, num_samples, kl_mode, kl_scale = inputs
    # the seed (8 bytes) is all the noise costs: eps is regenerated in backward
    ctx.save_for_backward(mu, logvar, mu_p, logvar_p, seed)
    ctx.num_samples, ctx.kl_mode, ctx.kl_scale = num_samples, kl_mode, kl_scale


def _sample_kl_backward(ctx, grad_z, grad_kl):
    mu, logvar, mu_p, logvar_p, seed = ctx.saved_tensors
    gmu, glv, gmup, glvp = _sample_kl_backward_op(
        grad_z if ctx.num_samples != 0 else None,
        grad_kl if ctx.kl_mode != KL_OFF else None,
        mu, logvar, mu_p, logvar_p, seed, ctx.num_samples, ctx.kl_mode, ctx.kl_scale,
    )
    return (
        gmu, glv,
        gmup if mu_p is not None else None,
        glvp if logvar_p is not None else None,
        None, None, None, None,
    )


_sample_kl_op.register_autograd(_sample_kl_backward, setup_context=_sample_kl_setup)


def new_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A Philox seed drawn by torch's generator into device memory: no host sync, advances torch's RNG
    state (consecutive calls differ), follows torch.manual_seed, and is re-drawn on each CUDA-graph replay."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device, generator=generator)


def sample_kl(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Tensor | None,
    logvar_p: Tensor | None,
    *,
    sample: bool,
    num_samples: int | None,
    generator: torch.Generator | None,
    reduction: str | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Validated arguments in, (z or None, kl or None) out."""
    out_dtype = mu.dtype
    mu, logvar = mu.contiguous(), logvar.contiguous()
    # a broadcast prior is expanded once; autograd's expand backward reduces its gradient
    if mu_p is not None:
        mu_p = mu_p.to(out_dtype).expand(mu.shape).contiguous()
    if logvar_p is not None:
        logvar_p = logvar_p.to(out_dtype).expand(mu.shape).contiguous()
    if reduction is None:
        kl_mode, kl_scale = KL_OFF, 1.0
    elif reduction == "none":
        kl_mode, kl_scale = KL_ELEMENTWISE, 1.0
    else:
        kl_mode, kl_scale = KL_REDUCED, reduction_scale(reduction, mu.numel(), mu.shape)
    k = (-1 if num_samples is None else num_samples) if sample else 0
    seed = new_seed(mu.device, generator) if sample else torch.zeros(1, dtype=torch.int64, device=mu.device)
    z, kl = _sample_kl_op(mu, logvar, mu_p, logvar_p, seed, k, kl_mode, kl_scale)
    return (z if sample else None), (kl if reduction is not None else None)


# --------------------------------------------------------------------------------------------------------
# Gaussian NLL
# --------------------------------------------------------------------------------------------------------


def _var_index(in_shape: torch.Size, var_shape: torch.Size) -> tuple[int, int, int, int, int] | None:
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


def _var_grad_plan(var_mode: int, reduction: str, grad_var: bool, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """How the variance's gradient is written: per program and summed (a scalar variance under a
    reduction), per element in var's dtype (a full variance), or per element in fp32 and summed over the
    broadcast dims in backward (any other broadcast, and reduction="none", whose grad_output is per element)."""
    if not grad_var:
        return GV_OFF, dtype
    if var_mode == VAR_SCALAR and reduction != "none":
        return GV_PARTIAL, torch.float32
    if var_mode == VAR_FULL:
        return GV_ELEMENTWISE, dtype
    return GV_ELEMENTWISE, torch.float32


def nll_supported(input: Tensor, target: Tensor, var: Tensor) -> bool:
    """What the kernel covers; anything else takes the eager reference, with torch's semantics."""
    return (
        input.shape == target.shape
        and input.dtype == target.dtype == var.dtype
        and var.dim() == input.dim()
        and _var_index(input.shape, var.shape) is not None
    )


@torch.library.custom_op("fastvae::gaussian_nll", mutates_args=())
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dloss/dinput, dloss/dvar, negative-var flag); the gradients scaled by the reduction."""
    n = input.numel()
    dev = input.device
    mode, v_div, v_mod, v_mul, v_mod2 = _var_index(input.shape, var.shape)
    block, warps = _launch_config(n)
    grid = (triton.cdiv(n, block),)
    reduce = reduction != "none"
    scale = reduction_scale(reduction, n, input.shape)
    loss = _alloc(input, grid, torch.float32) if reduce else _alloc(input, input.shape)
    gx = _alloc(input, input.shape if grad_input else (0,))
    gv_mode, gv_dtype = _var_grad_plan(mode, reduction, grad_var, input.dtype)
    gv = _alloc(input, {GV_OFF: (0,), GV_PARTIAL: grid}.get(gv_mode, input.shape), gv_dtype)
    neg = torch.zeros(1, dtype=torch.int32, device=dev)
    if n:
        nll_k.gaussian_nll_fwd_kernel[grid](
            input, target, var if mode != VAR_SCALAR else var.reshape(-1)[:1],
            loss, gx, gv, neg,
            n, v_div, v_mod, v_mul, v_mod2,
            eps, 0.5 * math.log(2 * math.pi) if full else 0.0, scale,
            LOGVAR=logvar_form, VAR_MODE=mode, REDUCE=reduce,
            GRAD_X=grad_input, GRAD_VAR=gv_mode, BLOCK=block, num_warps=warps,
        )
    if reduce:
        loss = _finish_sum(loss, scale, input.dtype)
    if gv_mode == GV_PARTIAL:
        gv = _finish_sum(gv, scale, torch.float32)
    return loss, gx, gv, neg


@_gaussian_nll_op.register_fake
def _(input, target, var, full, eps, reduction, logvar_form, grad_input, grad_var):
    loss = input.new_empty(() if reduction != "none" else input.shape)
    gx = input.new_empty(input.shape if grad_input else (0,))
    gv_mode, gv_dtype = _var_grad_plan(_var_index(input.shape, var.shape)[0], reduction, grad_var, input.dtype)
    gv = input.new_empty({GV_OFF: (0,), GV_PARTIAL: ()}.get(gv_mode, input.shape), dtype=gv_dtype)
    return loss, gx, gv, input.new_empty(1, dtype=torch.int32)


@torch.library.custom_op("fastvae::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output in place; a no-op on the device when grad_output is a scalar 1.0."""
    n = grad.numel()
    if n == 0:
        return
    per_element = grad_output.numel() != 1
    block, warps = _launch_config(n)
    reduce_k.scale_grad_kernel[(triton.cdiv(n, block),)](
        grad, grad_output.contiguous(), n, PER_ELEMENT=per_element, BLOCK=block, num_warps=warps
    )


@_scale_grad_op.register_fake
def _(grad, grad_output):
    return None


def _nll_setup(ctx, inputs, output):
    input, target, var, full, eps, reduction, logvar_form, grad_input, grad_var = inputs
    _, gx, gv, neg = output
    ctx.mark_non_differentiable(gx, gv, neg)
    # the gradients the forward wrote are what backward needs; scaling them in place bumps their
    # version, so a second backward through the same graph fails loudly instead of double-scaling
    ctx.save_for_backward(gx, gv)
    ctx.var_shape, ctx.var_dtype, ctx.reduction = var.shape, var.dtype, reduction


def _nll_backward(ctx, grad_loss, _gx, _gv, _neg):
    gx, gv = ctx.saved_tensors
    need_input, need_target, need_var = ctx.needs_input_grad[:3]
    grad_input = grad_target = grad_var = None
    if need_input or need_target:
        _scale_grad_op(gx, grad_loss)
        grad_input = gx if need_input else None
        grad_target = -gx if need_target else None
    if need_var:
        if gv.shape == ctx.var_shape and gv.dtype == ctx.var_dtype:
            _scale_grad_op(gv, grad_loss)
            grad_var = gv
        else:  # a scalar total, or per-element terms of a broadcast variance
            g = gv * grad_loss
            grad_var = (g.reshape(ctx.var_shape) if g.numel() == 1 else g.sum_to_size(ctx.var_shape)).to(
                ctx.var_dtype
            )
    return grad_input, grad_target, grad_var, None, None, None, None, None, None


_gaussian_nll_op.register_autograd(_nll_backward, setup_context=_nll_setup)


def gaussian_nll(
    input: Tensor, target: Tensor, var: Tensor, *, logvar_form: bool, full: bool, eps: float, reduction: str
) -> Tensor:
    """Validated arguments in (var already shaped to input's ndim, see nll_supported), loss out."""
    grad = torch.is_grad_enabled()
    need_x = grad and (input.requires_grad or target.requires_grad)
    need_v = grad and var.requires_grad
    var_c = var if var.numel() == 1 else var.contiguous()
    loss, _, _, neg = _gaussian_nll_op(
        input.contiguous(), target.contiguous(), var_c, full, float(eps), reduction, logvar_form, need_x, need_v
    )
    if not logvar_form:
        _raise_on_negative(neg)
    return loss


def _raise_on_negative(neg: Tensor) -> None:
    if neg.device.type == "cpu":
        if not torch.compiler.is_compiling() and bool(neg.item()):
            raise ValueError("var has negative entry/entries")
    else:
        # device-side assert: no host sync, also legal under compile and CUDA-graph capture
        torch._assert_async(neg == 0, "var has negative entry/entries")
