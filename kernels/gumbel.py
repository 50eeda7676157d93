"""Gumbel-softmax posteriors (DALL-E's dVAE, taming's GumbelQuantize): the relaxed sample and the KL of the
categorical to the uniform prior in one read of the logits, the Gumbel noise drawn by Philox in the kernel
and regenerated in backward (neither the noise nor the soft sample is kept for backward).

For a position p with logits l_k (k < K), g_pk = -log(-log u_pk), u_pk = Philox(seed, p K + k) in (0, 1):

    v_k = (l_k + g_k) / tau,   y_k = exp(v_k - logsumexp_k v)          (hard: one-hot of argmax_k v, first on ties)
    KL_p = log K - H(q) = log K - lse_l + E_q[l],   q = softmax(l)     (per position, no noise)

Forward: two passes over K per tile of positions (the online (max, sum) of v, of l and of q l, with the argmax;
then y written); the per-position logsumexp of v and (lse_l, E_q[l]) are kept, 3 floats a position.
Backward: dl_k = y_k (gy_k - sum_j y_j gy_j) / tau + gkl_p q_k (l_k - E_q[l]), y recomputed from the
regenerated noise, again two passes. Bytes: the logits read twice and y written once forward (read twice and
the gradient written once backward); Philox costs ~40 integer ops an element: at K = 8192 and fp32 logits
the kernels are bound by the integer issue rate on the Philox rounds, not by DRAM.

Positions are addressed as (b, s) = (p // S, p % S) with strides (stride_b, stride_s) and codes by stride_k:
(B, K, H, W) logits (channels-first, S = H W) and (N, K) ones are read in place.

With a codebook E (K, D) (taming's GumbelQuantize, DALL-E's dVAE), z_q_p = sum_k y_pk e_k is formed in the
sampling pass as flash attention forms P V: per tile of 32 positions, pass 1 as above (with the argmax), then
soft: z_q += y_tile @ E_tile over the code tiles (tl.dot, fp32 accumulation; y only in registers); hard:
z_q = E[argmax] (the straight-through value). Backward: gy_pk = gz_p . e_k (tl.dot) into the softmax backward
above, y the soft sample (straight-through: hard's gradient to the logits is the soft sample's), two passes;
dE = y^T gz by a kernel over (code tile, feature tile) that streams the position tiles in order (deterministic,
no atomics), y recomputed (soft) or the one-hot of the saved argmax (hard). Bytes: forward the logits twice
(once hard) and z_q, P (4 + 8) stats and indices; nothing of size P K beyond the logits and their gradient.
FLOPs: 2 P K D forward (soft), 4 P K D for dl and 2 P K D for dE backward. Past 128 features the
forward's programs split the features (pass 1 and the noise recomputed per split: twice at D = 256).
"""

import triton
import triton.language as tl

from .sampling import _philox, _unit
from .tiles import token_code_dot


@triton.jit
def _gumbel(seed, counters):
    """-log(-log u) with u = a 23-bit uniform + 2^-24, in (0, 1) exactly: no log of 0 at either end, and every
    intermediate a normal fp32 (so a GPU's flush-to-zero log changes nothing)."""
    w, _, _, _ = _philox(seed, counters)
    u = _unit(w, 1.0) + 5.960464477539063e-08
    return -tl.log(-tl.log(u))


