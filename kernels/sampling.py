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

One Philox call (10 rounds) yields four normals (two Box-Muller pairs), so each program works on a
[BLOCK/4, 4] tile: a row is one counter and four neighbouring elements, which keeps the loads contiguous
and spends a quarter of the integer work of one call per element.

Offsets are int64 throughout, so tensors past 2^31 elements index correctly; Philox takes the 64-bit
counter as two 32-bit words.
"""

import triton
import triton.language as tl

from .reduce import row_col, store_partials

# KL_MODE: what the kernel does with the KL
KL_OFF = tl.constexpr(0)  # sampling only
KL_ELEMENTWISE = tl.constexpr(1)  # reduction="none": one value (or one gradient) per element
KL_REDUCED = tl.constexpr(2)  # fp32 partials; backward gets one gradient (PER_ROW: one per row)


@triton.jit
def _tile(pid, n, BLOCK: tl.constexpr):
    """Element offsets of this program as a [BLOCK/4, 4] tile, its Philox counters, and the bounds mask."""
    rows = pid.to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    offs = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    return offs, rows, offs < n


@triton.jit
def _noise(seed, counters):
    """eps for a tile: the four normals of each row's Philox counter spread over the row's four elements.
    Sample k of row r uses counter k * ceil(n/4) + r (int64, advanced by the caller)."""
    r0, r1, r2, r3 = tl.randn4x(seed, counters)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, r0[:, None],
                    tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))


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
    z_ptr, kl_ptr, lr_ptr,
    n, num_samples, row_len, lr_stride,
    SAMPLE: tl.constexpr, KL_MODE: tl.constexpr, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
    LOG_RATIO: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, rows, mask = _tile(pid, n, BLOCK)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE:
        seed = tl.load(seed_ptr)
        std = tl.exp(0.5 * lv)
        z_offs, counters, lr_base = offs, rows, lr_ptr
        for _ in range(num_samples):
            eps = _noise(seed, counters)
            z = mu + std * eps
            tl.store(z_ptr + z_offs, z.to(z_ptr.dtype.element_ty), mask=mask)
            if LOG_RATIO:  # log N(z; 0, I) - log N(z; mu, e^lv), summed per row: the 2 pi terms cancel
                store_partials(0.5 * (eps * eps - z * z + lv), mask, lr_base, pid, row_len, True, BLOCK, LONG_ROWS)
                lr_base += lr_stride
            z_offs += n
            counters += (n + 3) // 4
    if KL_MODE != KL_OFF:
        d, inv_var_p, lvp = _kl_terms(mu, lv, mup_ptr, lvp_ptr, offs, mask, HAS_MU_P, HAS_LV_P)
        kl = 0.5 * (lvp - lv + (tl.exp(lv) + d * d) * inv_var_p - 1.0)
        if KL_MODE == KL_ELEMENTWISE:
            tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=mask)
        else:
            store_partials(kl, mask, kl_ptr, pid, row_len, PER_ROW, BLOCK, LONG_ROWS)


@triton.jit
def sample_kl_bwd_kernel(
    gz_ptr, gkl_ptr, glr_ptr, mu_ptr, logvar_ptr, mup_ptr, lvp_ptr, seed_ptr,
    gmu_ptr, glv_ptr, gmup_ptr, glvp_ptr,
    n, num_samples, kl_scale, row_len, n_rows,
    HAS_GZ: tl.constexpr, KL_MODE: tl.constexpr, HAS_MU_P: tl.constexpr, HAS_LV_P: tl.constexpr,
    LOG_RATIO: tl.constexpr, PER_ROW: tl.constexpr, LONG_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, rows, mask = _tile(pid, n, BLOCK)
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gmu = tl.zeros_like(mu)
    glv = tl.zeros_like(mu)
    if PER_ROW or LOG_RATIO:  # each element's row: where its per-row gradient is read
        row, _ = row_col(pid, row_len, BLOCK, LONG_ROWS)
        row = tl.reshape(row, [BLOCK // 4, 4])
    else:
        row = offs
    if HAS_GZ or LOG_RATIO:
        seed = tl.load(seed_ptr)
        std = tl.exp(0.5 * lv)
        gz_offs, counters, lr_offs = offs, rows, row
        g_eps = tl.zeros_like(mu)  # sum_k dL/dz_k * eps_k: dz/dlogvar = 0.5 std eps
        for _ in range(num_samples):
            eps = _noise(seed, counters)
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
            counters += (n + 3) // 4
        glv += 0.5 * std * g_eps
    if KL_MODE != KL_OFF:
        if KL_MODE == KL_ELEMENTWISE:
            g = tl.load(gkl_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        elif PER_ROW:
            g = tl.load(gkl_ptr + row, mask=mask, other=0.0).to(tl.float32)
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
