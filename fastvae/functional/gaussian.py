"""The Gaussian family: reparameterized sampling, its KL, and the Gaussian NLL."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import (
    broadcast_pair,
    check_broadcastable_to,
    check_generator,
    check_num_samples,
    check_reduction,
    check_same_device,
    check_same_shape,
    check_tensor,
    use_triton,
)

__all__ = [
    "reparameterize",
    "gaussian_kl",
    "reparameterize_kl",
    "gaussian_nll_loss",
    "gaussian_nll_loss_logvar",
]


def _check_posterior(mu: Tensor, logvar: Tensor) -> None:
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    check_same_device(mu=mu, logvar=logvar)
    check_same_shape("logvar", logvar, "mu", mu)


def _eps(mu: Tensor, num_samples: int | None, generator: torch.Generator | None) -> Tensor:
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    _, dt = reference.dtypes(mu)  # fp32 noise for half types, as the kernels draw it
    return torch.randn(shape, dtype=dt, device=mu.device, generator=generator)


def reparameterize(
    mu: Tensor,
    logvar: Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I).

    With ``num_samples=K`` returns K independent samples per input, shape ``(K, *mu.shape)``. The noise comes
    from ``generator`` or torch's default generator of the device, so ``torch.manual_seed`` reproduces z
    bitwise. On the Triton path eps is drawn inside the kernel and regenerated in backward, never stored.
    """
    _check_posterior(mu, logvar)
    num_samples = check_num_samples(num_samples)
    generator = check_generator(generator, mu.device)
    if use_triton(backend, mu):
        from .. import _triton

        return _triton.sample_kl(mu, logvar, None, None, sample=True, num_samples=num_samples,
                                 generator=generator, reduction=None, out_dtype=mu.dtype)[0]
    return reference.reparameterize(mu, logvar, _eps(mu, num_samples, generator))


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    mu_p: Tensor | None = None,
    logvar_p: Tensor | None = None,
    *,
    reduction: str = "sum",
    backend: str | None = None,
) -> Tensor:
    """KL(N(mu, diag e^logvar) || N(mu_p, diag e^logvar_p)); the prior defaults to N(0, I).

    Elementwise 0.5 * (logvar_p - logvar + (e^logvar + (mu - mu_p)^2) / e^logvar_p - 1), reduced by
    ``reduction`` in "none" | "sum" | "mean" | "batchmean" | "per_sample". ``mu_p``/``logvar_p`` broadcast to
    mu's shape.
    """
    _check_posterior(mu, logvar)
    for name, t in (("mu_p", mu_p), ("logvar_p", logvar_p)):
        if t is not None:
            check_tensor(name, t)
            check_broadcastable_to(name, t, "mu", mu)
    check_same_device(mu=mu, mu_p=mu_p, logvar_p=logvar_p)
    check_reduction(reduction, shape=mu.shape)
    priors = [t for t in (mu_p, logvar_p) if t is not None]
    if use_triton(backend, mu, logvar, *priors):
        from .. import _triton

        return _triton.sample_kl(mu, logvar, mu_p, logvar_p, sample=False, num_samples=None, generator=None,
                                 reduction=reduction, out_dtype=reference.dtypes(mu, logvar, *priors)[0])[1]
    return reference.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction)


