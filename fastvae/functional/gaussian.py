"""The Gaussian family: reparameterized sampling, its KL, and the Gaussian NLL."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .._checks import (
    ShapeError,
    broadcast_pair,
    broadcast_shapes,
    check_broadcastable_to,
    check_generator,
    check_num_samples,
    check_reduction,
    check_same_device,
    check_tensor,
    check_values,
    use_triton,
    validating,
)
from ..reference.gaussian import gaussian_nll as _eager_nll

__all__ = [
    "reparameterize",
    "gaussian_kl",
    "reparameterize_kl",
    "gaussian_nll_loss",
    "gaussian_nll_loss_logvar",
]


def _broadcast(**tensors: Tensor | None) -> torch.Size:
    """The shape the tensors given (None skipped) broadcast to, each checked against the ones before it with
    torch's elementwise-op message (``ShapeError``: a ValueError and the RuntimeError torch raises)."""
    shape: tuple[int, ...] = ()
    names: list[str] = []
    for name, t in tensors.items():
        if t is None:
            continue
        for i, (a, b) in enumerate(zip(reversed(shape), reversed(t.shape))):
            if a != b and a != 1 and b != 1:
                dim = max(len(shape), t.dim()) - 1 - i
                raise ShapeError(
                    f"{name} of shape {tuple(t.shape)} does not broadcast with {' and '.join(names)} (shape "
                    f"{tuple(shape)}): The size of tensor a ({a}) must match the size of tensor b ({b}) at "
                    f"non-singleton dimension {dim}"
                )
        shape = tuple(broadcast_shapes(shape, t.shape))
        names.append(name)
    return torch.Size(shape)


def _check_posterior(mu: Tensor, logvar: Tensor) -> torch.Size:
    """The posterior's shape: mu and logvar broadcast together as in ``mu + exp(0.5 * logvar) * eps`` (a
    shared (1, D) logvar against a (B, D) mu, say)."""
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    check_same_device(mu=mu, logvar=logvar)
    return _broadcast(mu=mu, logvar=logvar)


def _eps(mu: Tensor, shape: torch.Size, num_samples: int | None, generator: torch.Generator | None) -> Tensor:
    """torch.randn of the samples' shape: with mu and logvar of one shape, what ``torch.randn_like(mu)`` draws."""
    shape = shape if num_samples is None else (num_samples, *shape)
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

    mu and logvar broadcast together (z has their broadcast shape; a broadcast input's gradient is summed back
    to its shape). With ``num_samples=K`` returns K independent samples per input, shape ``(K, *shape)``. The
    noise comes from ``generator`` or torch's default generator of the device, so ``torch.manual_seed``
    reproduces z bitwise.

    Eager path: eps is ``torch.randn`` of z's shape and z is computed as the formula is written (multiply,
    then add), so for fp32 z equals ``mu + torch.exp(0.5 * logvar) * eps`` with ``eps = torch.randn_like(mu)``
    drawn from the same generator state, bit for bit. Triton path: eps is drawn inside the kernel (its own
    Philox stream, not torch.randn's numbers) and regenerated in backward, never stored; z is within a few
    ulps of the formula with that eps (the GPU's exp and a multiply-add the compiler may fuse), not bitwise.
    """
    shape = _check_posterior(mu, logvar)
    num_samples = check_num_samples(num_samples)
    generator = check_generator(generator, mu.device)
    if use_triton(backend, mu, logvar):
        from .. import _triton

        return _triton.sample_kl(mu, logvar, None, None, sample=True, num_samples=num_samples,
                                 generator=generator, reduction=None, out_dtype=mu.dtype)[0]
    return reference.reparameterize(mu, logvar, _eps(mu, shape, num_samples, generator))


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
    ``reduction`` in "none" | "sum" | "mean" | "batchmean" | "per_sample". All four tensors broadcast together,
    as in the formula; the elementwise KL has their broadcast shape.
    """
    _check_posterior(mu, logvar)
    for name, t in (("mu_p", mu_p), ("logvar_p", logvar_p)):
        if t is not None:
            check_tensor(name, t)
    check_same_device(mu=mu, mu_p=mu_p, logvar_p=logvar_p)
    shape = _broadcast(mu=mu, logvar=logvar, mu_p=mu_p, logvar_p=logvar_p)
    check_reduction(reduction, shape=shape)
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
    """(z, KL(q || N(0, I))) from one read of mu and logvar: the encoder half of the ELBO in one call. mu and
    logvar broadcast together (see ``reparameterize``); z and the elementwise KL have their broadcast shape."""
    shape = _check_posterior(mu, logvar)
    check_reduction(reduction, shape=shape)
    num_samples = check_num_samples(num_samples)
    generator = check_generator(generator, mu.device)
    if use_triton(backend, mu, logvar):
        from .. import _triton

        return _triton.sample_kl(mu, logvar, None, None, sample=True, num_samples=num_samples,
                                 generator=generator, reduction=reduction, out_dtype=reference.dtypes(mu, logvar)[0])
    z = reference.reparameterize(mu, logvar, _eps(mu, shape, num_samples, generator))
    return z, reference.gaussian_kl(mu, logvar, None, None, reduction)


def _check_nll_common(input: Tensor, target: Tensor, reduction: str) -> torch.Size:
    check_tensor("target", target, integer_ok=True)  # integer data (uint8 pixels) is promoted, as torch does
    if target.dtype == torch.bool:  # torch's own error for ``input - target`` on a bool tensor
        raise RuntimeError(
            "Subtraction, the `-` operator, with a bool tensor is not supported. If you are trying to invert a "
            "mask, use the `~` or `logical_not()` operator instead."
        )
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
    return _eager_nll(input, target, v, logvar_form, full, float(eps), reduction)


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
    ``torch.nn.functional.gaussian_nll_loss`` (same arguments, var forms, clamping, gradients, integer
    targets and errors), plus ``reduction="batchmean"`` and ``"per_sample"``.

        loss = 0.5 * (log(max(var, eps)) + (input - target)^2 / max(var, eps)) [+ 0.5 log 2 pi if full]

    A negative var raises ``ValueError("var has negative entry/entries")`` as torch does, on both backends:
    the check reads one bool on the host (a sync), done when ``_checks.validating`` says so (by default, since
    torch checks too). Where it is skipped (``set_default_validate_args(False)``, torch.compile, CUDA-graph
    capture) a negative entry gives NaN in its loss and gradients instead (never a clamped finite value).

    On the Triton path the gradient is written in the same pass as the loss; ``create_graph=True`` gives the
    formula's second-order terms on both paths.
    """
    check_tensor("input", input)
    scalar_var = _is_number(var)
    if scalar_var and var < 0:
        raise ValueError("var has negative entry/entries")
    var = _as_tensor("var", var, input)
    _check_nll_common(input, target, reduction)
    check_same_device(input=input, var=var)
    triton_path = use_triton(backend, input, target, var)
    if not scalar_var and validating(True, var):
        check_values(var < 0, "var has negative entry/entries")
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

