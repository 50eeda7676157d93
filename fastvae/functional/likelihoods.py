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
    broadcast_shapes,
    check_reduction,
    check_same_device,
    check_tensor,
    check_values,
    use_triton,
    validating,
)
from ..reference import likelihoods as ref_lik
from ..reference.common import REDUCTIONS

__all__ = ["binary_cross_entropy_with_logits", "poisson_nll_loss", "negative_binomial_nll", "zinb_nll",
           "LossDtypeError"]


class LossDtypeError(TypeError, NotImplementedError):
    """An integer or bool logit or BCE target: torch raises ``RuntimeError`` (or its subclass
    ``NotImplementedError``) for these, fastvae's argument checks ``TypeError``; this is both."""


def _check_floating(name: str, t: object) -> Tensor:
    check_tensor(name, t, integer_ok=True)
    if not t.is_floating_point():  # type: ignore[union-attr]
        raise LossDtypeError(f"{name} must have a floating-point dtype, got {t.dtype}")  # type: ignore[union-attr]
    return t  # type: ignore[return-value]


class _Shape:
    """A shape where broadcast_pair reads a tensor's (its message names the sizes and the dim)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)

    def dim(self) -> int:
        return len(self.shape)


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
    shape = broadcast_shapes(t.shape, input.shape)
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

    As torch: the loss comes out in the target's dtype (fp32 for a half target under autocast); weight and
    pos_weight may be integer tensors, input and target may not (``LossDtypeError``, a TypeError and a
    RuntimeError). On the Triton path the loss and both gradients are written in one pass, reading dense
    inputs (channels_last included) where they lie; gradients come back in the input's memory format.
    """
    _check_floating("input", input)
    _check_floating("target", target)
    reduction = _torch_reduction_arg(reduction, size_average, reduce, input.shape)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            check_tensor(name, t, integer_ok=True)
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
                                           out_dtype=ref_lik.bce_out_dtype(target))
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

    Integer input or target are promoted as torch promotes them (an integer tensor counts as the default
    float dtype). On the Triton path the loss and the gradients to input and target are written in one pass
    (input and target of one shape; a broadcast pair takes the eager path).
    """
    check_tensor("input", input, integer_ok=True)
    check_tensor("target", target, integer_ok=True)
    check_same_device(input=input, target=target)
    # torch's message names the target as tensor a
    shape = broadcast_pair("target", target, "input", input)
    reduction = _torch_reduction_arg(reduction, size_average, reduce, shape)
    if use_triton(backend, input, target) and input.shape == target.shape:
        from .. import _triton

        return _triton.poisson_nll(input, target, log_input=bool(log_input), full=bool(full), eps=float(eps),
                                   reduction=reduction, out_dtype=ref_lik.float_dtypes(input, target)[0])
    return reference.poisson_nll(input, target, bool(log_input), bool(full), float(eps), reduction)


def _check_counts(x: Tensor, mu: Tensor, theta: Tensor, pi_logits: Tensor | None, eps: float,
                  reduction: str) -> torch.Size:
    """The checks of NB and ZINB; the broadcast shape of all their arguments (the loss's)."""
    check_tensor("x", x, integer_ok=True)
    check_tensor("mu", mu)
    check_tensor("theta", theta)
    if pi_logits is not None:
        check_tensor("pi_logits", pi_logits)
    check_same_device(x=x, mu=mu, theta=theta, pi_logits=pi_logits)
    # scvi's formulas are elementwise torch ops: every argument broadcasts with every other, in any direction
    shape = broadcast_pair("x", x, "mu", mu)
    shape = broadcast_pair("x and mu", _Shape(shape), "theta", theta)
    if pi_logits is not None:
        shape = broadcast_pair("x, mu and theta", _Shape(shape), "pi_logits", pi_logits)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    check_reduction(reduction, shape=shape)
    if validating(False, x, mu, theta):  # scvi checks nothing here: only when validation is asked for
        check_values(ref_lik.invalid_counts(x, mu, theta),
                     "x, mu and theta must be >= 0 (counts, a mean and an inverse dispersion)")
    return shape


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

    x, mu and theta broadcast as the formula's torch ops do (the loss has their broadcast shape; theta is
    typically one per gene, shape ``(G,)``); x may be an integer tensor (promoted as torch's ``lgamma``
    does). Gradients flow to every argument. A negative x, mu or theta gives NaN in the loss and the
    gradients (``fastvae.set_default_validate_args(True)`` raises ValueError instead). On the Triton path:
    one pass, digamma included (a broadcast x or mu is expanded to the loss's shape first).
    """
    shape = _check_counts(x, mu, theta, None, eps, reduction)
    if use_triton(backend, x, mu, theta):
        from .. import _triton

        if _triton.nb_supported(shape, x, theta):
            return _triton.nb_nll(x.expand(shape), mu.expand(shape), theta, None, eps=eps, reduction=reduction,
                                  out_dtype=ref_lik.float_dtypes(x, mu, theta)[0])
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

    and for x > eps ``-(log_nb - softplus(-pi) - pi)`` (see ``negative_binomial_nll``, whose broadcasting,
    dtypes and invalid values this follows; scvi's own ``log_zinb_positive`` first reshapes a 1-D theta to
    ``(1, G)``, which ``fastvae.integrations.scvi`` does too). Gradients flow to every argument.
    """
    shape = _check_counts(x, mu, theta, pi_logits, eps, reduction)
    if use_triton(backend, x, mu, theta, pi_logits):
        from .. import _triton

        if _triton.nb_supported(shape, x, theta):
            return _triton.nb_nll(x.expand(shape), mu.expand(shape), theta, pi_logits.expand(shape), eps=eps,
                                  reduction=reduction, out_dtype=ref_lik.float_dtypes(x, mu, theta, pi_logits)[0])
    return reference.zinb_nll(x, mu, theta, pi_logits, float(eps), reduction)
