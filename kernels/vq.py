"""Nearest-code search of vector quantization, streamed: a tile of BLOCK_N tokens against the codebook in tiles
of BLOCK_K codes through ``tl.dot``, with an online argmin (flash attention's scheme with min in place of
log-sum-exp), so no N x K distance exists anywhere, not even per program beyond one [BLOCK_N, BLOCK_K] tile.

    score_nk = bias_k - 2 z_n . e_k       euclidean: bias_k = ||e_k||^2 (||z_n||^2 is the same for every k)
    score_nk = -z_n . e_k / ||e_k||        cosine: bias 0, each code scaled by its inverse norm (||z_n|| > 0
                                           scales a row and does not move its argmin)
    index_n  = argmin_k score_nk, the lowest k on ties (an elementwise running minimum over the code tiles,
               strict <, then one row argmin per token after the loop, lowest k on ties)

NaN as ``torch.argmin`` treats it: a code holding a NaN is every token's index (the first such code); a token
holding one gets index 0 (every score of its row is NaN).

Precision: 16-bit tokens and codes go to the tensor cores as they are; their products are exact in fp32 and
the dot accumulates in fp32, so the search is a fp32 search of the same values up to the order of summation
(the fp32 rounding of the expanded form). fp32 inputs use tf32x3 (three tf32 products: fp32 accuracy on the
tensor cores; the interpreter computes in fp32). Mixed input dtypes are computed in fp32.

Work: 2 N K D FLOPs on the tensor cores; bytes: the N tokens once, the K x D codebook once per token tile
(from L2: K D bytes per BLOCK_N tokens), N indices written. At K D >> BLOCK_N D the codebook stream through
L2 and the tensor-core rate bound it, not DRAM.

Fused quantization (``vq_fwd_kernel``): after the search, the tile's codes are gathered by index (never a
one-hot) and, in the same program, z_q (or the rotation trick's R z, its value z_q) is written in z's layout
and the squared error ||z - z_q||^2 summed into one fp32 partial per program (summed in a fixed order
afterwards): the commitment and codebook losses are both that sum over N D, differing only in where their
gradient goes. Cosine compares the unit vectors, rounded to their input dtypes as F.normalize's are.
Backward (``vq_bwd_kernel``) recomputes the gathered codes from the indices and writes, per token in O(D),

    dz = J_est^T g + 2 g_c (z - z_q)                  (then F.normalize's Jacobian for cosine)
    row_n = 2 g_b (z_q - z)                           (stored in code order: per-code sums, no atomics)

with J_est the identity (straight-through), s (I - 2 w w^T + 2 q u^T) (rotation trick, u q w s detached; w's
norm and dots summed from the elements of u + q, so they stay bounded where u ~ -q), or
0 (ESTIMATOR == VALUE: z_q itself is written, a value without a gradient to z, as residual VQ's stages use it).
Each pass over D re-reads the tile's z and codes from L1/L2: the epilogue moves 2 N D elements in (z, the
gathered codes) and N D out, against the search's 2 N K D FLOPs.

Token addressing: token n is (b, s) = (n // S, n % S) at b * stride_b + s * stride_s, element d at
d * stride_d (+ head * D * stride_d): channels-last (..., D) and channels-first (B, D, H, W) read in place.
"""

import triton
import triton.language as tl

from .tiles import code_chunk, dot_acc, token_base, token_chunk, token_code_dot, token_rows, token_split

NORM_EPS = tl.constexpr(1e-6)  # the rotation trick's safe_div floor (vector-quantize-pytorch's)
NORMALIZE_EPS = tl.constexpr(1e-12)  # F.normalize's
# what the fused kernels write as z_q (its value is z_q in each case; its gradient to z differs)
STRAIGHT_THROUGH = tl.constexpr(0)
ROTATION = tl.constexpr(1)
VALUE = tl.constexpr(2)


