"""Reconstruction likelihoods beyond the Gaussian: Bernoulli (BCE with logits) and Poisson as drop-ins for
torch's losses, and the negative binomial / zero-inflated NB of count data (scVI's parameterization)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import _reduction as _torch_reduction

from .. import reference
from .._checks import (
    ShapeError,
    broadcast_pair,
    check_broadcastable_to,
    check_reduction,
    check_same_device,
    check_same_shape,
    check_tensor,
    use_triton,
)
from ..reference.common import REDUCTIONS

__all__ = ["binary_cross_entropy_with_logits", "poisson_nll_loss", "negative_binomial_nll", "zinb_nll"]


def _torch_reduction_arg(reduction: object, size_average: object, reduce: object, shape) -> str:
    """torch's legacy size_average/reduce mapping, then torch's message for an unknown reduction (the drop-ins
    raise what torch raises), then the per_sample check."""
    if size_average is not None or reduce is not None:
        reduction = _torch_reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction (must be one of {', '.join(REDUCTIONS)})")
    return check_reduction(reduction, shape=shape)


def _check_no_growth(name: str, t: Tensor, input: Tensor) -> None:
    """torch multiplies the loss by weight / pos_weight in place: one that would grow the loss's shape
    fails there with this message."""
    shape = torch.broadcast_shapes(t.shape, input.shape)
    if shape != input.shape:
        raise ShapeError(
            f"{name} of shape {tuple(t.shape)} grows the loss: "
            f"output with shape {list(input.shape)} doesn't match the broadcast shape {list(shape)}"
        )


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Bernoulli NLL of ``target`` given logits ``input``: drop-in for
    ``torch.nn.functional.binary_cross_entropy_with_logits`` (arguments, weight and pos_weight broadcasting,
    gradients to input and target, errors), plus ``reduction="batchmean"`` and ``"per_sample"``.

        loss = weight * ((1 - t) x + (1 + (pos_weight - 1) t) softplus(-x))

    On the Triton path the loss and both gradients are written in one pass.
    """
    check_tensor("input", input)
    check_tensor("target", target)
    reduction = _torch_reduction_arg(reduction, size_average, reduce, input.shape)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            check_tensor(name, t)
            if t.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    f"The function 'binary_cross_entropy_with_logits' is not differentiable with respect to "
                    f"argument '{name}'. This input cannot have requires_grad True."
                )
    if weight is not None:
        broadcast_pair("input", input, "weight", weight)
        _check_no_growth("weight", weight, input)
    if pos_weight is not None:
        broadcast_pair("pos_weight", pos_weight, "target", target)
        _check_no_growth("pos_weight", pos_weight, input)
    check_same_device(input=input, target=target, weight=weight, pos_weight=pos_weight)
    extra = [t for t in (weight, pos_weight) if t is not None]
    if use_triton(backend, input, target, *extra):
        from .. import _triton

        if _triton.bce_supported(input, target, weight, pos_weight):
            return _triton.bce_with_logits(input, target, weight, pos_weight, reduction=reduction,
                                           out_dtype=reference.dtypes(input, target, *extra)[0])
    return reference.bce_with_logits(input, target, weight, pos_weight, reduction)


