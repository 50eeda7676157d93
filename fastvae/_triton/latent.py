"""The batch-level latent terms' launches (``kernels/latent.py``) as custom ops with autograd.

Forward saves O(B D) per-row statistics (the joint log-sum-exp, which is log q(z) itself, and the per-dim
ones); backward recomputes every tile from them. Gradients are written by programs that own them (row tiles
for z, column tiles for mu and logvar; row tiles of x and of y for the MMD): no float atomics.
"""

import math

import torch
import triton
from torch import Tensor

from ..kernels import latent as latent_k
from . import common


def tc_blocks(dim: int, elements: int = 8192) -> "tuple[int, int, int]":
    """(BLOCK_I, BLOCK_J, BLOCK_D): a [BI, BJ, BD] tile of at most ``elements`` fp32 (8192: 32 a thread of 8
    warps), the columns tile at most 16 deep, up to 128 rows (small D: more pairs a tile, fewer passes over
    the columns). No tl.dot here, so BD follows D down to 1. The forward and the row kernel of backward take
    4096, where sm_90 compiles them without spills under triton 3.6 and 3.9; the column kernel 8192."""
    bd = triton.next_power_of_2(dim)
    per = max(1, elements // bd)
    bj = min(16, max(2, per // 16))
    return max(1, min(128, per // bj)), bj, bd


def _log_weights(batch: int, dataset_size: int, mss: bool) -> "tuple[float, float, float]":
    """(lw_own, lw_strat, lw_other) as the kernels take them."""
    if not mss:
        lw = -math.log(batch * dataset_size)
        return lw, lw, lw
    m = batch - 1
    return (-math.log(dataset_size), math.log(dataset_size - m) - math.log(dataset_size) - math.log(m),
            -math.log(m))


@torch.library.custom_op("fastvae::tc_log_densities", mutates_args=())
def _tc_op(z: Tensor, mu: Tensor, logvar: Tensor, row_offset: int, dataset_size: int, mss: bool
           ) -> "tuple[Tensor, Tensor, Tensor, Tensor, Tensor]":
    """(log_qz, log_prod_qzi, log_qzx, log_pz, lse_d) in fp32: rows z (R, D) against the columns mu/logvar
    (B, D); lse_d (R, D) is the per-dim log-sum-exp backward recomputes from."""
    rows, dim = z.shape
    batch = mu.shape[0]
    outs = [common.alloc(z, (rows,), torch.float32) for _ in range(4)]
    lse_d = common.alloc(z, (rows, dim), torch.float32)
    bi, bj, bd = tc_blocks(dim, 4096)
    if rows:
        latent_k.tc_fwd_kernel[(triton.cdiv(rows, bi),)](
            z, mu, logvar, *outs, lse_d, rows, batch, dim, row_offset, *_log_weights(batch, dataset_size, mss),
            BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, num_warps=8,
        )
    return (*outs, lse_d)


@_tc_op.register_fake
def _(z, mu, logvar, row_offset, dataset_size, mss):
    rows = z.shape[0]
    return (*(z.new_empty((rows,), dtype=torch.float32) for _ in range(4)),
            z.new_empty(z.shape, dtype=torch.float32))


@torch.library.custom_op("fastvae::tc_log_densities_backward", mutates_args=())
def _tc_backward_op(g_qz: Tensor, g_prod: Tensor, g_qzx: Tensor, g_pz: Tensor, z: Tensor, mu: Tensor,
                    logvar: Tensor, log_qz: Tensor, lse_d: Tensor, row_offset: int, dataset_size: int, mss: bool
                    ) -> "tuple[Tensor, Tensor, Tensor]":
    rows, dim = z.shape
    batch = mu.shape[0]
    dz, dmu, dlv = common.alloc(z, z.shape), common.alloc(mu, mu.shape), common.alloc(logvar, logvar.shape)
    lw = _log_weights(batch, dataset_size, mss)
    grads = [g.contiguous() for g in (g_qz, g_prod, g_qzx, g_pz)]
    if rows:
        ri, rj, bd = tc_blocks(dim, 4096)
        latent_k.tc_bwd_rows_kernel[(triton.cdiv(rows, ri),)](
            z, mu, logvar, log_qz, lse_d, *grads, dz, rows, batch, dim, row_offset, *lw,
            BLOCK_I=ri, BLOCK_J=rj, BLOCK_D=bd, num_warps=8,
        )
    bi, bj, bd = tc_blocks(dim)
    if batch:
        # column tiles as deep as the row kernel's row tiles, streaming row tiles as shallow as its columns
        latent_k.tc_bwd_cols_kernel[(triton.cdiv(batch, bi),)](
            z, mu, logvar, log_qz, lse_d, *grads[:3], dmu, dlv, rows, batch, dim, row_offset, *lw,
            BLOCK_I=bj, BLOCK_J=bi, BLOCK_D=bd, num_warps=8,
        )
    return dz, dmu, dlv


@_tc_backward_op.register_fake
def _(g_qz, g_prod, g_qzx, g_pz, z, mu, logvar, log_qz, lse_d, row_offset, dataset_size, mss):
    return torch.empty_like(z), torch.empty_like(mu), torch.empty_like(logvar)


def _tc_setup(ctx, inputs, output):
    z, mu, logvar, row_offset, dataset_size, mss = inputs
    ctx.save_for_backward(z, mu, logvar, output[0], output[4])
    ctx.args = (row_offset, dataset_size, mss)
    ctx.set_materialize_grads(True)


def _tc_backward(ctx, g_qz, g_prod, g_qzx, g_pz, _g_lse_d):
    z, mu, logvar, log_qz, lse_d = ctx.saved_tensors
    dz, dmu, dlv = _tc_backward_op(g_qz, g_prod, g_qzx, g_pz, z, mu, logvar, log_qz, lse_d, *ctx.args)
    return dz, dmu, dlv, None, None, None


_tc_op.register_autograd(_tc_backward, setup_context=_tc_setup)


def tc_log_densities(z: Tensor, mu: Tensor, logvar: Tensor, *, dataset_size: int, mss: bool, row_offset: int
                     ) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """Validated arguments in, (log_qz, log_prod_qzi, log_qzx, log_pz) per row out, fp32."""
    out = _tc_op(z.contiguous(), mu.contiguous(), logvar.contiguous(), row_offset, dataset_size, mss)
    return out[0], out[1], out[2], out[3]


# the forward keeps two block sums live beside the dot: 16 x 32 tiles, where sm_90 does not spill under
# triton 3.6 or 3.9 (16 x 16 spills under 3.9); backward 32 x 32
MMD_BLOCK_I, MMD_BLOCK_J, MMD_FWD_BLOCK_I, MMD_FWD_BLOCK_J, MMD_WARPS = 32, 32, 16, 32, 8
MMD_FWD_SCALES = 2  # scales a forward launch sums: more (WAE's 7) spill under triton 3.6; the rest, more launches


def _mmd_k(dim: int) -> int:
    # K = 16 tiles spill on sm_90 (tf32x3 splits each operand in two): small D pads to 32, the dot is cheap
    return min(64, max(32, triton.next_power_of_2(dim)))


def _mmd_plan(n: int, m: int, mode: str) -> "tuple[float, float, float]":
    from ..reference.latent import mmd_coefficients

    return mmd_coefficients(n, m, mode)


@torch.library.custom_op("fastvae::mmd", mutates_args=())
def _mmd_op(x: Tensor, y: Tensor, inv: Tensor, imq: bool, mode: str, out_dtype: torch.dtype) -> Tensor:
    """MMD^2 (0-d, ``out_dtype``) of x (n, D) and y (m, D), with the reciprocals of the scales in ``inv``
    (fp32, on the device: the kernels loop over them)."""
    (n, dim), m = x.shape, y.shape[0]
    cxx, cyy, cxy = _mmd_plan(n, m, mode)
    gx, gy = triton.cdiv(n, MMD_FWD_BLOCK_I), triton.cdiv(m, MMD_FWD_BLOCK_I)
    chunks = range(0, inv.numel(), MMD_FWD_SCALES)
    partials = common.alloc(x, ((gx + gy) * len(chunks),), torch.float32)
    skip, paired = mode != "biased", mode == "paired"
    cfg = dict(BLOCK_I=MMD_FWD_BLOCK_I, BLOCK_J=MMD_FWD_BLOCK_J, BLOCK_K=_mmd_k(dim), num_warps=MMD_WARPS)
    for c, s0 in enumerate(chunks):
        part, scales = partials[c * (gx + gy):], inv[s0:s0 + MMD_FWD_SCALES]
        latent_k.mmd_fwd_kernel[(gx,)](x, x, y, scales, part, n, n, m, dim, scales.numel(), cxx, -2.0 * cxy,
                                       IMQ=imq, SKIP1=skip, SKIP2=paired, HAS_B2=True, **cfg)
        latent_k.mmd_fwd_kernel[(gy,)](y, y, y, scales, part[gx:], m, m, m, dim, scales.numel(), cyy, 0.0,
                                       IMQ=imq, SKIP1=skip, SKIP2=False, HAS_B2=False, **cfg)
    return common.finish_sum(partials, 1.0, out_dtype)


@_mmd_op.register_fake
def _(x, y, inv, imq, mode, out_dtype):
    return x.new_empty((), dtype=out_dtype)


@torch.library.custom_op("fastvae::mmd_backward", mutates_args=())
def _mmd_backward_op(grad: Tensor, x: Tensor, y: Tensor, inv: Tensor, imq: bool, mode: str
                     ) -> "tuple[Tensor, Tensor]":
    (n, dim), m = x.shape, y.shape[0]
    cxx, cyy, cxy = _mmd_plan(n, m, mode)
    dx, dy = common.alloc(x, x.shape), common.alloc(y, y.shape)
    go = grad.reshape(1).contiguous()
    skip, paired = mode != "biased", mode == "paired"
    bk = _mmd_k(dim)
    cfg = dict(IMQ=imq, SKIP1=skip, SKIP2=paired, HAS_B2=True, BLOCK_I=MMD_BLOCK_I, BLOCK_J=MMD_BLOCK_J,
               BLOCK_K=bk, num_warps=MMD_WARPS)
    # d/da of c sum_ij k(a_i, a_j) counts each pair twice: 2 c; the cross term's -2 c_xy once from each side
    latent_k.mmd_bwd_kernel[(triton.cdiv(n, MMD_BLOCK_I), triton.cdiv(dim, bk))](
        x, x, y, inv, go, dx, n, n, m, dim, inv.numel(), 2.0 * cxx, -2.0 * cxy, **cfg)
    latent_k.mmd_bwd_kernel[(triton.cdiv(m, MMD_BLOCK_I), triton.cdiv(dim, bk))](
        y, y, x, inv, go, dy, m, m, n, dim, inv.numel(), 2.0 * cyy, -2.0 * cxy, **cfg)
    return dx, dy


@_mmd_backward_op.register_fake
def _(grad, x, y, inv, imq, mode):
    return torch.empty_like(x), torch.empty_like(y)


def _mmd_setup(ctx, inputs, output):
    x, y, inv, imq, mode, out_dtype = inputs
    ctx.save_for_backward(x, y, inv)
    ctx.args = (imq, mode)


def _mmd_backward(ctx, grad):
    x, y, inv = ctx.saved_tensors
    dx, dy = _mmd_backward_op(grad, x, y, inv, *ctx.args)
    return dx, dy, None, None, None, None


_mmd_op.register_autograd(_mmd_backward, setup_context=_mmd_setup)


def mmd(x: Tensor, y: Tensor, *, kernel: str, scales: "list[float]", mode: str, out_dtype: torch.dtype) -> Tensor:
    """Validated arguments in, MMD^2 (0-d, ``out_dtype``) out."""
    inv = torch.tensor([1.0 / s for s in scales], dtype=torch.float32, device=x.device)
    return _mmd_op(x.contiguous(), y.contiguous(), inv, kernel == "imq", mode, out_dtype)