@triton.jit
def _argmin_tiles(
    z_ptr, z_base, row_ok, e_base, bias_ptr, scale_ptr, nan_ptr, head, K, D, stride_d, stride_ek,
    COSINE: tl.constexpr, DOT_FP32: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(best score, its index) of each token of the tile over all K codes: the online argmin. ONE_CHUNK (D <=
    BLOCK_D): the token tile is loaded once, before the loop, which then reads only codes.

    Each position of the [BLOCK_N, BLOCK_K] tile keeps its own running minimum over the code tiles and the
    tile it came from (strict <: the earliest tile on ties), 3 instructions an element besides the score's
    FMA; the row's argmin is taken once, after the loop, lowest code first on ties. A per-tile row argmin
    costs several times that in compares, selects and shuffles: the issue rate, not the tensor cores, would
    bound the search. Codes past K score +inf (their bias is loaded as inf and their dot is 0).
    """
    best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    best_k0 = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    if ONE_CHUNK:
        zt = token_chunk(z_ptr, z_base, row_ok, 0, D, stride_d, BLOCK_D)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        if ONE_CHUNK:
            acc = dot_acc(zt, code_chunk(e_base, ks, k_ok, 0, D, stride_ek, BLOCK_D),
                          tl.zeros([BLOCK_N, BLOCK_K], tl.float32), DOT_FP32, False)
        else:
            acc = token_code_dot(z_ptr, z_base, row_ok, e_base, ks, k_ok, D, stride_d, stride_ek,
                                 DOT_FP32, False, BLOCK_N, BLOCK_K, BLOCK_D)
        if COSINE:  # -z . e / |e|: the bias is 0 for a code, inf past K
            score = acc * tl.load(scale_ptr + head * K + ks, mask=k_ok, other=0.0)[None, :] + tl.where(
                k_ok, 0.0, float("inf"))[None, :]
        else:
            score = tl.load(bias_ptr + head * K + ks, mask=k_ok, other=float("inf"))[None, :] - 2.0 * acc
        better = score < best
        best = tl.where(better, score, best)
        best_k0 = tl.where(better, k0, best_k0)
    # the row's minimum, then the lowest code holding it: two built-in reductions (a tl.reduce with a
    # (value, index) combine is the same on the GPU, but the interpreter runs it element by element in Python)
    best_k = best_k0 + tl.arange(0, BLOCK_K)[None, :]
    value = tl.min(best, axis=1)
    index = tl.min(tl.where(best == value[:, None], best_k, 2147483647), axis=1)
    # a NaN score never compares below: torch.argmin returns the first NaN, which for a code holding a NaN is
    # that code for every token (a token holding one scores NaN everywhere: index 0, as above)
    nan_code = tl.load(nan_ptr + head)
    index = tl.where(nan_code < K, nan_code, index)
    return value, index.to(tl.int64)


@triton.jit
def vq_argmin_kernel(
    z_ptr, e_ptr, bias_ptr, scale_ptr, nan_ptr, idx_ptr,
    N, S, K, D,
    stride_b, stride_s, stride_d, stride_eh, stride_ek,
    COSINE: tl.constexpr, DOT_FP32: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    rows, row_ok, z_base = token_rows(tl.program_id(0), N, S, head, D, stride_b, stride_s, stride_d, BLOCK_N)
    _, best_idx = _argmin_tiles(z_ptr, z_base, row_ok, e_ptr + head.to(tl.int64) * stride_eh, bias_ptr, scale_ptr,
                                nan_ptr, head, K, D, stride_d, stride_ek, COSINE, DOT_FP32, ONE_CHUNK, BLOCK_N,
                                BLOCK_K, BLOCK_D)
    tl.store(idx_ptr + rows * tl.num_programs(1) + head, best_idx, mask=row_ok)


@triton.jit
def _chunk(z_ptr, z_base, e_rows, row_ok, d0, D, stride_d, zden, eden, COSINE: tl.constexpr,
           BLOCK_D: tl.constexpr, EXACT: tl.constexpr = False):
    """The [BLOCK_N, BLOCK_D] chunk at feature d0 of the tokens and of their codes in fp32, as the losses see
    them: for cosine divided by their norms and rounded to their own dtypes (F.normalize in that dtype).
    EXACT (the forward, whose values a user compares): IEEE division, torch's own; its slow path is a
    subroutine call whose stack frame the backward's register-tight kernels spilled around, and a gradient
    is not compared bitwise, so the backward divides as Triton's ``/`` does (div.full, within 2 ulp)."""
    ds = d0 + tl.arange(0, BLOCK_D)
    m = row_ok[:, None] & (ds < D)[None, :]
    z = tl.load(z_ptr + z_base[:, None] + ds[None, :].to(tl.int64) * stride_d, mask=m, other=0.0)
    e = tl.load(e_rows[:, None] + ds[None, :], mask=m, other=0.0)
    zf = z.to(tl.float32)
    ef = e.to(tl.float32)
    if COSINE and EXACT:
        zf = tl.div_rn(zf, zden[:, None]).to(z.dtype).to(tl.float32)
        ef = tl.div_rn(ef, eden[:, None]).to(e.dtype).to(tl.float32)
    elif COSINE:
        zf = (zf / zden[:, None]).to(z.dtype).to(tl.float32)
        ef = (ef / eden[:, None]).to(e.dtype).to(tl.float32)
    return zf, ef, ds, m


@triton.jit
def _z_norm(z_ptr, z_base, row_ok, D, stride_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            EXACT: tl.constexpr = False):
    """F.normalize's denominator of each token: max(||z||, 1e-12), the norm rounded to z's dtype as torch's
    norm of a 16-bit tensor is (EXACT: the IEEE square root, as ``_chunk``'s division); and the unclamped
    norm (its backward switches at the floor)."""
    zz = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_ptr + z_base[:, None] + ds[None, :].to(tl.int64) * stride_d,
                    mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)
        zz += tl.sum(z.to(tl.float32) * z.to(tl.float32), axis=1)
    if EXACT:
        nz = tl.sqrt_rn(zz).to(z_ptr.dtype.element_ty).to(tl.float32)
    else:
        nz = tl.sqrt(zz).to(z_ptr.dtype.element_ty).to(tl.float32)
    return tl.maximum(nz, NORMALIZE_EPS), nz


