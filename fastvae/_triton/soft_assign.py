"""Soft assignment over a codebook: launches of ``kernels/soft_assign.py`` as custom ops with autograd.

The forward op keeps (z, codebook, pE, lse, H) for backward, O(N D + K D + N) with nothing N x K; backward
recomputes p from lse. Under ``create_graph=True`` the backward is the eager formula differentiated by
autograd (``common.differentiable_backward``), so second-order terms are torch's.
"""

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from .._checks import interpreting
from ..kernels import soft_assign as sa_k
from ..reference import soft_assign as sa_ref
from . import common

METRIC_IDS = {"dot": sa_k.DOT, "sqeuclidean": sa_k.SQEUCLIDEAN, "euclidean": sa_k.EUCLIDEAN}


class Tiles(NamedTuple):
    """A kernel's launch shape: BLOCK_N tokens by BLOCK_K codes a tile, on ``num_warps`` warps."""

    block_n: int
    block_k: int
    num_warps: int


# Tiles that compile for sm_90 with no register spill in any specialization the tests launch, checked with the
# GPU image's triton 3.6 (bench/sass_report.py --check-only); fp32's tf32x3 dots, which split each operand in
# three, are the tightest (at 64 x 64 every kernel spilled, the backward ones by kilobytes). Software
# pipelining is off (num_stages=1): its multi-buffered loads took the registers the tiles need. The feature
# chunks are fixed: narrower ones for small D saved padded work, but ptxas spilled predicate registers in
# some of their specializations. Chosen for a clean compile, not tuned for speed (no GPU timing yet).
FWD_TILES = Tiles(64, 32, 4)
PBAR_TILES = Tiles(64, 64, 4)
DZ_TILES = Tiles(32, 32, 4)  # the backward tiles carry s, p, w and g_pE . e at once
DE_TILES = Tiles(16, 32, 2)  # on 4 warps ptxas capped some specializations at 128 registers and spilled
NUM_STAGES = 1
BLOCK_D = 32  # the logits' feature chunk
BLOCK_V = 64  # the D-wide outputs' chunk: D up to this is one sweep over the codes, a wider D one a chunk


def _dot_fp32(a: Tensor, b: Tensor) -> bool:
    """Whether a . b is multiplied in fp32: unless both share one 16-bit dtype. The interpreter's tl.dot
    multiplies bf16's raw uint16 storage, so there bf16 takes the fp32 dot, the same math (bf16 products are
    exact in fp32)."""
    same_half = a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    return not same_half or (a.dtype == torch.bfloat16 and interpreting())


def _out_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, codebook.dtype)


def _like_tokens(z: Tensor, dtype: torch.dtype, alloc) -> Tensor:
    """A (B, S, D) buffer in z's memory order when z is dense (a channels-first map stays channels-first)."""
    if z.numel() and common.dense(z):
        return alloc(z, (z.numel(),), dtype).as_strided(z.shape, z.stride())
    return alloc(z, z.shape, dtype)


def _fake_tokens(z: Tensor, dtype: torch.dtype) -> Tensor:
    return _like_tokens(z, dtype, lambda like, shape, dt: like.new_empty(shape, dtype=dt))


def _sq_norms(z: Tensor, codebook: Tensor, metric: int) -> "tuple[Tensor, Tensor]":
    """||z_n||^2 (N,) and ||e_k||^2 (K,) in fp32, for the distances (unused by dot: empty stand-ins)."""
    if metric == sa_k.DOT:
        return z.new_empty(0, dtype=torch.float32), z.new_empty(0, dtype=torch.float32)
    zn2 = torch.linalg.vector_norm(z, dim=-1, dtype=torch.float32).square().reshape(-1)
    en2 = torch.linalg.vector_norm(codebook, dim=-1, dtype=torch.float32).square()
    return zn2, en2


