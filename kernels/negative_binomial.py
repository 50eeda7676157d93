"""Negative binomial and zero-inflated negative binomial NLLs (the scRNA-seq count likelihoods of scVI), loss and
gradients in one pass, with the fp32 lgamma and digamma they need.

Mean / inverse-dispersion parameterization, term for term as scvi-tools' ``log_nb_positive`` and
``log_zinb_positive`` (eps inside the logs). Per element, with count x, mean mu, inverse dispersion th and
dropout logit pi:

    A      = th * (log(th + eps) - log(th + mu + eps))
    log_nb = A + x * (log(mu + eps) - log(th + mu + eps)) + lgamma(x + th) - lgamma(th) - lgamma(x + 1)
    NB:    loss = -log_nb
    ZINB:  loss = -(softplus(-pi + A) - softplus(-pi))          where x < eps
           loss = -(log_nb - softplus(-pi) - pi)                 where x > eps   (0 at x == eps, as scvi)

    d log_nb / d mu = x / (mu + eps) - (th + x) / (th + mu + eps)
    d log_nb / d th = dA/dth - x / (th + mu + eps) + digamma(x + th) - digamma(th),
                      dA/dth = log(th + eps) - log(th + mu + eps) + th / (th + eps) - th / (th + mu + eps)
    zero case, s = sigmoid(-pi + A):   d/dmu = -s * th / (th + mu + eps)   d/dth = s * dA/dth
                                       d/dpi = sigmoid(-pi) - s
    non-zero case:                     d/dpi = sigmoid(-pi) - 1            (mu, th: those of log_nb)

Gradients are stored already multiplied by the reduction's scale (and negated, as the loss is), so backward is
a multiply by grad_output that is skipped on the device when grad_output is exactly 1. x gets no gradient: it
is the data. A negative x, mu or th gives NaN in the loss and every gradient. th is indexed, not
materialized (TH_MODE, see bernoulli.load_bcast): one per feature broadcast over the rows reads G values for
N elements.

Bytes for N elements: reads 2N (x, mu) + N for a full-shape th + N for pi (ZINB); writes N for each gradient
asked for (mu, th, pi) and N for reduction="none" or fp32 partials otherwise. Compared with the eager
formulas (about twenty launches, each reading and writing N-sized intermediates) this is one pass.
"""

import triton
import triton.language as tl

from .bernoulli import load_bcast, log1p
from .reduce import store_loss

HALF_LOG_2PI = tl.constexpr(0.9189385332046727)
SHIFT = tl.constexpr(4)  # the asymptotic series are used from 4 up
LN2 = tl.constexpr(0.6931471805599453)
EULER = tl.constexpr(0.5772156649015329)
MIN_NORMAL_BITS = tl.constexpr(0x00800000)  # the bits of 2^-126, fp32's smallest normal number
TINY = tl.constexpr(5.421010862427522e-20)  # 2^-64: below it lgamma(x) = -log x and psi(x) = -1/x - gamma

FN_DIGAMMA = tl.constexpr(0)
FN_LGAMMA = tl.constexpr(1)


@triton.jit
def log_full(v):
    """log(v) for v >= 0 (NaN below, as tl.log) that keeps subnormal arguments on a GPU: there fp32 tl.log
    compiles to lg2.approx.ftz, which flushes a subnormal v to 0 and returns -inf (the interpreter does not
    flush). A subnormal v is m * 2^-149 with m its bits read as an integer (1 <= m < 2^23, exact in fp32), so
    log v = log m - 149 log 2 with only normal arguments; v = 0 gives log 0 = -inf, the right limit."""
    bits = v.to(tl.int32, bitcast=True)
    sub = (bits >= 0) & (bits < MIN_NORMAL_BITS)  # +0 and the positive subnormals (a negative v has bit 31 set)
    # one log of a normal (or zero) argument either way: the MUFU cost of the plain log
    return tl.log(tl.where(sub, bits.to(tl.float32), v)) - tl.where(sub, 149.0 * LN2, 0.0)


