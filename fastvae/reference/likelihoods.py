"""Reconstruction likelihoods beyond the Gaussian, as eager formulas: Bernoulli (binary cross-entropy with
logits), Poisson, negative binomial and zero-inflated negative binomial.

    Bernoulli:  loss = w * ((1 - t) x + (1 + (p - 1) t) softplus(-x))          (torch's BCE with logits)
    Poisson:    loss = exp(x) - t x   or   x - t log(x + eps)   [+ Stirling's log t! where t > 1]
    NB:         loss = -(th (log(th + eps) - log(th + mu + eps)) + x (log(mu + eps) - log(th + mu + eps))
                         + lgamma(x + th) - lgamma(th) - lgamma(x + 1))
    ZINB:       loss = -log_zinb_positive(x, mu, th, pi)                       (scvi-tools, term for term)

Inputs are computed in ``dtypes(...)[1]`` (fp32 for half types) and the loss returned in the promoted dtype;
gradients come from autograd through the formulas, which is what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import HALF_DTYPES, HALF_LOG_2PI, dtypes, reduce


def bce_out_dtype(target: Tensor) -> torch.dtype:
    """torch's result dtype for binary_cross_entropy_with_logits: the target's (torch forms ``(1 - target)``
    and multiplies the rest into it in place), fp32 for a half target under autocast (an fp32-policy op)."""
    return dtypes(target)[0]


def bce_with_logits(
    input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: str
) -> Tensor:
    """torch's binary_cross_entropy_with_logits (elementwise, in the compute dtype), then ``reduction``; the
    loss in the target's dtype, as torch returns it."""
    extra = [t for t in (weight, pos_weight) if t is not None]
    _, dt = dtypes(input, target, *[t for t in extra if t.is_floating_point()])
    w = weight.to(dt) if weight is not None else None
    pw = pos_weight.to(dt) if pos_weight is not None else None
    loss = F.binary_cross_entropy_with_logits(input.to(dt), target.to(dt), w, pos_weight=pw, reduction="none")
    return reduce(loss, reduction).to(bce_out_dtype(target))


def float_dtypes(*ts: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """``dtypes`` with an integer or bool tensor counted as the default float dtype (what ``exp``, ``log`` or
    ``lgamma`` of it gives in torch: integer counts and targets are promoted as torch's formulas do)."""
    default = torch.get_default_dtype()
    out = None
    for t in ts:
        d = t.dtype if t.is_floating_point() else default
        out = d if out is None else torch.promote_types(out, d)
    if out in HALF_DTYPES and torch.is_autocast_enabled(ts[0].device.type):
        out = torch.float32
    return out, (torch.float32 if out in HALF_DTYPES else out)


def poisson_nll(input: Tensor, target: Tensor, log_input: bool, full: bool, eps: float, reduction: str) -> Tensor:
    """torch.nn.functional.poisson_nll_loss's formula. The Stirling term is taken on a target clamped to
    where it counts (t > 1): torch masks the term after forming t log t, whose gradient at t = 0 is then
    0 * inf = nan; here it is 0, the gradient of the masked term."""
    out_dtype, dt = float_dtypes(input, target)
    x, t = input.to(dt), target.to(dt)
    loss = torch.exp(x) - t * x if log_input else x - t * torch.log(x + eps)
    if full:
        big = t > 1
        ts = torch.where(big, t, torch.ones_like(t))
        stirling = ts * torch.log(ts) - ts + 0.5 * torch.log(ts) + HALF_LOG_2PI
        loss = loss + torch.where(big, stirling, torch.zeros_like(stirling))
    return reduce(loss, reduction).to(out_dtype)


def log_nb_positive(x: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8) -> Tensor:
    """scvi-tools' log_nb_positive: the NB log-likelihood, mean ``mu``, inverse dispersion ``theta``."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb_positive(x: Tensor, mu: Tensor, theta: Tensor, pi: Tensor, eps: float = 1e-8) -> Tensor:
    """scvi-tools' log_zinb_positive: the zero-inflated NB log-likelihood, dropout logit ``pi``."""
    softplus_pi = F.softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)
    case_zero = F.softplus(pi_theta_log) - softplus_pi
    mul_case_zero = (x < eps).to(case_zero.dtype) * case_zero
    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    mul_case_non_zero = (x > eps).to(case_non_zero.dtype) * case_non_zero
    return mul_case_zero + mul_case_non_zero


def invalid_counts(x: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
    """Where the NB is undefined: a negative count, mean or inverse dispersion (broadcast shape). scvi's formula
    gives NaN for most such elements but a finite value for some (mu in (-eps, 0), a negative x, a negative
    theta at a zero count of ZINB); fastvae gives NaN for all, in the loss and every gradient."""
    return (x < 0) | (mu < 0) | (theta < 0)


def poison_invalid(x: Tensor, mu: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x, mu, theta with NaN added where ``invalid_counts`` (0 elsewhere): the loss there is NaN and so is the
    gradient of every input through it (a NaN constant added to the loss would leave the gradients finite). One
    elementwise pass each; a broadcast theta or x comes out in the broadcast shape (its gradient sums back)."""
    bad = torch.where(invalid_counts(x, mu, theta), torch.nan, 0.0).to(mu.dtype)
    return x + bad, mu + bad, theta + bad


def negative_binomial_nll(x: Tensor, mu: Tensor, theta: Tensor, eps: float, reduction: str) -> Tensor:
    """-log_nb_positive, reduced; ``theta`` broadcasts against ``mu`` (one per feature: shape (G,))."""
    out_dtype, dt = float_dtypes(x, mu, theta)
    x, mu, theta = poison_invalid(x.to(dt), mu.to(dt), theta.to(dt))
    loss = -log_nb_positive(x, mu, theta, eps)
    return reduce(loss, reduction).to(out_dtype)


def zinb_nll(x: Tensor, mu: Tensor, theta: Tensor, pi_logits: Tensor, eps: float, reduction: str) -> Tensor:
    """-log_zinb_positive, reduced."""
    out_dtype, dt = float_dtypes(x, mu, theta, pi_logits)
    x, mu, theta = poison_invalid(x.to(dt), mu.to(dt), theta.to(dt))
    loss = -log_zinb_positive(x, mu, theta, pi_logits.to(dt), eps)
    return reduce(loss, reduction).to(out_dtype)
