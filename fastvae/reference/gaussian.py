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
    """z = mu + exp(0.5 logvar) * eps, mu and logvar broadcast together; eps carries K samples in front.

    Written as the formula users write (a multiply, then an add: two roundings), not as one addcmul (a single
    rounding), so that for fp32 it gives ``mu + torch.exp(0.5 * logvar) * eps`` bit for bit.
    """
    out_dtype, dt = dtypes(mu, logvar, loss=False)
    # autograd keeps std (exp's output) and eps (mul's other factor), as it does for the formula
    return (mu.to(dt) + torch.exp(0.5 * logvar.to(dt)) * eps.to(dt)).to(out_dtype)


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

    Exactly torch.nn.functional.gaussian_nll_loss's math: the clamp does not stop the gradient to var. A
    negative entry, which torch rejects, gives NaN (loss and gradients). ``var`` has already been shaped to
    broadcast against ``input``; ``target`` may be an integer tensor (promoted, as torch does).
    """
    out_dtype, dt = dtypes(input, target, var)
    var = var.to(dt).clone()
    with torch.no_grad():
        negative = var < 0
        var.clamp_(min=eps)
        # a negative variance is invalid (torch raises): NaN in its loss and gradients, never a clamped value
        var.masked_fill_(negative, float("nan"))
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


def _nll_formula(logvar_form: bool, full: bool, eps: float, reduction: str):
    """The loss as a function of (input, target, var) through the formulas above: what autograd differentiates
    for a double backward."""
    if logvar_form:
        return lambda i, t, v: gaussian_nll_logvar(i, t, v, full, reduction)
    return lambda i, t, v: gaussian_nll_var(i, t, v, full, eps, reduction)


def grads_of(formula, inputs: tuple, needs: tuple, grad_outputs: tuple) -> tuple:
    """d(formula(*inputs))/d(inputs) . grad_outputs with the graph kept (create_graph=True): a backward that is
    itself differentiable, with the formula's second-order terms. None where an input needs no gradient."""
    outs = formula(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o is not None and o.requires_grad]
    wanted = [x for x, need in zip(inputs, needs) if need]
    if not pairs or not wanted:
        return tuple(None for _ in inputs)
    with torch.enable_grad():
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True))
    out = []
    for x, need in zip(inputs, needs):
        g = next(grads) if need else None
        out.append(torch.zeros_like(x) if need and g is None else g)
    return tuple(out)


class GaussianNLL(torch.autograd.Function):
    """The eager path of both NLL forms: the loss and its gradient in one go, like the kernel.

    Autograd through the formulas above keeps several input-sized tensors for backward (the difference, its
    square, the quotient); here the forward turns the difference into dloss/dinput in place and backward
    only scales what was saved, so a forward+backward holds about two input-sized tensors beyond its inputs
    at its peak. Gradients are those of the formulas (gradcheck-tested), the var clamp included; a negative
    var gives NaN. ``need_x`` / ``need_v``: whether input-or-target / var take a gradient (the caller knows,
    the forward of a setup_context Function does not).

    Under ``create_graph=True`` backward recomputes the formulas on the saved inputs and differentiates them
    with the graph kept (second-order terms, any order); torch.func transforms use the setup_context form and
    the generated vmap rule.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, var, logvar_form: bool, full: bool, eps: float, reduction: str, need_x: bool,
                need_v: bool):
        out_dtype, dt = dtypes(input, target, var)
        v = var.to(dt)
        if logvar_form:  # exp(-logvar), a factor
            vc = torch.exp(-v)
        else:  # the variance clamped as torch does (clamp keeps NaN), NaN where it is negative (invalid)
            vc = torch.where(v < 0, float("nan"), v.clamp(min=eps))
        scale_by = torch.Tensor.div_ if not logvar_form else torch.Tensor.mul_
        d = input.to(dt) - target.to(dt)
        q = scale_by(torch.square(d), vc)  # d^2 / var
        g_x = scale_by(d, vc) if need_x else None  # d / var, in place
        del d  # without a gradient to keep, the difference is freed here
        g_v = None
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
            if g_v is not None:  # a scalar grad_output: reduce over the broadcast dims now, keep var-sized
                g_v = g_v.mul_(scale).sum_to_size(var.shape)
        # outputs must be tensors (the vmap rule): an empty one stands for "not written"
        return (loss.to(out_dtype), loss.new_empty(0) if g_x is None else g_x,
                loss.new_empty(0) if g_v is None else g_v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, var, logvar_form, full, eps, reduction, need_x, need_v = inputs
        _, g_x, g_v = output
        ctx.mark_non_differentiable(g_x, g_v)
        # the inputs are kept for a create_graph backward only (they are alive in the caller anyway)
        ctx.save_for_backward(g_x, g_v, input, target, var)
        ctx.args = (logvar_form, full, eps, reduction)
        ctx.need = (need_x, need_v)
        ctx.loss_ndim = max(input.dim(), target.dim(), var.dim()) if reduction == "per_sample" else 0

    @staticmethod
    def backward(ctx, grad_out, _g_x, _g_v):
        g_x, g_v, input, target, var = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward, from the formulas
            return grads_of(_nll_formula(*ctx.args), (input, target, var), needs, (grad_out,)) + (None,) * 6
        need_x, need_v = ctx.need
        grad_input = grad_target = grad_var = None
        if ctx.loss_ndim:  # per_sample, one value per row: broadcast over the rest
            grad_out = grad_out.reshape(grad_out.shape + (1,) * (ctx.loss_ndim - 1))
        if need_x and (needs[0] or needs[1]):
            g = g_x * grad_out.to(g_x.dtype)
            if needs[0]:
                grad_input = g.sum_to_size(input.shape).to(input.dtype)
            if needs[1]:
                grad_target = (-g).sum_to_size(target.shape).to(target.dtype)
        if need_v and needs[2]:
            grad_var = (g_v * grad_out.to(g_v.dtype)).sum_to_size(var.shape).to(var.dtype)
        return grad_input, grad_target, grad_var, None, None, None, None, None, None


def gaussian_nll(input: Tensor, target: Tensor, var: Tensor, logvar_form: bool, full: bool, eps: float,
                 reduction: str) -> Tensor:
    """Both NLL forms through ``GaussianNLL`` (``var`` shaped to input's ndim)."""
    grad = torch.is_grad_enabled()
    need_x = grad and (input.requires_grad or target.requires_grad)
    need_v = grad and var.requires_grad
    return GaussianNLL.apply(input, target, var, logvar_form, full, float(eps), reduction, need_x, need_v)[0]
