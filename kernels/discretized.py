"""Discretized likelihoods of images, loss and gradient to the parameters in one pass: the mixture of
logistics of PixelCNN++ / VDVAE / NVAE (``dmol_fwd_kernel``), its sampler (``dmol_sample_kernel``), and the
one-component discretized logistic (IAF-VAE) and Gaussian (DDPM) (``discretized_fwd_kernel``). The formulas
and the parameter layout are in fastvae/reference/discretized.py; here, how they are computed.

Bin probabilities in log space. sigmoid(a) - sigmoid(b), a = b + w > b, equals expm1(w) sigmoid(b) sigmoid(-a)
exactly, so

    log(sigmoid(a) - sigmoid(b)) = log expm1(w) + log sigmoid(b) + log sigmoid(-a)        (``_log_bin``)

with w = 2 h e^-s known without a subtraction: no cancellation where the bin is narrow against the scale
(the peers' fp32 difference of two sigmoids near 1/2 keeps ~log2(w) bits fewer). DDPM's tanh-approximated
normal CDF is a sigmoid too: 0.5 (1 + tanh(u)) = sigmoid(2u), so the same function serves it with
a = t(plus), b = t(minus), t(v) = 2 sqrt(2/pi) (v + 0.044715 v^3).

Mixture, per pixel: the M components are one [BLOCK, MP] register tile (MP = M padded to a power of two):
every parameter is loaded once, the per-channel terms and their derivatives to the centred value and the
log scale are kept per component, and two max-shifted log-sum-exps over the tile's second axis (the
logits' and the components') give the loss

    loss = logsumexp(logits) - logsumexp_k(logits_k + sum_c lp_ck)

and the responsibilities r = softmax_k(logits_k + sum_c lp_ck), pi = softmax(logits), from which

    dloss/dlogit_k = pi_k - r_k,   dloss/dmean_ck = r_k dlp_ck/dcentred,   dloss/dlog_scale_ck = -r_k dlp_ck/ds,
    dloss/dcoeff_j = r_k dlp_ck/dcentred x_i (1 - tanh^2)       (coeff_0: c = 1, i = 0; coeff_1: c = 2, i = 0;
                                                                 coeff_2: c = 2, i = 1)

Nothing of shape (..., M) reaches memory. Bytes per pixel: reads 4 (10M + 3) for fp32 params and images (3M + 1
for one channel), writes the same 10M gradients (in the params' dtype, fp32 for fp16) and 4 bytes of loss
(per pixel, or fp32 partials); the eager formulas write and read some twenty (..., 3, M) temporaries.

Sampler, per pixel: Philox uniforms (counter pixel * (MP + 1) + k, word 0, for component k's Gumbel noise;
counter pixel * (MP + 1) + MP, words 0..2, for the channels' logistic noise), argmax of logits - log(-log u),
a gather of the chosen component's parameters, the logistic draws and the clipped coefficient chain. Reads
4 (M + 3 C) bytes, writes 4 C.
"""

import triton
import triton.language as tl

from .bernoulli import log1p
from .reduce import store_loss
from .sampling import _philox, _unit

EDGE = tl.constexpr(0.999)
LOG_SCALE_MIN = tl.constexpr(-7.0)
LOG_1E_5 = tl.constexpr(-11.512925464970229)  # cdf_delta > 1e-5, compared in log space
LOG_1E_12 = tl.constexpr(-27.631021115928547)
TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)
GELU_C = tl.constexpr(0.044715)
NEG_BIG = tl.constexpr(-1.0e30)  # the logit of a padding component: exp underflows to 0, no inf - inf

KIND_LOGISTIC = tl.constexpr(0)  # IAF-VAE's discretized logistic
KIND_GAUSSIAN = tl.constexpr(1)  # DDPM's discretized Gaussian


@triton.jit
def _softplus_sigmoid(v):
    """(softplus(v), sigmoid(v), sigmoid(-v)) from one exp, none overflowing."""
    e = tl.exp(-tl.abs(v))
    inv = 1.0 / (1.0 + e)
    pos = v >= 0.0
    return tl.maximum(v, 0.0) + log1p(e), tl.where(pos, inv, e * inv), tl.where(pos, e * inv, inv)


