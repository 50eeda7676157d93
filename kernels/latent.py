"""Batch-level latent terms as tiled all-pairs kernels: a tile of rows i against a stream of tiles of columns
j with an online (max, sum) log-sum-exp, flash-attention's scheme; nothing of size B x B is ever stored, and
backward recomputes the tiles from per-row statistics saved in forward.

β-TCVAE decomposition (``tc_*``). Rows: R samples z_i (global indices row_offset + i); columns: the B
posteriors N(mu_j, diag e^lv_j). With L_ijd = log N(z_i^d; mu_j^d, e^lv_j^d) = -1/2 ((z - mu)^2 e^-lv + lv)
- log(2 pi)/2 and log w_ij the estimator's weight (MSS: lw_own at j = i, lw_strat at j = i + 1 mod B,
lw_other elsewhere; MWS: one value),

    log_qz_i   = logsumexp_j (lw_ij + sum_d L_ijd)                 (one online lse per row)
    lse_id     = logsumexp_j (lw_ij + L_ijd),  log_prod_i = sum_d lse_id   (one online lse per (row, dim))

The per-dimension log-sum-exp is not a matrix product: every (i, j, d) needs its own exp, B^2 D of them,
so the kernels work on [BLOCK_I, BLOCK_J, BLOCK_D] tiles. The joint's sum over d then costs one add an
element on a tile already computed; its expansion into products (z^2 . e^-lv - 2 z . mu e^-lv + ...) would
save those adds on the tensor cores but not one exp, and it cancels catastrophically at small variances
(|z^2 e^-lv| ~ 1e4 at lv = -10 for a result near 0: nats of error at tf32). Work: about 8 B^2 D FLOPs and
B^2 D exponentials forward, each backward kernel as much again (it recomputes the pairs); bytes: the rows once
and the 2 B D column values once per row tile, 4 B + 4 B D written. Bound by the exponentials (MUFU) and the
FP32 issue rate, not by memory.

Backward (``tc_bwd_rows_kernel`` over row tiles for dz, ``tc_bwd_cols_kernel`` over column tiles for dmu,
dlogvar: flash-attention's dQ / dK-dV split, no float atomics), with P_ij = exp(lw_ij + sum_d L_ijd -
log_qz_i), Q_ijd = exp(lw_ij + L_ijd - lse_id), A_ijd = g_qz_i P_ij + g_prod_i Q_ijd, t = (z_i - mu_j) e^-lv_j:

    dz_i^d  = -sum_j A_ijd t_ijd            dmu_j^d = sum_i A_ijd t_ijd
    dlv_j^d = sum_i A_ijd (t_ijd (z_i^d - mu_j^d) - 1) / 2

plus the per-sample terms log q(z_i|x_i) (own posterior) and log p(z_i) (standard normal).

MMD (``mmd_*``): rows a_i against the columns of up to two sets b (x against x and y, y against y), the
squared distances |a|^2 + |b|^2 - 2 a.b through ``tl.dot`` (tf32x3: fp32 accuracy on tensor cores), then
k = sum_s f(d2 / s) with f = exp(-t) or 1/(1 + t); each program writes coef-weighted partial sums, summed in
a fixed order. Backward: G_ij = coef k'(d2_ij), d a_i = 2 (sum_j G_ij a_i - (G b)_i) (a second ``tl.dot``).
FLOPs: 2 B^2 D on the tensor cores and B^2 exponentials (or reciprocals) a scale: MUFU-bound for D below
a few hundred. The reciprocals of the scales are fp32 scalar arguments (inv0, inv1, ...; a constexpr count):
nothing is copied to the device for them, and a CUDA graph captures them as launch arguments.

The TC kernels read every input where it lies, through its (row, column) strides: ``mu, logvar =
h.chunk(2, dim=1)`` needs no copy (a column stride of 1 is specialized by the JIT, so those loads stay
vectorized); gradients are written through their buffers' strides. The MMD kernels take row-major (n, dim)
tensors: three runtime row strides in the forward's distance loop cost registers that spill on sm_90 under
triton 3.6 (half inputs, 80 bytes), and their inputs are O(n D) against O(n^2 D) work, so a strided x or y is
copied by the host instead. Row indices and sizes are int32 (a batch is far below 2^31 rows;
no index of a pair is ever formed); element offsets row * stride + column * stride are int32 unless the host
finds that some tensor spans 2^31 elements or more (WIDE: int64 products, which cost twice the registers of an
address).
"""

