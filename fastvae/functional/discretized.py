"""Discretized likelihoods of images: the mixture of logistics of PixelCNN++ / VDVAE / NVAE, its sampler,
the one-component discretized logistic (IAF-VAE) and discretized Gaussian (DDPM), and bits per dim."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from .._checks import (
    ShapeError,
    broadcast_shapes,
    check_generator,
    check_reduction,
    check_same_device,
    check_tensor,
    check_values,
    use_triton,
    validating,
)
from ..reference.discretized import LAYOUTS, params_per_pixel

__all__ = [
    "bits_per_dim",
    "discretized_gaussian_nll",
    "discretized_logistic_nll",
    "discretized_mix_logistic_nll",
    "sample_discretized_mix_logistic",
]


def _check_int(name: str, v: object, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}), got {v}")
    return v


def _check_layout(layout: object) -> bool:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout == "channels_first"


def _check_range(name: str, x: Tensor, lo: float, hi: float) -> None:
    """Images outside [lo, hi] (or NaN) give NaN in the loss and the gradients of their pixels on both
    backends (no device assert, no host sync). These formulas have no torch twin that checks its input, so
    the ValueError below is raised only when validation is on (``fastvae.set_default_validate_args(True)``):
    one host sync, the same on both backends."""
    if x.numel() and validating(False, x):
        check_values(~((x >= lo) & (x <= hi)), f"{name} must lie in [{lo:g}, {hi:g}] (values outside it or NaN)")


def _check_mixture_params(params: Tensor, num_mixtures: int, channels_first: bool, channels: int) -> None:
    dim = 1 if channels_first else -1
    if params.dim() < 2:
        raise ValueError(f"params must have a batch and a parameter dim, got shape {tuple(params.shape)}")
    want = params_per_pixel(num_mixtures, channels)
    if params.shape[dim] != want:
        raise ValueError(
            f"params has {params.shape[dim]} parameters per pixel in dim {dim} (layout="
            f"{'channels_first' if channels_first else 'channels_last'}); num_mixtures={num_mixtures} with "
            f"{channels} image channel{'s' if channels != 1 else ''} needs {want} "
            f"({'10' if channels == 3 else '3'} x num_mixtures)"
        )


def discretized_mix_logistic_nll(
    x: Tensor,
    params: Tensor,
    *,
    num_mixtures: int,
    bits: int = 8,
    layout: str = "channels_last",
    reduction: str = "per_sample",
    backend: str | None = None,
) -> Tensor:
    """Negative log-likelihood in nats of images ``x`` in [-1, 1] under the discretized mixture of logistics
    of PixelCNN++ (openai/pixel-cnn, openai/vdvae, NVAE), term for term the peers' formula (see
    fastvae.reference.discretized): per pixel

        loss = -logsumexp_k(log_softmax(logits)_k + sum_c log P(x_c | mean_ck + AR chain, log_scale_ck))

    ``layout="channels_last"``: x (B, ..., C), params (B, ..., P) as vdvae / pixel-cnn; ``"channels_first"``:
    x (B, C, ...), params (B, P, ...) as NVAE. C = 3 (P = 10 num_mixtures) or 1 (P = 3 num_mixtures, no
    coefficients). ``bits``: 2^bits levels (vdvae's low_bit is 5). The loss is per pixel (x's shape without
    the channel dim) before ``reduction`` (``"per_sample"``: summed per image; see ``bits_per_dim``).
    Gradients flow to params; x is data. On the Triton path the loss and the params' gradient are one pass,
    reading x and params where they lie (any strides whose spatial dims collapse: contiguous, channels_last
    memory format, VDVAE's permuted conv output, a chunk), the gradient returned in params' dim order.
    Invalid x (outside [-1, 1], or NaN): NaN loss and params' gradients for its pixel; a ValueError instead
    only with ``fastvae.set_default_validate_args(True)`` (the formula has no torch twin that checks, so the
    default is off). create_graph=True and torch.func take the eager formula's derivatives. NVAE's own code
    takes x > 0.99 as the highest bin (8-bit bin 254 included) and x in [0, 1]: here x is in
    [-1, 1] and the highest bin is x > 0.999, as pixel-cnn and vdvae.
    """
    check_tensor("x", x)
    check_tensor("params", params)
    check_same_device(x=x, params=params)
    num_mixtures = _check_int("num_mixtures", num_mixtures, 1)
    bits = _check_int("bits", bits, 1, 16)
    channels_first = _check_layout(layout)
    if x.dim() < 2:
        raise ValueError(f"x must have a batch and a channel dim, got shape {tuple(x.shape)}")
    channels = x.shape[1] if channels_first else x.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels in dim {1 if channels_first else -1} "
                         f"(layout={layout}), got shape {tuple(x.shape)}")
    _check_mixture_params(params, num_mixtures, channels_first, channels)
    pix = (lambda t: (t.shape[0], *t.shape[2:])) if channels_first else (lambda t: tuple(t.shape[:-1]))
    if pix(x) != pix(params):
        raise ValueError(f"x {tuple(x.shape)} and params {tuple(params.shape)} must have the same pixels for "
                         f"layout={layout} (every dim but the {'second' if channels_first else 'last'})")
    check_reduction(reduction, shape=pix(x))
    _check_range("x", x, -1.0, 1.0)
    if use_triton(backend, params, x) and not (torch.is_grad_enabled() and x.requires_grad):
        from .. import _triton

        return _triton.dmol_nll(x, params, num_mixtures=num_mixtures, bits=bits, channels_first=channels_first,
                                reduction=reduction, out_dtype=reference.dtypes(params, x)[0])
    return reference.discretized_mix_logistic_nll(x, params, num_mixtures, bits, layout, reduction)


def sample_discretized_mix_logistic(
    params: Tensor,
    *,
    num_mixtures: int,
    channels: int = 3,
    layout: str = "channels_last",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """An image in [-1, 1] drawn from the mixture, as openai/vdvae's ``sample_from_discretized_mix_logistic``:
    a component by Gumbel-max over the logits, a logistic draw per channel, the coefficient chain, each
    channel clipped to [-1, 1] (not rounded to a bin). Shape (B, ..., C) or (B, C, ...) by ``layout``, in
    params' dtype, no gradient. The noise comes from ``generator`` or torch's default generator of the
    device (``torch.manual_seed`` reproduces it bitwise on each backend); on the Triton path it is Philox
    noise drawn in the kernel (a 64-bit key drawn on the device: no host sync). The sample comes back in
    params' dim order (channels_last params give a channels_last image)."""
    check_tensor("params", params)
    num_mixtures = _check_int("num_mixtures", num_mixtures, 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    channels_first = _check_layout(layout)
    _check_mixture_params(params, num_mixtures, channels_first, channels)
    generator = check_generator(generator, params.device)
    if use_triton(backend, params):
        from .. import _triton

        return _triton.sample_dmol(params, num_mixtures=num_mixtures, channels=channels,
                                   channels_first=channels_first, generator=generator)
    with torch.no_grad():
        return reference.sample_discretized_mix_logistic(params, num_mixtures, channels, layout, generator)


def _check_one_component(x: Tensor, mean: Tensor, log_scale: Tensor, reduction: str) -> torch.Size:
    """The loss's shape: x, mean and log_scale broadcast together as the formula's elementwise ops do
    (torch's rule and message; a ``ShapeError``, both ValueError and RuntimeError, when they do not)."""
    check_tensor("x", x)
    check_tensor("mean", mean)
    check_tensor("log_scale", log_scale)
    check_same_device(x=x, mean=mean, log_scale=log_scale)
    shape: tuple = ()
    for name, t in (("x", x), ("mean", mean), ("log_scale", log_scale)):
        for i, (a, b) in enumerate(zip(reversed(shape), reversed(t.shape))):
            if a != b and a != 1 and b != 1:
                dim = max(len(shape), t.dim()) - 1 - i
                raise ShapeError(f"{name} of shape {tuple(t.shape)} does not broadcast with the other inputs' "
                                 f"{tuple(shape)}: The size of tensor a ({a}) must match the size of tensor b "
                                 f"({b}) at non-singleton dimension {dim}")
        shape = tuple(broadcast_shapes(shape, t.shape))
    check_reduction(reduction, shape=shape)
    return torch.Size(shape)


def _expanded(shape: torch.Size, *ts: Tensor) -> tuple[Tensor, ...]:
    """Each input as a view of the loss's shape (autograd sums a broadcast input's gradient back)."""
    return tuple(t if t.shape == shape else t.expand(shape) for t in ts)


def discretized_logistic_nll(
    x: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    *,
    binsize: float = 1.0 / 256.0,
    reduction: str = "per_sample",
    backend: str | None = None,
) -> Tensor:
    """IAF-VAE's discretized logistic (openai/iaf ``discretized_logistic``), per element, x in [0, 1]:

        q = floor(x / binsize) binsize,  y = (q - mean) / e^s
        loss = -log(sigmoid(y + binsize / e^s) - sigmoid(y) + 1e-7)

    with s = ``log_scale``. Gradients flow to mean and log_scale; on the Triton path in one pass, walking x,
    mean and log_scale where they lie when they share one dense layout (outputs in that layout). x outside
    [0, 1] or NaN: NaN loss and gradients there; a ValueError only with
    ``fastvae.set_default_validate_args(True)`` (no torch twin checks this formula: off by default). x, mean
    and log_scale broadcast together (the loss has their broadcast shape)."""
    shape = _check_one_component(x, mean, log_scale, reduction)
    if isinstance(binsize, bool) or not isinstance(binsize, (int, float)) or not binsize > 0:
        raise ValueError(f"binsize must be a number > 0, got {binsize!r}")
    _check_range("x", x, 0.0, 1.0)
    if use_triton(backend, mean, log_scale, x) and not (torch.is_grad_enabled() and x.requires_grad):
        from .. import _triton

        x, mean, log_scale = _expanded(shape, x, mean, log_scale)  # a broadcast input is copied by the op
        return _triton.discretized_nll(x, mean, log_scale, kind=_triton.discretized.KIND_LOGISTIC,
                                       bin_param=float(binsize), reduction=reduction,
                                       out_dtype=reference.dtypes(mean, log_scale, x)[0])
    return reference.discretized_logistic_nll(x, mean, log_scale, float(binsize), reduction)


def discretized_gaussian_nll(
    x: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    *,
    bits: int = 8,
    reduction: str = "per_sample",
    backend: str | None = None,
) -> Tensor:
    """DDPM's decoder term (``discretized_gaussian_log_likelihood``), negated, per element, x in [-1, 1]:
    a Gaussian of standard deviation e^s (s = ``log_scale``) through DDPM's tanh-approximated CDF over the
    bin of half-width 1 / (2^bits - 1), the lowest and highest bins open-ended, each log probability
    floored at log(1e-12). Gradients flow to mean and log_scale; on the Triton path in one pass, walking x,
    mean and log_scale where they lie when they share one dense layout (outputs in that layout). x outside
    [-1, 1] or NaN: NaN loss and gradients there; a ValueError only with
    ``fastvae.set_default_validate_args(True)`` (no torch twin checks this formula: off by default). x, mean
    and log_scale broadcast together (the loss has their broadcast shape)."""
    shape = _check_one_component(x, mean, log_scale, reduction)
    bits = _check_int("bits", bits, 1, 16)
    _check_range("x", x, -1.0, 1.0)
    if use_triton(backend, mean, log_scale, x) and not (torch.is_grad_enabled() and x.requires_grad):
        from .. import _triton

        x, mean, log_scale = _expanded(shape, x, mean, log_scale)  # a broadcast input is copied by the op
        return _triton.discretized_nll(x, mean, log_scale, kind=_triton.discretized.KIND_GAUSSIAN,
                                       bin_param=1.0 / (2.0**bits - 1.0), reduction=reduction,
                                       out_dtype=reference.dtypes(mean, log_scale, x)[0])
    return reference.discretized_gaussian_nll(x, mean, log_scale, bits, reduction)


def bits_per_dim(nll: Tensor, num_dims: int) -> Tensor:
    """A negative log-likelihood in nats over ``num_dims`` dimensions (C x H x W of an image, for a
    per-sample NLL) in bits per dim: nll / (num_dims ln 2)."""
    check_tensor("nll", nll)
    num_dims = _check_int("num_dims", num_dims, 1)
    return nll / (num_dims * math.log(2.0))
