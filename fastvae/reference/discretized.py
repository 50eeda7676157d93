"""Discretized likelihoods of image models, as eager formulas: the discretized mixture of logistics of
PixelCNN++ / VDVAE / NVAE, its sampler, and the one-component discretized logistic (IAF-VAE) and discretized
Gaussian (DDPM).

Mixture (openai/pixel-cnn ``discretized_mix_logistic_loss``, openai/vdvae's port, term for term), x in
[-1, 1] on 2^bits levels, half a bin h = 1 / (2^bits - 1), per pixel, component k and channel c:

    s      = max(log_scale, -7)                 mu_c = mean_c + sum_{j<c} tanh(coeff_j) x_j  (the AR chain)
    plus   = e^-s (x - mu + h)    minus = e^-s (x - mu - h)    mid = e^-s (x - mu)
    lp_ck  = plus - softplus(plus)                          x < -0.999   (lowest bin)
             -softplus(minus)                               x > 0.999    (highest bin)
             log(max(sigmoid(plus) - sigmoid(minus), 1e-12))  where that difference > 1e-5
             mid - s - 2 softplus(mid) - log((2^bits - 1) / 2)  otherwise (the density at the bin centre)
    loss   = -logsumexp_k(log_softmax(logits)_k + sum_c lp_ck)

Parameter layout, per pixel (channels last: the last dim; channels first, NVAE's: dim 1), M = num_mixtures:
``[logits (M) | channel 0: means (M), log_scales (M), coeffs (M) | channel 1: ... | channel 2: ...]``, 10M
for 3 channels; one channel has no coefficients: ``[logits | means | log_scales]``, 3M. The coefficients of
channel block j are the j-th of the chain: mu_1 uses coeff_0, mu_2 uses coeff_1 (times x_0) and coeff_2
(times x_1), as the peers read them.

One component, per element (no logits, no coefficients):

    IAF-VAE (openai/iaf ``discretized_logistic``), x in [0, 1], bins of ``binsize`` from 0:
        y = (floor(x / binsize) binsize - mean) / e^s,   loss = -log(sigmoid(y + binsize / e^s) - sigmoid(y) + 1e-7)
    DDPM (``discretized_gaussian_log_likelihood``), x in [-1, 1],
    Phi~(v) = 0.5 (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))):
        lowest bin  -log(max(Phi~(plus), 1e-12)),  highest  -log(max(1 - Phi~(minus), 1e-12)),
        else        -log(max(Phi~(plus) - Phi~(minus), 1e-12)),     s the log standard deviation (no clamp)

Inputs are computed in ``dtypes(...)[1]`` (fp32 for half types); gradients come from autograd through the
formulas, which is what the kernels are tested against.

Invalid images (the ``*_nll`` functions): an x outside its range ([-1, 1], IAF's [0, 1]) or NaN makes its
pixel's (element's) loss NaN and every gradient of that pixel's parameters NaN, as the kernels do: the
parameters are multiplied by a factor that is 1, or NaN there (a NaN factor in a product reaches the
gradient whatever the formula's clamps and branches pass back; an added NaN would not).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import dtypes, reduce

LAYOUTS = ("channels_last", "channels_first")
EDGE = 0.999  # the peers' thresholds of the lowest and highest bin
LOG_SCALE_MIN = -7.0


def params_per_pixel(num_mixtures: int, channels: int) -> int:
    """10M for three channels (logits, and per channel means, log scales, coefficients), 3M for one."""
    return num_mixtures * (10 if channels == 3 else 3)


def _channels_last(x: Tensor, params: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    if layout == "channels_first":
        return x.movedim(1, -1), params.movedim(1, -1)
    return x, params


def _unpack(params: Tensor, num_mixtures: int, channels: int):
    """(logits (..., M), means, log_scales (clamped), coeffs (tanh) each (..., C, M)) from channels-last params."""
    m = num_mixtures
    logits = params[..., :m]
    rest = params[..., m:].reshape(*params.shape[:-1], channels, (params.shape[-1] - m) // channels)
    means = rest[..., :m]
    log_scales = torch.clamp(rest[..., m:2 * m], min=LOG_SCALE_MIN)
    coeffs = torch.tanh(rest[..., 2 * m:3 * m]) if channels == 3 else None
    return logits, means, log_scales, coeffs


def dmol_log_prob(x: Tensor, params: Tensor, num_mixtures: int, bits: int = 8,
                  layout: str = "channels_last") -> Tensor:
    """Per-pixel log-likelihood (x's shape without the channel dim) of the discretized mixture of logistics,
    openai/vdvae's ``discretized_mix_logistic_loss`` term for term (any bits; vdvae's low_bit is bits=5)."""
    x, params = _channels_last(x, params, layout)
    c_num = x.shape[-1]
    logits, means, log_scales, coeffs = _unpack(params, num_mixtures, c_num)
    x = x.unsqueeze(-1) + torch.zeros_like(means)  # (..., C, M)
    if c_num == 3:
        m2 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
        m3 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
        means = torch.stack([means[..., 0, :], m2, m3], dim=-2)
    levels = 2.0**bits - 1.0
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / levels)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / levels)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(
        x < -EDGE,
        log_cdf_plus,
        torch.where(
            x > EDGE,
            log_one_minus_cdf_min,
            torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                        log_pdf_mid - math.log(levels / 2.0)),
        ),
    )
    log_probs = log_probs.sum(dim=-2) + F.log_softmax(logits, dim=-1)
    return torch.logsumexp(log_probs, dim=-1)


def invalid_to_nan(x: Tensor, lo: float, hi: float, dim: int | None = None) -> Tensor:
    """1 where x lies in [lo, hi], NaN where it does not or is NaN (with ``dim``: per pixel, NaN where any
    channel along ``dim`` is invalid, that dim kept at size 1). No host sync."""
    ok = (x >= lo) & (x <= hi)
    if dim is not None:
        ok = ok.all(dim=dim, keepdim=True)
    one = torch.ones((), dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return torch.where(ok, one, torch.full_like(one, math.nan))


def discretized_mix_logistic_nll(x: Tensor, params: Tensor, num_mixtures: int, bits: int, layout: str,
                                 reduction: str) -> Tensor:
    """-dmol_log_prob per pixel, reduced over the pixels (shape: x's without the channel dim); NaN for a
    pixel of x outside [-1, 1]."""
    out_dtype, dt = dtypes(params, x)
    x, params = x.to(dt), params.to(dt)
    nan = invalid_to_nan(x, -1.0, 1.0, 1 if layout == "channels_first" else -1)
    loss = -dmol_log_prob(x * nan, params * nan, num_mixtures, bits, layout)
    return reduce(loss, reduction).to(out_dtype)


def sample_discretized_mix_logistic(params: Tensor, num_mixtures: int, channels: int, layout: str,
                                    generator: torch.Generator | None = None) -> Tensor:
    """openai/vdvae's ``sample_from_discretized_mix_logistic``: a component by Gumbel-max over the logits
    (uniforms in (1e-5, 1 - 1e-5)), a logistic draw per channel, the coefficient chain, each channel clipped
    to [-1, 1] (not rounded to a bin). Returns the image in ``layout``, in params' dtype."""
    if layout == "channels_first":
        params = params.movedim(1, -1)
    out_dtype, dt = dtypes(params, loss=False)
    p = params.to(dt)
    m = num_mixtures
    logits, means, log_scales, coeffs = _unpack(p, m, channels)
    u = torch.rand(logits.shape, dtype=dt, device=p.device, generator=generator) * (1.0 - 2e-5) + 1e-5
    amax = torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)
    sel = F.one_hot(amax, num_classes=m).to(dt).unsqueeze(-2)  # (..., 1, M)
    mean = (means * sel).sum(-1)
    log_scale = (log_scales * sel).sum(-1)
    u = torch.rand(mean.shape, dtype=dt, device=p.device, generator=generator) * (1.0 - 2e-5) + 1e-5
    xs = mean + torch.exp(log_scale) * (torch.log(u) - torch.log(1.0 - u))
    x0 = torch.clamp(xs[..., 0], -1.0, 1.0)
    if channels == 3:
        coeff = (coeffs * sel).sum(-1)
        x1 = torch.clamp(xs[..., 1] + coeff[..., 0] * x0, -1.0, 1.0)
        x2 = torch.clamp(xs[..., 2] + coeff[..., 1] * x0 + coeff[..., 2] * x1, -1.0, 1.0)
        out = torch.stack([x0, x1, x2], dim=-1)
    else:
        out = x0.unsqueeze(-1)
    if layout == "channels_first":
        out = out.movedim(-1, 1)
    return out.to(out_dtype)


