"""Reparameterized sampling fused with the KL divergence of diagonal Gaussians.

Forward, per element i of mu/logvar (N elements) and sample k < K:

    std      = exp(0.5 * logvar)
    eps[k,i] = Philox-normal(seed, k * ceil(N/4) + i // 4)[i % 4]   (drawn here, never stored)
    z[k,i]   = mu + std * eps[k,i]
    kl[i]    = 0.5 * (logvar_p - logvar + (exp(logvar) + (mu - mu_p)^2) * exp(-logvar_p) - 1)

with mu_p = 0, logvar_p = 0 unless given. The KL is written per element (reduction "none") or as one fp32
partial per program (one per row segment for reduction="per_sample"), summed in a fixed order by
``reduce.py`` (no float atomics).
Bytes: reads 2N (4N with a prior), writes K*N for z and N or one float per program for the KL.

Backward regenerates eps from the same seed and counters:

    grad_mu     = sum_k grad_z[k] + g_kl * (mu - mu_p) * exp(-logvar_p)
    grad_logvar = 0.5 * std * sum_k grad_z[k] * eps[k] + g_kl * 0.5 * (exp(logvar - logvar_p) - 1)
    grad_mu_p   = -g_kl * (mu - mu_p) * exp(-logvar_p)
    grad_logvar_p = g_kl * 0.5 * (1 - (exp(logvar) + (mu - mu_p)^2) * exp(-logvar_p))

where g_kl is the per-element KL gradient, the row's (per_sample), or the scalar grad_output times the
reduction's scale, read on the device. Bytes: reads K*N (grad_z) + 2N, writes 2N (plus 2N in, 2N out with a prior).

With LOG_RATIO (``sample_log_weights``), each sample k also gets its per-row log importance ratio against the
standard-normal prior, reduced in the kernel like a per-sample KL (one partial per row segment, K sets):

    log_ratio[k, b] = sum_{i in row b} 0.5 * (eps[k,i]^2 - z[k,i]^2 + logvar[i])      (= log p(z) - log q(z|x))
    backward:  dL/dz[k,i] += -g[k,b] * z[k,i],   dL/dlogvar[i] += 0.5 * sum_k g[k,b]

Bytes: reads 2N, writes K*N for z and 4 K (P + B) for the partials (B = rows).

Input forms (constexprs, one kernel): FORM_LOGVAR reads logvar; FORM_CLAMPED reads logvar clamped to [-30, 20]
in the kernel (ldm's posterior: gradient zero outside, as torch.clamp's); FORM_SCALE reads the standard deviation
(torch.distributions.Normal's scale, and the prior's scale) as it is, with lv = 2 log(scale) and var = scale^2
where the formulas need them, and the gradients to scale (dz/dscale = eps, dKL/dscale = 2/scale dKL/dlv).
SPLIT > 0: mu and logvar are the two halves of one contiguous tensor split along one dim (ldm's ``parameters``
(B, 2C, ...) along dim 1, or ``h.chunk(2, dim)``), read in place: logical element e of the half lies at
e + (e // SPLIT) * SPLIT, its logvar SPLIT further (SPLIT = the half's size from the split dim inward). With
SPLIT_GRAD (ldm) the gradients are written to the same places of one tensor; otherwise to two contiguous ones.

Noise: one Philox call (10 rounds, 32-bit words) yields four uniform words, turned into four normals by
two Box-Muller pairs (``_normal_pair``: a radius from one word, a uniform angle from the other, its sine and
cosine as short polynomials on an octant plus a random symmetry of the square, no libdevice range
reduction). Element e of sample k is normal e % 4 of counter k * ceil(N/4) + e // 4, whatever the tile.

Tile: each program works on a [BLOCK/ROW, ROW] tile, ROW = 16 bytes of the narrowest tensor it touches
(4 fp32, 8 bf16/fp16), so each thread's row is one 128-bit load or store; a row spans ROW/4 Philox
counters. Offsets are int32 unless WIDE (max(K, 2 if SPLIT) * N + BLOCK >= 2^31, chosen on the host): 64-bit
address arithmetic costs as many integer instructions as the math on the hot path. The per-sample counter
stride ceil(N/4) comes from the host (``n_ctr``): N + 3 could wrap in int32.

z = mu + std * eps is written as the formula is, but the compiler may fuse it into one multiply-add (one
rounding, not two) and exp is the GPU's: z matches the eager formula with the same eps to a few ulps, not
bit for bit.
"""