import triton
import triton.language as tl

HALF_LOG_2PI = tl.constexpr(0.9189385332046727)


@triton.jit
def _offsets(idx, d, stride_r, stride_c, WIDE: tl.constexpr):
    """Element offsets [len(idx), len(d)] of rows idx and columns d: int64 products under WIDE (a tensor of
    2^31 elements or more), int32 otherwise."""
    # one return (a compiled jit function may not return int64 from one branch and int32 from another)
    r, c = idx, d
    if WIDE:
        r, c = idx.to(tl.int64), d.to(tl.int64)
    return r[:, None] * stride_r + c[None, :] * stride_c


@triton.jit
def _tile_rows(ptr, idx, idx_ok, d, d_ok, stride_r, stride_c, WIDE: tl.constexpr):
    """A [len(idx), len(d)] tile of an (n, dim) tensor of strides (stride_r, stride_c) in fp32 (0 where
    masked)."""
    offs = _offsets(idx, d, stride_r, stride_c, WIDE)
    return tl.load(ptr + offs, mask=idx_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pair_densities(z, mu, lv, d_ok):
    """L_ijd (0 on padded dims), z_i - mu_j and t = (z_i - mu_j) e^-lv_j for z [BI, BD], mu/lv [BJ, BD]."""
    inv_var = tl.exp(-lv)[None, :, :]  # one exp a column element, shared by the BLOCK_I rows
    diff = z[:, None, :] - mu[None, :, :]
    t = diff * inv_var
    dens = -0.5 * (diff * t + lv[None, :, :]) - HALF_LOG_2PI
    return tl.where(d_ok[None, None, :], dens, 0.0), diff, t


@triton.jit
def _log_weights(g, j, batch, lw_own, lw_strat, lw_other):
    """log w [BI, BJ] for global rows g against columns j (-inf past the batch)."""
    g_next = tl.where(g + 1 == batch, 0, g + 1)
    lw = tl.where(j[None, :] == g_next[:, None], lw_strat, lw_other)
    lw = tl.where(j[None, :] == g[:, None], lw_own, lw)
    return tl.where((j < batch)[None, :], lw, float("-inf"))


@triton.jit
def tc_fwd_kernel(z_ptr, mu_ptr, lv_ptr, qz_ptr, prod_ptr, qzx_ptr, pz_ptr, lse_d_ptr,
                  rows, batch, dim, row_offset, lw_own, lw_strat, lw_other,
                  sz_r, sz_c, smu_r, smu_c, slv_r, slv_c,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr):
    """Per row: log_qz, log_prod_qzi, log_qzx, log_pz and the per-dim lse (saved for backward, (rows, dim)
    contiguous)."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.arange(0, BLOCK_D)
    i_ok, d_ok = i < rows, d < dim
    g = i + row_offset
    z = _tile_rows(z_ptr, i, i_ok, d, d_ok, sz_r, sz_c, WIDE)
    m = tl.full([BLOCK_I], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_I], tl.float32)
    m_d = tl.full([BLOCK_I, BLOCK_D], float("-inf"), tl.float32)
    s_d = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for j0 in range(0, batch, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < batch
        mu = _tile_rows(mu_ptr, j, j_ok, d, d_ok, smu_r, smu_c, WIDE)
        lv = _tile_rows(lv_ptr, j, j_ok, d, d_ok, slv_r, slv_c, WIDE)
        dens, _, _ = _pair_densities(z, mu, lv, d_ok)
        lw = _log_weights(g, j, batch, lw_own, lw_strat, lw_other)
        # the first tile holds column 0, so m is finite from then on: no exp(-inf - -inf)
        joint = tl.sum(dens, axis=2) + lw
        m_new = tl.maximum(m, tl.max(joint, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(joint - m_new[:, None]), axis=1)
        m = m_new
        per_dim = dens + lw[:, :, None]
        md_new = tl.maximum(m_d, tl.max(per_dim, axis=1))
        s_d = s_d * tl.exp(m_d - md_new) + tl.sum(tl.exp(per_dim - md_new[:, None, :]), axis=1)
        m_d = md_new
    lse_d = m_d + tl.log(s_d)
    zmask = i_ok[:, None] & d_ok[None, :]
    tl.store(lse_d_ptr + _offsets(i, d, dim, 1, WIDE), lse_d, mask=zmask)
    tl.store(qz_ptr + i, m + tl.log(s), mask=i_ok)
    tl.store(prod_ptr + i, tl.sum(tl.where(d_ok[None, :], lse_d, 0.0), axis=1), mask=i_ok)
    mu_own = _tile_rows(mu_ptr, g, i_ok, d, d_ok, smu_r, smu_c, WIDE)
    lv_own = _tile_rows(lv_ptr, g, i_ok, d, d_ok, slv_r, slv_c, WIDE)
    diff = z - mu_own
    own = -0.5 * (diff * diff * tl.exp(-lv_own) + lv_own) - HALF_LOG_2PI
    tl.store(qzx_ptr + i, tl.sum(tl.where(d_ok[None, :], own, 0.0), axis=1), mask=i_ok)
    prior = -0.5 * z * z - HALF_LOG_2PI
    tl.store(pz_ptr + i, tl.sum(tl.where(d_ok[None, :], prior, 0.0), axis=1), mask=i_ok)


@triton.jit
def _pair_weights(z, mu, lv, g, j, lse, lse_d, g_qz, g_prod, d_ok, batch, lw_own, lw_strat, lw_other):
    """A_ijd (the gradient's weight of each pair and dim), z_i - mu_j and t, recomputed from the saved
    lse's (+inf on padded rows and dims, so that their weights are 0)."""
    dens, diff, t = _pair_densities(z, mu, lv, d_ok)
    lw = _log_weights(g, j, batch, lw_own, lw_strat, lw_other)
    p = tl.exp(tl.sum(dens, axis=2) + lw - lse[:, None])
    q = tl.exp(dens + lw[:, :, None] - lse_d[:, None, :])
    return g_qz[:, None, None] * p[:, :, None] + g_prod[:, None, None] * q, diff, t


@triton.jit
def _row_stats(qz_ptr, lse_d_ptr, gqz_ptr, gprod_ptr, i, i_ok, d, d_ok, dim, WIDE: tl.constexpr):
    lse = tl.load(qz_ptr + i, mask=i_ok, other=float("inf"))
    offs = _offsets(i, d, dim, 1, WIDE)
    lse_d = tl.load(lse_d_ptr + offs, mask=i_ok[:, None] & d_ok[None, :], other=float("inf"))
    g_qz = tl.load(gqz_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    g_prod = tl.load(gprod_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    return lse, lse_d, g_qz, g_prod


@triton.jit
def tc_bwd_rows_kernel(z_ptr, mu_ptr, lv_ptr, qz_ptr, lse_d_ptr, gqz_ptr, gprod_ptr, gqzx_ptr, gpz_ptr,
                       dz_ptr, rows, batch, dim, row_offset, lw_own, lw_strat, lw_other,
                       sz_r, sz_c, smu_r, smu_c, slv_r, slv_c, sdz_r, sdz_c,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr):
    """dz for a tile of rows, streaming every column tile."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    d = tl.arange(0, BLOCK_D)
    i_ok, d_ok = i < rows, d < dim
    g = i + row_offset
    z = _tile_rows(z_ptr, i, i_ok, d, d_ok, sz_r, sz_c, WIDE)
    lse, lse_d, g_qz, g_prod = _row_stats(qz_ptr, lse_d_ptr, gqz_ptr, gprod_ptr, i, i_ok, d, d_ok, dim, WIDE)
    acc = tl.zeros([BLOCK_I, BLOCK_D], tl.float32)
    for j0 in range(0, batch, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < batch
        mu = _tile_rows(mu_ptr, j, j_ok, d, d_ok, smu_r, smu_c, WIDE)
        lv = _tile_rows(lv_ptr, j, j_ok, d, d_ok, slv_r, slv_c, WIDE)
        a, _, t = _pair_weights(z, mu, lv, g, j, lse, lse_d, g_qz, g_prod, d_ok, batch, lw_own, lw_strat,
                                lw_other)
        acc -= tl.sum(a * t, axis=1)
    mu_own = _tile_rows(mu_ptr, g, i_ok, d, d_ok, smu_r, smu_c, WIDE)
    lv_own = _tile_rows(lv_ptr, g, i_ok, d, d_ok, slv_r, slv_c, WIDE)
    g_qzx = tl.load(gqzx_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    g_pz = tl.load(gpz_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    acc -= g_qzx[:, None] * (z - mu_own) * tl.exp(-lv_own) + g_pz[:, None] * z
    offs = _offsets(i, d, sdz_r, sdz_c, WIDE)
    tl.store(dz_ptr + offs, acc.to(dz_ptr.dtype.element_ty), mask=i_ok[:, None] & d_ok[None, :])


@triton.jit
def tc_bwd_cols_kernel(z_ptr, mu_ptr, lv_ptr, qz_ptr, lse_d_ptr, gqz_ptr, gprod_ptr, gqzx_ptr,
                       dmu_ptr, dlv_ptr, rows, batch, dim, row_offset, lw_own, lw_strat, lw_other,
                       sz_r, sz_c, smu_r, smu_c, slv_r, slv_c, sdmu_r, sdmu_c, sdlv_r, sdlv_c,
                       BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr):
    """dmu, dlogvar for a tile of columns, streaming every row tile."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    d = tl.arange(0, BLOCK_D)
    j_ok, d_ok = j < batch, d < dim
    mu = _tile_rows(mu_ptr, j, j_ok, d, d_ok, smu_r, smu_c, WIDE)
    lv = _tile_rows(lv_ptr, j, j_ok, d, d_ok, slv_r, slv_c, WIDE)
    acc_mu = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    acc_lv = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    for i0 in range(0, rows, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_ok = i < rows
        z = _tile_rows(z_ptr, i, i_ok, d, d_ok, sz_r, sz_c, WIDE)
        lse, lse_d, g_qz, g_prod = _row_stats(qz_ptr, lse_d_ptr, gqz_ptr, gprod_ptr, i, i_ok, d, d_ok, dim,
                                              WIDE)
        a, diff, t = _pair_weights(z, mu, lv, i + row_offset, j, lse, lse_d, g_qz, g_prod, d_ok, batch,
                                   lw_own, lw_strat, lw_other)
        at = a * t
        acc_mu += tl.sum(at, axis=0)
        acc_lv += tl.sum(at * diff - a, axis=0)
    # the own-posterior term of the columns that are this process's rows
    r = j - row_offset
    r_ok = j_ok & (r >= 0) & (r < rows)
    z_own = _tile_rows(z_ptr, r, r_ok, d, d_ok, sz_r, sz_c, WIDE)
    g_qzx = tl.load(gqzx_ptr + r, mask=r_ok, other=0.0).to(tl.float32)
    diff = z_own - mu
    t = diff * tl.exp(-lv)
    acc_mu += g_qzx[:, None] * t
    acc_lv += g_qzx[:, None] * (t * diff - 1.0)
    mask = j_ok[:, None] & d_ok[None, :]
    tl.store(dmu_ptr + _offsets(j, d, sdmu_r, sdmu_c, WIDE), acc_mu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + _offsets(j, d, sdlv_r, sdlv_c, WIDE), (0.5 * acc_lv).to(dlv_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _sq_dist(a_ptr, b_ptr, i, i_ok, j, j_ok, dim, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
             BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    """|a_i - b_j|^2 [BI, BJ] as |a|^2 + |b|^2 - 2 a.b, the dot product on the tensor cores."""
    dot = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    na = tl.zeros([BLOCK_I], tl.float32)
    nb = tl.zeros([BLOCK_J], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < dim
        a = _tile_rows(a_ptr, i, i_ok, k, k_ok, dim, 1, WIDE)
        b = _tile_rows(b_ptr, j, j_ok, k, k_ok, dim, 1, WIDE)
        dot = tl.dot(a, tl.trans(b), dot, input_precision="tf32x3")
        na += tl.sum(a * a, axis=1)
        nb += tl.sum(b * b, axis=1)
    # the clamp (rounding can take the expansion below 0) keeps a NaN: the GPU's plain max returns the other
    # operand, which would turn a NaN input into a finite distance and a finite, wrong loss
    return tl.maximum(na[:, None] + nb[None, :] - 2.0 * dot, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scale_term(d2, inv, IMQ: tl.constexpr, DERIVATIVE: tl.constexpr):
    """f(d2 / s) for one scale (inv = 1 / s), or its derivative in d2."""
    u = d2 * inv
    if IMQ:
        r = 1.0 / (1.0 + u)
        return (-inv * r * r) if DERIVATIVE else r
    e = tl.exp(-u)
    return (-inv * e) if DERIVATIVE else e


@triton.jit
def _kernel_value(d2, inv0, inv1, inv2, inv3, inv4, inv5, inv6, inv7, n_scales: tl.constexpr, IMQ: tl.constexpr,
                  DERIVATIVE: tl.constexpr):
    """sum_s f(d2 / s) over the first n_scales (1 to 8) scalar scales, or its derivative in d2 (unrolled: a
    runtime loop here spills on sm_90)."""
    acc = _scale_term(d2, inv0, IMQ, DERIVATIVE)
    if n_scales > 1:
        acc += _scale_term(d2, inv1, IMQ, DERIVATIVE)
    if n_scales > 2:
        acc += _scale_term(d2, inv2, IMQ, DERIVATIVE)
    if n_scales > 3:
        acc += _scale_term(d2, inv3, IMQ, DERIVATIVE)
    if n_scales > 4:
        acc += _scale_term(d2, inv4, IMQ, DERIVATIVE)
    if n_scales > 5:
        acc += _scale_term(d2, inv5, IMQ, DERIVATIVE)
    if n_scales > 6:
        acc += _scale_term(d2, inv6, IMQ, DERIVATIVE)
    if n_scales > 7:
        acc += _scale_term(d2, inv7, IMQ, DERIVATIVE)
    return acc


@triton.jit
def _pair_mask(i, i_ok, j, j_ok, n_b, SKIP_DIAG: tl.constexpr):
    mask = i_ok[:, None] & j_ok[None, :]
    if SKIP_DIAG:
        mask = mask & (i[:, None] != j[None, :])
    return mask


@triton.jit
def _mmd_block_sum(a_ptr, b_ptr, i, i_ok, n_b, dim, inv0, inv1,
                   n_scales: tl.constexpr, IMQ: tl.constexpr, SKIP_DIAG: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    acc = tl.zeros([BLOCK_I], tl.float32)
    for j0 in range(0, n_b, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < n_b
        d2 = _sq_dist(a_ptr, b_ptr, i, i_ok, j, j_ok, dim, BLOCK_I, BLOCK_J, BLOCK_K, WIDE)
        k = _kernel_value(d2, inv0, inv1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, n_scales, IMQ, False)
        acc += tl.sum(tl.where(_pair_mask(i, i_ok, j, j_ok, n_b, SKIP_DIAG), k, 0.0), axis=1)
    return tl.sum(acc, axis=0)


@triton.jit
def mmd_fwd_kernel(a_ptr, b1_ptr, b2_ptr, partial_ptr, n_a, n_b1, n_b2, dim, inv0, inv1, n_scales: tl.constexpr,
                   coef1, coef2, IMQ: tl.constexpr, SKIP1: tl.constexpr, SKIP2: tl.constexpr, HAS_B2: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    """partial[pid] = coef1 sum k(a_i, b1_j) + coef2 sum k(a_i, b2_j) over this program's rows i, k summing
    n_scales (1 or 2) scales."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < n_a
    total = coef1 * _mmd_block_sum(a_ptr, b1_ptr, i, i_ok, n_b1, dim, inv0, inv1,
                                   n_scales, IMQ, SKIP1, BLOCK_I, BLOCK_J, BLOCK_K, WIDE)
    if HAS_B2:
        total += coef2 * _mmd_block_sum(a_ptr, b2_ptr, i, i_ok, n_b2, dim, inv0, inv1,
                                        n_scales, IMQ, SKIP2, BLOCK_I, BLOCK_J, BLOCK_K, WIDE)
    tl.store(partial_ptr + tl.program_id(0), total)


@triton.jit
def _mmd_block_grad(acc, a, a_ptr, b_ptr, i, i_ok, kk, kk_ok, n_b, dim, inv0, inv1, inv2,
                    inv3, inv4, inv5, inv6, inv7, n_scales: tl.constexpr, coef, IMQ: tl.constexpr,
                    SKIP_DIAG: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                    WIDE: tl.constexpr):
    """acc += coef sum_j k'(d2_ij) (a_i - b_j) on the dims kk of this program."""
    for j0 in range(0, n_b, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < n_b
        d2 = _sq_dist(a_ptr, b_ptr, i, i_ok, j, j_ok, dim, BLOCK_I, BLOCK_J, BLOCK_K, WIDE)
        gk = coef * _kernel_value(d2, inv0, inv1, inv2, inv3, inv4, inv5, inv6, inv7, n_scales, IMQ, True)
        gk = tl.where(_pair_mask(i, i_ok, j, j_ok, n_b, SKIP_DIAG), gk, 0.0)
        b = _tile_rows(b_ptr, j, j_ok, kk, kk_ok, dim, 1, WIDE)
        acc += tl.sum(gk, axis=1)[:, None] * a - tl.dot(gk, b, input_precision="tf32x3")
    return acc


@triton.jit
def mmd_bwd_kernel(a_ptr, b1_ptr, b2_ptr, go_ptr, da_ptr, n_a, n_b1, n_b2, dim, inv0, inv1, inv2, inv3, inv4, inv5,
                   inv6, inv7, n_scales: tl.constexpr, coef1, coef2, IMQ: tl.constexpr, SKIP1: tl.constexpr,
                   SKIP2: tl.constexpr, HAS_B2: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr):
    """da = 2 grad_output (coef1 sum_j k'(d2) (a_i - b1_j) + coef2 ...) for the rows of program 0's axis and
    the dims of axis 1 (the distances are recomputed over every dim), summing n_scales (1 to 8) scales; with
    ACCUMULATE added to what an earlier launch (the next 8 scales) wrote there."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < n_a
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kk_ok = kk < dim
    a = _tile_rows(a_ptr, i, i_ok, kk, kk_ok, dim, 1, WIDE)
    acc = tl.zeros([BLOCK_I, BLOCK_K], tl.float32)
    acc = _mmd_block_grad(acc, a, a_ptr, b1_ptr, i, i_ok, kk, kk_ok, n_b1, dim, inv0, inv1,
                          inv2, inv3, inv4, inv5, inv6, inv7, n_scales, coef1, IMQ, SKIP1, BLOCK_I, BLOCK_J,
                          BLOCK_K, WIDE)
    if HAS_B2:
        acc = _mmd_block_grad(acc, a, a_ptr, b2_ptr, i, i_ok, kk, kk_ok, n_b2, dim, inv0,
                              inv1, inv2, inv3, inv4, inv5, inv6, inv7, n_scales, coef2, IMQ, SKIP2, BLOCK_I,
                              BLOCK_J, BLOCK_K, WIDE)
    go = tl.load(go_ptr).to(tl.float32)
    offs = _offsets(i, kk, dim, 1, WIDE)
    mask = i_ok[:, None] & kk_ok[None, :]
    out = 2.0 * go * acc
    if ACCUMULATE:
        out += tl.load(da_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(da_ptr + offs, out.to(da_ptr.dtype.element_ty), mask=mask)
