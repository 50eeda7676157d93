"""Vector quantization: launches of ``kernels/vq.py`` as custom ops.

``vq_search`` returns indices only (k-means, residual stages). ``vq_quantize`` is the fused op: search, z_q
(or the rotation trick's output) in z's layout and the squared error in one pass, with its backward writing
z's gradient and the codebook's per-token rows in one more; the codebook gradient is those rows summed per
code in a fixed order (a stable sort of the indices, then one segment sum: no float atomics).
"""

import torch
import triton
from torch import Tensor

from .._checks import interpreting
from ..kernels import vq as vq_k
from ..reference import vq as vq_ref
from . import common

BLOCK_N, BLOCK_K = 64, 64
# the backward is elementwise per token (O(D) each): at 64 tokens a program ptxas held some specializations to
# 64 registers and spilled; 32 compile clean at ~40
BWD_BLOCK_N = 32
# the kernels' ESTIMATOR modes: what z_q's gradient to z is (a value: none)
ESTIMATORS = {"straight_through": 0, "rotation": 1, "value": 2}


def _block_d(d: int) -> int:
    """The feature chunk of the backward's elementwise passes over a token tile."""
    return min(64, max(16, triton.next_power_of_2(d)))


def _search_block_d(d: int, dot_fp32: bool) -> int:
    """The feature chunk of the search's ``tl.dot`` (at least 16, tl.dot's smallest side). 16-bit codes up to
    256 features take one chunk: the token tile is loaded once for the whole loop over code tiles, which then
    streams only codes (the machine-code report predicts the search at D = 256 bound by the tensor cores,
    where chunks of 64 re-read the token tile for every code tile and bound it by the issue rate). fp32 runs
    as tf32x3, whose split operands take twice the registers: chunks of 32 keep it clear of spills beside
    the running minimum's two [64, 64] tiles."""
    if not dot_fp32 and d <= 256:
        return max(16, triton.next_power_of_2(d))
    return min(64 if not dot_fp32 else 32, max(16, triton.next_power_of_2(d)))


def _dot_fp32(z: Tensor, e: Tensor) -> bool:
    """One 16-bit dtype goes to the tensor cores as it is; the interpreter's tl.dot multiplies bf16's raw
    uint16 storage, so there bf16 takes the fp32 dot, the same math (bf16 products are exact in fp32)."""
    return not (z.dtype == e.dtype and z.dtype in (torch.float16, torch.bfloat16)) or (
        z.dtype == torch.bfloat16 and interpreting())


def _code_terms(e: Tensor, cosine: bool) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """Per-code terms, H * K floats each: the squared norms (the euclidean score's bias), the negated inverse
    norms (the cosine score's factor), F.normalize's denominators max(||e||, 1e-12) in e's dtype rounded as
    torch's (what the cosine losses divide by); and per head the first code holding a NaN (K if none)."""
    ef = e.float()
    bias = ef.square().sum(-1)
    k = e.shape[1]
    codes = torch.arange(k, device=e.device, dtype=torch.int32)
    nan_code = torch.where(bias.isnan(), codes, k).amin(-1) if k else codes.new_zeros(e.shape[0])
    if not cosine:
        return bias, bias, bias, nan_code
    return bias, -torch.linalg.vector_norm(ef, dim=-1).clamp_min(1e-12).reciprocal(), _normalize_den(e), nan_code


def _normalize_den(e: Tensor) -> Tensor:
    """F.normalize's denominators of the codes, max(||e||, 1e-12), the norm in e's dtype as torch rounds it."""
    return torch.linalg.vector_norm(e, dim=-1).clamp_min(1e-12).float()