@triton.jit
def reciprocal_full(v):
    """1 / v for v >= 0 that a GPU's approximate division does not flush at a subnormal v (it would give
    1 / 0 = inf where 1 / v is finite, v in (2^-128, 2^-126)): 2^149 / m for v = m 2^-149, as (1 / m) 2^75 2^74
    (two exact power-of-two steps), overflowing to inf exactly where fp32 must; v = 0 gives inf."""
    bits = v.to(tl.int32, bitcast=True)
    sub = (bits >= 0) & (bits < MIN_NORMAL_BITS)
    m = tl.maximum(bits, 1).to(tl.float32)  # bits = 0 (v = 0) gives 2^149: inf after the scaling, as 1/0
    q = 1.0 / tl.where(sub, m, v)  # one division either way
    return tl.where(sub, (q * 3.777893186295716e22) * 1.8889465931478581e22, q)  # 2^75, then 2^74


@triton.jit
def _shift(x):
    """(y, num, den) for x > 0: below 4, y = x + 4, den = x (x+1) (x+2) (x+3) and num / den = sum_j 1/(x + j)
    (the recurrences Gamma(x) = Gamma(x + 4) / den and psi(x) = psi(x + 4) - num / den in closed form: one
    select per argument, not per step, and no division in the steps); from 4 up, y = x, den = 1, num = 0. A fixed shift
    to [4, 8) rather than a shift to [6, 7): lgamma(y) - log(den) cancels more the larger y is, and y < 8
    keeps it within 1.6e-6, as the per-step shift was (tests/test_likelihoods.py)."""
    small = x < SHIFT
    xs = tl.minimum(x, 4.0)  # = min(x, SHIFT): the unused lanes' products stay finite
    num = tl.full(x.shape, 1.0, tl.float32)
    den = xs
    for j in tl.static_range(1, SHIFT):
        num = num * (xs + j) + den
        den = den * (xs + j)
    return tl.where(small, x + SHIFT, x), tl.where(small, num, 0.0), tl.where(small, den, 1.0)


@triton.jit
def lgamma_digamma(x):
    """(log Gamma(x), psi(x)) for x >= 0 in fp32 (inf, -inf at 0; inf, inf at inf), sharing the shift and
    log y. With y >= 4:
    log Gamma(y) ~ (y - 1/2) log y - y + log(2 pi)/2 + 1/(12y) - 1/(360y^3) + 1/(1260y^5) - 1/(1680y^7),
    psi(y) ~ log y - 1/(2y) - 1/(12y^2) + 1/(120y^4) - 1/(252y^6) + 1/(240y^8) - 1/(132y^10) (truncation
    errors 3e-9 and 1e-9 at y = 4). libdevice's lgammaf does not run in the interpreter, so this is what
    both paths use; a caller that needs one of the two leaves the other to dead-code elimination.

    Below TINY = 2^-64 the shift's den = x (x+1)(x+2)(x+3) ~ 6x would reach the subnormals (from x ~ 2e-39),
    which a GPU's ftz log and division flush to 0 (lgamma +inf, not 92 at 1e-40), while the interpreter keeps
    them: there lgamma(x) = -log x - gamma x and psi(x) = -1/x - gamma + O(x) are taken directly, through
    log_full and reciprocal_full (no subnormal reaches an approximate instruction), exact to fp32 rounding
    (the dropped terms are below 2^-64 relative). From TINY up every intermediate is a normal number."""
    y, num, den = _shift(x)
    # two divisions, not one of 1 / (y den): at x = 0 (den = 0) or x = inf (0 * inf) the shared one turns
    # the limits into NaN or a wrong-signed inf
    r = 1.0 / y
    r2 = r * r
    log_y = tl.log(y)
    # (y - 1/2) log y - y = (y - 1/2)(log y - 1) - 1/2: the product is half the size, so is its rounding
    lg_series = r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 * (1.0 / 1680))))
    lg = (y - 0.5) * (log_y - 1.0) + (HALF_LOG_2PI - 0.5) + lg_series - tl.log(den)
    psi_series = r2 * (1.0 / 12 - r2 * (1.0 / 120 - r2 * (1.0 / 252 - r2 * (1.0 / 240 - r2 * (1.0 / 132)))))
    psi = log_y - 0.5 * r - psi_series - num / den
    tiny = x < TINY  # x >= 0 here: NaN and inf fail the test and keep the series' values
    lg = tl.where(tiny, -log_full(x), lg)
    psi = tl.where(tiny, -reciprocal_full(x) - EULER, psi)
    return lg, psi