@triton.jit
def _log_expm1(w):
    """(log expm1(w), d/dw = 1 / (1 - e^-w)) for w > 0: a Taylor series of expm1 below 1/2 (relative error
    under 1e-9 there), w + log1p(-e^-w) above, which never overflows."""
    ew = tl.exp(-w)
    ws = tl.minimum(w, 0.5)
    em1 = 1.0 + ws * (1.0 / 9.0)
    em1 = 1.0 + ws * (1.0 / 8.0) * em1
    em1 = 1.0 + ws * (1.0 / 7.0) * em1
    em1 = 1.0 + ws * (1.0 / 6.0) * em1
    em1 = 1.0 + ws * (1.0 / 5.0) * em1
    em1 = 1.0 + ws * (1.0 / 4.0) * em1
    em1 = 1.0 + ws * (1.0 / 3.0) * em1
    em1 = 1.0 + ws * 0.5 * em1
    em1 = ws * em1
    small = w < 0.5
    lem1 = tl.where(small, tl.log(em1), w + log1p(-ew))
    dlem1 = tl.where(small, 1.0 / (em1 * ew), 1.0 / (1.0 - ew))
    return lem1, dlem1


@triton.jit
def _log_bin(a, b, w):
    """log(sigmoid(a) - sigmoid(b)) for a = b + w, w > 0 (see the module docstring), with the partial
    derivatives of its parts: returns (lp, dlp/da, dlp/db, dlp/dw) with a, b, w taken as independent;
    also softplus(a), softplus(b) and sigmoid(a), sigmoid(b) for the edge bins."""
    sp_a, sig_a, _ = _softplus_sigmoid(a)
    sp_b, sig_b, sig_nb = _softplus_sigmoid(b)
    lem1, dlem1 = _log_expm1(w)
    lp = lem1 + (b - sp_b) - sp_a
    return lp, -sig_a, sig_nb, dlem1, sp_a, sp_b, sig_a, sig_b


@triton.jit
def _logistic_channel(xc, mean, ls_raw, half_bin, log_half_levels):
    """One channel of one component of the pixel-cnn mixture: (lp, dlp/dcentred, dlp/dlog_scale_raw)."""
    ls = tl.maximum(ls_raw, LOG_SCALE_MIN)
    inv = tl.exp(-ls)
    cen = xc - mean
    plus = inv * (cen + half_bin)
    minus = inv * (cen - half_bin)
    w = (2.0 * half_bin) * inv
    lp_mid, da, db, dw, sp_p, sp_m, sig_p, sig_m = _log_bin(plus, minus, w)
    # mid bins: d/dcentred = inv (da + db) (w does not move), d/ds = -(plus da + minus db) - w dw
    gc_mid = inv * (da + db)
    gs_mid = -(plus * da + minus * db) - w * dw
    # the density at the bin centre, where the bin's probability is below 1e-5
    mid = inv * cen
    sp_c, sig_c, _ = _softplus_sigmoid(mid)
    lp_tiny = mid - ls - 2.0 * sp_c - log_half_levels
    d_tiny = 1.0 - 2.0 * sig_c
    use_mid = lp_mid > LOG_1E_5
    lp = tl.where(use_mid, lp_mid, lp_tiny)
    gc = tl.where(use_mid, gc_mid, inv * d_tiny)
    gs = tl.where(use_mid, gs_mid, -mid * d_tiny - 1.0)
    # lowest bin: log sigmoid(plus); highest: log sigmoid(-minus)
    left = xc < -EDGE
    right = xc > EDGE
    lp = tl.where(left, plus - sp_p, tl.where(right, -sp_m, lp))
    gc = tl.where(left, inv * (1.0 - sig_p), tl.where(right, -inv * sig_m, gc))
    gs = tl.where(left, -plus * (1.0 - sig_p), tl.where(right, minus * sig_m, gs))
    gs = tl.where(ls_raw >= LOG_SCALE_MIN, gs, 0.0)  # the clamp's gradient
    return lp, gc, gs


@triton.jit
def _tile_ptrs(pix, P: tl.constexpr, C: tl.constexpr, spatial, CHANNELS_FIRST: tl.constexpr):
    """(first param offset, param stride, first image offset, image stride) of each pixel: channels last
    keeps a pixel's params contiguous, channels first (B, P, *spatial) strides them by the spatial size."""
    if CHANNELS_FIRST:
        b = pix // spatial
        s = pix - b * spatial
        return b * (P * spatial) + s, spatial, b * (C * spatial) + s, spatial
    else:
        return pix * P, 1, pix * C, 1


