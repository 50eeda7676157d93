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

Special functions at the extremes. On the GPU tl.exp and tl.log compile to approximate instructions that
flush subnormals to zero (the interpreter does not): no term here takes the log of a value that can be
subnormal or divides by one.

- log sigmoid(v) = min(v, 0) - log1p(e^-|v|): no inf - inf, no log of a sigmoid.
- log expm1(w) below w = 1/2 is log w + log(expm1(w) / w), log w = log(2h) - s passed in the log domain
  (w = 2h e^-s is subnormal for s past ~80); its derivative is kept as w d/dw log expm1(w) = w / (1 - e^-w)
  (-> 1 as w -> 0, where d/dw alone overflows and 0 * inf made IAF's log-scale gradient NaN).
- A bin holding most of the mass (a > 0 > b, w > 1) is log1p(-(sigmoid(-a) + sigmoid(b))), where
  log expm1(w) + log sigmoid(b) + log sigmoid(-a) would cancel terms of size w (the one-component kernels,
  whose w is unbounded; the mixture's is below 9 and leaves the form out).
- tanh(c) and 1 - tanh(c)^2 = 4 e / (1 + e)^2 from e = e^-2|c| (no 1 - tanh^2 cancellation).
- DDPM's cubic past |v| = 1e4 (it overflows at 7e12) is not formed: the CDF is 0 or 1 there.

Every exp whose result a GPU may flush (e^-|v| past |v| ~ 87) then changes a sigmoid, a log1p or a sum of
exponentials by less than 2^-126 absolutely. Clamps are tl.where on a comparison (a NaN falls through:
tl.minimum / tl.maximum return the other operand on the GPU and here), and the IAF bin index uses IEEE
division (tl.math.div_rn: an approximate x / binsize can land just below an integer, one bin too low).

Invalid images: an x outside its range, or NaN, gives NaN in the loss of its pixel (element) and in every
gradient of that pixel's parameters: the reduction's scale becomes NaN there. No device assert.

Addressing: every tensor is read where it lies, through (batch, spatial, channel) strides of its pixel
decomposition (x's channel dim, the params' parameter dim, the collapsed spatial dims), or one pixel stride
with FLAT. Offsets are int32 unless WIDE (some offset, or a Philox counter, reaches 2^31): then every index
product is int64 (k, the pixel and its parts are widened before any multiply).

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
CUBE_MAX = tl.constexpr(1.0e4)  # |v| past which DDPM's CDF is 0 or 1 in fp32 (v^3 would overflow past 7e12)

KIND_LOGISTIC = tl.constexpr(0)  # IAF-VAE's discretized logistic
KIND_GAUSSIAN = tl.constexpr(1)  # DDPM's discretized Gaussian


@triton.jit
def _log_sigmoids(v):
    """(log sigmoid(v), log sigmoid(-v), sigmoid(v), sigmoid(-v)) from one exp, none overflowing."""
    e = tl.exp(-tl.abs(v))
    lg = log1p(e)
    inv = 1.0 / (1.0 + e)
    pos = v >= 0.0
    return (tl.where(pos, 0.0, v) - lg, tl.where(pos, -v, 0.0) - lg,
            tl.where(pos, inv, e * inv), tl.where(pos, e * inv, inv))


@triton.jit
def _tanh_sech2(c):
    """(tanh(c), 1 - tanh(c)^2) from e = e^-2|c|: (1 - e) / (1 + e) with c's sign, 4 e / (1 + e)^2."""
    e = tl.exp(-2.0 * tl.abs(c))
    d = 1.0 / (1.0 + e)
    t = (1.0 - e) * d
    return tl.where(c < 0.0, -t, t), 4.0 * e * d * d


@triton.jit
def _log_expm1(w, log_w):
    """(log expm1(w), w d/dw log expm1(w) = w / (1 - e^-w)) for w >= 0 given log w: below 1/2,
    log w + log(expm1(w) / w) with expm1(w) / w a Taylor series (relative error under 1e-9); above,
    w + log1p(-e^-w), which never overflows."""
    ew = tl.exp(-w)
    small = w < 0.5
    ws = tl.where(small, w, 0.5)
    s = 1.0 + ws * (1.0 / 9.0)
    s = 1.0 + ws * (1.0 / 8.0) * s
    s = 1.0 + ws * (1.0 / 7.0) * s
    s = 1.0 + ws * (1.0 / 6.0) * s
    s = 1.0 + ws * (1.0 / 5.0) * s
    s = 1.0 + ws * (1.0 / 4.0) * s
    s = 1.0 + ws * (1.0 / 3.0) * s
    s = 1.0 + ws * 0.5 * s  # expm1(ws) / ws, in [1, 1.3]
    lem1 = tl.where(small, log_w + tl.log(s), w + log1p(-ew))
    wdlem1 = tl.where(small, 1.0 / (s * ew), w / (1.0 - ew))
    return lem1, wdlem1


@triton.jit
def _log_bin(a, b, w, log_w, STRADDLE: tl.constexpr):
    """log(sigmoid(a) - sigmoid(b)) for a = b + w, w >= 0 (see the module docstring), with the partial
    derivatives of its parts: returns (lp, dlp/da, dlp/db, w dlp/dw) with a, b, w taken as independent;
    also log sigmoid(a), sigmoid(-a), log sigmoid(-b), sigmoid(b) for the edge bins. STRADDLE: the form of
    a wide bin over the centre, where w is unbounded (the mixture's w = 2h e^-s is at most 2 e^7 / 255 < 9:
    the three terms then cancel to a few ulps of 9, and it leaves the form out)."""
    lsa, lsna, sa, sna = _log_sigmoids(a)
    lsb, lsnb, sb, snb = _log_sigmoids(b)
    lem1, wdw = _log_expm1(w, log_w)
    lp = lem1 + lsb + lsna
    da = -sa
    db = snb
    if STRADDLE:
        # most of the mass inside (the bin straddles the centre, w > 1): 1 - sigmoid(-a) - sigmoid(b), a
        # function of a and b alone (its w-derivative is 0)
        wide = (a > 0.0) & (b < 0.0) & (w > 1.0)
        tails = sna + sb
        lp_w = log1p(-tails)
        inv_d = 1.0 / (1.0 - tails)
        lp = tl.where(wide, lp_w, lp)
        da = tl.where(wide, sa * sna * inv_d, da)
        db = tl.where(wide, -sb * snb * inv_d, db)
        wdw = tl.where(wide, 0.0, wdw)
    return lp, da, db, wdw, lsa, sna, lsnb, sb


@triton.jit
def _logistic_channel(xc, mean, ls_raw, half_bin, log_two_h, log_half_levels, CLAMP_GRAD_AT_MIN: tl.constexpr):
    """One channel of one component of the pixel-cnn mixture: (lp, dlp/dcentred, dlp/dlog_scale_raw)."""
    ls = tl.where(ls_raw < LOG_SCALE_MIN, LOG_SCALE_MIN, ls_raw)  # a NaN stays NaN
    inv = tl.exp(-ls)
    cen = xc - mean
    plus = inv * (cen + half_bin)
    minus = inv * (cen - half_bin)
    w = (2.0 * half_bin) * inv
    lp_mid, da, db, wdw, ls_p, sig_np, ls_nm, sig_m = _log_bin(plus, minus, w, log_two_h - ls, False)
    # mid bins: d/dcentred = inv (da + db) (w does not move), d/ds = -(plus da + minus db) - w dw
    gc_mid = inv * (da + db)
    gs_mid = -(plus * da + minus * db) - wdw
    # the density at the bin centre, where the bin's probability is below 1e-5
    mid = inv * cen
    ls_c, ls_nc, sig_c, _ = _log_sigmoids(mid)
    lp_tiny = ls_c + ls_nc - ls - log_half_levels  # mid - 2 softplus(mid) = log sigmoid(mid) + log sigmoid(-mid)
    d_tiny = 1.0 - 2.0 * sig_c
    use_mid = lp_mid > LOG_1E_5
    lp = tl.where(use_mid, lp_mid, lp_tiny)
    gc = tl.where(use_mid, gc_mid, inv * d_tiny)
    gs = tl.where(use_mid, gs_mid, -mid * d_tiny - 1.0)
    # lowest bin: log sigmoid(plus); highest: log sigmoid(-minus)
    left = xc < -EDGE
    right = xc > EDGE
    lp = tl.where(left, ls_p, tl.where(right, ls_nm, lp))
    gc = tl.where(left, inv * sig_np, tl.where(right, -inv * sig_m, gc))
    gs = tl.where(left, -plus * sig_np, tl.where(right, minus * sig_m, gs))
    # the clamp's gradient: none below -7, and at -7 itself as the installed torch.clamp
    if CLAMP_GRAD_AT_MIN:
        gs = tl.where(ls_raw < LOG_SCALE_MIN, 0.0, gs)
    else:
        gs = tl.where(ls_raw <= LOG_SCALE_MIN, 0.0, gs)
    return lp, gc, gs


@triton.jit
def _pixel_offset(pix, spatial, sb, ss, FLAT: tl.constexpr):
    """The offset of each pixel's first element: pix ss when batch and spatial dims collapse (FLAT), else
    b sb + s ss with b = pix // spatial, s = pix - b spatial."""
    if FLAT:
        return pix * ss
    else:
        b = pix // spatial
        return b * sb + (pix - b * spatial) * ss


@triton.jit
def _pixels(pid, n_pix, BLOCK: tl.constexpr, MP: tl.constexpr, WIDE: tl.constexpr):
    """(pixel indices, pixel mask, component indices [1, MP]) in int32, or int64 with WIDE."""
    k = tl.arange(0, MP)[None, :]
    if WIDE:
        pix = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        k = k.to(tl.int64)
    else:
        pix = pid * BLOCK + tl.arange(0, BLOCK)
    return pix, pix < n_pix, k


@triton.jit
def dmol_fwd_kernel(
    x_ptr, p_ptr, loss_ptr, g_ptr,
    n_pix, spatial, xb, xs, xc, pb, ps, pc, gb, gs, gc,
    half_bin, log_two_h, log_half_levels, grad_scale, row_len,
    M: tl.constexpr, MP: tl.constexpr, C: tl.constexpr, GRAD: tl.constexpr, FLAT: tl.constexpr,
    WIDE: tl.constexpr, CLAMP_GRAD_AT_MIN: tl.constexpr,
    REDUCE: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """x's pixel (b, s), channel c at x_ptr + b xb + s xs + c xc; parameter j of that pixel at
    p_ptr + b pb + s ps + j pc; its gradient likewise through (gb, gs, gc)."""
    CB: tl.constexpr = M * (3 if C == 3 else 2)  # one channel's block: means, log scales (, coefficients)
    pid = tl.program_id(0)
    pix, pmask, k = _pixels(pid, n_pix, BLOCK, MP, WIDE)
    p_pix = p_ptr + _pixel_offset(pix, spatial, pb, ps, FLAT)[:, None]
    x_off = _pixel_offset(pix, spatial, xb, xs, FLAT)
    kmask = pmask[:, None] & (k < M)
    logits = tl.load(p_pix + k * pc, mask=kmask, other=0.0).to(tl.float32)
    logits = tl.where(k < M, logits, NEG_BIG)
    x0 = tl.load(x_ptr + x_off, mask=pmask, other=0.0).to(tl.float32)
    ok = (x0 >= -1.0) & (x0 <= 1.0)  # False for a NaN too
    x0 = x0[:, None]
    mean0 = tl.load(p_pix + (M + k) * pc, mask=kmask, other=0.0).to(tl.float32)
    ls0 = tl.load(p_pix + (2 * M + k) * pc, mask=kmask, other=0.0).to(tl.float32)
    lp0, gc0, gs0 = _logistic_channel(x0, mean0, ls0, half_bin, log_two_h, log_half_levels, CLAMP_GRAD_AT_MIN)
    a = logits + lp0
    if C == 3:
        x1 = tl.load(x_ptr + (x_off + xc), mask=pmask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + ((x_off + xc) + xc), mask=pmask, other=0.0).to(tl.float32)
        ok = ok & (x1 >= -1.0) & (x1 <= 1.0) & (x2 >= -1.0) & (x2 <= 1.0)
        x1 = x1[:, None]
        x2 = x2[:, None]
        t0, s0 = _tanh_sech2(tl.load(p_pix + (3 * M + k) * pc, mask=kmask, other=0.0).to(tl.float32))
        t1, s1 = _tanh_sech2(tl.load(p_pix + (M + CB + 2 * M + k) * pc, mask=kmask, other=0.0).to(tl.float32))
        t2, s2 = _tanh_sech2(tl.load(p_pix + (M + 2 * CB + 2 * M + k) * pc, mask=kmask, other=0.0).to(tl.float32))
        mean1 = tl.load(p_pix + (M + CB + k) * pc, mask=kmask, other=0.0).to(tl.float32) + t0 * x0
        ls1 = tl.load(p_pix + (M + CB + M + k) * pc, mask=kmask, other=0.0).to(tl.float32)
        lp1, gc1, gs1 = _logistic_channel(x1, mean1, ls1, half_bin, log_two_h, log_half_levels,
                                          CLAMP_GRAD_AT_MIN)
        mean2 = tl.load(p_pix + (M + 2 * CB + k) * pc, mask=kmask, other=0.0).to(tl.float32) \
            + t1 * x0 + t2 * x1
        ls2 = tl.load(p_pix + (M + 2 * CB + M + k) * pc, mask=kmask, other=0.0).to(tl.float32)
        lp2, gc2, gs2 = _logistic_channel(x2, mean2, ls2, half_bin, log_two_h, log_half_levels,
                                          CLAMP_GRAD_AT_MIN)
        a = a + lp1 + lp2
    m_l = tl.max(logits, axis=1)
    e_l = tl.exp(logits - m_l[:, None])
    z_l = tl.sum(e_l, axis=1)
    m_a = tl.max(a, axis=1)
    e_a = tl.exp(a - m_a[:, None])
    z_a = tl.sum(e_a, axis=1)
    loss = (m_l + tl.log(z_l)) - (m_a + tl.log(z_a))
    loss = tl.where(ok, loss, float("nan"))
    store_loss(loss, pmask, loss_ptr, pix, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    if GRAD:
        scale = tl.where(ok, grad_scale, float("nan"))  # an invalid pixel's gradients are NaN
        r = e_a * (scale / z_a)[:, None]  # responsibilities, times the reduction's scale
        g_pix = g_ptr + _pixel_offset(pix, spatial, gb, gs, FLAT)[:, None]
        ty = g_ptr.dtype.element_ty
        tl.store(g_pix + k * gc, (e_l * (scale / z_l)[:, None] - r).to(ty), mask=kmask)
        tl.store(g_pix + (M + k) * gc, (r * gc0).to(ty), mask=kmask)
        tl.store(g_pix + (2 * M + k) * gc, (-r * gs0).to(ty), mask=kmask)
        if C == 3:
            rc1 = r * gc1
            rc2 = r * gc2
            tl.store(g_pix + (3 * M + k) * gc, (rc1 * x0 * s0).to(ty), mask=kmask)
            tl.store(g_pix + (M + CB + k) * gc, rc1.to(ty), mask=kmask)
            tl.store(g_pix + (M + CB + M + k) * gc, (-r * gs1).to(ty), mask=kmask)
            tl.store(g_pix + (M + CB + 2 * M + k) * gc, (rc2 * x0 * s1).to(ty), mask=kmask)
            tl.store(g_pix + (M + 2 * CB + k) * gc, rc2.to(ty), mask=kmask)
            tl.store(g_pix + (M + 2 * CB + M + k) * gc, (-r * gs2).to(ty), mask=kmask)
            tl.store(g_pix + (M + 2 * CB + 2 * M + k) * gc, (rc2 * x1 * s2).to(ty), mask=kmask)


@triton.jit
def _uniform(w):
    """A uint32 word as a uniform in (1e-5, 1 - 1e-5), the peers' torch.uniform_(1e-5, 1 - 1e-5)."""
    return 1e-5 + (1.0 - 2e-5) * _unit(w, 1.0)


@triton.jit
def _clip(v):
    """v clipped to [-1, 1], a NaN kept (torch.clamp's)."""
    return tl.where(v < -1.0, -1.0, tl.where(v > 1.0, 1.0, v))


@triton.jit
def dmol_sample_kernel(
    p_ptr, seed_ptr, out_ptr, n_pix, spatial, pb, ps, pc, ob, os, oc,
    M: tl.constexpr, MP: tl.constexpr, C: tl.constexpr, FLAT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    CB: tl.constexpr = M * (3 if C == 3 else 2)
    pid = tl.program_id(0)
    pix, pmask, k = _pixels(pid, n_pix, BLOCK, MP, WIDE)
    p_pix = p_ptr + _pixel_offset(pix, spatial, pb, ps, FLAT)
    o_off = _pixel_offset(pix, spatial, ob, os, FLAT)
    kmask = pmask[:, None] & (k < M)
    logits = tl.load(p_pix[:, None] + k * pc, mask=kmask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr)
    ctr = pix * (MP + 1)  # the same counters, hence the same noise, in int32 and int64
    g, _, _, _ = _philox(seed, ctr[:, None] + k)
    score = tl.where(k < M, logits - tl.log(-tl.log(_uniform(g))), float("-inf"))
    sel = tl.argmax(score, axis=1)
    if WIDE:
        sel = sel.to(tl.int64)
    w0, w1, w2, _ = _philox(seed, ctr + MP)
    u = _uniform(w0)
    mean = tl.load(p_pix + (M + sel) * pc, mask=pmask, other=0.0).to(tl.float32)
    ls = tl.load(p_pix + (2 * M + sel) * pc, mask=pmask, other=0.0).to(tl.float32)
    ls = tl.where(ls < LOG_SCALE_MIN, LOG_SCALE_MIN, ls)
    v0 = _clip(mean + tl.exp(ls) * (tl.log(u) - tl.log(1.0 - u)))
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_off, v0.to(ty), mask=pmask)
    if C == 3:
        c0, _ = _tanh_sech2(tl.load(p_pix + (3 * M + sel) * pc, mask=pmask, other=0.0).to(tl.float32))
        c1, _ = _tanh_sech2(tl.load(p_pix + (M + CB + 2 * M + sel) * pc, mask=pmask, other=0.0).to(tl.float32))
        c2, _ = _tanh_sech2(tl.load(p_pix + (M + 2 * CB + 2 * M + sel) * pc, mask=pmask, other=0.0).to(tl.float32))
        u = _uniform(w1)
        mean = tl.load(p_pix + (M + CB + sel) * pc, mask=pmask, other=0.0).to(tl.float32)
        ls = tl.load(p_pix + (M + CB + M + sel) * pc, mask=pmask, other=0.0).to(tl.float32)
        ls = tl.where(ls < LOG_SCALE_MIN, LOG_SCALE_MIN, ls)
        v1 = _clip(mean + tl.exp(ls) * (tl.log(u) - tl.log(1.0 - u)) + c0 * v0)
        u = _uniform(w2)
        mean = tl.load(p_pix + (M + 2 * CB + sel) * pc, mask=pmask, other=0.0).to(tl.float32)
        ls = tl.load(p_pix + (M + 2 * CB + M + sel) * pc, mask=pmask, other=0.0).to(tl.float32)
        ls = tl.where(ls < LOG_SCALE_MIN, LOG_SCALE_MIN, ls)
        v2 = _clip(mean + tl.exp(ls) * (tl.log(u) - tl.log(1.0 - u)) + c1 * v0 + c2 * v1)
        tl.store(out_ptr + (o_off + oc), v1.to(ty), mask=pmask)
        tl.store(out_ptr + ((o_off + oc) + oc), v2.to(ty), mask=pmask)


@triton.jit
def discretized_fwd_kernel(
    x_ptr, mean_ptr, ls_ptr, loss_ptr, gm_ptr, gs_ptr,
    n, bin_param, log_bin, grad_scale, row_len,
    KIND: tl.constexpr, GRAD_MEAN: tl.constexpr, GRAD_LS: tl.constexpr, WIDE: tl.constexpr,
    REDUCE: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One component per element, every tensor walked in one shared memory order. KIND_LOGISTIC (IAF-VAE;
    bin_param = binsize, x in [0, 1]): the bin [q, q + binsize) of q = floor(x / binsize) binsize,
    loss = -log(bin probability + 1e-7). KIND_GAUSSIAN (DDPM; bin_param = half a bin h, x in [-1, 1]):
    DDPM's CDF t(v) as a sigmoid, its edge bins and 1e-12 floors (0 gradient where floored). log_bin:
    log(binsize), log(2h) for the Gaussian. An x outside its range or NaN gives NaN loss and gradients.
    Bytes for N elements: reads 3N, writes N per gradient asked for and N or fp32 partials of loss."""
    pid = tl.program_id(0)
    if WIDE:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ls = tl.load(ls_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.exp(-ls)
    if KIND == KIND_LOGISTIC:
        ok = (x >= 0.0) & (x <= 1.0)  # False for a NaN too
        cen = tl.floor(tl.math.div_rn(x, bin_param)) * bin_param - mean
        b = inv * cen
        w = bin_param * inv
        lp_bin, da, db, wdw, _, _, _, _ = _log_bin(b + w, b, w, log_bin - ls, True)
        delta = tl.exp(lp_bin)
        lp = tl.log(delta + 1e-7)
        f = delta / (delta + 1e-7)
        gc = f * inv * (da + db)
        gs = f * (-((b + w) * da + b * db) - wdw)
    else:
        ok = (x >= -1.0) & (x <= 1.0)
        cen = x - mean
        plus = inv * (cen + bin_param)
        minus = inv * (cen - bin_param)
        # past |v| = 1e4 the CDF is exactly 0 or 1 in fp32 (and float64: t(v) > 7e10) and its derivative 0;
        # the cube would overflow past 7e12. A bin edge out there is the lowest or highest bin's open end:
        # minus below takes the lowest bin's form log CDF(plus), plus above the highest's (a NaN takes none)
        lo_m = minus < -CUBE_MAX
        hi_p = plus > CUBE_MAX
        plus = tl.where(plus > CUBE_MAX, CUBE_MAX, tl.where(plus < -CUBE_MAX, -CUBE_MAX, plus))
        minus = tl.where(minus > CUBE_MAX, CUBE_MAX, tl.where(minus < -CUBE_MAX, -CUBE_MAX, minus))
        tp = TWO_SQRT_2_OVER_PI * (plus + GELU_C * plus * plus * plus)
        tm = TWO_SQRT_2_OVER_PI * (minus + GELU_C * minus * minus * minus)
        q2 = plus * plus + plus * minus + minus * minus
        q1 = 1.0 + GELU_C * q2
        d = (2.0 * bin_param) * inv
        w = TWO_SQRT_2_OVER_PI * d * q1  # tp - tm without the subtraction
        log_w = (log_bin - ls) + tl.log(q1 * TWO_SQRT_2_OVER_PI)
        lp_mid, da, db, wdw, ls_a, sig_na, ls_nb, sig_b = _log_bin(tp, tm, w, log_w, True)
        dtp = TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * plus * plus)
        dtm = TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * minus * minus)
        # w dlp/dw times (dw/dcentred) / w and (dw/ds) / w
        gw_c = wdw * (inv * (3.0 * GELU_C) * (plus + minus) / q1)
        gw_s = -wdw * ((1.0 + 3.0 * GELU_C * q2) / q1)
        left = x < -EDGE
        right = x > EDGE
        # (b == 0), not ~b: triton 3.3's interpreter has no int1 type for a bitwise not
        left = left | ((right == 0) & lo_m)
        right = right | ((left == 0) & hi_p)
        lp = tl.where(left, ls_a, tl.where(right, ls_nb, lp_mid))
        gc = tl.where(left, inv * sig_na * dtp, tl.where(right, -inv * sig_b * dtm,
                                                         inv * (da * dtp + db * dtm) + gw_c))
        gs = tl.where(left, -plus * sig_na * dtp, tl.where(right, minus * sig_b * dtm,
                                                          -(plus * da * dtp + minus * db * dtm) + gw_s))
        floored = lp < LOG_1E_12
        lp = tl.where(floored, LOG_1E_12, lp)
        gc = tl.where(floored, 0.0, gc)
        gs = tl.where(floored, 0.0, gs)
    lp = tl.where(ok, lp, float("nan"))
    store_loss(-lp, mask, loss_ptr, offs, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    # loss = -lp, centred = x - mean: dloss/dmean = dlp/dcentred, dloss/dlog_scale = -dlp/ds
    scale = tl.where(ok, grad_scale, float("nan"))
    if GRAD_MEAN:
        tl.store(gm_ptr + offs, (gc * scale).to(gm_ptr.dtype.element_ty), mask=mask)
    if GRAD_LS:
        tl.store(gs_ptr + offs, (-gs * scale).to(gs_ptr.dtype.element_ty), mask=mask)
