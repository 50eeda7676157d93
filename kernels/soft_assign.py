"""Soft assignment of tokens to a learned codebook, fused as flash attention fuses softmax(Q K^T) V: no N x K
logit or probability exists anywhere, only one [BLOCK_N, BLOCK_K] tile per program.

Tokens z_n (N x D), codes e_k (K x D), t the inverse temperature:

    s_nk = t f(z_n, e_k),   f = z.e (dot) | -||z - e||^2 (sqeuclidean) | -||z - e|| (euclidean),
                            ||z - e||^2 = max(||z||^2 + ||e||^2 - 2 z.e, 0)   (the z.e tile from ``tl.dot``)
    p_n   = softmax_k s_n,   lse_n = logsumexp_k s_nk,   H_n = lse_n - sum_k p_nk s_nk
    pbar_k = (1/N) sum_n p_nk,   pE_n = sum_k p_nk e_k                                         (flash's P V)

Forward: ``soft_assign_fwd_kernel`` (one program per token tile) streams the code tiles with an online
(max, sum) and writes lse, H and pE; H is carried as sum_k exp(s - m)(s - m), rescaled when the running max
m moves, so it never subtracts two logits of size t |z||e|. ``soft_assign_pbar_kernel`` (one program per
code tile) streams every token tile and sums p_nk = exp(s_nk - lse_n) down its columns in a fixed order.

Backward (p recomputed from lse, flash attention's scheme), for upstream g_lse, g_H, g_pbar, g_pE:

    ds_nk = p_nk [g_lse_n - g_H_n (s_nk - sbar_n) + g_pbar_k / N + g_pE_n . e_k - c_n]
    sbar_n = lse_n - H_n  (s - sbar = log p + H),   c_n = (1/N) sum_k p_nk g_pbar_k + g_pE_n . pE_n
    w_nk  = t ds_nk (dot) | 2 t ds_nk (sqeuclidean) | t ds_nk / ||z_n - e_k||, 0 at distance 0 (euclidean,
            as torch's cdist backward)
    dz_n  = sum_k w_nk e_k  - [metric != dot] z_n sum_k w_nk
    de_k  = sum_n w_nk z_n  - [metric != dot] e_k sum_n w_nk  + sum_n p_nk g_pE_n            (flash's dV)

``soft_assign_bwd_dz_kernel`` (token tiles) first streams the codes once for c_n's first part (only when
g_pbar is given), writes c_n, then streams them again for dz; ``soft_assign_bwd_de_kernel`` (code tiles)
streams every token tile for de. Every sum runs in a fixed order: no atomics, bitwise deterministic.

Feature chunks: the logits accumulate over D in chunks of BLOCK_D (``token_code_dot``; a D below it is padded
to it); the D-wide outputs (pE, dz, de) are accumulated in chunks of BLOCK_V columns, one sweep over the codes
(tokens) a chunk, so D <= BLOCK_V is one sweep and a wider D recomputes the logits once per chunk.

Precision: fp32 accumulation always. The logits' z.e takes one 16-bit dtype on both sides to the tensor
cores as it is (exact products), anything else as tf32x3, not ``IEEE``: tf32x3 drops only the lo x lo
product, an error of ~2^-21 |z||e|, so at t = 100 a logit moves by ~5e-5 nats (plain tf32 would move it by
about a tenth of a nat), while ``IEEE`` would run the dots as FMAs, several times slower. The second-stage
products (P E, W E, W^T Z, P^T g_pE) have an fp32 operand (p, w) and run as tf32x3 too.

Work per step (F = 2 N K D FLOPs, D <= BLOCK_V): forward 2 F (logits, P E) + F (pbar's logits); backward,
token pass 2 F (logits, W E) + F with g_pE (g_pE . e) + F with g_pbar (c_n's sweep), code pass 2 F (logits,
W^T Z) + 2 F with g_pE (g_pE . e, P^T g_pE): 6 to 8 F with every output used, and N K exponentials per
sweep. Each further BLOCK_V chunk re-runs its kernel's logits (and g_pE . e): D = 256 in chunks of 64 costs
the forward 5 F in place of 2 F. Bytes: z (and g_pE) once, the codebook (K D) once per token tile from L2,
O(N + K) statistics: no DRAM bound; the tensor cores bound it once D is past a few tens, the exponentials
(MUFU, one per logit per sweep) below that, as flash attention with a small head dim.
"""

import triton
import triton.language as tl

from .tiles import token_code_dot, token_rows

DOT, SQEUCLIDEAN, EUCLIDEAN = 0, 1, 2