def reparameterize_kl(
    mu: Tensor,
    logvar: Tensor,
    *,
    reduction: str = "sum",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(z, KL(q || N(0, I))) from one read of mu and logvar: the encoder half of the ELBO in one call."""
    _check_posterior(mu, logvar)
    check_reduction(reduction, shape=mu.shape)
    num_samples = check_num_samples(num_samples)
    generator = check_generator(generator, mu.device)
    if use_triton(backend, mu, logvar):
        from .. import _triton

        return _triton.sample_kl(mu, logvar, None, None, sample=True, num_samples=num_samples,
                                 generator=generator, reduction=reduction, out_dtype=reference.dtypes(mu, logvar)[0])
    z = reference.reparameterize(mu, logvar, _eps(mu, num_samples, generator))
    return z, reference.gaussian_kl(mu, logvar, None, None, reduction)


def _check_nll_common(input: Tensor, target: Tensor, reduction: str) -> torch.Size:
    check_tensor("target", target)
    check_same_device(input=input, target=target)
    check_reduction(reduction)
    shape = broadcast_pair("input", input, "target", target)
    check_reduction(reduction, shape=shape)
    return shape


def _shape_var(input: Tensor, var: Tensor) -> Tensor:
    """torch.nn.functional.gaussian_nll_loss's var forms: input's shape; input's shape with one dim of
    size 1 (homoscedastic along it); input's shape without the last dim (unsqueezed to size 1)."""
    if var.shape == input.shape:
        return var
    if input.shape[:-1] == var.shape:
        return var.unsqueeze(-1)
    if input.dim() == var.dim() and sum(v for i, v in zip(input.shape, var.shape) if i != v) == 1:
        return var
    raise ValueError(
        f"var is of incorrect size: var {tuple(var.shape)} for input {tuple(input.shape)}; expected the input's "
        "shape, the input's shape with one dim of size 1, or the input's shape without its last dim"
    )


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _as_tensor(name: str, value: Tensor | float, input: Tensor) -> Tensor:
    """A Python number as a 0-d tensor of input's dtype and device; a tensor is checked and kept."""
    if _is_number(value):
        return torch.full((), float(value), dtype=input.dtype, device=input.device)
    return check_tensor(name, value)


def _nll(input: Tensor, target: Tensor, v: Tensor, logvar_form: bool, full: bool, eps: float, reduction: str,
         triton_path: bool) -> Tensor:
    """Both NLL forms once validated, ``v`` with input's ndim: the kernel where it covers the shapes and
    dtypes, else the eager path with torch's semantics."""
    if triton_path:
        from .. import _triton

        if _triton.nll_supported(input, target, v):
            return _triton.gaussian_nll(input, target, v, logvar_form=logvar_form, full=full, eps=eps,
                                        reduction=reduction, out_dtype=reference.dtypes(input, target, v)[0])
    return reference.GaussianNLL.apply(input, target, v, logvar_form, full, float(eps), reduction)


def _negative_var_check_allowed(var: Tensor) -> bool:
    # torch.any(var < 0) reads a device value on the host: skip it where that is impossible (compile) or
    # forbidden (CUDA-graph capture); the kernels flag negative entries on the device instead.
    if torch.compiler.is_compiling():
        return False
    return not (var.is_cuda and torch.cuda.is_current_stream_capturing())


def gaussian_nll_loss(
    input: Tensor,
    target: Tensor,
    var: Tensor | float,
    full: bool = False,
    eps: float = 1e-6,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> Tensor:
    """Negative log-likelihood of ``target`` under N(input, var): drop-in for
    ``torch.nn.functional.gaussian_nll_loss`` (same arguments, var forms, clamping, gradients and errors),
    plus ``reduction="batchmean"`` and ``"per_sample"``.

        loss = 0.5 * (log(max(var, eps)) + (input - target)^2 / max(var, eps)) [+ 0.5 log 2 pi if full]

    On the Triton path the gradient is written in the same pass as the loss.
    """
    check_tensor("input", input)
    scalar_var = _is_number(var)
    if scalar_var and var < 0:
        raise ValueError("var has negative entry/entries")
    var = _as_tensor("var", var, input)
    _check_nll_common(input, target, reduction)
    check_same_device(input=input, var=var)
    triton_path = use_triton(backend, input, target, var)
    # the kernels flag negative entries on the device; the eager path checks like torch (a host sync)
    if not scalar_var and not triton_path and _negative_var_check_allowed(var) and torch.any(var < 0):
        raise ValueError("var has negative entry/entries")
    var = var.expand((1,) * input.dim()) if scalar_var else _shape_var(input, var)
    return _nll(input, target, var, False, full, eps, reduction, triton_path)


def gaussian_nll_loss_logvar(
    input: Tensor,
    target: Tensor,
    logvar: Tensor | float,
    full: bool = False,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> Tensor:
    """Gaussian NLL with the log-variance a decoder learns:

        loss = 0.5 * (logvar + (input - target)^2 * exp(-logvar)) [+ 0.5 log 2 pi if full]

    ``logvar`` broadcasts to input's shape: a scalar parameter, one per feature, one per row, or one per
    element. No clamp is needed: exp(-logvar) is finite for any finite logvar.
    """
    check_tensor("input", input)
    logvar = _as_tensor("logvar", logvar, input)
    _check_nll_common(input, target, reduction)
    check_same_device(input=input, logvar=logvar)
    check_broadcastable_to("logvar", logvar, "input", input)
    triton_path = use_triton(backend, input, target, logvar)
    # leading size-1 dims give logvar input's ndim, the form both paths index
    logvar = logvar.reshape((1,) * (input.dim() - logvar.dim()) + tuple(logvar.shape))
    return _nll(input, target, logvar, True, full, 0.0, reduction, triton_path)

