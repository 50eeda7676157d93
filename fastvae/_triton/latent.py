"""The batch-level latent terms' launches (``kernels/latent.py``) as custom ops with autograd.

Forward saves O(B D) per-row statistics (the joint log-sum-exp, which is log q(z) itself, and the per-dim
ones); backward recomputes every tile from them. Gradients are written by programs that own them (row tiles
for z, column tiles for mu and logvar; row tiles of x and of y for the MMD): no float atomics.

The TC inputs are read where they lie through their strides (no ``.contiguous()``: ``mu, logvar =
h.chunk(2, dim=1)``, a transposed z, an expanded logvar all launch as they are); a gradient comes back in its
input's layout when that is dense, else contiguous. The MMD takes row-major x and y (a strided one is copied:
see kernels/latent.py, runtime strides spill there; O(n D) bytes against O(n^2 D) work). Under
``create_graph=True`` backward is the eager formula differentiated with the graph kept
(``common.differentiable_backward``): torch's second-order numbers.
"""

import math

import torch
import triton
from torch import Tensor

from .. import reference
from ..kernels import latent as latent_k
from . import common

INT32_OFFSETS = 2**31  # a tensor spanning this many elements or more takes the kernels' int64 offsets (WIDE)
# the most rows (or columns) a tile can reach past a tensor's end (masked), and dims past D: in the offset bound
_ROW_PAD, _DIM_PAD = 1024, 64


def _wide(*ts: Tensor) -> bool:
    """Whether some element offset row * stride(0) + column * stride(1) of these 2-D tensors, masked tile lanes
    included, can reach 2^31: then the kernels compute offsets in int64."""
    extent = max((t.shape[0] + _ROW_PAD) * t.stride(0) + (t.shape[1] + _DIM_PAD) * t.stride(1) for t in ts)
    return extent >= INT32_OFFSETS


def _strides(*ts: Tensor) -> "tuple[int, ...]":
    return tuple(st for t in ts for st in t.stride())


def _grad_buffer(t: Tensor) -> Tensor:
    """A gradient buffer in t's layout when t is dense (channels of a transposed tensor stay put), else
    contiguous (a strided view such as a chunk of a wider tensor: its gradient is its own tensor)."""
    return common.alloc_like(t) if common.dense(t) else common.alloc(t, t.shape)


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


@common.custom_op("fastvae::tc_log_densities")
def _tc_op(z: Tensor, mu: Tensor, logvar: Tensor, row_offset: int, dataset_size: int, mss: bool
           ) -> "tuple[Tensor, Tensor, Tensor, Tensor, Tensor]":
    """(log_qz, log_prod_qzi, log_qzx, log_pz, lse_d) in fp32: rows z (R, D) against the columns mu/logvar
    (B, D), each read through its strides; lse_d (R, D) is the per-dim log-sum-exp backward recomputes from."""
    rows, dim = z.shape
    batch = mu.shape[0]
    outs = [common.alloc(z, (rows,), torch.float32) for _ in range(4)]
    lse_d = common.alloc(z, (rows, dim), torch.float32)
    bi, bj, bd = tc_blocks(dim, 4096)
    if rows:
        latent_k.tc_fwd_kernel[(triton.cdiv(rows, bi),)](
            z, mu, logvar, *outs, lse_d, rows, batch, dim, row_offset, *_log_weights(batch, dataset_size, mss),
            *_strides(z, mu, logvar),
            BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, WIDE=_wide(z, mu, logvar, lse_d), num_warps=8,
        )
    return (*outs, lse_d)


@_tc_op.register_fake
def _(z, mu, logvar, row_offset, dataset_size, mss):
    rows = z.shape[0]
    return (*(z.new_empty((rows,), dtype=torch.float32) for _ in range(4)),
            z.new_empty(z.shape, dtype=torch.float32))