@triton.jit
def _rotation_norms(vv, qq):
    """The rotation trick's (reference ``rotation_trick``) per-token norms from ||z||^2 and ||z_q||^2:
    cz = max(|z|, 1e-6), cq = max(|z_q|, 1e-6) (u = z / cz, q = z_q / cq) and the scale s = |z_q| / cz."""
    cz = tl.maximum(tl.sqrt(vv), NORM_EPS)
    return cz, tl.maximum(tl.sqrt(qq), NORM_EPS), tl.sqrt(qq) / cz


@triton.jit
def _u_plus_q(zf, ef, cz, cq):
    """u + q elementwise: w = (u + q) / max(|u + q|, 1e-12). Its norm and every dot with it are summed from
    these same elements, never expanded as |u|^2 + 2 u.q + |q|^2: where u ~ -q that expansion cancels to 0
    while the elements keep their rounding, and z . w came out unbounded (|z| 1e5 and more)."""
    return zf / cz[:, None] + ef / cq[:, None]


@triton.jit
def _rotation_dots(z_ptr, z_base, e_rows, row_ok, g_ptr, g_base, gstride_d, D, stride_d, zden, eden, cz, cq,
                   COSINE: tl.constexpr, GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   EXACT: tl.constexpr = False):
    """(|u + q|, z . (u + q), g . (u + q)) per token, from the elements (``_u_plus_q``) as the kernel's other
    passes form them (EXACT as theirs); g with GRAD only."""
    ww = tl.zeros([BLOCK_N], tl.float32)
    zw = tl.zeros([BLOCK_N], tl.float32)
    gw = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        zf, ef, ds, m = _chunk(z_ptr, z_base, e_rows, row_ok, d0, D, stride_d, zden, eden, COSINE, BLOCK_D, EXACT)
        upq = _u_plus_q(zf, ef, cz, cq)
        ww += tl.sum(upq * upq, axis=1)
        zw += tl.sum(zf * upq, axis=1)
        if GRAD:
            g = tl.load(g_ptr + g_base[:, None] + ds[None, :].to(tl.int64) * gstride_d, mask=m, other=0.0)
            gw += tl.sum(g.to(tl.float32) * upq, axis=1)
    return tl.maximum(tl.sqrt(ww), NORMALIZE_EPS), zw, gw


