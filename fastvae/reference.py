"""The VAE loss formulas in eager PyTorch, written once.

They are the CPU path (and any path the Triton kernels do not cover) and the oracle the kernels are tested
against. They take already-validated arguments; `fastvae.functional` checks and dispatches.

The ELBO of a VAE with encoder q(z|x) = N(mu, diag(exp(logvar))), prior p(z) = N(0, I) and Gaussian decoder
p(x|z) = N(x_hat, sigma^2 I) is

    log p(x) >= E_q[log p(x|z)] - KL[q(z|x) || p(z)]

with the three pieces below:

    z      = mu + exp(0.5 logvar) * eps,   eps ~ N(0, I)             (reparameterization)
    KL     = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar)              (closed form against N(0, I))
    -log p = 0.5 * (log sigma^2 + (x - x_hat)^2 / sigma^2) [+ 0.5 log 2 pi]

Written for memory as much as speed: every temporary that autograd does not save is updated in place, so
the CPU path allocates no more than the one-line formulas users write.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` ("none" | "sum" | "mean" | "batchmean" = sum / size of dim 0)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    # batchmean: a 0-d loss has one "batch"
    return loss.sum() / (loss.shape[0] if loss.dim() > 0 else 1)


def dtypes(*ts: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(result dtype, compute dtype): torch's type promotion, with half types computed in fp32."""
    out = ts[0].dtype
    for t in ts[1:]:
        out = torch.promote_types(out, t.dtype)
    return out, (torch.float32 if out in (torch.float16, torch.bfloat16) else out)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = mu + exp(0.5 logvar) * eps; eps broadcasts from the left when it carries K samples."""
    out_dtype, dt = dtypes(mu, logvar)
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
    diff = input.to(dt) - target.to(dt)
    loss = (diff * diff / var).add_(torch.log(var)).mul_(0.5)
    if full:
        loss = loss.add_(HALF_LOG_2PI)
    return reduce(loss, reduction).to(out_dtype)


def gaussian_nll_logvar(input: Tensor, target: Tensor, logvar: Tensor, full: bool, reduction: str) -> Tensor:
    """0.5 * (logvar + (input - target)^2 * exp(-logvar)) [+ 0.5 log 2 pi]."""
    out_dtype, dt = dtypes(input, target, logvar)
    lv = logvar.to(dt)
    diff = input.to(dt) - target.to(dt)
    loss = torch.addcmul(lv, diff * diff, torch.exp(-lv)).mul_(0.5)
    if full:
        loss = loss.add_(HALF_LOG_2PI)
    return reduce(loss, reduction).to(out_dtype)