def discretized_logistic_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, binsize: float) -> Tensor:
    """openai/iaf's ``discretized_logistic``, per element (no sum): the bin [floor(x / b) b, + b)."""
    scale = torch.exp(log_scale)
    sample = (torch.floor(x / binsize) * binsize - mean) / scale
    return torch.log(torch.sigmoid(sample + binsize / scale) - torch.sigmoid(sample) + 1e-7)


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """DDPM's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, bits: int = 8) -> Tensor:
    """DDPM's ``discretized_gaussian_log_likelihood`` (improved-diffusion's losses.py), per element; the
    half bin 1/255 generalized to 1 / (2^bits - 1)."""
    h = 1.0 / (2.0**bits - 1.0)
    centered_x = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + h))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - h))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -EDGE, log_cdf_plus,
                       torch.where(x > EDGE, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def discretized_logistic_nll(x: Tensor, mean: Tensor, log_scale: Tensor, binsize: float, reduction: str) -> Tensor:
    out_dtype, dt = dtypes(mean, log_scale, x)
    x = x.to(dt)
    nan = invalid_to_nan(x, 0.0, 1.0)
    loss = -discretized_logistic_log_prob(x * nan, mean.to(dt) * nan, log_scale.to(dt) * nan, binsize)
    return reduce(loss, reduction).to(out_dtype)


def discretized_gaussian_nll(x: Tensor, mean: Tensor, log_scale: Tensor, bits: int, reduction: str) -> Tensor:
    out_dtype, dt = dtypes(mean, log_scale, x)
    x = x.to(dt)
    nan = invalid_to_nan(x, -1.0, 1.0)
    loss = -discretized_gaussian_log_prob(x * nan, mean.to(dt) * nan, log_scale.to(dt) * nan, bits)
    return reduce(loss, reduction).to(out_dtype)