@triton.jit
def dmol_fwd_kernel(
    x_ptr, p_ptr, loss_ptr, g_ptr,
    n_pix, spatial, half_bin, log_half_levels, grad_scale, row_len,
    M: tl.constexpr, MP: tl.constexpr, C: tl.constexpr, CHANNELS_FIRST: tl.constexpr, GRAD: tl.constexpr,
    REDUCE: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    P: tl.constexpr = M * (10 if C == 3 else 3)
    CB: tl.constexpr = M * (3 if C == 3 else 2)  # one channel's block: means, log scales (, coefficients)
    pid = tl.program_id(0)
    pix = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    pmask = pix < n_pix
    p_base, p_stride, x_base, x_stride = _tile_ptrs(pix, P, C, spatial, CHANNELS_FIRST)
    k = tl.arange(0, MP)[None, :]
    kmask = pmask[:, None] & (k < M)
    ptrs = p_ptr + p_base[:, None] + k * p_stride
    logits = tl.load(ptrs, mask=kmask, other=0.0).to(tl.float32)
    logits = tl.where(k < M, logits, NEG_BIG)
    x0 = tl.load(x_ptr + x_base, mask=pmask, other=0.0).to(tl.float32)[:, None]
    mean0 = tl.load(ptrs + M * p_stride, mask=kmask, other=0.0).to(tl.float32)
    ls0 = tl.load(ptrs + 2 * M * p_stride, mask=kmask, other=0.0).to(tl.float32)
    lp0, gc0, gs0 = _logistic_channel(x0, mean0, ls0, half_bin, log_half_levels)
    a = logits + lp0
    if C == 3:
        x1 = tl.load(x_ptr + x_base + x_stride, mask=pmask, other=0.0).to(tl.float32)[:, None]
        x2 = tl.load(x_ptr + x_base + 2 * x_stride, mask=pmask, other=0.0).to(tl.float32)[:, None]
        t0 = tl.load(ptrs + (M + 2 * M) * p_stride, mask=kmask, other=0.0).to(tl.float32)
        t1 = tl.load(ptrs + (M + CB + 2 * M) * p_stride, mask=kmask, other=0.0).to(tl.float32)
        t2 = tl.load(ptrs + (M + 2 * CB + 2 * M) * p_stride, mask=kmask, other=0.0).to(tl.float32)
        # tanh(v) = 1 - 2 / (e^{2v} + 1), exact at both ends (libdevice's tanh is no faster here)
        t0 = 1.0 - 2.0 / (tl.exp(2.0 * t0) + 1.0)
        t1 = 1.0 - 2.0 / (tl.exp(2.0 * t1) + 1.0)
        t2 = 1.0 - 2.0 / (tl.exp(2.0 * t2) + 1.0)
        mean1 = tl.load(ptrs + (M + CB) * p_stride, mask=kmask, other=0.0).to(tl.float32) + t0 * x0
        ls1 = tl.load(ptrs + (M + CB + M) * p_stride, mask=kmask, other=0.0).to(tl.float32)
        lp1, gc1, gs1 = _logistic_channel(x1, mean1, ls1, half_bin, log_half_levels)
        mean2 = tl.load(ptrs + (M + 2 * CB) * p_stride, mask=kmask, other=0.0).to(tl.float32) \
            + t1 * x0 + t2 * x1
        ls2 = tl.load(ptrs + (M + 2 * CB + M) * p_stride, mask=kmask, other=0.0).to(tl.float32)
        lp2, gc2, gs2 = _logistic_channel(x2, mean2, ls2, half_bin, log_half_levels)
        a = a + lp1 + lp2
    m_l = tl.max(logits, axis=1)
    e_l = tl.exp(logits - m_l[:, None])
    z_l = tl.sum(e_l, axis=1)
    m_a = tl.max(a, axis=1)
    e_a = tl.exp(a - m_a[:, None])
    z_a = tl.sum(e_a, axis=1)
    loss = (m_l + tl.log(z_l)) - (m_a + tl.log(z_a))
    store_loss(loss, pmask, loss_ptr, pix, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    if GRAD:
        r = e_a * (grad_scale / z_a)[:, None]  # responsibilities, times the reduction's scale
        gptrs = g_ptr + p_base[:, None] + k * p_stride
        ty = g_ptr.dtype.element_ty
        tl.store(gptrs, (e_l * (grad_scale / z_l)[:, None] - r).to(ty), mask=kmask)
        tl.store(gptrs + M * p_stride, (r * gc0).to(ty), mask=kmask)
        tl.store(gptrs + 2 * M * p_stride, (-r * gs0).to(ty), mask=kmask)
        if C == 3:
            rc1 = r * gc1
            rc2 = r * gc2
            tl.store(gptrs + 3 * M * p_stride, (rc1 * x0 * (1.0 - t0 * t0)).to(ty), mask=kmask)
            tl.store(gptrs + (M + CB) * p_stride, rc1.to(ty), mask=kmask)
            tl.store(gptrs + (M + CB + M) * p_stride, (-r * gs1).to(ty), mask=kmask)
            tl.store(gptrs + (M + CB + 2 * M) * p_stride, (rc2 * x0 * (1.0 - t1 * t1)).to(ty), mask=kmask)
            tl.store(gptrs + (M + 2 * CB) * p_stride, rc2.to(ty), mask=kmask)
            tl.store(gptrs + (M + 2 * CB + M) * p_stride, (-r * gs2).to(ty), mask=kmask)
            tl.store(gptrs + (M + 2 * CB + 2 * M) * p_stride, (rc2 * x1 * (1.0 - t2 * t2)).to(ty), mask=kmask)


@triton.jit
def _uniform(w):
    """A uint32 word as a uniform in (1e-5, 1 - 1e-5), the peers' torch.uniform_(1e-5, 1 - 1e-5)."""
    return 1e-5 + (1.0 - 2e-5) * _unit(w, 1.0)


@triton.jit
def dmol_sample_kernel(
    p_ptr, seed_ptr, out_ptr, n_pix, spatial,
    M: tl.constexpr, MP: tl.constexpr, C: tl.constexpr, CHANNELS_FIRST: tl.constexpr, BLOCK: tl.constexpr,
):
    P: tl.constexpr = M * (10 if C == 3 else 3)
    CB: tl.constexpr = M * (3 if C == 3 else 2)
    pid = tl.program_id(0)
    pix = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    pmask = pix < n_pix
    p_base, p_stride, x_base, x_stride = _tile_ptrs(pix, P, C, spatial, CHANNELS_FIRST)
    k = tl.arange(0, MP)[None, :]
    kmask = pmask[:, None] & (k < M)
    logits = tl.load(p_ptr + p_base[:, None] + k * p_stride, mask=kmask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    ctr = pix * (MP + 1)
    g, _, _, _ = _philox(seed, ctr[:, None] + k)
    score = tl.where(k < M, logits - tl.log(-tl.log(_uniform(g))), float("-inf"))
    sel = tl.argmax(score, axis=1).to(tl.int64)
    w0, w1, w2, _ = _philox(seed, ctr + MP)
    ch = p_ptr + p_base + (M + sel) * p_stride  # the chosen component's mean in channel 0
    u = _uniform(w0)
    mean = tl.load(ch, mask=pmask, other=0.0).to(tl.float32)
    ls = tl.maximum(tl.load(ch + M * p_stride, mask=pmask, other=0.0).to(tl.float32), LOG_SCALE_MIN)
    v0 = tl.minimum(tl.maximum(mean + tl.exp(ls) * (tl.log(u) - tl.log(1.0 - u)), -1.0), 1.0)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + x_base, v0.to(ty), mask=pmask)
    if C == 3:
        c0 = tl.load(ch + 2 * M * p_stride, mask=pmask, other=0.0).to(tl.float32)
        c1 = tl.load(ch + (CB + 2 * M) * p_stride, mask=pmask, other=0.0).to(tl.float32)
        c2 = tl.load(ch + (2 * CB + 2 * M) * p_stride, mask=pmask, other=0.0).to(tl.float32)
        c0 = 1.0 - 2.0 / (tl.exp(2.0 * c0) + 1.0)
        c1 = 1.0 - 2.0 / (tl.exp(2.0 * c1) + 1.0)
        c2 = 1.0 - 2.0 / (tl.exp(2.0 * c2) + 1.0)
        u = _uniform(w1)
        mean = tl.load(ch + CB * p_stride, mask=pmask, other=0.0).to(tl.float32)
        ls = tl.maximum(tl.load(ch + (CB + M) * p_stride, mask=pmask, other=0.0).to(tl.float32), LOG_SCALE_MIN)
        v1 = mean + tl.exp(ls) * (tl.log(u) - tl.log(1.0 - u)) + c0 * v0
        v1 = tl.minimum(tl.maximum(v1, -1.0), 1.0)
        u = _uniform(w2)
        mean = tl.load(ch + 2 * CB * p_stride, mask=pmask, other=0.0).to(tl.float32)
        ls = tl.maximum(tl.load(ch + (2 * CB + M) * p_stride, mask=pmask, other=0.0).to(tl.float32),
                        LOG_SCALE_MIN)
        v2 = mean + tl.exp(ls) * (tl.log(u) - tl.log(1.0 - u)) + c1 * v0 + c2 * v1
        v2 = tl.minimum(tl.maximum(v2, -1.0), 1.0)
        tl.store(out_ptr + x_base + x_stride, v1.to(ty), mask=pmask)
        tl.store(out_ptr + x_base + 2 * x_stride, v2.to(ty), mask=pmask)


@triton.jit
def discretized_fwd_kernel(
    x_ptr, mean_ptr, ls_ptr, loss_ptr, gm_ptr, gs_ptr,
    n, bin_param, grad_scale, row_len,
    KIND: tl.constexpr, GRAD_MEAN: tl.constexpr, GRAD_LS: tl.constexpr,
    REDUCE: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One component per element. KIND_LOGISTIC (IAF-VAE; bin_param = binsize): the bin [q, q + binsize)
    of q = floor(x / binsize) binsize, loss = -log(bin probability + 1e-7). KIND_GAUSSIAN (DDPM; bin_param =
    half a bin h): DDPM's CDF t(v) as a sigmoid, its edge bins and 1e-12 floors (0 gradient where floored).
    Bytes for N elements: reads 3N, writes N per gradient asked for and N or fp32 partials of loss."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ls = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.exp(-ls)
    if KIND == KIND_LOGISTIC:
        cen = tl.floor(x / bin_param) * bin_param - mean
        b = inv * cen
        w = bin_param * inv
        lp_bin, da, db, dw, _, _, _, _ = _log_bin(b + w, b, w)
        delta = tl.exp(lp_bin)
        lp = tl.log(delta + 1e-7)
        f = delta / (delta + 1e-7)
        gc = f * inv * (da + db)
        gs = f * (-((b + w) * da + b * db) - w * dw)
    else:
        cen = x - mean
        plus = inv * (cen + bin_param)
        minus = inv * (cen - bin_param)
        d = (2.0 * bin_param) * inv
        tp = TWO_SQRT_2_OVER_PI * (plus + GELU_C * plus * plus * plus)
        tm = TWO_SQRT_2_OVER_PI * (minus + GELU_C * minus * minus * minus)
        q2 = plus * plus + plus * minus + minus * minus
        w = TWO_SQRT_2_OVER_PI * d * (1.0 + GELU_C * q2)  # tp - tm without the subtraction
        lp_mid, da, db, dw, sp_a, sp_b, sig_a, sig_b = _log_bin(tp, tm, w)
        dtp = TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * plus * plus)
        dtm = TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * minus * minus)
        dw_dcen = inv * TWO_SQRT_2_OVER_PI * (3.0 * GELU_C) * (plus + minus) * d
        dw_ds = -TWO_SQRT_2_OVER_PI * d * (1.0 + 3.0 * GELU_C * q2)
        left = x < -EDGE
        right = x > EDGE
        lp = tl.where(left, tp - sp_a, tl.where(right, -sp_b, lp_mid))
        gc = tl.where(left, inv * (1.0 - sig_a) * dtp, tl.where(right, -inv * sig_b * dtm,
                                                                  inv * (da * dtp + db * dtm) + dw * dw_dcen))
        gs = tl.where(left, -plus * (1.0 - sig_a) * dtp, tl.where(right, minus * sig_b * dtm,
                                                                   -(plus * da * dtp + minus * db * dtm) + dw * dw_ds))
        floored = lp < LOG_1E_12
        lp = tl.where(floored, LOG_1E_12, lp)
        gc = tl.where(floored, 0.0, gc)
        gs = tl.where(floored, 0.0, gs)
    store_loss(-lp, mask, loss_ptr, offs, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    # loss = -lp, centred = x - mean: dloss/dmean = dlp/dcentred, dloss/dlog_scale = -dlp/ds
    if GRAD_MEAN:
        tl.store(gm_ptr + offs, (gc * grad_scale).to(gm_ptr.dtype.element_ty), mask=mask)
    if GRAD_LS:
        tl.store(gs_ptr + offs, (-gs * grad_scale).to(gs_ptr.dtype.element_ty), mask=mask)
