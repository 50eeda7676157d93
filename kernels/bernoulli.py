"""Bernoulli negative log-likelihood from logits (binary cross-entropy with logits), gradients in the same pass.

Per element i, with logit x, target t, weight w and pos_weight p (each 1 when absent):

    sp   = softplus(-x) = max(-x, 0) + log1p(exp(-|x|))          (= -log sigmoid(x), never overflows)
    lw   = 1 + (p - 1) * t
    loss = w * ((1 - t) * x + lw * sp)
    dloss/dx = w * ((1 - t) - lw * sigmoid(-x))                 (= w * (sigmoid(x) - t) without p)
    dloss/dt = w * (-x + (p - 1) * sp)                          (torch's target gradient)

exactly torch.nn.functional.binary_cross_entropy_with_logits's math. exp(-|x|) never overflows; below 2^-126
(|x| > 87.3) a GPU's ex2.approx.ftz flushes it to 0 where the interpreter keeps the subnormal: softplus(-x)
and sigmoid(-x) then differ by under 1.2e-38 absolute, below fp32's resolution of any loss or gradient
term they are added to except an exact 0 (t = 1 at x > 87.3, where torch's CUDA fp32 gives the subnormal).
Gradients are stored already multiplied by the reduction's scale, so backward is a multiply by grad_output
that is skipped on the device when grad_output is exactly 1.

weight and pos_weight are indexed, never materialized (W_MODE / P_MODE): 0 reads w[i], 1 one scalar,
2 w[((i // div) % mod) * mul + i % mod2] (per-feature, per-row, per-channel broadcasts), 3 absent.

Bytes for N elements: reads 2N (+N for each full-shape weight or pos_weight; a broadcast one is cached),
writes N for each gradient asked for (input, target), and N for reduction="none" or fp32 partials otherwise.
"""

import triton
import triton.language as tl

from .reduce import store_loss

OP_FULL = tl.constexpr(0)
OP_SCALAR = tl.constexpr(1)
OP_INDEXED = tl.constexpr(2)
OP_ABSENT = tl.constexpr(3)


@triton.jit
def load_bcast(ptr, offs, mask, div, mod, mul, mod2, MODE: tl.constexpr):
    """An operand broadcast to the elements ``offs`` (MODE as above; absent reads as 1), in fp32."""
    if MODE == OP_FULL:
        v = tl.load(ptr + offs, mask=mask, other=1.0).to(tl.float32)
    elif MODE == OP_SCALAR:
        v = tl.load(ptr).to(tl.float32) + tl.zeros(offs.shape, tl.float32)
    elif MODE == OP_INDEXED:
        v = tl.load(ptr + ((offs // div) % mod) * mul + offs % mod2, mask=mask, other=1.0).to(tl.float32)
    else:
        v = tl.full(offs.shape, 1.0, tl.float32)
    return v


@triton.jit
def log1p(e):
    """log(1 + e) to full fp32 relative accuracy for small e (Kahan's correction: log(u) * e / (u - 1) with
    u = fl(1 + e) cancels the rounding of 1 + e), where the plain log would keep only e's leading bits."""
    u = 1.0 + e
    return tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))


@triton.jit
def bce_logits_fwd_kernel(
    x_ptr, t_ptr, w_ptr, p_ptr,
    loss_ptr, gx_ptr, gt_ptr,
    n, w_div, w_mod, w_mul, w_mod2, p_div, p_mod, p_mul, p_mod2,
    grad_scale, row_len,
    W_MODE: tl.constexpr, P_MODE: tl.constexpr, REDUCE: tl.constexpr, PER_ROW: tl.constexpr,
    LONG_ROWS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(x))
    sp = tl.maximum(-x, 0.0) + log1p(e)
    inv = 1.0 / (1.0 + e)
    sig_neg = tl.where(x >= 0.0, e * inv, inv)  # sigmoid(-x) without exp overflow
    if P_MODE == OP_ABSENT:
        loss = (1.0 - t) * x + sp
        gx = (1.0 - t) - sig_neg
        gt = -x
    else:
        pm1 = load_bcast(p_ptr, offs, mask, p_div, p_mod, p_mul, p_mod2, P_MODE) - 1.0
        lw = 1.0 + pm1 * t
        loss = (1.0 - t) * x + lw * sp
        gx = (1.0 - t) - lw * sig_neg
        gt = pm1 * sp - x
    if W_MODE != OP_ABSENT:
        w = load_bcast(w_ptr, offs, mask, w_div, w_mod, w_mul, w_mod2, W_MODE)
        loss = loss * w
        gx = gx * w
        gt = gt * w
    store_loss(loss, mask, loss_ptr, offs, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    if GRAD_X:
        tl.store(gx_ptr + offs, (gx * grad_scale).to(gx_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        tl.store(gt_ptr + offs, (gt * grad_scale).to(gt_ptr.dtype.element_ty), mask=mask)
