"""The Gaussian family: reparameterized sampling, the KL of diagonal Gaussians and the Gaussian NLL.

The ELBO of a VAE with encoder q(z|x) = N(mu, diag(exp(logvar))), prior p(z) = N(0, I) and Gaussian decoder
p(x|z) = N(x_hat, sigma^2 I) is

    log p(x) >= E_q[log p(x|z)] - KL[q(z|x) || p(z)]

with the three pieces below:

    z      = mu + exp(0.5 logvar) * eps,   eps ~ N(0, I)             (reparameterization)
    KL     = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar)              (closed form against N(0, I))
    -log p = 0.5 * (log sigma^2 + (x - x_hat)^2 / sigma^2) [+ 0.5 log 2 pi]

Written for memory as much as speed: every temporary that autograd does not save is updated in place, so
the CPU path allocates no more than the one-line formulas users write. The NLL's CPU path is
``GaussianNLL``, which like the kernel writes the gradient in the forward; ``gaussian_nll_var`` and
``gaussian_nll_logvar`` are its formulas, kept as the oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import HALF_LOG_2PI, dtypes, reduce, reduction_scale


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(0.5 logvar) * eps; eps broadcasts from the left when it carries K samples."""
    out_dtype, dt = dtypes(mu, logvar, loss=False)
    std = torch.exp(0.5 * logvar.to(dt))
    # addcmul's backward needs std and eps but not its own output, so nothing here is saved twice
    return torch.addcmul(mu.to(dt), std, eps.to(dt)).to(out_dtype)


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Tensor | None = None,
    logvar_p: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), elementwise

        0.5 * (logvar_p - logvar + (e^logvar + (mu - mu_p)^2) / e^logvar_p - 1)

    which for the standard normal prior is 0.5 * (e^logvar + mu^2 - 1 - logvar).
    """
    out_dtype, dt = dtypes(mu, logvar)
    mu, logvar = mu.to(dt), logvar.to(dt)
    if mu_p is None and logvar_p is None:
        # exp's output is saved by autograd, so it is the one temporary not reused in place
        kl = torch.addcmul(torch.exp(logvar) - logvar, mu, mu)
    else:
        diff = mu if mu_p is None else mu - mu_p.to(dt)
        num = torch.addcmul(torch.exp(logvar), diff, diff)
        if logvar_p is None:
            kl = num - logvar
        else:
            lvp = logvar_p.to(dt)
            kl = (num * torch.exp(-lvp)).add_(lvp).sub_(logvar)
    kl = kl.sub_(1.0).mul_(0.5)
    return reduce(kl, reduction).to(out_dtype)


def gaussian_nll_var(
    input: Tensor, target: Tensor, var: Tensor, full: bool, eps: float, reduction: str
) -> Tensor:
    """0.5 * (log(max(var, eps)) + (input - target)^2 / max(var, eps)) [+ 0.5 log 2 pi].

    Exactly torch.nn.functional.gaussian_nll_loss's math: the clamp does not stop the gradient to var.
    ``var`` has already been shaped to broadcast against ``input``.
    """
    out_dtype, dt = dtypes(input, target, var)
    var = var.to(dt).clone()
    with torch.no_grad():
        var.clamp_(min=eps)
    # no named temporaries: without grad each one is freed as soon as the next op has read it
    loss = (torch.square(input.to(dt) - target.to(dt)) / var).add_(torch.log(var)).mul_(0.5)
    if full:
        loss = loss.add_(HALF_LOG_2PI)
    return reduce(loss, reduction).to(out_dtype)


def gaussian_nll_logvar(input: Tensor, target: Tensor, logvar: Tensor, full: bool, reduction: str) -> Tensor:
    """0.5 * (logvar + (input - target)^2 * exp(-logvar)) [+ 0.5 log 2 pi]."""
    out_dtype, dt = dtypes(input, target, logvar)
    lv = logvar.to(dt)
    loss = torch.addcmul(lv, torch.square(input.to(dt) - target.to(dt)), torch.exp(-lv)).mul_(0.5)
    if full:
        loss = loss.add_(HALF_LOG_2PI)
    return reduce(loss, reduction).to(out_dtype)


class GaussianNLL(torch.autograd.Function):
    """The CPU path of both NLL forms: the loss and its gradient in one go, like the kernel.

    Autograd through the formulas above keeps several input-sized tensors for backward (the difference, its
    square, the quotient); here the forward turns the difference into dloss/dinput in place and backward
    only scales what was saved, so a forward+backward holds about two input-sized tensors at its peak.
    Gradients are those of the formulas (gradcheck-tested), the var clamp included.
    """

    @staticmethod
    def forward(ctx, input, target, var, logvar_form: bool, full: bool, eps: float, reduction: str):
        out_dtype, dt = dtypes(input, target, var)
        v = var.to(dt)
        # the variance (clamped, as a divisor) or exp(-logvar) (as a factor): var-sized, often tiny
        vc = v.clamp(min=eps) if not logvar_form else torch.exp(-v)
        scale_by = torch.Tensor.div_ if not logvar_form else torch.Tensor.mul_
        d = input.to(dt) - target.to(dt)
        q = scale_by(torch.square(d), vc)  # d^2 / var
        g_x = scale_by(d, vc) if any(ctx.needs_input_grad[:2]) else None  # d / var, in place
        del d  # without a gradient to keep, the difference is freed here
        need_v = ctx.needs_input_grad[2]
        if need_v:  # dloss/dvar: 0.5 (1 - q) / var; dloss/dlogvar: 0.5 (1 - q)
            g_v = torch.sub(1.0, q).mul_(0.5)
            if not logvar_form:
                g_v.div_(vc)
        loss = q.add_(v if logvar_form else torch.log(vc)).mul_(0.5)
        if full:
            loss.add_(HALF_LOG_2PI)
        scale = reduction_scale(reduction, loss.numel(), loss.shape)
        loss = reduce(loss, reduction)
        if reduction not in ("none", "per_sample"):
            if g_x is not None:
                g_x.mul_(scale)
            if need_v:  # a scalar grad_output: reduce over the broadcast dims now, keep var-sized
                g_v = g_v.mul_(scale).sum_to_size(var.shape)
        ctx.save_for_backward(g_x, g_v if need_v else None)
        ctx.shapes = (input.shape, target.shape, var.shape)
        ctx.per_sample, ctx.loss_shape = reduction == "per_sample", q.shape
        ctx.dtypes = (input.dtype, target.dtype, var.dtype)
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        g_x, g_v = ctx.saved_tensors
        (s_in, s_t, s_v), (t_in, t_t, t_v) = ctx.shapes, ctx.dtypes
        grad_out = grad_out.to(g_x.dtype if g_x is not None else g_v.dtype)
        if ctx.per_sample:  # one value per row: broadcast over the rest
            grad_out = grad_out.reshape(grad_out.shape + (1,) * (len(ctx.loss_shape) - 1))
        grad_input = grad_target = grad_var = None
        if g_x is not None:
            g = g_x * grad_out
            if ctx.needs_input_grad[0]:
                grad_input = g.sum_to_size(s_in).to(t_in)
            if ctx.needs_input_grad[1]:
                grad_target = (-g).sum_to_size(s_t).to(t_t)
        if g_v is not None:
            grad_var = (g_v * grad_out).sum_to_size(s_v).to(t_v)
        return grad_input, grad_target, grad_var, None, None, None, None