@common.custom_op("fastvae::vq_search")
def _vq_search_op(z: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """Indices (B * S, H) of the nearest code; z a (B, S, H * Dh) view read in place through its strides
    (channels-last tokens, or channels-first feature maps as (B, H * W, D) with a feature stride of H * W),
    codebook (H, K, Dh)."""
    b, s, d_all = z.shape
    heads, k, dh = codebook.shape
    n = b * s
    idx = common.alloc(z, (n, heads), torch.int64)
    if n == 0:
        return idx
    e = codebook.contiguous()  # a parameter already is: no copy
    bias, scale, _, nan_code = _code_terms(e, cosine)
    dot_fp32 = _dot_fp32(z, e)
    block_d = _search_block_d(dh, dot_fp32)
    vq_k.vq_argmin_kernel[(triton.cdiv(n, BLOCK_N), heads)](
        z, e, bias, scale, nan_code, idx,
        n, s, k, dh,
        z.stride(0), z.stride(1), z.stride(2), e.stride(0), e.stride(1),
        COSINE=cosine, DOT_FP32=dot_fp32, ONE_CHUNK=dh <= block_d,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block_d, num_warps=4,
    )
    return idx


@_vq_search_op.register_fake
def _(z, codebook, cosine):
    return z.new_empty((z.shape[0] * z.shape[1], codebook.shape[0]), dtype=torch.int64)


def vq_search(z3: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """Validated arguments in: z3 a (B, S, H * Dh) view of the tokens, codebook (H, K, Dh); indices (B S, H)."""
    return _vq_search_op(z3.detach(), codebook.detach(), cosine)


def _layout_like(z: Tensor, dtype: torch.dtype) -> Tensor:
    """A (B, S, D) buffer in z's memory layout when z is dense (channels-first maps stay channels-first), else
    contiguous."""
    return common.alloc_like(z, dtype) if common.dense(z) else common.alloc(z, z.shape, dtype)


@common.custom_op("fastvae::vq_quantize")
def _vq_quantize_op(
    z: Tensor, codebook: Tensor, cosine: bool, estimator: int
) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """``estimator``: one of ``ESTIMATORS``' values. (z_q in z's layout and torch's promoted dtype, indices
    (B S, H), the squared error summed twice: the commitment's and the codebook's, the same value with
    separate gradients); z (B, S, H Dh) a view read in place, codebook (H, K, Dh)."""
    b, s, _ = z.shape
    heads, k, dh = codebook.shape
    n = b * s
    q = _layout_like(z, torch.promote_types(z.dtype, codebook.dtype))
    idx = common.alloc(z, (n, heads), torch.int64)
    grid = (triton.cdiv(n, BLOCK_N), heads)
    parts = common.alloc(z, (grid[0] * heads,), torch.float32)
    if n:
        e = codebook.contiguous()
        bias, scale, eden, nan_code = _code_terms(e, cosine)
        dot_fp32 = _dot_fp32(z, e)
        block_d = _search_block_d(dh, dot_fp32)
        vq_k.vq_fwd_kernel[grid](
            z, e, bias, scale, nan_code, eden, idx, q, parts,
            n, s, k, dh,
            z.stride(0), z.stride(1), z.stride(2), q.stride(0), q.stride(1), q.stride(2), e.stride(0), e.stride(1),
            COSINE=cosine, ESTIMATOR=estimator, DOT_FP32=dot_fp32, ONE_CHUNK=dh <= block_d,
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block_d, EPI_D=_block_d(dh), num_warps=4,
        )
    sq = common.finish_sum(parts, 1.0, torch.float32) if n else parts.new_zeros(())
    return q, idx, sq, sq.clone()


@_vq_quantize_op.register_fake
def _(z, codebook, cosine, estimator):
    q = _layout_like(z, torch.promote_types(z.dtype, codebook.dtype))  # the real op's strides
    idx = z.new_empty((z.shape[0] * z.shape[1], codebook.shape[0]), dtype=torch.int64)
    return q, idx, z.new_empty((), dtype=torch.float32), z.new_empty((), dtype=torch.float32)


@common.custom_op("fastvae::vq_quantize_backward")
def _vq_bwd_op(z: Tensor, codebook: Tensor, idx: Tensor, grad_q: Tensor, grad_sq: Tensor, cosine: bool,
               estimator: int, code_grad: bool) -> "tuple[Tensor, Tensor]":
    """(dz in z's layout and dtype, d codebook): ``grad_sq`` (2,) fp32 holds the two sums' upstream grads."""
    b, s, _ = z.shape
    heads, k, dh = codebook.shape
    n = b * s
    gz = _layout_like(z, z.dtype)
    if n == 0:
        return gz, codebook.new_zeros(codebook.shape)
    e = codebook.contiguous()
    # the kernel reads it for cosine only; an fp32 placeholder otherwise (its specialization unchanged)
    eden = _normalize_den(e) if cosine else e.new_empty(0, dtype=torch.float32)
    codes = (idx + torch.arange(heads, device=idx.device) * k).reshape(-1)  # flat code ids h K + index
    rows = pos = counts = idx  # unused placeholders unless the codebook wants its gradient
    if code_grad:
        counts = vq_ref.histogram(codes, heads * k)
        order = torch.argsort(codes, stable=True)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        rows = common.alloc(z, (n * heads, dh), torch.float32)
    vq_k.vq_bwd_kernel[(triton.cdiv(n, BWD_BLOCK_N), heads)](
        z, e, eden, idx, grad_q, grad_sq, pos, gz, rows,
        n, s, k, dh,
        z.stride(0), z.stride(1), z.stride(2), grad_q.stride(0), grad_q.stride(1), grad_q.stride(2),
        gz.stride(0), gz.stride(1), gz.stride(2), e.stride(0), e.stride(1),
        COSINE=cosine, ESTIMATOR=estimator, CODE_GRAD=code_grad,
        BLOCK_N=BWD_BLOCK_N, BLOCK_D=_block_d(dh), num_warps=4,
    )
    if not code_grad:
        return gz, codebook.new_zeros(codebook.shape)
    # each code's rows are one run of ``rows``: summed in sequence, bitwise the same every run
    grad_hat = torch.segment_reduce(rows, "sum", lengths=counts, axis=0, unsafe=True, initial=0).view(heads, k, dh)
    if cosine:  # F.normalize of each code: (g - e^ (e^ . g)) / max(|e|, eps), the projection dropped at the floor
        den = eden.view(heads, k, 1)
        unit = e.float() / den
        proj = (unit * grad_hat).sum(-1, keepdim=True)
        grad_hat = torch.where(torch.linalg.vector_norm(e.float(), dim=-1, keepdim=True) >= 1e-12,
                               grad_hat - unit * proj, grad_hat) / den
    return gz, grad_hat.to(codebook.dtype)


@_vq_bwd_op.register_fake
def _(z, codebook, idx, grad_q, grad_sq, cosine, estimator, code_grad):
    return _layout_like(z, z.dtype), codebook.new_empty(codebook.shape)


def _quantize_formula(z: Tensor, codebook: Tensor, idx: Tensor, cosine: bool, estimator: int):
    """The op's outputs by the eager reference at fixed indices: what create_graph differentiates."""
    n, heads = idx.shape
    zf = z.reshape(n, heads, codebook.shape[-1])
    cb = codebook
    if cosine:
        zf, cb = torch.nn.functional.normalize(zf, dim=-1), torch.nn.functional.normalize(cb, dim=-1)
    z_q = vq_ref.gather_codes(cb, idx)
    zc, qc = zf.float(), z_q.float()
    commit, code = (zc - qc.detach()).square().sum(), (zc.detach() - qc).square().sum()
    z_q = z_q.to(torch.promote_types(z.dtype, z_q.dtype))
    if estimator == ESTIMATORS["value"]:
        return z_q.detach().reshape(z.shape), commit, code
    est = vq_ref.rotation_trick if estimator == ESTIMATORS["rotation"] else vq_ref.straight_through
    return est(zf, z_q).reshape(z.shape), commit, code


def _setup(ctx, inputs, output):
    z, codebook, cosine, estimator = inputs
    if not codebook.requires_grad:
        # an EMA codebook is a buffer its module updates in place before backward runs: z's gradient needs
        # the codes this forward used (the eager path saves the gathered z_q; K x D is the smaller copy)
        codebook = codebook.clone()
    ctx.save_for_backward(z, codebook, output[1])
    ctx.flags = (cosine, estimator)
    # an output that took no gradient arrives as None, not as zeros the backward would read
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    if estimator == ESTIMATORS["value"]:
        ctx.mark_non_differentiable(output[0])


def _backward(ctx, grad_q, _grad_idx, grad_commit, grad_code):
    z, codebook, idx = ctx.saved_tensors
    cosine, estimator = ctx.flags
    if torch.is_grad_enabled():  # create_graph: the formula, differentiable again
        return common.differentiable_backward(
            lambda z_, cb_: _quantize_formula(z_, cb_, idx, cosine, estimator), (z, codebook),
            ctx.needs_input_grad[:2], (grad_q, grad_commit, grad_code)) + (None, None)
    if grad_q is None:  # unused, or a value-only z_q: a zero-stride zero, nothing allocated
        grad_q = torch.zeros((), dtype=z.dtype, device=z.device).expand(z.shape)
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    grad_sq = torch.stack([zero if g is None else g.float() for g in (grad_commit, grad_code)])
    gz, gcb = _vq_bwd_op(z, codebook, idx, grad_q, grad_sq, cosine, estimator, ctx.needs_input_grad[1])
    return (gz if ctx.needs_input_grad[0] else None), (gcb if ctx.needs_input_grad[1] else None), None, None


_vq_quantize_op.register_autograd(_backward, setup_context=_setup)


def vq_quantize(z3: Tensor, codebook: Tensor, cosine: bool, estimator: str) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """Validated arguments in: z3 a (B, S, H * Dh) view of the tokens, codebook (H, K, Dh), ``estimator`` a key
    of ``ESTIMATORS``; out (z_q in z3's shape, indices (B S, H), commitment sum, codebook sum): the sums of
    squared errors in fp32."""
    return _vq_quantize_op(z3, codebook, cosine, ESTIMATORS[estimator])