def poisson_nll_loss(
    input: Tensor,
    target: Tensor,
    log_input: bool = True,
    full: bool = False,
    size_average: bool | None = None,
    eps: float = 1e-8,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> Tensor:
    """Poisson NLL of ``target`` with rate ``exp(input)`` (``log_input=True``) or ``input``: drop-in for
    ``torch.nn.functional.poisson_nll_loss``, plus ``reduction="batchmean"`` and ``"per_sample"``.

        loss = exp(x) - t x   |   x - t log(x + eps)     [+ t log t - t + 0.5 log(2 pi t) where t > 1, if full]

    On the Triton path the loss and the gradients to input and target are written in one pass (input and
    target of one shape; a broadcast pair takes the eager path).
    """
    check_tensor("input", input)
    check_tensor("target", target)
    check_same_device(input=input, target=target)
    # torch's message names the target as tensor a
    shape = broadcast_pair("target", target, "input", input)
    reduction = _torch_reduction_arg(reduction, size_average, reduce, shape)
    if use_triton(backend, input, target) and input.shape == target.shape:
        from .. import _triton

        return _triton.poisson_nll(input, target, log_input=bool(log_input), full=bool(full), eps=float(eps),
                                   reduction=reduction, out_dtype=reference.dtypes(input, target)[0])
    return reference.poisson_nll(input, target, bool(log_input), bool(full), float(eps), reduction)


def _check_counts(x: Tensor, mu: Tensor, theta: Tensor, pi_logits: Tensor | None, eps: float, reduction: str):
    check_tensor("x", x)
    check_tensor("mu", mu)
    check_tensor("theta", theta)
    check_same_shape("mu", mu, "x", x)
    check_broadcastable_to("theta", theta, "mu", mu)
    if pi_logits is not None:
        check_tensor("pi_logits", pi_logits)
        check_same_shape("pi_logits", pi_logits, "x", x)
    check_same_device(x=x, mu=mu, theta=theta, pi_logits=pi_logits)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    check_reduction(reduction, shape=x.shape)


def negative_binomial_nll(
    x: Tensor,
    mu: Tensor,
    theta: Tensor,
    eps: float = 1e-8,
    reduction: str = "sum",
    *,
    backend: str | None = None,
) -> Tensor:
    """Negative log-likelihood of counts ``x`` under NB(mean ``mu``, inverse dispersion ``theta``), term for
    term scvi-tools' ``-log_nb_positive``:

        loss = -(th (log(th + eps) - log(th + mu + eps)) + x (log(mu + eps) - log(th + mu + eps))
                 + lgamma(x + th) - lgamma(th) - lgamma(x + 1))

    ``mu`` has x's shape; ``theta`` broadcasts to it (one per gene: shape ``(G,)``, broadcast over cells).
    Gradients flow to mu and theta (x is data). On the Triton path: one pass, digamma included.
    """
    _check_counts(x, mu, theta, None, eps, reduction)
    if use_triton(backend, x, mu, theta):
        from .. import _triton

        if _triton.nb_supported(x, mu, theta, None):
            return _triton.nb_nll(x, mu, theta, None, eps=eps, reduction=reduction,
                                  out_dtype=reference.dtypes(x, mu, theta)[0])
    return reference.negative_binomial_nll(x, mu, theta, float(eps), reduction)


def zinb_nll(
    x: Tensor,
    mu: Tensor,
    theta: Tensor,
    pi_logits: Tensor,
    eps: float = 1e-8,
    reduction: str = "sum",
    *,
    backend: str | None = None,
) -> Tensor:
    """Negative log-likelihood of counts ``x`` under the zero-inflated NB with dropout logits ``pi_logits``,
    term for term scvi-tools' ``-log_zinb_positive``: for x < eps

        loss = -(softplus(-pi + th (log(th + eps) - log(th + mu + eps))) - softplus(-pi))

    and for x > eps ``-(log_nb - softplus(-pi) - pi)`` (see ``negative_binomial_nll``). ``mu`` and
    ``pi_logits`` have x's shape, ``theta`` broadcasts to it. Gradients flow to mu, theta and pi_logits.
    """
    _check_counts(x, mu, theta, pi_logits, eps, reduction)
    if use_triton(backend, x, mu, theta, pi_logits):
        from .. import _triton

        if _triton.nb_supported(x, mu, theta, pi_logits):
            return _triton.nb_nll(x, mu, theta, pi_logits, eps=eps, reduction=reduction,
                                  out_dtype=reference.dtypes(x, mu, theta, pi_logits)[0])
    return reference.zinb_nll(x, mu, theta, pi_logits, float(eps), reduction)