@triton.jit
def _token_sq_norms(zn2_ptr, rows, row_ok, METRIC: tl.constexpr):
    """||z_n||^2 of the tile's tokens for the distances; dot reads nothing (its buffer is empty)."""
    if METRIC == 0:
        zn2 = tl.zeros(rows.shape, tl.float32)
    else:
        zn2 = tl.load(zn2_ptr + rows, mask=row_ok, other=0.0)
    return zn2


@triton.jit
def _logits(
    z_ptr, z_base, row_ok, zn2, e_ptr, en2_ptr, ks, k_ok, D, stride_d, stride_ek, t,
    METRIC: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(s [BLOCK_N, BLOCK_K] with -inf on padded codes, the distance ||z - e|| for euclidean (else the dot))."""
    acc = token_code_dot(z_ptr, z_base, row_ok, e_ptr, ks, k_ok, D, stride_d, stride_ek,
                         DOT_FP32, False, BLOCK_N, BLOCK_K, BLOCK_D)
    dist = acc
    if METRIC == 0:
        f = acc
    else:
        en2 = tl.load(en2_ptr + ks, mask=k_ok, other=0.0)
        # the expansion's rounding can go below 0 where z = e: clamped, as cdist's matmul form clamps
        q = tl.maximum(zn2[:, None] + en2[None, :] - 2.0 * acc, 0.0)
        if METRIC == 1:
            f = -q
        else:
            dist = tl.sqrt(q)
            f = -dist
    s = tl.where(k_ok[None, :], f * t, float("-inf"))
    return s, dist


@triton.jit
def _code_grad(gpbar_ptr, ks, k_ok, inv_n, HAS_GPBAR: tl.constexpr):
    """g_pbar / N of the codes ``ks`` (0 without g_pbar)."""
    if HAS_GPBAR:
        gp = tl.load(gpbar_ptr + ks, mask=k_ok, other=0.0) * inv_n
    else:
        gp = tl.zeros(ks.shape, tl.float32)
    return gp


@triton.jit
def _ds_tile(
    s, dist, lse, ent, g_lse, g_h, c, gp_k, gpe_e, valid, t,
    METRIC: tl.constexpr, HAS_GPBAR: tl.constexpr, HAS_GPE: tl.constexpr,
):
    """(p, w) of a tile: p = exp(s - lse), w = ds scaled by the metric's derivative (0 outside ``valid``).
    ``gp_k`` is g_pbar / N of the tile's codes, ``gpe_e`` = g_pE . e (each used only when given)."""
    # padded codes have s = -inf: log p is taken as 0 there, so inner stays finite and p = 0 zeroes ds
    logp = tl.where(valid, s - lse[:, None], 0.0)
    p = tl.where(valid, tl.exp(logp), 0.0)
    inner = g_lse[:, None] - g_h[:, None] * (logp + ent[:, None]) - c[:, None]
    if HAS_GPBAR:
        inner += gp_k[None, :]
    if HAS_GPE:
        inner += gpe_e
    ds = p * inner
    if METRIC == 0:
        w = ds * t
    elif METRIC == 1:
        w = ds * (2.0 * t)
    else:  # the gradient of a distance is defined as 0 where it is 0 (torch's cdist backward)
        pos = dist > 0.0
        w = tl.where(pos, ds * t / tl.where(pos, dist, 1.0), 0.0)
    return p, w


@triton.jit
def soft_assign_fwd_kernel(
    z_ptr, e_ptr, zn2_ptr, en2_ptr, pe_ptr, lse_ptr, ent_ptr,
    N, S, K, D, t,
    stride_b, stride_s, stride_d, stride_ek, pe_sb, pe_ss, pe_sd,
    METRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    head = tl.program_id(1)  # one codebook: 0
    rows, row_ok, z_base = token_rows(tl.program_id(0), N, S, head, D, stride_b, stride_s, stride_d, BLOCK_N)
    _, _, pe_base = token_rows(tl.program_id(0), N, S, head, D, pe_sb, pe_ss, pe_sd, BLOCK_N)
    zn2 = _token_sq_norms(zn2_ptr, rows, row_ok, METRIC)
    for v0 in range(0, D, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        v_ok = vs < D
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_N], tl.float32)  # sum_k exp(s - m)
        a = tl.zeros([BLOCK_N], tl.float32)  # sum_k exp(s - m) (s - m)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            # named, not "_": a name bound before a loop and again inside it is a loop-carried value, whose
            # type must not change (the interpreter does not check this; the compiler does)
            s, unused_dist = _logits(z_ptr, z_base, row_ok, zn2, e_ptr, en2_ptr, ks, k_ok, D, stride_d,
                                     stride_ek, t, METRIC, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
            shift = tl.where(den > 0.0, m - m_new, 0.0)  # -inf - m_new would make 0 * inf
            pt = tl.exp(s - m_new[:, None])
            centred = tl.where(k_ok[None, :], s - m_new[:, None], 0.0)
            a = alpha * (a + den * shift) + tl.sum(pt * centred, axis=1)
            den = den * alpha + tl.sum(pt, axis=1)
            ev = tl.load(e_ptr + ks[:, None].to(tl.int64) * stride_ek + vs[None, :],
                         mask=k_ok[:, None] & v_ok[None, :], other=0.0)
            acc = tl.dot(pt, ev.to(tl.float32), acc * alpha[:, None], input_precision="tf32x3")
            m = m_new
        pe = acc / den[:, None]
        tl.store(pe_ptr + pe_base[:, None] + vs[None, :].to(tl.int64) * pe_sd, pe,
                 mask=row_ok[:, None] & v_ok[None, :])
        if v0 == 0:
            tl.store(lse_ptr + rows, m + tl.log(den), mask=row_ok)
            tl.store(ent_ptr + rows, tl.log(den) - a / den, mask=row_ok)


@triton.jit
def soft_assign_pbar_kernel(
    z_ptr, e_ptr, zn2_ptr, en2_ptr, lse_ptr, pbar_ptr,
    N, S, K, D, t, inv_n,
    stride_b, stride_s, stride_d, stride_ek,
    METRIC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    col = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows, row_ok, z_base = token_rows(tl.cast(n0 // BLOCK_N, tl.int32), N, S, head, D,
                                          stride_b, stride_s, stride_d, BLOCK_N)
        zn2 = _token_sq_norms(zn2_ptr, rows, row_ok, METRIC)
        s, unused_dist = _logits(z_ptr, z_base, row_ok, zn2, e_ptr, en2_ptr, ks, k_ok, D, stride_d, stride_ek, t,
                       METRIC, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p = tl.where(row_ok[:, None] & k_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        col += tl.sum(p, axis=0)
    tl.store(pbar_ptr + ks, col * inv_n, mask=k_ok)


@triton.jit
def soft_assign_bwd_dz_kernel(
    z_ptr, e_ptr, zn2_ptr, en2_ptr, lse_ptr, ent_ptr, pe_ptr,
    glse_ptr, gh_ptr, gpbar_ptr, gpe_ptr, c_ptr, dz_ptr,
    N, S, K, D, t, inv_n,
    stride_b, stride_s, stride_d, stride_ek, pe_sb, pe_ss, pe_sd, g_sb, g_ss, g_sd, dz_sb, dz_ss, dz_sd,
    METRIC: tl.constexpr, DOT_FP32: tl.constexpr, DOT_FP32_G: tl.constexpr,
    HAS_GPBAR: tl.constexpr, HAS_GPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    rows, row_ok, z_base = token_rows(pid, N, S, head, D, stride_b, stride_s, stride_d, BLOCK_N)
    zn2 = _token_sq_norms(zn2_ptr, rows, row_ok, METRIC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lse = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    # c_n = (1/N) sum_k p_nk g_pbar_k + g_pE_n . pE_n
    c = tl.zeros([BLOCK_N], tl.float32)
    if HAS_GPBAR:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            s, unused_dist = _logits(z_ptr, z_base, row_ok, zn2, e_ptr, en2_ptr, ks, k_ok, D, stride_d, stride_ek, t,
                           METRIC, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
            gp = tl.load(gpbar_ptr + ks, mask=k_ok, other=0.0)
            p = tl.where(k_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
            c += tl.sum(p * gp[None, :], axis=1)
        c = c * inv_n
    _, _, g_base = token_rows(pid, N, S, head, D, g_sb, g_ss, g_sd, BLOCK_N)
    if HAS_GPE:
        _, _, pe_base = token_rows(pid, N, S, head, D, pe_sb, pe_ss, pe_sd, BLOCK_N)
        for v0 in range(0, D, BLOCK_V):
            vs = v0 + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (vs < D)[None, :]
            g = tl.load(gpe_ptr + g_base[:, None] + vs[None, :].to(tl.int64) * g_sd, mask=ok, other=0.0)
            pe = tl.load(pe_ptr + pe_base[:, None] + vs[None, :].to(tl.int64) * pe_sd, mask=ok, other=0.0)
            c += tl.sum(g.to(tl.float32) * pe.to(tl.float32), axis=1)
    tl.store(c_ptr + rows, c, mask=row_ok)

    _, _, dz_base = token_rows(pid, N, S, head, D, dz_sb, dz_ss, dz_sd, BLOCK_N)
    for v0 in range(0, D, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        v_ok = vs < D
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        wsum = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            s, dist = _logits(z_ptr, z_base, row_ok, zn2, e_ptr, en2_ptr, ks, k_ok, D, stride_d, stride_ek, t,
                              METRIC, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
            gp = _code_grad(gpbar_ptr, ks, k_ok, inv_n, HAS_GPBAR)
            if HAS_GPE:
                gpe_e = token_code_dot(gpe_ptr, g_base, row_ok, e_ptr, ks, k_ok, D, g_sd, stride_ek,
                                       DOT_FP32_G, False, BLOCK_N, BLOCK_K, BLOCK_D)
            else:
                gpe_e = s
            unused_p, w = _ds_tile(s, dist, lse, ent, g_lse, g_h, c, gp, gpe_e, row_ok[:, None] & k_ok[None, :], t,
                            METRIC, HAS_GPBAR, HAS_GPE)
            wsum += tl.sum(w, axis=1)
            ev = tl.load(e_ptr + ks[:, None].to(tl.int64) * stride_ek + vs[None, :],
                         mask=k_ok[:, None] & v_ok[None, :], other=0.0)
            acc = tl.dot(w, ev.to(tl.float32), acc, input_precision="tf32x3")
        ok = row_ok[:, None] & v_ok[None, :]
        if METRIC != 0:
            zv = tl.load(z_ptr + z_base[:, None] + vs[None, :].to(tl.int64) * stride_d, mask=ok, other=0.0)
            acc -= zv.to(tl.float32) * wsum[:, None]
        tl.store(dz_ptr + dz_base[:, None] + vs[None, :].to(tl.int64) * dz_sd, acc, mask=ok)


@triton.jit
def soft_assign_bwd_de_kernel(
    z_ptr, e_ptr, zn2_ptr, en2_ptr, lse_ptr, ent_ptr,
    glse_ptr, gh_ptr, gpbar_ptr, gpe_ptr, c_ptr, de_ptr,
    N, S, K, D, t, inv_n,
    stride_b, stride_s, stride_d, stride_ek, g_sb, g_ss, g_sd,
    METRIC: tl.constexpr, DOT_FP32: tl.constexpr, DOT_FP32_G: tl.constexpr,
    HAS_GPBAR: tl.constexpr, HAS_GPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
):
    head = tl.program_id(1)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    gp = _code_grad(gpbar_ptr, ks, k_ok, inv_n, HAS_GPBAR)
    for v0 in range(0, D, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        v_ok = vs < D
        acc = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
        wsum = tl.zeros([BLOCK_K], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            tile = tl.cast(n0 // BLOCK_N, tl.int32)
            rows, row_ok, z_base = token_rows(tile, N, S, head, D, stride_b, stride_s, stride_d, BLOCK_N)
            g_rows, g_ok, g_base = token_rows(tile, N, S, head, D, g_sb, g_ss, g_sd, BLOCK_N)
            zn2 = _token_sq_norms(zn2_ptr, rows, row_ok, METRIC)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            g_lse = tl.load(glse_ptr + rows, mask=row_ok, other=0.0)
            g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
            c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
            s, dist = _logits(z_ptr, z_base, row_ok, zn2, e_ptr, en2_ptr, ks, k_ok, D, stride_d, stride_ek, t,
                              METRIC, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
            if HAS_GPE:
                gpe_e = token_code_dot(gpe_ptr, g_base, row_ok, e_ptr, ks, k_ok, D, g_sd, stride_ek,
                                       DOT_FP32_G, False, BLOCK_N, BLOCK_K, BLOCK_D)
            else:
                gpe_e = s
            p, w = _ds_tile(s, dist, lse, ent, g_lse, g_h, c, gp, gpe_e, row_ok[:, None] & k_ok[None, :], t,
                            METRIC, HAS_GPBAR, HAS_GPE)
            wsum += tl.sum(w, axis=0)
            ok = row_ok[:, None] & v_ok[None, :]
            zv = tl.load(z_ptr + z_base[:, None] + vs[None, :].to(tl.int64) * stride_d, mask=ok, other=0.0)
            acc = tl.dot(tl.trans(w), zv.to(tl.float32), acc, input_precision="tf32x3")
            if HAS_GPE:
                gv = tl.load(gpe_ptr + g_base[:, None] + vs[None, :].to(tl.int64) * g_sd, mask=ok, other=0.0)
                acc = tl.dot(tl.trans(p), gv.to(tl.float32), acc, input_precision="tf32x3")
        ok = k_ok[:, None] & v_ok[None, :]
        if METRIC != 0:
            ev = tl.load(e_ptr + ks[:, None].to(tl.int64) * stride_ek + vs[None, :], mask=ok, other=0.0)
            acc -= ev.to(tl.float32) * wsum[:, None]
        tl.store(de_ptr + ks[:, None].to(tl.int64) * D + vs[None, :], acc, mask=ok)
