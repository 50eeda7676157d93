"""Reparameterized sampling fused with the KL divergence of diagonal Gaussians.

Forward, per element i of mu/logvar (N elements) and sample k < K:

    std      = exp(0.5 * logvar)
    eps[k,i] = Philox-normal(seed, k * N + i)                   (drawn here, never stored)
    z[k,i]   = mu + std * eps[k,i]
    kl[i]    = 0.5 * (logvar_p - logvar + (exp(logvar) + (mu - mu_p)^2) * exp(-logvar_p) - 1)

with mu_p = 0, logvar_p = 0 unless given. The KL is written per element (reduction "none") or as one fp32
partial per program, summed in a fixed order by ``reduce.sum_partials_kernel`` (no float atomics).
Bytes: reads 2N (4N with a prior), writes K*N for z and N or one float per program for the KL.

Backward regenerates eps from the same seed and counters:

    grad_mu     = sum_k grad_z[k] + g_kl * (mu - mu_p) * exp(-logvar_p)
    grad_logvar = 0.5 * std * sum_k grad_z[k] * eps[k] + g_kl * 0.5 * (exp(logvar - logvar_p) - 1)
    grad_mu_p   = -g_kl * (mu - mu_p) * exp(-logvar_p)
    grad_logvar_p = g_kl * 0.5 * (1 - (exp(logvar) + (mu - mu_p)^2) * exp(-logvar_p))

where g_kl is the per-element KL gradient or the scalar grad_output times the reduction's scale, read on the
device. Bytes: reads K*N (grad_z) + 2N, writes 2N (plus 2N in, 2N out with a prior).

Offsets are int64 throughout, so tensors past 2^31 elements index correctly; Philox takes the 64-bit
counter as two 32-bit words.
"""

import triton
import triton.language as tl

# KL_MODE: what the kernel does with the KL
KL_OFF = tl.constexpr(0)  # sampling only
KL_ELEMENTWISE = tl.constexpr(1)  # reduction="none": one value (or one gradient) per element
KL_REDUCED = tl.constexpr(2)  # one fp32 partial per program; backward gets a scalar gradient


@triton.jit
def _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr):
    """(mu - mu_p, exp(-logvar_p), logvar_p), with the standard-normal prior's constants when absent."""
    if HAS_MU_P:
        d = mu - tl.load(mup_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        d = mu
    if HAS_LV_P:
        lvp = tl.load(lvp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        lvp = tl.zeros_like(lv)
    return d, tl.exp(-lvp), lvp


@triton.jit
def sample_kl_fwd_kernel(
    mu_ptr, logvar_ptr, mup_ptr, lvp_ptr, seed_ptr,
    z_ptr, kl_ptr,
    n, num_samples,
    SAMPLE: tl.constexpr, KL_MODE: tl.constexpr, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE:
        seed = tl.load(seed_ptr)
        std = tl.exp(0.5 * lv)
        idx = offs
        for _ in range(num_samples):
            eps = tl.randn(seed, idx)
            tl.store(z_ptr + idx, (mu + std * eps).to(z_ptr.dtype.element_ty), mask=mask)
            idx += n
    if KL_MODE != KL_OFF:
        d, inv_var_p, lvp = _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P, HAS_LV_P)
        kl = 0.5 * (lvp - lv + (tl.exp(lv) + d * d) * inv_var_p - 1.0)
        if KL_MODE == KL_ELEMENTWISE:
            tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(kl_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))


@triton.jit
def sample_kl_bwd_kernel(
    gz_ptr, gkl_ptr, mu_ptr, logvar_ptr, mup_ptr, lvp_ptr, seed_ptr,
    gmu_ptr, glv_ptr, gmup_ptr, glvp_ptr,
    n, num_samples, kl_scale,
    HAS_GZ: tl.constexpr, KL_MODE: tl.constexpr, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gmu = tl.zeros([BLOCK], dtype=tl.float32)
    glv = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GZ:
        seed = tl.load(seed_ptr)
        idx = offs
        g_eps = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(num_samples):
            gz = tl.load(gz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            gmu += gz
            g_eps += gz * tl.randn(seed, idx)
            idx += n
        glv = 0.5 * tl.exp(0.5 * lv) * g_eps
    if KL_MODE != KL_OFF:
        if KL_MODE == KL_ELEMENTWISE:
            g = tl.load(gkl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            g = tl.load(gkl_ptr).to(tl.float32) * kl_scale
        d, inv_var_p, lvp = _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P, HAS_LV_P)
        g_d = g * d * inv_var_p
        var = tl.exp(lv)
        gmu += g_d
        glv += 0.5 * g * (var * inv_var_p - 1.0)
        if HAS_MU_P:
            tl.store(gmup_ptr + offs, (-g_d).to(gmup_ptr.dtype.element_ty), mask=mask)
        if HAS_LV_P:
            glvp = 0.5 * g * (1.0 - (var + d * d) * inv_var_p)
            tl.store(glvp_ptr + offs, glvp.to(glvp_ptr.dtype.element_ty), mask=mask)
    tl.store(gmu_ptr + offs, gmu.to(gmu_ptr.dtype.element_ty), mask=mask)
    tl.store(glv_ptr + offs, glv.to(glv_ptr.dtype.element_ty), mask=mask)
