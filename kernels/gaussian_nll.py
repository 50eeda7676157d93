"""Gaussian negative log-likelihood with its gradient written in the same pass.

Per element i, with d = input - target and v the variance entry of i (var form) or the log-variance (logvar
form):

    var form:    vc = max(v, eps)    loss = 0.5 * (log vc + d^2 / vc)         [+ 0.5 log 2 pi]
                 (vc = NaN for v < 0 or NaN: an invalid variance gives NaN, never a clamped finite value)
                 dloss/dinput = d / vc       dloss/dvar = 0.5 * (1 / vc - d^2 / vc^2)
    logvar form:                     loss = 0.5 * (v + d^2 * exp(-v))         [+ 0.5 log 2 pi]
                 dloss/dinput = d * exp(-v)  dloss/dlogvar = 0.5 * (1 - d^2 * exp(-v))

(the var clamp does not stop the gradient, as in torch.nn.functional.gaussian_nll_loss). Gradients are
stored already multiplied by the reduction's scale (1/N for mean, 1/B for batchmean), in the input's dtype
(fp32 for fp16 inputs, whose range would lose them), so backward is a multiply by grad_output that is skipped
on the device when grad_output is exactly 1.

The variance is indexed, never materialized: VAR_MODE 0 reads var[i], 1 reads a single scalar, 2 reads
var[((i // v_div) % v_mod) * v_mul + i % v_mod2], which covers one broadcast dim in the middle (torch's
homoscedastic forms, per-row) and one kept group between broadcast ones (per-feature, per-channel).

The target may be an integer tensor (uint8 pixels), converted on load as torch's promotion would. Offsets
are int32 unless WIDE (N + BLOCK >= 2^31, chosen on the host): 64-bit divisions of the indexed variance cost
several times the 32-bit ones.

Bytes for N elements: reads 2N (+N for a per-element variance), writes N for the input gradient when asked,
N for a per-element variance gradient, N for reduction="none" or fp32 partials otherwise (one per program,
or one per row segment for reduction="per_sample"; see reduce.py).
"""

import triton
import triton.language as tl

from .reduce import store_loss

VAR_FULL = tl.constexpr(0)
VAR_SCALAR = tl.constexpr(1)
VAR_INDEXED = tl.constexpr(2)
# GRAD_VAR: what is written for the variance's gradient
GV_OFF = tl.constexpr(0)
GV_ELEMENTWISE = tl.constexpr(1)  # one value per input element (reduced later for a broadcast variance)
GV_PARTIAL = tl.constexpr(2)  # a scalar variance: one fp32 partial per program


@triton.jit
def gaussian_nll_fwd_kernel(
    x_ptr, t_ptr, v_ptr,
    loss_ptr, gx_ptr, gv_ptr,
    n, v_div, v_mod, v_mul, v_mod2,
    eps, const, grad_scale, row_len,
    LOGVAR: tl.constexpr, VAR_MODE: tl.constexpr, REDUCE: tl.constexpr, PER_ROW: tl.constexpr,
    LONG_ROWS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_VAR: tl.constexpr, BLOCK: tl.constexpr,
    WIDE: tl.constexpr = True,
):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if VAR_MODE == VAR_FULL:
        v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    elif VAR_MODE == VAR_SCALAR:
        v = tl.load(v_ptr).to(tl.float32)
    else:
        v_idx = ((offs // v_div) % v_mod) * v_mul + offs % v_mod2
        v = tl.load(v_ptr + v_idx, mask=mask, other=1.0).to(tl.float32)
    d = x - t
    if LOGVAR:
        inv_v = tl.exp(-v)
        d2_iv = d * d * inv_v
        loss = 0.5 * (v + d2_iv) + const
        gv = 0.5 * (1.0 - d2_iv)
    else:
        # torch's clamp(min=eps), written as a select: max.f32 would return eps for a NaN variance; and a
        # negative variance (invalid, which the host check reports when it runs) becomes NaN, not eps
        vc = tl.where(v < 0.0, float("nan"), tl.where(v < eps, eps, v))
        inv_v = 1.0 / vc
        d2_iv = d * d * inv_v
        loss = 0.5 * (tl.log(vc) + d2_iv) + const
        gv = 0.5 * inv_v * (1.0 - d2_iv)
    store_loss(loss, mask, loss_ptr, offs, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    if GRAD_X:
        tl.store(gx_ptr + offs, (d * inv_v * grad_scale).to(gx_ptr.dtype.element_ty), mask=mask)
    if GRAD_VAR == GV_ELEMENTWISE:
        tl.store(gv_ptr + offs, (gv * grad_scale).to(gv_ptr.dtype.element_ty), mask=mask)
    elif GRAD_VAR == GV_PARTIAL:
        tl.store(gv_ptr + pid, tl.sum(tl.where(mask, gv, 0.0), axis=0))