@triton.jit
def vq_fwd_kernel(
    z_ptr, e_ptr, bias_ptr, scale_ptr, nan_ptr, eden_ptr, idx_ptr, q_ptr, sq_ptr,
    N, S, K, D,
    stride_b, stride_s, stride_d, qstride_b, qstride_s, qstride_d, stride_eh, stride_ek,
    COSINE: tl.constexpr, ESTIMATOR: tl.constexpr, DOT_FP32: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EPI_D: tl.constexpr,
):
    """Search, then z_q (the estimator's value) written and the squared error summed: one program per tile
    of BLOCK_N tokens of one head; the epilogue's passes over the features take chunks of EPI_D (the
    search's BLOCK_D may span all of D, too wide for the epilogue's fp32 tiles in registers)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    bi, si = token_split(rows, S)
    z_base = token_base(bi, si, head, D, stride_b, stride_s, stride_d)
    e_base = e_ptr + head.to(tl.int64) * stride_eh
    _, idx = _argmin_tiles(z_ptr, z_base, row_ok, e_base, bias_ptr, scale_ptr, nan_ptr, head, K, D, stride_d, stride_ek,
                           COSINE, DOT_FP32, ONE_CHUNK, BLOCK_N, BLOCK_K, BLOCK_D)
    tl.store(idx_ptr + rows * tl.num_programs(1) + head, idx, mask=row_ok)

    e_rows = e_base + idx * stride_ek
    q_base = token_base(bi, si, head, D, qstride_b, qstride_s, qstride_d)
    zden = tl.full([BLOCK_N], 1.0, tl.float32)
    eden = tl.full([BLOCK_N], 1.0, tl.float32)
    if COSINE:
        zden, _ = _z_norm(z_ptr, z_base, row_ok, D, stride_d, BLOCK_N, EPI_D, True)
        eden = tl.load(eden_ptr + head * K + idx, mask=row_ok, other=1.0)
    # rotation: out = s (z - 2 (z . w) w + 2 (z . u) q), from |z|, |z_q| and then the dots with u + q
    cz = tl.full([BLOCK_N], 1.0, tl.float32)
    cq = cz
    rs = cz
    a_w = tl.zeros([BLOCK_N], tl.float32)  # 2 (z . w) / |u + q|: the factor of u + q
    b_q = tl.zeros([BLOCK_N], tl.float32)  # 2 (z . u) / cq: the factor of z_q
    if ESTIMATOR == ROTATION:
        vv = tl.zeros([BLOCK_N], tl.float32)
        qq = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, EPI_D):
            zf, ef, ds, m = _chunk(z_ptr, z_base, e_rows, row_ok, d0, D, stride_d, zden, eden, COSINE, EPI_D,
                                   True)
            vv += tl.sum(zf * zf, axis=1)
            qq += tl.sum(ef * ef, axis=1)
        cz, cq, rs = _rotation_norms(vv, qq)
        cw, zw, _ = _rotation_dots(z_ptr, z_base, e_rows, row_ok, z_ptr, z_base, stride_d, D, stride_d, zden, eden,
                                   cz, cq, COSINE, False, BLOCK_N, EPI_D, True)
        a_w = 2.0 * zw / (cw * cw)
        b_q = 2.0 * (vv / cz) / cq
    out_ty = q_ptr.dtype.element_ty
    sq = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, EPI_D):
        zf, ef, ds, m = _chunk(z_ptr, z_base, e_rows, row_ok, d0, D, stride_d, zden, eden, COSINE, EPI_D, True)
        diff = zf - ef
        sq += tl.sum(diff * diff, axis=1)
        if ESTIMATOR == ROTATION:
            out = rs[:, None] * (zf - a_w[:, None] * _u_plus_q(zf, ef, cz, cq) + b_q[:, None] * ef)
        elif ESTIMATOR == VALUE:
            out = ef
        else:  # z + (z_q - z), each op rounded to the output dtype as torch's eager ops round it
            out = zf + (ef - zf).to(out_ty).to(tl.float32)
        tl.store(q_ptr + q_base[:, None] + ds[None, :].to(tl.int64) * qstride_d, out.to(out_ty), mask=m)
    tl.store(sq_ptr + head * tl.num_programs(0) + pid, tl.sum(sq, axis=0))


@triton.jit
def vq_bwd_kernel(
    z_ptr, e_ptr, eden_ptr, idx_ptr, g_ptr, gsq_ptr, pos_ptr, gz_ptr, rows_ptr,
    N, S, K, D,
    stride_b, stride_s, stride_d, gstride_b, gstride_s, gstride_d, zgstride_b, zgstride_s, zgstride_d,
    stride_eh, stride_ek,
    COSINE: tl.constexpr, ESTIMATOR: tl.constexpr, CODE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dz in z's dtype (strides zgstride_*) and, with CODE_GRAD, each token's codebook-gradient row written at
    its place in code order (``pos``), both from the upstream g (of z_q) and (g_c, g_b) (of the two sums)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    heads = tl.num_programs(1)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    bi, si = token_split(rows, S)
    z_base = token_base(bi, si, head, D, stride_b, stride_s, stride_d)
    g_base = token_base(bi, si, head, D, gstride_b, gstride_s, gstride_d)
    gz_base = token_base(bi, si, head, D, zgstride_b, zgstride_s, zgstride_d)
    idx = tl.load(idx_ptr + rows * heads + head, mask=row_ok, other=0)
    e_rows = e_ptr + head.to(tl.int64) * stride_eh + idx * stride_ek
    g_c = tl.load(gsq_ptr)
    g_b = tl.load(gsq_ptr + 1)
    zden = tl.full([BLOCK_N], 1.0, tl.float32)
    nz = zden
    eden = zden
    if COSINE:
        zden, nz = _z_norm(z_ptr, z_base, row_ok, D, stride_d, BLOCK_N, BLOCK_D)
        eden = tl.load(eden_ptr + head * K + idx, mask=row_ok, other=1.0)
    # the per-token dots the estimator's and F.normalize's Jacobians need
    vv = tl.zeros([BLOCK_N], tl.float32)
    qq = tl.zeros([BLOCK_N], tl.float32)
    vq = tl.zeros([BLOCK_N], tl.float32)
    gv = tl.zeros([BLOCK_N], tl.float32)
    gq = tl.zeros([BLOCK_N], tl.float32)
    if COSINE or ESTIMATOR == ROTATION:
        for d0 in range(0, D, BLOCK_D):
            zf, ef, ds, m = _chunk(z_ptr, z_base, e_rows, row_ok, d0, D, stride_d, zden, eden, COSINE, BLOCK_D)
            g = tl.load(g_ptr + g_base[:, None] + ds[None, :].to(tl.int64) * gstride_d, mask=m, other=0.0)
            g = g.to(tl.float32)
            vv += tl.sum(zf * zf, axis=1)
            qq += tl.sum(ef * ef, axis=1)
            vq += tl.sum(zf * ef, axis=1)
            gv += tl.sum(g * zf, axis=1)
            gq += tl.sum(g * ef, axis=1)
    # J_est^T g = s (g - 2 (g . w) w + 2 (g . q) u) = s g - cw_ (u + q) + cu z  (straight-through: s = 1,
    # cw_ = cu = 0; a value: s = 0), u + q taken elementwise (``_u_plus_q``)
    s = tl.full([BLOCK_N], 1.0 if ESTIMATOR != VALUE else 0.0, tl.float32)
    cz = tl.full([BLOCK_N], 1.0, tl.float32)
    cq = cz
    c_w = tl.zeros([BLOCK_N], tl.float32)
    c_u = tl.zeros([BLOCK_N], tl.float32)
    proj = s * gv
    if ESTIMATOR == ROTATION:
        cz, cq, s = _rotation_norms(vv, qq)
        cw, zw, gw = _rotation_dots(z_ptr, z_base, e_rows, row_ok, g_ptr, g_base, gstride_d, D, stride_d, zden, eden,
                                    cz, cq, COSINE, True, BLOCK_N, BLOCK_D)
        c_w = 2.0 * s * gw / (cw * cw)  # 2 s (g . w) / |u + q|
        c_u = 2.0 * s * (gq / cq) / cz  # 2 s (g . q) / cz
        proj = s * gv - c_w * zw + c_u * vv
    # y . dL/dy of F.normalize's output y (~ the rounded unit token): its Jacobian's projection
    proj += 2.0 * g_c * (vv - vq)
    gz_ty = gz_ptr.dtype.element_ty
    at = rows  # each token's row in code order
    if CODE_GRAD:
        at = tl.load(pos_ptr + rows * heads + head, mask=row_ok, other=0)
    for d0 in range(0, D, BLOCK_D):
        zf, ef, ds, m = _chunk(z_ptr, z_base, e_rows, row_ok, d0, D, stride_d, zden, eden, COSINE, BLOCK_D)
        g = tl.load(g_ptr + g_base[:, None] + ds[None, :].to(tl.int64) * gstride_d, mask=m, other=0.0)
        gy = s[:, None] * g.to(tl.float32) + 2.0 * g_c * (zf - ef)
        if ESTIMATOR == ROTATION:
            gy += c_u[:, None] * zf - c_w[:, None] * _u_plus_q(zf, ef, cz, cq)
        if COSINE:  # F.normalize: (g - y (y . g)) / |z| above the floor, g / floor at or below it
            gy = tl.where((nz >= NORMALIZE_EPS)[:, None], gy - zf * proj[:, None], gy) / zden[:, None]
        tl.store(gz_ptr + gz_base[:, None] + ds[None, :].to(tl.int64) * zgstride_d, gy.to(gz_ty), mask=m)
        if CODE_GRAD:
            tl.store(rows_ptr + at[:, None] * D + ds[None, :], 2.0 * g_b * (ef - zf), mask=m)