def _fake_grad(t: Tensor) -> Tensor:
    """_grad_buffer's layout for a fake tensor."""
    if common.dense(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return t.new_empty(t.shape)


@common.custom_op("fastvae::tc_log_densities_backward")
def _tc_backward_op(g_qz: Tensor, g_prod: Tensor, g_qzx: Tensor, g_pz: Tensor, z: Tensor, mu: Tensor,
                    logvar: Tensor, log_qz: Tensor, lse_d: Tensor, row_offset: int, dataset_size: int, mss: bool
                    ) -> "tuple[Tensor, Tensor, Tensor]":
    rows, dim = z.shape
    batch = mu.shape[0]
    dz, dmu, dlv = _grad_buffer(z), _grad_buffer(mu), _grad_buffer(logvar)
    lw = _log_weights(batch, dataset_size, mss)
    # (R,) vectors the kernels index with unit stride: an expanded grad_output (a sum's backward) is copied
    grads = [g.contiguous() for g in (g_qz, g_prod, g_qzx, g_pz)]
    wide = _wide(z, mu, logvar, lse_d, dz, dmu, dlv)
    if rows:
        ri, rj, bd = tc_blocks(dim, 4096)
        latent_k.tc_bwd_rows_kernel[(triton.cdiv(rows, ri),)](
            z, mu, logvar, log_qz, lse_d, *grads, dz, rows, batch, dim, row_offset, *lw,
            *_strides(z, mu, logvar, dz),
            BLOCK_I=ri, BLOCK_J=rj, BLOCK_D=bd, WIDE=wide, num_warps=8,
        )
    bi, bj, bd = tc_blocks(dim)
    if batch:
        # column tiles as deep as the row kernel's row tiles, streaming row tiles as shallow as its columns
        latent_k.tc_bwd_cols_kernel[(triton.cdiv(batch, bi),)](
            z, mu, logvar, log_qz, lse_d, *grads[:3], dmu, dlv, rows, batch, dim, row_offset, *lw,
            *_strides(z, mu, logvar, dmu, dlv),
            BLOCK_I=bj, BLOCK_J=bi, BLOCK_D=bd, WIDE=wide, num_warps=8,
        )
    return dz, dmu, dlv


@_tc_backward_op.register_fake
def _(g_qz, g_prod, g_qzx, g_pz, z, mu, logvar, log_qz, lse_d, row_offset, dataset_size, mss):
    return _fake_grad(z), _fake_grad(mu), _fake_grad(logvar)


def _tc_setup(ctx, inputs, output):
    z, mu, logvar, row_offset, dataset_size, mss = inputs
    ctx.save_for_backward(z, mu, logvar, output[0], output[4])
    ctx.args = (row_offset, dataset_size, mss)
    ctx.set_materialize_grads(True)


def _tc_backward(ctx, g_qz, g_prod, g_qzx, g_pz, _g_lse_d):
    z, mu, logvar, log_qz, lse_d = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the eager formula's differentiable gradient
        row_offset, dataset_size, mss = ctx.args

        def formula(z_, mu_, lv_):
            return reference.tc_log_densities(z_, mu_, lv_, dataset_size=dataset_size, mss=mss,
                                              row_offset=row_offset)

        grads = common.differentiable_backward(formula, (z, mu, logvar), ctx.needs_input_grad[:3],
                                               (g_qz, g_prod, g_qzx, g_pz))
        return (*grads, None, None, None)
    dz, dmu, dlv = _tc_backward_op(g_qz, g_prod, g_qzx, g_pz, z, mu, logvar, log_qz, lse_d, *ctx.args)
    return dz, dmu, dlv, None, None, None


_tc_op.register_autograd(_tc_backward, setup_context=_tc_setup)


def tc_log_densities(z: Tensor, mu: Tensor, logvar: Tensor, *, dataset_size: int, mss: bool, row_offset: int
                     ) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """Validated arguments in, (log_qz, log_prod_qzi, log_qzx, log_pz) per row out, fp32."""
    out = _tc_op(z, mu, logvar, row_offset, dataset_size, mss)
    return out[0], out[1], out[2], out[3]


# the forward keeps two block sums live beside the dot: 16 x 32 tiles, where sm_90 does not spill under
# triton 3.6 or 3.9 (16 x 16 spills under 3.9); backward 32 x 32
MMD_BLOCK_I, MMD_BLOCK_J, MMD_FWD_BLOCK_I, MMD_FWD_BLOCK_J, MMD_WARPS = 32, 32, 16, 32, 8
MMD_FWD_SCALES = 2  # scales a forward launch sums: more (WAE's 7) spill under triton 3.6; the rest, more launches
MMD_BWD_SCALES = 8  # scales a backward launch sums (the kernel's 8 scalar arguments); more accumulate over launches
MMD_BWD_SCALES_WIDE = 4  # with int64 offsets 8 scales spill on sm_90 (triton 3.9, a transposed input)


def _mmd_k(dim: int) -> int:
    # K = 16 tiles spill on sm_90 (tf32x3 splits each operand in two): small D pads to 32, the dot is cheap
    return min(64, max(32, triton.next_power_of_2(dim)))


def _mmd_plan(n: int, m: int, mode: str) -> "tuple[float, float, float]":
    from ..reference.latent import mmd_coefficients

    return mmd_coefficients(n, m, mode)


def _inv_chunks(scales: "list[float]", size: int) -> "list[tuple[list[float], int]]":
    """The reciprocals of the scales in launches of at most ``size``: (values padded with 0.0 to ``size``,
    how many are real), as fp32 scalar kernel arguments (host floats: no copy to the device, nothing a CUDA
    graph has to capture but the launch)."""
    inv = [1.0 / s for s in scales]
    return [(inv[k:k + size] + [0.0] * (size - len(inv[k:k + size])), len(inv[k:k + size]))
            for k in range(0, len(inv), size)]


@common.custom_op("fastvae::mmd")
def _mmd_op(x: Tensor, y: Tensor, scales: "list[float]", imq: bool, mode: str, out_dtype: torch.dtype) -> Tensor:
    """MMD^2 (0-d, ``out_dtype``) of the row-major x (n, D) and y (m, D) over the ``scales`` (host floats)."""
    (n, dim), m = x.shape, y.shape[0]
    cxx, cyy, cxy = _mmd_plan(n, m, mode)
    gx, gy = triton.cdiv(n, MMD_FWD_BLOCK_I), triton.cdiv(m, MMD_FWD_BLOCK_I)
    chunks = _inv_chunks(scales, MMD_FWD_SCALES)
    partials = common.alloc(x, ((gx + gy) * len(chunks),), torch.float32)
    skip, paired = mode != "biased", mode == "paired"
    cfg = dict(BLOCK_I=MMD_FWD_BLOCK_I, BLOCK_J=MMD_FWD_BLOCK_J, BLOCK_K=_mmd_k(dim), WIDE=_wide(x, y),
               num_warps=MMD_WARPS)
    for c, (inv, count) in enumerate(chunks):
        part = partials[c * (gx + gy):]
        latent_k.mmd_fwd_kernel[(gx,)](x, x, y, part, n, n, m, dim, *inv, count, cxx, -2.0 * cxy,
                                       IMQ=imq, SKIP1=skip, SKIP2=paired, HAS_B2=True, **cfg)
        latent_k.mmd_fwd_kernel[(gy,)](y, y, y, part[gx:], m, m, m, dim, *inv, count, cyy, 0.0,
                                       IMQ=imq, SKIP1=skip, SKIP2=False, HAS_B2=False, **cfg)
    return common.finish_sum(partials, 1.0, out_dtype)


@_mmd_op.register_fake
def _(x, y, scales, imq, mode, out_dtype):
    return x.new_empty((), dtype=out_dtype)


@common.custom_op("fastvae::mmd_backward")
def _mmd_backward_op(grad: Tensor, x: Tensor, y: Tensor, scales: "list[float]", imq: bool, mode: str
                     ) -> "tuple[Tensor, Tensor]":
    (n, dim), m = x.shape, y.shape[0]
    cxx, cyy, cxy = _mmd_plan(n, m, mode)
    dx, dy = common.alloc(x, x.shape), common.alloc(y, y.shape)
    go = grad.reshape(1)
    skip, paired = mode != "biased", mode == "paired"
    bk = _mmd_k(dim)
    wide = _wide(x, y, dx, dy)
    cfg = dict(IMQ=imq, SKIP1=skip, SKIP2=paired, HAS_B2=True, BLOCK_I=MMD_BLOCK_I, BLOCK_J=MMD_BLOCK_J,
               BLOCK_K=bk, WIDE=wide, num_warps=MMD_WARPS)
    per_launch = MMD_BWD_SCALES_WIDE if wide else MMD_BWD_SCALES
    for c, (inv, count) in enumerate(_inv_chunks(scales, per_launch)):
        inv = inv + [0.0] * (8 - len(inv))  # the kernel's 8 scale arguments
        # d/da of c sum_ij k(a_i, a_j) counts each pair twice: 2 c; the cross term's -2 c_xy once from each side
        latent_k.mmd_bwd_kernel[(triton.cdiv(n, MMD_BLOCK_I), triton.cdiv(dim, bk))](
            x, x, y, go, dx, n, n, m, dim, *inv, count, 2.0 * cxx, -2.0 * cxy,
            ACCUMULATE=c > 0, **cfg)
        latent_k.mmd_bwd_kernel[(triton.cdiv(m, MMD_BLOCK_I), triton.cdiv(dim, bk))](
            y, y, x, go, dy, m, m, n, dim, *inv, count, 2.0 * cyy, -2.0 * cxy,
            ACCUMULATE=c > 0, **cfg)
    return dx, dy


@_mmd_backward_op.register_fake
def _(grad, x, y, scales, imq, mode):
    return x.new_empty(x.shape), y.new_empty(y.shape)


def _mmd_setup(ctx, inputs, output):
    x, y, scales, imq, mode, out_dtype = inputs
    ctx.save_for_backward(x, y)
    ctx.args = (scales, imq, mode)
    ctx.out_dtype = out_dtype


def _mmd_backward(ctx, grad):
    x, y = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the eager formula's differentiable gradient
        scales, imq, mode = ctx.args

        def formula(x_, y_):
            return reference.mmd(x_, y_, kernel="imq" if imq else "rbf", scales=scales, mode=mode).to(ctx.out_dtype)

        dx, dy = common.differentiable_backward(formula, (x, y), ctx.needs_input_grad[:2], (grad,))
        return dx, dy, None, None, None, None
    dx, dy = _mmd_backward_op(grad, x, y, *ctx.args)
    return dx, dy, None, None, None, None


_mmd_op.register_autograd(_mmd_backward, setup_context=_mmd_setup)


def mmd(x: Tensor, y: Tensor, *, kernel: str, scales: "list[float]", mode: str, out_dtype: torch.dtype) -> Tensor:
    """Validated arguments in, MMD^2 (0-d, ``out_dtype``) out."""
    # row-major for the kernels (a no-op when already so): runtime row strides spill the forward on sm_90, and
    # the O(n D) copy is small beside the O(n^2 D) pairs
    return _mmd_op(x.contiguous(), y.contiguous(), list(scales), kernel == "imq", mode, out_dtype)