@triton.jit
def lgamma(x):
    lg, _ = lgamma_digamma(x)
    return lg


@triton.jit
def digamma(x):
    _, psi = lgamma_digamma(x)
    return psi


@triton.jit
def softplus(z):
    return tl.maximum(z, 0.0) + log1p(tl.exp(-tl.abs(z)))


@triton.jit
def sigmoid(z):
    e = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, inv, e * inv)


@triton.jit
def special_fn_kernel(x_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
    """out = digamma(x) or lgamma(x) (FN): the device functions above on their own, for their accuracy tests."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    if FN == FN_DIGAMMA:
        y = digamma(x)
    else:
        y = lgamma(x)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.jit
def nb_nll_fwd_kernel(
    x_ptr, mu_ptr, th_ptr, pi_ptr,
    loss_ptr, gmu_ptr, gth_ptr, gpi_ptr,
    n, th_div, th_mod, th_mul, th_mod2, eps, grad_scale, row_len,
    TH_MODE: tl.constexpr, ZI: tl.constexpr, REDUCE: tl.constexpr, PER_ROW: tl.constexpr,
    LONG_ROWS: tl.constexpr, GRAD_MU: tl.constexpr, GRAD_TH: tl.constexpr, GRAD_PI: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    mu = tl.load(mu_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    th = load_bcast(th_ptr, offs, mask, th_div, th_mod, th_mul, th_mod2, TH_MODE)
    # log_full: with eps = 0 a subnormal mu or theta would be flushed to log 0 = -inf on a GPU only
    log_th = log_full(th + eps)
    inv_thmu = 1.0 / (th + mu + eps)
    log_thmu = log_full(th + mu + eps)
    log_mu_term = x * (log_full(mu + eps) - log_thmu)
    a = th * (log_th - log_thmu)
    x_th = x + th
    lg_x_th, psi_x_th = lgamma_digamma(x_th)
    lg_th, psi_th = lgamma_digamma(th)
    log_nb = a + log_mu_term + lg_x_th - lg_th - lgamma(x + 1.0)
    da_dth = log_th - log_thmu + th / (th + eps) - th * inv_thmu
    d_mu = x / (mu + eps) - x_th * inv_thmu
    d_th = da_dth - x * inv_thmu + psi_x_th - psi_th
    if ZI:
        pi = tl.load(pi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sp_neg_pi = softplus(-pi)
        pt = a - pi
        zero = x < eps
        nonzero = x > eps
        ll = tl.where(zero, softplus(pt) - sp_neg_pi, tl.where(nonzero, log_nb - sp_neg_pi - pi, 0.0))
        s = sigmoid(pt)
        sig_neg_pi = sigmoid(-pi)
        d_pi = tl.where(zero, sig_neg_pi - s, tl.where(nonzero, sig_neg_pi - 1.0, 0.0))
        d_mu = tl.where(zero, -s * th * inv_thmu, tl.where(nonzero, d_mu, 0.0))
        d_th = tl.where(zero, s * da_dth, tl.where(nonzero, d_th, 0.0))
    else:
        ll = log_nb
    # a negative count, mean or inverse dispersion: NaN in the loss and every gradient (the eager path's
    # poison_invalid), never a finite value from a branch tl.where happened to select
    bad = (x < 0.0) | (mu < 0.0) | (th < 0.0)
    loss = tl.where(bad, float("nan"), -ll)
    d_mu = tl.where(bad, float("nan"), d_mu)
    d_th = tl.where(bad, float("nan"), d_th)
    if ZI:
        d_pi = tl.where(bad, float("nan"), d_pi)
    neg_scale = -grad_scale
    store_loss(loss, mask, loss_ptr, offs, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    if GRAD_MU:
        tl.store(gmu_ptr + offs, (d_mu * neg_scale).to(gmu_ptr.dtype.element_ty), mask=mask)
    if GRAD_TH:
        tl.store(gth_ptr + offs, (d_th * neg_scale).to(gth_ptr.dtype.element_ty), mask=mask)
    if ZI:
        if GRAD_PI:
            tl.store(gpi_ptr + offs, (d_pi * neg_scale).to(gpi_ptr.dtype.element_ty), mask=mask)