import triton
import triton.language as tl

from .reduce import row_col, store_loss, store_partials

# KL_MODE: what the kernel does with the KL
KL_OFF = tl.constexpr(0)  # sampling only
KL_ELEMENTWISE = tl.constexpr(1)  # reduction="none": one value (or one gradient) per element
KL_REDUCED = tl.constexpr(2)  # fp32 partials; backward gets one gradient (PER_ROW: one per row)

# FORM: what logvar_ptr (and lvp_ptr) hold
FORM_LOGVAR = tl.constexpr(0)
FORM_CLAMPED = tl.constexpr(1)  # logvar, clamped to [LV_MIN, LV_MAX] here
FORM_SCALE = tl.constexpr(2)  # the standard deviation
LV_MIN = tl.constexpr(-30.0)
LV_MAX = tl.constexpr(20.0)


@triton.jit
def _tile(pid, n, BLOCK: tl.constexpr, ROW: tl.constexpr, WIDE: tl.constexpr):
    """Element offsets of this program as a [BLOCK/ROW, ROW] tile in memory order, its first Philox counter
    per row (element e's counter is e // 4), and the bounds mask."""
    if WIDE:
        pid = pid.to(tl.int64)
    rows = pid * (BLOCK // ROW) + tl.arange(0, BLOCK // ROW)
    offs = rows[:, None] * ROW + tl.arange(0, ROW)[None, :]
    return offs, rows * (ROW // 4), offs < n


# sin(pi/2 f) / f and cos(pi/2 f) for f in [-1/2, 1/2] as polynomials in f^2 (least squares on Chebyshev
# nodes): max error 1e-7 against float64 in fp32 arithmetic, about an ulp
_S1 = tl.constexpr(1.5707963705062866)
_S3 = tl.constexpr(-0.6459634900093079)
_S5 = tl.constexpr(0.07968021929264069)
_S7 = tl.constexpr(-0.004602163098752499)
_C2 = tl.constexpr(-1.2337005138397217)
_C4 = tl.constexpr(0.25366920232772827)
_C6 = tl.constexpr(-0.02086007036268711)
_C8 = tl.constexpr(0.00090362987248227)


@triton.jit
def _unit(w, offset: tl.constexpr):
    """(the top 23 bits of a uint32 word as a float in [1, 2)) - offset: exact, no int-to-float conversion."""
    return ((w >> 9) | 0x3F800000).to(tl.float32, bitcast=True) - offset


@triton.jit
def _log_normal(x):
    """log x for a positive, finite, normal fp32 x: libdevice's logf (the same reduction to [2/3, 4/3) and
    polynomial) without its branches for zero, denormals, infinities and NaN, which cost a third of it."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits - 0x3F2AAAAB) & -8388608  # 0xFF800000: the exponent that puts the mantissa in [2/3, 4/3)
    f = (bits - e).to(tl.float32, bitcast=True) - 1.0
    p = -0.13018856942653656 * f + 0.1408461034297943
    p = p * f - 0.12148627638816833
    p = p * f + 0.1398061066865921
    p = p * f - 0.16684235632419586
    p = p * f + 0.20012299716472626
    p = p * f - 0.24999669194221497
    p = p * f + 0.333331823348999
    p = p * f - 0.5
    return e.to(tl.float32) * (0.6931471824645996 * 2.0**-23) + (f + f * (f * p))


@triton.jit
def _sincos_octant(f):
    """(sin, cos) of pi/2 f for f in [-1/2, 1/2]."""
    f2 = f * f
    return f * (_S1 + f2 * (_S3 + f2 * (_S5 + f2 * _S7))), 1.0 + f2 * (_C2 + f2 * (_C4 + f2 * (_C6 + f2 * _C8)))


@triton.jit
def _normal_pair(w_r, w_a):
    """Two independent standard normals from two uniform uint32 words (Box-Muller).

    radius: sqrt(-2 log u), u in (0, 1) from w_r's top 23 bits, centred in its cell so it is never 0
            (|eps| <= 5.8);
    angle:  uniform on the circle, as an angle uniform on [-pi/4, pi/4) (w_a's top 23 bits) moved by a
            uniform symmetry of the square (swap sine and cosine, flip either sign: three low bits), so
            the sine and cosine need no range reduction.
    """
    r = tl.sqrt(-2.0 * _log_normal(_unit(w_r, 1.0 - 2.0**-24)))
    s, c = _sincos_octant(_unit(w_a, 1.5))
    swap = (w_a & 1) != 0
    a = tl.where(swap, s, c).to(tl.uint32, bitcast=True) ^ (w_r << 31)
    b = tl.where(swap, c, s).to(tl.uint32, bitcast=True) ^ ((w_a & 2) << 30)
    return r * a.to(tl.float32, bitcast=True), r * b.to(tl.float32, bitcast=True)


@triton.jit
def _mul_wide(a, b):
    """(high, low) 32-bit words of the 64-bit product of uint32 ``a`` and a uint32 constant: one wide
    multiply (IMAD.WIDE.U32) where triton's umulhi and mul are two."""
    p = a.to(tl.uint64) * b
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox(seed, counters):
    """Philox4x32-10 of (counter low word, counter high word, 0, 0) under the 64-bit key ``seed``: the four
    uint32 words ``tl.randint4x(seed, counters)`` gives, bit for bit (int32 counters have a high word of 0)."""
    c0 = counters.to(tl.uint32)
    if tl.constexpr(counters.dtype.primitive_bitwidth > 32):
        c1 = (counters >> 32).to(tl.uint32)
    else:
        c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    seed = seed.to(tl.uint64, bitcast=True)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(10):
        hi_b, lo_b = _mul_wide(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul_wide(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _noise(seed, counters, ROW: tl.constexpr):
    """eps for a [BLOCK/ROW, ROW] tile whose rows start at Philox ``counters``: ROW/4 calls per row, each
    four normals for four neighbouring elements (the caller adds k * ceil(n/4) for sample k)."""
    lane = tl.arange(0, ROW)[None, :]
    eps = tl.zeros([counters.shape[0], ROW], dtype=tl.float32)
    for j in tl.static_range(ROW // 4):
        w0, w1, w2, w3 = _philox(seed, counters + j)
        e0, e1 = _normal_pair(w0, w1)
        e2, e3 = _normal_pair(w2, w3)
        eps = tl.where(lane == 4 * j, e0[:, None], eps)
        eps = tl.where(lane == 4 * j + 1, e1[:, None], eps)
        eps = tl.where(lane == 4 * j + 2, e2[:, None], eps)
        eps = tl.where(lane == 4 * j + 3, e3[:, None], eps)
    return eps


@triton.jit
def _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
              FORM: tl.constexpr):
    """(mu - mu_p, exp(-logvar_p), logvar_p, the prior's scale or 1); the standard-normal prior's are the
    constants (1, 0), which the compiler folds away (an exp of a zero tensor it would compute)."""
    if HAS_MU_P:
        d = mu - tl.load(mup_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        d = mu
    if HAS_LV_P:
        if FORM == FORM_SCALE:
            sp = tl.load(lvp_ptr + offs, mask=mask, other=1.0).to(tl.float32)
            return d, 1.0 / (sp * sp), 2.0 * tl.log(sp), sp
        else:
            lvp = tl.load(lvp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            return d, tl.exp(-lvp), lvp, 1.0
    else:
        return d, 1.0, 0.0, 1.0


@triton.jit
def _split_offsets(offs, SPLIT):
    """Where logical element e of the (B, C, ...) half lies in (B, 2C, ...) ``parameters``."""
    return offs + (offs // SPLIT) * SPLIT


@triton.jit
def _load_posterior(mu_ptr, logvar_ptr, offs, mask, SPLIT, FORM: tl.constexpr, HAS_SPLIT: tl.constexpr):
    """(memory offsets of mu, mu, the logvar as the formulas use it, std, var, the raw second input) in fp32."""
    if HAS_SPLIT:
        mem = _split_offsets(offs, SPLIT)
        lv_ptr = mu_ptr + SPLIT
    else:
        mem = offs
        lv_ptr = logvar_ptr
    mu = tl.load(mu_ptr + mem, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(lv_ptr + mem, mask=mask, other=1.0 if FORM == FORM_SCALE else 0.0).to(tl.float32)
    if FORM == FORM_SCALE:
        lv = 2.0 * tl.log(raw)
        return mem, mu, lv, raw, raw * raw, raw
    if FORM == FORM_CLAMPED:  # torch.clamp's values: NaN stays NaN
        lv = tl.where(raw < LV_MIN, LV_MIN, tl.where(raw > LV_MAX, LV_MAX, raw))
    else:
        lv = raw
    # exp(lv), not std^2: exp(lv) - lv - 1 cancels to lv^2 / 2, and a rounding more shows in small KLs
    return mem, mu, lv, tl.exp(0.5 * lv), tl.exp(lv), raw


@triton.jit
def sample_kl_fwd_kernel(
    mu_ptr, logvar_ptr, mup_ptr, lvp_ptr, seed_ptr,
    z_ptr, kl_ptr, lr_ptr,
    n, n_ctr, num_samples, row_len, lr_stride, split,
    SAMPLE: tl.constexpr, KL_MODE: tl.constexpr, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
    LOG_RATIO: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ROW: tl.constexpr, WIDE: tl.constexpr, FORM: tl.constexpr, HAS_SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, counters, mask = _tile(pid, n, BLOCK, ROW, WIDE)
    _, mu, lv, std, var, _ = _load_posterior(mu_ptr, logvar_ptr, offs, mask, split, FORM, HAS_SPLIT)
    if SAMPLE:
        seed = tl.load(seed_ptr)
        z_offs, lr_base = offs, lr_ptr
        for _ in range(num_samples):
            eps = _noise(seed, counters, ROW)
            z = mu + std * eps
            tl.store(z_ptr + z_offs, z.to(z_ptr.dtype.element_ty), mask=mask)
            if LOG_RATIO:  # log N(z; 0, I) - log N(z; mu, e^lv), summed per row: the 2 pi terms cancel
                store_partials(0.5 * (eps * eps - z * z + lv), mask, lr_base, pid, row_len, True, BLOCK, LONG_ROWS)
                lr_base += lr_stride
            z_offs += n
            counters += n_ctr
    if KL_MODE != KL_OFF:
        d, inv_var_p, lvp, _ = _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P, HAS_LV_P, FORM)
        kl = 0.5 * (lvp - lv + (var + d * d) * inv_var_p - 1.0)
        store_loss(kl, mask, kl_ptr, offs, pid, row_len, KL_MODE == KL_REDUCED, PER_ROW, BLOCK, LONG_ROWS)


@triton.jit
def sample_kl_bwd_kernel(
    gz_ptr, gkl_ptr, glr_ptr, mu_ptr, logvar_ptr, mup_ptr, lvp_ptr, seed_ptr,
    gmu_ptr, glv_ptr, gmup_ptr, glvp_ptr,
    n, n_ctr, num_samples, kl_scale, row_len, n_rows, split,
    HAS_GZ: tl.constexpr, KL_MODE: tl.constexpr, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
    LOG_RATIO: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ROW: tl.constexpr, WIDE: tl.constexpr, FORM: tl.constexpr, HAS_SPLIT: tl.constexpr,
    CLAMP_CLOSED: tl.constexpr = True, SPLIT_GRAD: tl.constexpr = True,
):
    pid = tl.program_id(0)
    offs, counters, mask = _tile(pid, n, BLOCK, ROW, WIDE)
    mem, mu, lv, std, var, raw = _load_posterior(mu_ptr, logvar_ptr, offs, mask, split, FORM, HAS_SPLIT)
    gmu = tl.zeros_like(mu)
    glv = tl.zeros_like(mu)  # dL/dlv, but for the samples' part, g_eps
    g_eps = tl.zeros_like(mu)  # sum_k dL/dz_k * eps_k: dz/dlogvar = 0.5 std eps, dz/dscale = eps
    if PER_ROW or LOG_RATIO:  # each element's row: where its per-row gradient is read
        row, _ = row_col(pid, row_len, BLOCK, LONG_ROWS)
        row = tl.reshape(row, [BLOCK // ROW, ROW])
    else:
        row = offs
    if HAS_GZ or LOG_RATIO:
        seed = tl.load(seed_ptr)
        gz_offs, lr_offs = offs, row
        for _ in range(num_samples):
            eps = _noise(seed, counters, ROW)
            g_z = tl.zeros_like(mu)
            if HAS_GZ:
                g_z += tl.load(gz_ptr + gz_offs, mask=mask, other=0.0).to(tl.float32)
            if LOG_RATIO:
                # d(log ratio)/dz = -z; directly, d(log ratio)/dlogvar = 0.5
                g_lr = tl.load(glr_ptr + lr_offs, mask=mask, other=0.0).to(tl.float32)
                g_z -= g_lr * (mu + std * eps)
                glv += 0.5 * g_lr
                lr_offs += n_rows
            gmu += g_z
            g_eps += g_z * eps
            gz_offs += n
            counters += n_ctr
    if KL_MODE != KL_OFF:
        if KL_MODE == KL_ELEMENTWISE:
            g = tl.load(gkl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        elif PER_ROW:
            g = tl.load(gkl_ptr + row, mask=mask, other=0.0).to(tl.float32)
        else:
            g = tl.load(gkl_ptr).to(tl.float32) * kl_scale
        d, inv_var_p, lvp, sp = _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P, HAS_LV_P, FORM)
        g_d = g * d * inv_var_p
        gmu += g_d
        glv += 0.5 * g * (var * inv_var_p - 1.0)
        if HAS_MU_P:
            tl.store(gmup_ptr + offs, (-g_d).to(gmup_ptr.dtype.element_ty), mask=mask)
        if HAS_LV_P:
            glvp = 0.5 * g * (1.0 - (var + d * d) * inv_var_p)
            if FORM == FORM_SCALE:  # dlv_p/dscale_p = 2 / scale_p
                glvp = glvp * 2.0 / sp
            tl.store(glvp_ptr + offs, glvp.to(glvp_ptr.dtype.element_ty), mask=mask)
    if FORM == FORM_SCALE:
        glv = glv * 2.0 / raw
        if HAS_GZ or LOG_RATIO:
            glv += g_eps
    else:
        if HAS_GZ or LOG_RATIO:  # (std * 0 is not folded away: no exp where no sample was drawn)
            glv += 0.5 * std * g_eps
        if FORM == FORM_CLAMPED:  # torch.clamp's gradient: 0 outside [min, max]; on the bounds as torch does
            if CLAMP_CLOSED:  # torch <= 2.13
                glv = tl.where((raw >= LV_MIN) & (raw <= LV_MAX), glv, 0.0)
            else:  # torch >= 2.14: the open interval
                glv = tl.where((raw > LV_MIN) & (raw < LV_MAX), glv, 0.0)
    if HAS_SPLIT and SPLIT_GRAD:
        tl.store(gmu_ptr + mem, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(gmu_ptr + split + mem, glv.to(gmu_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(gmu_ptr + offs, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + offs, glv.to(glv_ptr.dtype.element_ty), mask=mask)