@triton.jit
def _tile(pos, p_ok, ks, S, K, stride_b, stride_s, stride_k):
    """The [BLOCK_P, BLOCK_K] mask and element offsets of positions ``pos`` and codes ``ks``."""
    k_ok = ks < K
    ok = p_ok[:, None] & k_ok[None, :]
    offs = ((pos // S) * stride_b + (pos % S) * stride_s)[:, None] + ks[None, :].to(tl.int64) * stride_k
    return ok, offs


@triton.jit
def _stats(l_ptr, seed, pos, p_ok, K_LOOP, S, K, inv_tau, stride_b, stride_s, stride_k,
           HARD: tl.constexpr, KL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The first pass over the codes of a tile of positions (K_LOOP = K; 0 skips it): the online (max, sum) of
    v, the argmax of v (HARD), and the online (max, sum) of l and of q l (KL). Returns (m, s, best_k, m2, s2,
    t2): lse_v = m + log s, lse_l = m2 + log s2, E_q[l] = t2 / s2."""
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK_P], tl.int64)
    m2 = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s2 = tl.zeros([BLOCK_P], tl.float32)
    t2 = tl.zeros([BLOCK_P], tl.float32)
    for k0 in range(0, K_LOOP, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok, offs = _tile(pos, p_ok, ks, S, K, stride_b, stride_s, stride_k)
        lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        v = (lg + _gumbel(seed, pos[:, None] * K + ks[None, :])) * inv_tau
        # codes past K are -inf; positions past P keep their finite (zero-logit) values, so no lane ever
        # computes -inf - (-inf)
        k_ok = (ks < K)[None, :]
        v = tl.where(k_ok, v, float("-inf"))
        m_new = tl.maximum(m, tl.max(v, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[:, None]), axis=1)
        m = m_new
        if HARD:
            tile_best = tl.max(v, axis=1)
            tile_k = tl.argmax(v, axis=1, tie_break_left=True).to(tl.int64) + k0
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_k = tl.where(better, tile_k, best_k)
        if KL:
            lm = tl.where(k_ok, lg, float("-inf"))
            m2_new = tl.maximum(m2, tl.max(lm, axis=1))
            e = tl.exp(lm - m2_new[:, None])
            rescale = tl.exp(m2 - m2_new)
            s2 = s2 * rescale + tl.sum(e, axis=1)
            t2 = t2 * rescale + tl.sum(e * tl.where(k_ok, lg, 0.0), axis=1)
            m2 = m2_new
    return m, s, best_k, m2, s2, t2


@triton.jit
def gumbel_softmax_fwd_kernel(
    l_ptr, seed_ptr, y_ptr, lse_ptr, kl_ptr,
    P, S, K, inv_tau, log_k,
    stride_b, stride_s, stride_k, ystride_b, ystride_s, ystride_k,
    HARD: tl.constexpr, KL: tl.constexpr, NOISE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """NOISE: write the Gumbel noise g itself into y (what a create_graph backward differentiates around)."""
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pos < P
    seed = tl.load(seed_ptr)
    m, s, best_k, m2, s2, t2 = _stats(l_ptr, seed, pos, p_ok, K if not NOISE else 0, S, K, inv_tau,
                                      stride_b, stride_s, stride_k, HARD, KL, BLOCK_P, BLOCK_K)
    lse = m + tl.log(s)
    if not NOISE:
        tl.store(lse_ptr + pos, lse, mask=p_ok)
    if KL:
        lse_l = m2 + tl.log(s2)
        mean_l = t2 / s2
        tl.store(lse_ptr + P + pos, lse_l, mask=p_ok)
        tl.store(lse_ptr + 2 * P + pos, mean_l, mask=p_ok)
        tl.store(kl_ptr + pos, log_k - lse_l + mean_l, mask=p_ok)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok, offs = _tile(pos, p_ok, ks, S, K, stride_b, stride_s, stride_k)
        _, y_offs = _tile(pos, p_ok, ks, S, K, ystride_b, ystride_s, ystride_k)
        if NOISE:
            y = _gumbel(seed, pos[:, None] * K + ks[None, :])
        elif HARD:
            y = tl.where(ks[None, :].to(tl.int64) == best_k[:, None], 1.0, 0.0)
        else:
            lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            v = (lg + _gumbel(seed, pos[:, None] * K + ks[None, :])) * inv_tau
            y = tl.exp(v - lse[:, None])
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gumbel_softmax_bwd_kernel(
    l_ptr, seed_ptr, lse_ptr, gy_ptr, gkl_ptr, dl_ptr,
    P, S, K, inv_tau,
    stride_b, stride_s, stride_k, gstride_b, gstride_s, gstride_k, dstride_b, dstride_s, dstride_k,
    GRAD_Y: tl.constexpr, KL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pos < P
    seed = tl.load(seed_ptr)
    lse = tl.load(lse_ptr + pos, mask=p_ok, other=0.0)
    dot = tl.zeros([BLOCK_P], tl.float32)
    if GRAD_Y:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ok, offs = _tile(pos, p_ok, ks, S, K, stride_b, stride_s, stride_k)
            _, g_offs = _tile(pos, p_ok, ks, S, K, gstride_b, gstride_s, gstride_k)
            lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            y = tl.exp((lg + _gumbel(seed, pos[:, None] * K + ks[None, :])) * inv_tau - lse[:, None])
            gy = tl.load(gy_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
            dot += tl.sum(tl.where(ok, y * gy, 0.0), axis=1)
    if KL:
        lse_l = tl.load(lse_ptr + P + pos, mask=p_ok, other=0.0)
        mean_l = tl.load(lse_ptr + 2 * P + pos, mask=p_ok, other=0.0)
        gkl = tl.load(gkl_ptr + pos, mask=p_ok, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok, offs = _tile(pos, p_ok, ks, S, K, stride_b, stride_s, stride_k)
        _, d_offs = _tile(pos, p_ok, ks, S, K, dstride_b, dstride_s, dstride_k)
        lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dl = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        if GRAD_Y:
            _, g_offs = _tile(pos, p_ok, ks, S, K, gstride_b, gstride_s, gstride_k)
            y = tl.exp((lg + _gumbel(seed, pos[:, None] * K + ks[None, :])) * inv_tau - lse[:, None])
            gy = tl.load(gy_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
            dl += y * (gy - dot[:, None]) * inv_tau
        if KL:
            q = tl.exp(lg - lse_l[:, None])
            dl += gkl[:, None] * q * (lg - mean_l[:, None])
        tl.store(dl_ptr + d_offs, dl.to(dl_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------
# the codebook product z_q = y . E fused into the sampling pass (y never written)
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _soft_tile(l_ptr, seed, pos, p_ok, ks, lse, S, K, inv_tau, stride_b, stride_s, stride_k):
    """y [BLOCK_P, BLOCK_K] of the soft sample, recomputed from the logits, the regenerated noise and the
    per-position logsumexp of v; 0 outside the (P, K) range (a tl.dot operand, not a masked store)."""
    ok, offs = _tile(pos, p_ok, ks, S, K, stride_b, stride_s, stride_k)
    lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.exp((lg + _gumbel(seed, pos[:, None] * K + ks[None, :])) * inv_tau - lse[:, None])
    return tl.where(ok, y, 0.0), lg, ok


@triton.jit
def gumbel_codebook_fwd_kernel(
    l_ptr, e_ptr, seed_ptr, zq_ptr, idx_ptr, lse_ptr, kl_ptr,
    P, S, K, D, inv_tau, log_k,
    stride_b, stride_s, stride_k, stride_ek, zstride_b, zstride_s, zstride_d,
    HARD: tl.constexpr, KL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z_q[p, d-tile] of a tile of positions: pass 1 as the sampler's (lse of v, argmax, KL stats); then soft:
    acc += y_tile @ E[k-tile, d-tile] over the code tiles (fp32 accumulation, y in registers only); hard: the
    row E[argmax] (the straight-through value y_hard . E). Program (i, j) covers features j BLOCK_D on: with
    D <= BLOCK_D (128) one program per position tile, else pass 1 (and soft's Philox) is repeated per
    feature tile. The feature tile 0 writes the stats, indices and KL."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    pos = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pos < P
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    seed = tl.load(seed_ptr)
    m, s, best_k, m2, s2, t2 = _stats(l_ptr, seed, pos, p_ok, K, S, K, inv_tau, stride_b, stride_s, stride_k,
                                      True, KL, BLOCK_P, BLOCK_K)
    lse = m + tl.log(s)
    if pid_d == 0:
        tl.store(lse_ptr + pos, lse, mask=p_ok)
        tl.store(idx_ptr + pos, best_k, mask=p_ok)
        if KL:
            lse_l = m2 + tl.log(s2)
            mean_l = t2 / s2
            tl.store(lse_ptr + P + pos, lse_l, mask=p_ok)
            tl.store(lse_ptr + 2 * P + pos, mean_l, mask=p_ok)
            tl.store(kl_ptr + pos, log_k - lse_l + mean_l, mask=p_ok)
    z_offs = ((pos // S) * zstride_b + (pos % S) * zstride_s)[:, None] + ds[None, :].to(tl.int64) * zstride_d
    z_ok = p_ok[:, None] & d_ok[None, :]
    if HARD:
        zq = tl.load(e_ptr + best_k[:, None] * stride_ek + ds[None, :], mask=z_ok, other=0.0).to(tl.float32)
    else:
        zq = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            y, _, _ = _soft_tile(l_ptr, seed, pos, p_ok, ks, lse, S, K, inv_tau, stride_b, stride_s, stride_k)
            et = tl.load(e_ptr + ks[:, None].to(tl.int64) * stride_ek + ds[None, :],
                         mask=(ks < K)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            zq = tl.dot(y, et, zq, input_precision="tf32x3")
    tl.store(zq_ptr + z_offs, zq.to(zq_ptr.dtype.element_ty), mask=z_ok)


@triton.jit
def gumbel_codebook_bwd_logits_kernel(
    l_ptr, e_ptr, seed_ptr, lse_ptr, gz_ptr, gkl_ptr, dl_ptr,
    P, S, K, D, inv_tau,
    stride_b, stride_s, stride_k, stride_ek, gstride_b, gstride_s, gstride_d, dstride_b, dstride_s, dstride_k,
    GRAD_Z: tl.constexpr, KL: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dl of a tile of positions: gy_nk = gz_n . e_k (token_code_dot over the features), then the sampler's
    softmax backward dl_k = y_k (gy_k - sum_j y_j gy_j) / tau (+ the KL's term), y the soft sample (hard
    mode's straight-through gradient is the soft sample's). Two passes over the codes, gy recomputed in each:
    4 P K D flops, no (P, K) buffer."""
    pid = tl.program_id(0)
    pos = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pos < P
    seed = tl.load(seed_ptr)
    lse = tl.load(lse_ptr + pos, mask=p_ok, other=0.0)
    g_base = (pos // S) * gstride_b + (pos % S) * gstride_s
    dot = tl.zeros([BLOCK_P], tl.float32)
    if GRAD_Z:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            y, _, _ = _soft_tile(l_ptr, seed, pos, p_ok, ks, lse, S, K, inv_tau, stride_b, stride_s, stride_k)
            gy = token_code_dot(gz_ptr, g_base, p_ok, e_ptr, ks, ks < K, D, gstride_d, stride_ek,
                                True, False, BLOCK_P, BLOCK_K, BLOCK_D)
            dot += tl.sum(y * gy, axis=1)
    if KL:
        lse_l = tl.load(lse_ptr + P + pos, mask=p_ok, other=0.0)
        mean_l = tl.load(lse_ptr + 2 * P + pos, mask=p_ok, other=0.0)
        gkl = tl.load(gkl_ptr + pos, mask=p_ok, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        y, lg, ok = _soft_tile(l_ptr, seed, pos, p_ok, ks, lse, S, K, inv_tau, stride_b, stride_s, stride_k)
        _, d_offs = _tile(pos, p_ok, ks, S, K, dstride_b, dstride_s, dstride_k)
        dl = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
        if GRAD_Z:
            gy = token_code_dot(gz_ptr, g_base, p_ok, e_ptr, ks, ks < K, D, gstride_d, stride_ek,
                                True, False, BLOCK_P, BLOCK_K, BLOCK_D)
            dl += y * (gy - dot[:, None]) * inv_tau
        if KL:
            q = tl.exp(lg - lse_l[:, None])
            dl += gkl[:, None] * q * (lg - mean_l[:, None])
        tl.store(dl_ptr + d_offs, dl.to(dl_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gumbel_codebook_bwd_codes_kernel(
    l_ptr, seed_ptr, lse_ptr, idx_ptr, gz_ptr, de_ptr,
    P, S, K, D, inv_tau,
    stride_b, stride_s, stride_k, gstride_b, gstride_s, gstride_d, destride_k,
    HARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dE[k-tile, d-tile] = sum_p y_pk gz_pd, streaming every position tile in order (a deterministic sum, no
    atomics, no per-tile partials): y the soft sample recomputed (Philox again, P K per feature tile), or
    hard's one-hot of the saved argmax (the straight-through value). Reads the logits and gz once per program
    row/column: K / BLOCK_K reads of gz, D / BLOCK_D of the logits."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pos = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_ok = pos < P
        if HARD:
            best_k = tl.load(idx_ptr + pos, mask=p_ok, other=-1)
            y = tl.where(best_k[:, None] == ks[None, :].to(tl.int64), 1.0, 0.0)
        else:
            lse = tl.load(lse_ptr + pos, mask=p_ok, other=0.0)
            y, _, _ = _soft_tile(l_ptr, seed, pos, p_ok, ks, lse, S, K, inv_tau, stride_b, stride_s, stride_k)
        g_offs = ((pos // S) * gstride_b + (pos % S) * gstride_s)[:, None] + ds[None, :].to(tl.int64) * gstride_d
        gz = tl.load(gz_ptr + g_offs, mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(y), gz, acc, input_precision="tf32x3")
    tl.store(de_ptr + ks[:, None].to(tl.int64) * destride_k + ds[None, :], acc.to(de_ptr.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])
