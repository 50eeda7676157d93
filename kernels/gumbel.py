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
"""

import triton
import triton.language as tl

from .sampling import _philox, _unit


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
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_P], tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK_P], tl.int64)
    m2 = tl.full([BLOCK_P], float("-inf"), tl.float32)
    s2 = tl.zeros([BLOCK_P], tl.float32)
    t2 = tl.zeros([BLOCK_P], tl.float32)
    for k0 in range(0, K if not NOISE else 0, BLOCK_K):
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
