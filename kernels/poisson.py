"""Poisson negative log-likelihood, gradients in the same pass (torch.nn.functional.poisson_nll_loss's math).

Per element, with input x (the log-rate when LOG_INPUT, else the rate) and target t:

    LOG_INPUT:  loss = exp(x) - t * x                 dloss/dx = exp(x) - t           dloss/dt = -x
    else:       loss = x - t * log(x + eps)           dloss/dx = 1 - t / (x + eps)    dloss/dt = -log(x + eps)
    FULL adds Stirling's approximation of log(t!) where t > 1 (0 elsewhere):
                t * log(t) - t + 0.5 * log(2 pi t)    dloss/dt += log(t) + 0.5 / t

On a GPU tl.exp is ex2.approx.ftz: exp(x) below 2^-126 (x < -87.3) is flushed to 0 where the interpreter
keeps the subnormal, an absolute difference under 1.2e-38 in a loss that is then -t x up to rounding.

Gradients are stored already multiplied by the reduction's scale, so backward is a multiply by grad_output
that is skipped on the device when grad_output is exactly 1.

Bytes for N elements: reads 2N, writes N for each gradient asked for (input, target), and N for
reduction="none" or fp32 partials otherwise.
"""

import triton
import triton.language as tl

from .negative_binomial import log_full
from .reduce import store_loss


@triton.jit
def poisson_nll_fwd_kernel(
    x_ptr, t_ptr, loss_ptr, gx_ptr, gt_ptr,
    n, eps, half_log_2pi, grad_scale, row_len,
    LOG_INPUT: tl.constexpr, FULL: tl.constexpr, REDUCE: tl.constexpr, PER_ROW: tl.constexpr,
    LONG_ROWS: tl.constexpr, GRAD_X: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG_INPUT:
        rate = tl.exp(x)
        loss = rate - t * x
        gx = rate - t
        gt = -x
    else:
        log_rate = log_full(x + eps)  # eps = 0 and a subnormal rate: not flushed to -inf on a GPU
        loss = x - t * log_rate
        gx = 1.0 - t / (x + eps)
        gt = -log_rate
    if FULL:
        big = t > 1.0
        # the masked-off lanes take log(1): no nan or inf is formed, not even in a discarded lane
        ts = tl.where(big, t, 1.0)
        log_t = tl.log(ts)
        loss += tl.where(big, ts * log_t - ts + 0.5 * log_t + half_log_2pi, 0.0)
        gt += tl.where(big, log_t + 0.5 / ts, 0.0)
    store_loss(loss, mask, loss_ptr, offs, pid, row_len, REDUCE, PER_ROW, BLOCK, LONG_ROWS)
    if GRAD_X:
        tl.store(gx_ptr + offs, (gx * grad_scale).to(gx_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        tl.store(gt_ptr + offs, (gt * grad_scale).to(gt_ptr.dtype.element_ty), mask=mask)