@common.custom_op("fastvae::soft_assign")
def _soft_assign_op(z: Tensor, codebook: Tensor, t: float, metric: int) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(pE (B, S, D) in the promoted dtype and z's memory order, lse (N,), H (N,), pbar (K,) fp32); z a
    (B, S, D) view of the N = B S tokens read in place through its strides, codebook (K, D)."""
    b, s, d = z.shape
    k = codebook.shape[0]
    n = b * s
    pe = _like_tokens(z, _out_dtype(z, codebook), common.alloc)
    lse = common.alloc(z, (n,), torch.float32)
    ent = common.alloc(z, (n,), torch.float32)
    pbar = common.alloc(z, (k,), torch.float32)
    if n == 0:  # the mean of no distributions: NaN, as torch's mean of nothing
        return pe, lse, ent, pbar.fill_(float("nan"))
    e = codebook.contiguous()  # a parameter already is: no copy
    zn2, en2 = _sq_norms(z, e, metric)
    dot_fp32 = _dot_fp32(z, e)
    sa_k.soft_assign_fwd_kernel[(triton.cdiv(n, FWD_TILES.block_n), 1)](
        z, e, zn2, en2, pe, lse, ent,
        n, s, k, d, t,
        z.stride(0), z.stride(1), z.stride(2), e.stride(0), pe.stride(0), pe.stride(1), pe.stride(2),
        METRIC=metric, DOT_FP32=dot_fp32,
        BLOCK_N=FWD_TILES.block_n, BLOCK_K=FWD_TILES.block_k, BLOCK_D=BLOCK_D, BLOCK_V=BLOCK_V,
        num_warps=FWD_TILES.num_warps, num_stages=NUM_STAGES,
    )
    sa_k.soft_assign_pbar_kernel[(triton.cdiv(k, PBAR_TILES.block_k), 1)](
        z, e, zn2, en2, lse, pbar,
        n, s, k, d, t, 1.0 / n,
        z.stride(0), z.stride(1), z.stride(2), e.stride(0),
        METRIC=metric, DOT_FP32=dot_fp32,
        BLOCK_N=PBAR_TILES.block_n, BLOCK_K=PBAR_TILES.block_k, BLOCK_D=BLOCK_D,
        num_warps=PBAR_TILES.num_warps, num_stages=NUM_STAGES,
    )
    return pe, lse, ent, pbar


@_soft_assign_op.register_fake
def _(z, codebook, t, metric):
    n = z.shape[0] * z.shape[1]
    f32 = dict(dtype=torch.float32)
    return (_fake_tokens(z, _out_dtype(z, codebook)), z.new_empty((n,), **f32), z.new_empty((n,), **f32),
            z.new_empty((codebook.shape[0],), **f32))


@common.custom_op("fastvae::soft_assign_backward")
def _soft_assign_bwd_op(
    z: Tensor, codebook: Tensor, pe: Tensor, lse: Tensor, ent: Tensor, g_lse: Optional[Tensor],
    g_h: Optional[Tensor], g_pbar: Optional[Tensor], g_pe: Optional[Tensor], t: float, metric: int,
    need_de: bool,
) -> "tuple[Tensor, Tensor]":
    """(dz in z's shape, dtype and memory order, dcodebook (K, D) in its dtype, or (0, D) without ``need_de``:
    a frozen codebook, e.g. one updated by EMA, skips the code-tile pass)."""
    b, s, d = z.shape
    k = codebook.shape[0]
    n = b * s
    dz = _like_tokens(z, z.dtype, common.alloc)
    de = common.alloc(codebook, (k if need_de else 0, d), codebook.dtype)
    if n == 0:
        return dz, de.zero_()
    e = codebook.contiguous()
    zn2, en2 = _sq_norms(z, e, metric)
    # an output that took no gradient contributes nothing: zeros for the O(N + K) ones, a switch for g_pE
    g_lse = g_lse.float().contiguous() if g_lse is not None else lse.new_zeros(n)
    g_h = g_h.float().contiguous() if g_h is not None else lse.new_zeros(n)
    has_gpbar = g_pbar is not None
    g_pbar = g_pbar.float().contiguous() if has_gpbar else lse
    has_gpe = g_pe is not None
    g = g_pe if has_gpe else pe
    c = common.alloc(z, (n,), torch.float32)
    dot_fp32, dot_fp32_g = _dot_fp32(z, e), _dot_fp32(g, e)
    consts = dict(METRIC=metric, DOT_FP32=dot_fp32, DOT_FP32_G=dot_fp32_g, HAS_GPBAR=has_gpbar, HAS_GPE=has_gpe,
                  BLOCK_D=BLOCK_D, BLOCK_V=BLOCK_V, num_stages=NUM_STAGES)
    sa_k.soft_assign_bwd_dz_kernel[(triton.cdiv(n, DZ_TILES.block_n), 1)](
        z, e, zn2, en2, lse, ent, pe, g_lse, g_h, g_pbar, g, c, dz,
        n, s, k, d, t, 1.0 / n,
        z.stride(0), z.stride(1), z.stride(2), e.stride(0), pe.stride(0), pe.stride(1), pe.stride(2),
        g.stride(0), g.stride(1), g.stride(2), dz.stride(0), dz.stride(1), dz.stride(2),
        BLOCK_N=DZ_TILES.block_n, BLOCK_K=DZ_TILES.block_k, num_warps=DZ_TILES.num_warps, **consts,
    )
    if not need_de:
        return dz, de
    sa_k.soft_assign_bwd_de_kernel[(triton.cdiv(k, DE_TILES.block_k), 1)](
        z, e, zn2, en2, lse, ent, g_lse, g_h, g_pbar, g, c, de,
        n, s, k, d, t, 1.0 / n,
        z.stride(0), z.stride(1), z.stride(2), e.stride(0), g.stride(0), g.stride(1), g.stride(2),
        BLOCK_N=DE_TILES.block_n, BLOCK_K=DE_TILES.block_k, num_warps=DE_TILES.num_warps, **consts,
    )
    return dz, de


@_soft_assign_bwd_op.register_fake
def _(z, codebook, pe, lse, ent, g_lse, g_h, g_pbar, g_pe, t, metric, need_de):
    return _fake_tokens(z, z.dtype), codebook.new_empty((codebook.shape[0] if need_de else 0, codebook.shape[1]))


def _setup(ctx, inputs, output):
    z, codebook, t, metric = inputs
    pe, lse, ent, _ = output
    ctx.save_for_backward(z, codebook, pe, lse, ent)
    ctx.t, ctx.metric = t, metric
    # an unused output's gradient stays None (not an N x D zero tensor): the kernels then skip its products
    ctx.set_materialize_grads(False)


def _backward(ctx, g_pe, g_lse, g_h, g_pbar):
    z, codebook, pe, lse, ent = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():  # create_graph: the eager formula, differentiable again
        name = next(k for k, v in METRIC_IDS.items() if v == ctx.metric)
        out_dtype = pe.dtype

        def formula(zz, ee):
            dt = torch.promote_types(torch.float32, out_dtype)
            tokens = zz.reshape(-1, zz.shape[-1]).to(dt)
            pe_, lse_, ent_, pbar_ = sa_ref.soft_assign(tokens, ee.to(dt), ctx.t, name)
            return pe_.reshape(zz.shape).to(out_dtype), lse_.float(), ent_.float(), pbar_.float()

        grads = common.differentiable_backward(formula, (z, codebook), needs, (g_pe, g_lse, g_h, g_pbar))
        return grads[0], grads[1], None, None
    if not any(needs):
        return None, None, None, None
    dz, de = _soft_assign_bwd_op(z, codebook, pe, lse, ent, g_lse, g_h, g_pbar, g_pe, ctx.t, ctx.metric,
                                 needs[1])
    return (dz if needs[0] else None), (de if needs[1] else None), None, None


_soft_assign_op.register_autograd(_backward, setup_context=_setup)


def codebook_soft_assign(z3: Tensor, codebook: Tensor, t: float,
                         metric: str) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """Validated arguments in: z3 a (B, S, D) view of the tokens, codebook (K, D); (pE (B, S, D), lse (N,),
    H (N,), pbar (K,))."""
    return _soft_assign_op(z3, codebook, float(t), METRIC_IDS[metric])
