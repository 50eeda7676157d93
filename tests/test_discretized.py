"""Discretized likelihoods: the mixture of logistics (values and gradients against float64, per dtype, layout,
channel count, bits and reduction; against literal transcriptions of openai/vdvae's and NVAE's code), its
sampler (bitwise reproducible, and its histogram against the mixture's bin probabilities by chi-square), the
one-component IAF-VAE logistic and DDPM Gaussian, and in the Triton pass full output coverage and proof
that the kernels (not a fallback) ran."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _launches import count_launches
from _oracle import backward_both, check
from conftest import BACKEND, DEVICE, DTYPES, TOL

import fastvae
from fastvae import reference
from fastvae.reference.discretized import (
    discretized_gaussian_log_prob,
    discretized_logistic_log_prob,
    dmol_log_prob,
)

REDUCTIONS = ["none", "sum", "mean", "batchmean", "per_sample"]
LAYOUTS = ["channels_last", "channels_first"]
triton_only = pytest.mark.skipif(BACKEND != "triton", reason="kernel tests run in the Triton pass")
# fp32 gradients against float64: the centred value x - mu (mu with the AR chain) carries fp32 rounding of
# ~6e-8, amplified by the inverse scale, up to e^7 ~ 1100 at the clamp; the largest gradients are there
# The eager path is the peers' formula, whose fp32 sigmoid(plus) - sigmoid(minus) cancels where the bin is
# narrow against the scale (errors up to ~2e-4 in values, ~1e-3 of the largest gradient, measured); the
# kernels' log-space bin does not (test_kernel_bin_does_not_cancel)
DMOL_TOL = {**TOL, torch.float32: (5e-5, 5e-5) if BACKEND == "triton" else (2e-3, 2e-3)}


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return reference.reduce(x, reduction)


def _images(b, h, w, c, layout, bits=8, dtype=torch.float32):
    """Random pixels on 2^bits levels in [-1, 1], the lowest and highest bins present in every channel."""
    levels = 2**bits - 1
    k = torch.randint(0, levels + 1, (b, h, w, c))
    k[0, 0, 0] = 0
    k[-1, -1, -1] = levels
    x = (k.double() / levels * 2 - 1).to(dtype)
    return (x if layout == "channels_last" else x.permute(0, 3, 1, 2).contiguous()).to(DEVICE)


def _params(b, h, w, c, m, layout, tiny=False):
    """Fresh random mixture params: log scales in [-7.5, 0.5] (some clamped at -7, where most bins hold
    less than 1e-5 and the density branch runs), or all tiny with ``tiny``."""
    m_blocks = [torch.randn(b, h, w, m) * 1.5]
    for _ in range(c):
        m_blocks.append(torch.rand(b, h, w, m) * 1.8 - 0.9)
        ls = torch.rand(b, h, w, m) * 8 - 7.5 if not tiny else torch.rand(b, h, w, m) * 1.0 - 7.3
        m_blocks.append(ls)
        if c == 3:
            m_blocks.append(torch.randn(b, h, w, m))
    p = torch.cat(m_blocks, dim=-1)
    return p if layout == "channels_last" else p.permute(0, 3, 1, 2).contiguous()


def _pair(t: torch.Tensor, dtype: torch.dtype):
    low = t.to(DEVICE).to(dtype)
    return low.clone().requires_grad_(), low.double().requires_grad_()


def _branches(x: torch.Tensor, params: torch.Tensor, m: int, bits: int, layout: str) -> set:
    """Which of the peers' four cases the (float64) inputs exercise."""
    if layout == "channels_first":
        x, params = x.movedim(1, -1), params.movedim(1, -1)
    c = x.shape[-1]
    rest = params[..., m:].reshape(*params.shape[:-1], c, -1)
    ls = rest[..., m:2 * m].clamp(min=-7.0)
    mean = rest[..., :m]
    h = 1.0 / (2**bits - 1)
    xs = x.unsqueeze(-1)
    inv = torch.exp(-ls)
    delta = torch.sigmoid(inv * (xs - mean + h)) - torch.sigmoid(inv * (xs - mean - h))  # ignoring the AR shift
    out = set()
    if (x < -0.999).any():
        out.add("left")
    if (x > 0.999).any():
        out.add("right")
    inner = (xs.abs() < 0.999).expand_as(delta)
    if (inner & (delta > 1e-5)).any():
        out.add("mid")
    if (inner & (delta <= 1e-5)).any():
        out.add("tiny")
    return out


# ------------------------------------------------------------------------------------- mixture: values, grads

DMOL_CASES = [(c, lay) for c in (3, 1) for lay in LAYOUTS]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("channels, layout", DMOL_CASES, ids=[f"c{c}-{lay}" for c, lay in DMOL_CASES])
def test_dmol_matches_float64(dtype, reduction, channels, layout, backend):
    b, h, w, m = 2, 3, 4, 5
    x = _images(b, h, w, channels, layout, dtype=dtype)
    p, p64 = _pair(_params(b, h, w, channels, m, layout), dtype)
    out = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, layout=layout, reduction=reduction,
                                               backend=backend)
    ref = _reduce(-dmol_log_prob(x.double(), p64, m, 8, layout), reduction)
    assert out.shape == ref.shape
    assert _branches(x.double(), p64.detach(), m, 8, layout) == {"left", "right", "mid", "tiny"}
    backward_both(out, ref)
    check(out, ref, dtype, [(p, p64)], tol=DMOL_TOL[dtype])


@pytest.mark.parametrize("bits", [5, 8])
@pytest.mark.parametrize("tiny", [False, True], ids=["scales", "tiny-scales"])
@pytest.mark.parametrize("channels", [3, 1])
def test_dmol_bits_and_tiny_scales(bits, tiny, channels, backend):
    b, h, w, m = 2, 4, 5, 10
    x = _images(b, h, w, channels, "channels_last", bits=bits)
    p, p64 = _pair(_params(b, h, w, channels, m, "channels_last", tiny=tiny), torch.float32)
    out = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, bits=bits, backend=backend)
    ref = -dmol_log_prob(x.double(), p64, m, bits).flatten(1).sum(1)
    backward_both(out, ref)
    check(out, ref, torch.float32, [(p, p64)], tol=DMOL_TOL[torch.float32])


# literal transcriptions of the peers' code (float64, their layouts and conventions), the oracle of the
# reference itself


def vdvae_discretized_mix_logistic_loss(x, lp, low_bit=False):
    """openai/vdvae vae_helpers.py: x (B, H, W, 3) in [-1, 1], lp (B, H, W, 10M); per-sample loss per dim."""
    xs = list(x.shape)
    ls = list(lp.shape)
    nr_mix = int(ls[-1] / 10)
    logit_probs = lp[:, :, :, :nr_mix]
    lp = torch.reshape(lp[:, :, :, nr_mix:], xs + [nr_mix * 3])
    means = lp[:, :, :, :, :nr_mix]
    log_scales = torch.max(lp[:, :, :, :, nr_mix:2 * nr_mix], torch.full_like(means, -7.0))
    coeffs = torch.tanh(lp[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = torch.reshape(x, xs + [1]) + torch.zeros(xs + [nr_mix], dtype=x.dtype, device=x.device)
    m2 = torch.reshape(means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :],
                       [xs[0], xs[1], xs[2], 1, nr_mix])
    m3 = torch.reshape(means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
                       + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :], [xs[0], xs[1], xs[2], 1, nr_mix])
    means = torch.cat([torch.reshape(means[:, :, :, 0, :], [xs[0], xs[1], xs[2], 1, nr_mix]), m2, m3], dim=3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    d = 1.0 / 31.0 if low_bit else 1.0 / 255.0
    plus_in = inv_stdv * (centered_x + d)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - d)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    tail = np.log(15.5) if low_bit else np.log(127.5)
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min,
        torch.where(cdf_delta > 1e-5, torch.log(torch.max(cdf_delta, torch.full_like(cdf_delta, 1e-12))),
                    log_pdf_mid - tail)))
    log_probs = log_probs.sum(dim=3) + torch.log_softmax(logit_probs, -1)
    mixture_probs = torch.logsumexp(log_probs, -1)
    return -1.0 * mixture_probs.sum(dim=[1, 2]) / np.prod(xs[1:])


def nvae_disc_mix_logistic_log_prob(param, samples, num_mix, num_bits=8):
    """NVAE distributions.py DiscMixLogistic.log_prob: param (B, 10M, H, W), samples (B, 3, H, W) in [0, 1]."""
    b, _, hh, ww = param.size()
    logit_probs = param[:, :num_mix, :, :]
    lp = param[:, num_mix:, :, :].view(b, 3, 3 * num_mix, hh, ww)
    means = lp[:, :, :num_mix, :, :]
    log_scales = torch.clamp(lp[:, :, num_mix:2 * num_mix, :, :], min=-7.0)
    coeffs = torch.tanh(lp[:, :, 2 * num_mix:3 * num_mix, :, :])
    max_val = 2.0**num_bits - 1
    samples = 2 * samples - 1.0
    samples = samples.unsqueeze(4).expand(-1, -1, -1, -1, num_mix).permute(0, 1, 4, 2, 3)
    mean1 = means[:, 0, :, :, :]
    mean2 = means[:, 1, :, :, :] + coeffs[:, 0, :, :, :] * samples[:, 0, :, :, :]
    mean3 = means[:, 2, :, :, :] + coeffs[:, 1, :, :, :] * samples[:, 0, :, :, :] \
        + coeffs[:, 2, :, :, :] * samples[:, 1, :, :, :]
    means = torch.cat([mean1.unsqueeze(1), mean2.unsqueeze(1), mean3.unsqueeze(1)], dim=1)
    centered = samples - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / max_val)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered - 1.0 / max_val)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_prob_mid_safe = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-10)),
                                    log_pdf_mid - np.log(max_val / 2))
    log_probs = torch.where(samples < -0.999, log_cdf_plus,
                            torch.where(samples > 0.99, log_one_minus_cdf_min, log_prob_mid_safe))
    log_probs = torch.sum(log_probs, 1) + F.log_softmax(logit_probs, dim=1)
    return torch.logsumexp(log_probs, dim=1)


@pytest.mark.parametrize("bits", [8, 5])
def test_dmol_is_vdvae_term_for_term(bits, backend):
    b, h, w, m = 2, 3, 4, 10
    x = _images(b, h, w, 3, "channels_last", bits=bits).double()
    p64 = _params(b, h, w, 3, m, "channels_last").double().to(DEVICE).requires_grad_()
    theirs = vdvae_discretized_mix_logistic_loss(x, p64, low_bit=bits == 5)
    p = p64.detach().float().requires_grad_()
    ours = fastvae.discretized_mix_logistic_nll(x.float(), p, num_mixtures=m, bits=bits, backend=backend)
    ours_per_dim = ours / (h * w * 3)
    backward_both(ours_per_dim, theirs)
    check(ours_per_dim, theirs, torch.float32, [(p, p64)], tol=DMOL_TOL[torch.float32])
    torch.testing.assert_close(reference.discretized_mix_logistic_nll(x, p64.detach(), m, bits, "channels_last",
                                                                      "per_sample") / (h * w * 3),
                               theirs.detach(), rtol=1e-12, atol=1e-12)


def test_dmol_channels_first_is_nvae(backend):
    """NVAE's layout; its highest-bin test is x > 0.99, which also takes 8-bit bin 254 (0.992) as an edge:
    the images here leave that bin out, where the two agree."""
    b, h, w, m = 2, 3, 4, 10
    x = _images(b, h, w, 3, "channels_first").double()
    x = torch.where((x - 253 / 255).abs() < 1e-9, x - 2 / 255, x)  # bin 254 -> 253
    p64 = _params(b, h, w, 3, m, "channels_first").double().to(DEVICE).requires_grad_()
    theirs = -nvae_disc_mix_logistic_log_prob(p64, (x + 1) / 2, m)
    p = p64.detach().float().requires_grad_()
    ours = fastvae.discretized_mix_logistic_nll(x.float(), p, num_mixtures=m, layout="channels_first",
                                                reduction="none", backend=backend)
    backward_both(ours, theirs)
    check(ours, theirs, torch.float32, [(p, p64)], tol=DMOL_TOL[torch.float32])


def test_dmol_layouts_agree(backend, device):
    b, h, w, m = 2, 3, 5, 4
    x = _images(b, h, w, 3, "channels_last")
    p = _params(b, h, w, 3, m, "channels_last").to(device)
    last = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, reduction="none", backend=backend)
    first = fastvae.discretized_mix_logistic_nll(x.permute(0, 3, 1, 2), p.permute(0, 3, 1, 2), num_mixtures=m,
                                                 layout="channels_first", reduction="none", backend=backend)
    torch.testing.assert_close(first, last, rtol=1e-6, atol=1e-6)


def test_dmol_half_params_fp32_images(backend, device):
    """bf16 / fp16 decoder outputs against fp32 data: fp32 loss, gradients in the params' dtype."""
    b, h, w, m = 2, 3, 4, 5
    x = _images(b, h, w, 3, "channels_last")
    for dtype in (torch.bfloat16, torch.float16):
        p, p64 = _pair(_params(b, h, w, 3, m, "channels_last"), dtype)
        out = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, reduction="batchmean", backend=backend)
        ref = -dmol_log_prob(x.double(), p64, m).sum() / b
        assert out.dtype == torch.float32
        out.backward()
        ref.backward()
        check(out, ref, torch.float32, tol=TOL[torch.float32])
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=TOL[dtype][0],
                                   atol=TOL[dtype][1] * p64.grad.abs().max().item())


def test_bits_per_dim(backend, device):
    b, h, w, m = 2, 3, 4, 5
    x = _images(b, h, w, 3, "channels_last")
    p = _params(b, h, w, 3, m, "channels_last").to(device)
    nll = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, backend=backend)
    bpd = fastvae.bits_per_dim(nll, h * w * 3)
    theirs = vdvae_discretized_mix_logistic_loss(x.double(), p.double()) / math.log(2)
    torch.testing.assert_close(bpd.double(), theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_dims must be in"):
        fastvae.bits_per_dim(nll, 0)


def test_dmol_errors(backend, device):
    x = _images(2, 3, 4, 3, "channels_last")
    p = _params(2, 3, 4, 3, 5, "channels_last").to(device)
    nll = fastvae.discretized_mix_logistic_nll
    with pytest.raises(ValueError, match=r"params has 50 parameters per pixel.*num_mixtures=4.*needs 40"):
        nll(x, p, num_mixtures=4, backend=backend)
    with pytest.raises(ValueError, match=r"num_mixtures=5 with 1 image channel needs 15"):
        nll(x[..., :1], p, num_mixtures=5, backend=backend)
    with pytest.raises(ValueError, match=r"x must have 1 or 3 channels"):
        nll(x[..., :2], p, num_mixtures=5, backend=backend)
    with pytest.raises(ValueError, match=r"layout=channels_first"):
        nll(x, p, num_mixtures=5, layout="channels_first", backend=backend)
    with pytest.raises(ValueError, match=r"must have the same pixels"):
        nll(x[:, :2], p, num_mixtures=5, backend=backend)
    with pytest.raises(ValueError, match=r"layout must be one of"):
        nll(x, p, num_mixtures=5, layout="NHWC", backend=backend)
    with pytest.raises(TypeError, match="num_mixtures must be an int"):
        nll(x, p, num_mixtures=5.0, backend=backend)
    with pytest.raises(ValueError, match="bits must be in"):
        nll(x, p, num_mixtures=5, bits=0, backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        nll(x, p, num_mixtures=5, reduction="avg", backend=backend)
    with pytest.raises(TypeError, match="params must be a torch.Tensor"):
        nll(x, p.tolist(), num_mixtures=5, backend=backend)


def test_module(backend, device):
    x = _images(2, 3, 4, 3, "channels_first")
    p = _params(2, 3, 4, 3, 5, "channels_first").to(device)
    loss = fastvae.nn.DiscretizedMixLogisticNLLLoss(5, layout="channels_first", reduction="sum", backend=backend)
    torch.testing.assert_close(loss(x, p), fastvae.discretized_mix_logistic_nll(
        x, p, num_mixtures=5, layout="channels_first", reduction="sum", backend=backend))
    assert not list(loss.parameters()) and not loss.state_dict()


@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample"])
def test_dmol_empty_batch(reduction, backend, device):
    p = torch.randn(0, 3, 4, 50, device=device, requires_grad=True)
    out = fastvae.discretized_mix_logistic_nll(torch.zeros(0, 3, 4, 3, device=device), p, num_mixtures=5,
                                               reduction=reduction, backend=backend)
    assert out.shape == {"none": (0, 3, 4), "sum": (), "per_sample": (0,)}[reduction]
    out.sum().backward()
    assert p.grad.shape == p.shape and (out == 0).all()


def test_dmol_gradient_of_images_takes_the_eager_path(backend, device):
    x = _images(2, 3, 4, 3, "channels_last").requires_grad_()
    p = _params(2, 3, 4, 3, 5, "channels_last").to(device).requires_grad_()
    fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=5, backend=backend).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()


@triton_only
def test_kernel_bin_does_not_cancel():
    """Wide components (scales e^1..e^3 against a bin of 2/255): fp32 sigmoid(plus) - sigmoid(minus) keeps
    few bits; the kernel's expm1(w) sigmoid(minus) sigmoid(-plus) keeps them all."""
    b, h, w, m = 2, 4, 5, 10
    x = _images(b, h, w, 3, "channels_last")
    p = _params(b, h, w, 3, m, "channels_last")
    for c in range(3):
        p[..., m + 3 * m * c + m:m + 3 * m * c + 2 * m] = torch.rand(b, h, w, m) * 2 + 1
    p = p.to(DEVICE)
    exact = -dmol_log_prob(x.double(), p.double(), m).double()
    kernel = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, reduction="none", backend="triton")
    eager = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, reduction="none", backend="torch")
    err_k = ((kernel.double() - exact).abs() / exact.abs()).max().item()
    err_e = ((eager.double() - exact).abs() / exact.abs()).max().item()
    assert err_k < 1e-6 and err_e > 10 * err_k, (err_k, err_e)


# ----------------------------------------------------------------------------------------------- sampler


def _fixed_mixture(n_pix, channels, layout, m=3):
    """One mixture repeated over n_pix pixels (B = 1, H = 1, W = n_pix)."""
    logits = torch.tensor([0.3, -0.4, 0.8])[:m]
    blocks = [logits]
    for c in range(channels):
        blocks += [torch.tensor([-0.5, 0.1, 0.6])[:m] + 0.1 * c, torch.tensor([-1.5, -1.0, -2.0])[:m]]
        if channels == 3:
            blocks.append(torch.tensor([0.5, -0.3, 0.2])[:m])
    p = torch.cat(blocks).expand(1, 1, n_pix, -1)
    p = p if layout == "channels_last" else p.permute(0, 3, 1, 2)
    return p.contiguous().to(DEVICE)


@pytest.mark.parametrize("channels, layout", [(1, "channels_last"), (3, "channels_first")])
def test_sampler_histogram_matches_bin_probabilities(channels, layout, backend):
    """Channel 0's samples, binned on 3-bit levels, against the mixture's bin probabilities (chi-square).
    Channel 0 is the one whose conditional the likelihood and the sampler share: the sampler's chain uses the
    unrounded x_0, the likelihood the bin's."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n, m, bits = 3000, 3, 3
    p = _fixed_mixture(n, channels, layout, m)
    x = fastvae.sample_discretized_mix_logistic(p, num_mixtures=m, channels=channels, layout=layout,
                                                backend=backend)
    assert x.shape == ((1, 1, n, channels) if layout == "channels_last" else (1, channels, 1, n))
    assert x.abs().max() <= 1.0
    x0 = (x[..., 0] if layout == "channels_last" else x[:, 0]).flatten().double()
    levels = 2**bits - 1
    counts = torch.bincount(torch.round((x0 + 1) / 2 * levels).long(), minlength=levels + 1)
    grid = torch.linspace(-1, 1, levels + 1, dtype=torch.float64)
    one = p.double().cpu().movedim(1, -1) if layout == "channels_first" else p.double().cpu()
    one = one.reshape(-1, one.shape[-1])[0]
    # channel 0's marginal is the one-channel mixture of its logits, means and log scales (channel 0's
    # block comes first; the later channels integrate to 1 per component)
    one = one[:3 * m].expand(levels + 1, 1, 1, -1)
    probs = dmol_log_prob(grid[:, None, None, None], one, m, bits).exp().flatten()
    assert abs(probs.sum().item() - 1) < 1e-6
    stat = scipy_stats.chisquare(counts.cpu().double().numpy(), (probs * n).numpy())
    assert stat.pvalue > 1e-3, (counts, probs * n)


def test_sampler_is_reproducible(backend, device):
    p = _params(2, 3, 4, 3, 5, "channels_last").to(device)
    draw = fastvae.sample_discretized_mix_logistic
    gen = torch.Generator(device=device)
    a = draw(p, num_mixtures=5, generator=gen.manual_seed(7), backend=backend)
    b = draw(p, num_mixtures=5, generator=gen.manual_seed(7), backend=backend)
    c = draw(p, num_mixtures=5, generator=gen, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = draw(p, num_mixtures=5, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(d, draw(p, num_mixtures=5, backend=backend))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampler_follows_the_chain(layout, backend, device):
    """One dominant component with the smallest scale: the sample is its means through the coefficient chain
    (tanh'd), clipped, to within the logistic noise (|e^-7 log(u / (1 - u))| < 0.011)."""
    b, h, w, m = 2, 3, 4, 4
    p = _params(b, h, w, 3, m, "channels_last")
    chosen = torch.randint(0, m, (b, h, w))
    logits = torch.full((b, h, w, m), -60.0).scatter(-1, chosen[..., None], 60.0)
    p[..., :m] = logits
    for c in range(3):
        p[..., m + 3 * m * c + m:m + 3 * m * c + 2 * m] = -9.0
    pick = lambda j: p[..., j:j + m].gather(-1, chosen[..., None])[..., 0]  # noqa: E731
    mean = [pick(m + 3 * m * c) for c in range(3)]
    coef = [torch.tanh(pick(m + 3 * m * c + 2 * m)) for c in range(3)]
    x0 = mean[0].clamp(-1, 1)
    x1 = (mean[1] + coef[0] * x0).clamp(-1, 1)
    x2 = (mean[2] + coef[1] * x0 + coef[2] * x1).clamp(-1, 1)
    expect = torch.stack([x0, x1, x2], -1)
    if layout == "channels_first":
        p, expect = p.permute(0, 3, 1, 2).contiguous(), expect.permute(0, 3, 1, 2)
    out = fastvae.sample_discretized_mix_logistic(p.to(device), num_mixtures=m, layout=layout, backend=backend)
    # three channels' noise accumulates through the chain (|coef| < 1)
    torch.testing.assert_close(out.cpu(), expect, rtol=0, atol=0.04)


def test_sampler_errors(backend, device):
    p = _params(2, 3, 4, 3, 5, "channels_last").to(device)
    draw = fastvae.sample_discretized_mix_logistic
    with pytest.raises(ValueError, match="needs 40"):
        draw(p, num_mixtures=4, backend=backend)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        draw(p, num_mixtures=5, channels=2, backend=backend)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        draw(p, num_mixtures=5, generator=7, backend=backend)


# ------------------------------------------------------------------------------------------ one component

ONE_KINDS = ["logistic", "gaussian"]


def _one_component(kind, shape, dtype, tiny=False):
    """Random images and parameters. The eager path is the peers' formula, whose fp32 CDF differences cancel
    to nothing (and are floored) for narrow components away from x, where float64 still resolves them:
    on the torch pass the scales stay wide (e^-2 and up) and the means within a few scales of x, on the
    Triton pass scales go down to e^-6 and means anywhere."""
    if kind == "logistic":  # IAF-VAE: x in [0, 1] on 256 levels
        x = (torch.randint(0, 256, shape).double() / 256).to(dtype)
        mean = torch.rand(shape) * 1.2 - 0.1
    else:  # DDPM: x in [-1, 1] on 256 levels, both edges present
        k = torch.randint(0, 256, shape)
        k.view(-1)[0], k.view(-1)[-1] = 0, 255
        x = (k.double() / 255 * 2 - 1).to(dtype)
        mean = torch.rand(shape) * 2.2 - 1.1
    lo, hi = (-6.0, -1.0) if BACKEND == "triton" else (-2.0, 0.5)
    ls = lo + (hi - lo) * torch.rand(shape) if not tiny else torch.rand(shape) * 2 - 9
    if BACKEND != "triton":
        mean = x.float() + torch.randn(shape).clamp(-2, 2) * ls.exp()
    return x.to(DEVICE), _pair(mean, dtype), _pair(ls, dtype)


def _one_ref(kind, x, mean, ls):
    if kind == "logistic":
        return -discretized_logistic_log_prob(x, mean, ls, 1.0 / 256)
    return -discretized_gaussian_log_prob(x, mean, ls)


def _one_fn(kind):
    return fastvae.discretized_logistic_nll if kind == "logistic" else fastvae.discretized_gaussian_nll


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ONE_KINDS)
def test_one_component_matches_float64(dtype, reduction, kind, backend):
    shape = (3, 2, 5, 7)
    x, (mean, mean64), (ls, ls64) = _one_component(kind, shape, dtype)
    out = _one_fn(kind)(x, mean, ls, reduction=reduction, backend=backend)
    ref = _reduce(_one_ref(kind, x.double(), mean64, ls64), reduction)
    assert out.shape == ref.shape
    backward_both(out, ref)
    check(out, ref, dtype, [(mean, mean64), (ls, ls64)], tol=DMOL_TOL[dtype])


@pytest.mark.parametrize("shapes", [((2, 3, 4), (3, 1), (1,)), ((3, 1), (2, 3, 4), (4,)), ((2, 1, 4), (1, 3, 1), ())],
                         ids=["params-broadcast", "x-broadcast", "all-broadcast"])
@pytest.mark.parametrize("kind", ONE_KINDS)
def test_one_component_broadcasts(kind, shapes, backend):
    """x, mean and log_scale broadcast together as the formula's elementwise ops do (a per-channel scale, a
    shared image): the loss has the broadcast shape, each gradient its input's, the float64 numbers."""
    sx, sm, ss = shapes
    full = _checks_broadcast(sx, sm, ss)
    levels = 256 if kind == "logistic" else 255
    x = torch.randint(0, 256, sx).double() / levels
    x = (x if kind == "logistic" else x * 2 - 1).float().to(DEVICE)
    # scales e^-0.5 and up: the eager fp32 formula resolves every bin (its means cannot follow a broadcast x)
    mean, mean64 = _pair(torch.rand(sm) * 2.2 - 1.1, torch.float32)
    ls, ls64 = _pair(torch.rand(ss) * 1.5 - 0.5, torch.float32)
    out = _one_fn(kind)(x, mean, ls, reduction="none", backend=backend)
    ref = _one_ref(kind, x.double(), mean64, ls64)
    assert out.shape == ref.shape == full
    backward_both(out, ref)
    check(out, ref, torch.float32, [(mean, mean64), (ls, ls64)], tol=DMOL_TOL[torch.float32])
    assert mean.grad.shape == sm and ls.grad.shape == ss


def _checks_broadcast(*shapes):
    from fastvae._checks import broadcast_shapes

    return tuple(broadcast_shapes(*shapes))


@triton_only
@pytest.mark.parametrize("kind", ONE_KINDS)
def test_one_component_floors_and_tiny_scales(kind, backend):
    """Scales down to e^-9: IAF's + 1e-7 and DDPM's 1e-12 floors (and their zero gradients) take over; the
    kernel resolves the bins float64 resolves (the eager fp32 formula floors many more)."""
    x, (mean, mean64), (ls, ls64) = _one_component(kind, (4, 3, 6, 6), torch.float32, tiny=True)
    ref_elem = _one_ref(kind, x.double(), mean64, ls64)
    floor = -math.log(1e-7) if kind == "logistic" else -math.log(1e-12)
    assert (ref_elem.detach() > floor - 1e-3).any() and (ref_elem.detach() < floor - 1).any()
    out = _one_fn(kind)(x, mean, ls, reduction="none", backend=backend)
    backward_both(out, ref_elem)
    check(out, ref_elem, torch.float32, [(mean, mean64), (ls, ls64)], tol=DMOL_TOL[torch.float32])


def test_one_component_errors(backend, device):
    x = torch.rand(2, 3, device=device)
    m, s = torch.rand(2, 3, device=device), torch.rand(2, 3, device=device)
    with pytest.raises(ValueError, match=r"log_scale of shape \(2, 2\) does not broadcast"):
        fastvae.discretized_gaussian_nll(x, m, s[:, :2], backend=backend)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(3\) must match the size of tensor b \(2\)"):
        fastvae.discretized_logistic_nll(x, m[:, :2], s, backend=backend)
    with pytest.raises(ValueError, match="binsize must be a number > 0"):
        fastvae.discretized_logistic_nll(x, m, s, binsize=0.0, backend=backend)


# ------------------------------------------------------------------------------------- Triton pass only


@pytest.fixture
def launches():
    with count_launches("dmol_fwd_kernel", "dmol_sample_kernel", "discretized_fwd_kernel") as counts:
        yield counts


# (B, H, W, M): one pixel, rows shorter than a program's tile, rows spanning tiles (35 pixels a row against
# 16 a program at M = 10)
COVER_SIZES = [(1, 1, 1, 1), (2, 1, 3, 3), (3, 5, 7, 10)]


@triton_only
@pytest.mark.parametrize("size", COVER_SIZES, ids=["x".join(map(str, s)) for s in COVER_SIZES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "per_sample"])
def test_dmol_writes_every_element_and_takes_the_kernel(poisoned, launches, size, layout, reduction):
    b, h, w, m = size
    x = _images(b, h, w, 3, layout)
    p, p64 = _pair(_params(b, h, w, 3, m, layout), torch.float32)
    out = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, layout=layout, reduction=reduction,
                                               backend="triton")
    ref = _reduce(-dmol_log_prob(x.double(), p64, m, 8, layout), reduction)
    backward_both(out, ref)
    assert launches["dmol_fwd_kernel"] == 1, launches
    assert torch.isfinite(out).all() and torch.isfinite(p.grad).all(), "an element was never written"
    check(out, ref, torch.float32, [(p, p64)], tol=DMOL_TOL[torch.float32])
    s = fastvae.sample_discretized_mix_logistic(p, num_mixtures=m, layout=layout, backend="triton")
    assert launches["dmol_sample_kernel"] == 1 and torch.isfinite(s).all() and s.abs().max() <= 1


@triton_only
@pytest.mark.parametrize("kind", ONE_KINDS)
@pytest.mark.parametrize("shape", [(1,), (7, 3), (3, 1001)])
def test_one_component_writes_every_element_and_takes_the_kernel(poisoned, launches, kind, shape):
    x, (mean, mean64), (ls, ls64) = _one_component(kind, shape, torch.float32)
    out = _one_fn(kind)(x, mean, ls, reduction="per_sample", backend="triton")
    ref = _reduce(_one_ref(kind, x.double(), mean64, ls64), "per_sample")
    backward_both(out, ref)
    assert launches["discretized_fwd_kernel"] == 1, launches
    assert torch.isfinite(mean.grad).all() and torch.isfinite(ls.grad).all()
    check(out, ref, torch.float32, [(mean, mean64), (ls, ls64)], tol=DMOL_TOL[torch.float32])


@triton_only
def test_autocast_and_compile_take_the_kernel(launches):
    b, h, w, m = 2, 3, 4, 5
    x = _images(b, h, w, 3, "channels_last")
    p = _params(b, h, w, 3, m, "channels_last").to(DEVICE).requires_grad_()

    def step(p):
        return fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, reduction="batchmean", backend="triton")

    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = step(p.to(torch.bfloat16))
    assert out.dtype == torch.float32
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    results = []
    for fn in (step, compiled):
        leaf = p.detach().clone().requires_grad_()
        loss = fn(leaf)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0], results[1])
    assert launches["dmol_fwd_kernel"] == 3


@triton_only
def test_reductions_are_deterministic():
    x = _images(2, 4, 8, 3, "channels_last")
    p = _params(2, 4, 8, 3, 10, "channels_last").to(DEVICE)
    a = [fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=10, reduction="sum", backend="triton")
         for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_trainer_dmol(tmp_path, backend):
    """--likelihood dmol on the digits (8-bit, one channel): the decoder gives the mixture's params, the
    fused NLL is the ELBO's reconstruction term (the kernel on the Triton pass), bits/dim are reported."""
    for mod in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(mod)
    import json

    from fastvae import train

    argv = ["--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--latent-dim", "4", "--likelihood",
            "dmol", "--num-mixtures", "2", "--device", torch.device(DEVICE).type, "--out", str(tmp_path),
            "--backend", backend]
    with count_launches() as counts:
        assert train.main(argv) == 0
    if BACKEND == "triton":
        assert counts["dmol_fwd_kernel"] > 0
    (line,) = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # 64 pixels of 8 bits: a useful model is well under 8 bits/dim, and no likelihood of a bin exceeds 1
    assert 0 < line["test_bpd"] < 8 and line["test_elbo"] < 0
    assert line["test_bpd"] == pytest.approx(-line["test_elbo"] / (64 * math.log(2)))


# ------------------------------------------ drop-in behaviour: invalid images, second order, torch.func,
# ------------------------------------------ compile, no host sync, strides, 64-bit offsets, GPU special functions

MIX_M = 2


def _family_inputs(family: str, dtype=torch.float32, tiny: bool = False):
    """(x, [differentiable inputs]) of one small problem of each op (``tiny``: two pixels, for
    gradgradcheck's numerical Jacobians)."""
    g = torch.Generator().manual_seed(11)
    if family.startswith("dmol"):
        layout = "channels_first" if family.endswith("first") else "channels_last"
        c = 1 if family.endswith("first") else 3
        b, h, w = (1, 1, 2) if tiny else (2, 2, 3)
        k = torch.randint(0, 256, (b, h, w, c), generator=g)
        k[0, 0, 0] = 0
        k[-1, -1, -1] = 255
        x = k.double() / 255 * 2 - 1
        blocks = [torch.randn(b, h, w, MIX_M, generator=g)]
        for _ in range(c):  # scales e^-3..e^0 and means near x: every bin's probability well above 1e-5
            blocks += [torch.rand(b, h, w, MIX_M, generator=g) * 1.6 - 0.8,
                       torch.rand(b, h, w, MIX_M, generator=g) * 3 - 3]
            if c == 3:
                blocks.append(torch.randn(b, h, w, MIX_M, generator=g))
        p = torch.cat(blocks, -1).double()
        if layout == "channels_first":
            x, p = x.permute(0, 3, 1, 2).contiguous(), p.permute(0, 3, 1, 2).contiguous()
        return x.to(DEVICE, dtype), [p.to(DEVICE, dtype)]
    shape = (1, 3) if tiny else (2, 5)
    if family == "logistic":
        x = torch.randint(0, 256, shape, generator=g).double() / 256
        mean = x + 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        k = torch.randint(0, 256, shape, generator=g)
        k[0, 0], k[-1, -1] = 0, 255
        x = k.double() / 255 * 2 - 1
        mean = x + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    ls = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 4
    return x.to(DEVICE, dtype), [mean.to(DEVICE, dtype), ls.to(DEVICE, dtype)]


def _family_loss(family: str, x, *ts, backend=None, reduction="sum"):
    if family.startswith("dmol"):
        layout = "channels_first" if family.endswith("first") else "channels_last"
        return fastvae.discretized_mix_logistic_nll(x, ts[0], num_mixtures=MIX_M, layout=layout,
                                                    reduction=reduction, backend=backend)
    return _one_fn(family)(x, *ts, reduction=reduction, backend=backend)


FAMILIES = ["dmol-last", "dmol-first", "logistic", "gaussian"]


def _close_eager(a, e):
    """a (fp32) against the float64 formula, within the eager fp32 formula's cancellation (DMOL_TOL's torch
    pass tolerance, atol relative to the largest magnitude): the create_graph gradients are the eager
    formula's on either path."""
    scale = max(1.0, e.detach().abs().max().item()) if e.numel() else 1.0
    torch.testing.assert_close(a.detach().double(), e.detach(), rtol=2e-3, atol=2e-3 * scale)


@pytest.fixture
def validate_setting():
    yield fastvae.set_default_validate_args
    fastvae.set_default_validate_args(None)


def _bad_mask(family: str, x: torch.Tensor) -> tuple:
    """(x with one element above the range and one NaN, the loss elements they spoil)."""
    x = x.clone()
    if family.startswith("dmol"):
        cdim = 1 if family.endswith("first") else -1
        xl = x.movedim(cdim, -1)
        xl[0, 0, 1, -1] = 1.5
        xl[1, 1, 2, 0] = float("nan")
        bad = torch.zeros(xl.shape[:-1], dtype=torch.bool, device=x.device)
        bad[0, 0, 1] = bad[1, 1, 2] = True
        return x, bad
    x[0, 1] = 1.5
    x[1, 3] = float("nan")
    bad = torch.zeros_like(x, dtype=torch.bool)
    bad[0, 1] = bad[1, 3] = True
    return x, bad


@pytest.mark.parametrize("family", FAMILIES)
def test_invalid_images_give_nan_and_raise_only_when_validating(family, backend, validate_setting):
    """An image outside its range, or NaN: the loss of its pixel and every gradient of that pixel's
    parameters are NaN, the rest is the float64 formula's (no device assert, no host read); the ValueError
    only with set_default_validate_args(True), the same on both backends."""
    x, ts = _family_inputs(family)
    x_bad, bad = _bad_mask(family, x)
    leaves = [t.clone().requires_grad_() for t in ts]
    out = _family_loss(family, x_bad, *leaves, backend=backend, reduction="none")
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert torch.equal(out.isnan(), bad)
    grads = torch.autograd.grad(_family_loss(family, x_bad, *leaves, backend=backend, reduction="sum"), leaves)
    assert all(g.isnan().any() for g in grads)
    x_ok = torch.where(x_bad.isnan() | (x_bad.abs() > 1), x, x_bad)
    leaves64 = [t.double().requires_grad_() for t in ts]
    ref = _family_loss(family, x_ok.double(), *leaves64, backend="torch", reduction="none")
    grads64 = torch.autograd.grad(ref.sum(), leaves64)
    _close_eager(out[~bad], ref[~bad])
    cdim = (1 if family.endswith("first") else -1) if family.startswith("dmol") else None
    for g, g64 in zip(grads, grads64):
        spoilt = bad if cdim is None else bad.unsqueeze(cdim).expand_as(g)
        assert torch.equal(g.isnan(), spoilt)
        _close_eager(g[~spoilt], g64[~spoilt])
    validate_setting(True)
    lo = "0" if family == "logistic" else "-1"
    with pytest.raises(ValueError, match=rf"x must lie in \[{lo}, 1\]"):
        _family_loss(family, x_bad, *ts, backend=backend)
    _family_loss(family, x, *ts, backend=backend)  # valid images pass the check


def test_nan_log_scale_is_not_clamped_away(backend):
    """A NaN log scale falls through the clamp at -7 (a GPU's max() would return -7): NaN loss there."""
    x, (p,) = _family_inputs("dmol-last")
    p = p.clone()
    p[0, 1, 2, MIX_M + MIX_M] = float("nan")  # channel 0's first log scale of one pixel
    out = _family_loss("dmol-last", x, p, backend=backend, reduction="none")
    expect = torch.zeros_like(out, dtype=torch.bool)
    expect[0, 1, 2] = True
    assert torch.equal(out.isnan(), expect)


def _grad_of_grad(family, x, ts, backend, vs):
    leaves = [t.detach().clone().requires_grad_() for t in ts]
    grads = torch.autograd.grad(_family_loss(family, x, *leaves, backend=backend), leaves, create_graph=True)
    second = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), leaves)
    return grads, second


@pytest.mark.parametrize("family", FAMILIES)
def test_second_order(family, backend):
    """create_graph=True gives the float64 formula's second-order numbers on the call's path (the kernels'
    forward, the eager formula's differentiable backward); the plain backward agrees with the create_graph
    one; gradgradcheck on the float64 eager path."""
    x, ts = _family_inputs(family)
    vs = [torch.randn_like(t) for t in ts]
    grads, second = _grad_of_grad(family, x, ts, backend, vs)
    grads64, second64 = _grad_of_grad(family, x.double(), [t.double() for t in ts], "torch",
                                      [v.double() for v in vs])
    for a, e in zip(grads + second, grads64 + second64):
        assert a.dtype == torch.float32
        _close_eager(a, e)
    leaves = [t.clone().requires_grad_() for t in ts]
    plain = torch.autograd.grad(_family_loss(family, x, *leaves, backend=backend), leaves)
    for a, e in zip(plain, grads):
        _close_eager(a, e.double())
    if BACKEND == "torch":
        x64, small = _family_inputs(family, torch.float64, tiny=True)
        small = [t.requires_grad_() for t in small]
        assert torch.autograd.gradgradcheck(lambda *t: _family_loss(family, x64, *t, backend="torch"), small,
                                            fast_mode=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_func(family, backend):
    """torch.func.grad (the eager path, whatever the backend) gives autograd's gradient; vmap over a stack of
    problems gives each one's value."""
    x, ts = _family_inputs(family)
    argnums = tuple(range(len(ts)))
    grads = torch.func.grad(lambda *t: _family_loss(family, x, *t, backend=backend), argnums=argnums)(*ts)
    leaves = [t.clone().requires_grad_() for t in ts]
    expect = torch.autograd.grad(_family_loss(family, x, *leaves, backend="torch"), leaves)
    for a, e in zip(grads, expect):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    stacks = [torch.stack([t, t * 0.9]) for t in ts]
    batched = torch.func.vmap(lambda *t: _family_loss(family, x, *t, backend=backend))(*stacks)
    each = torch.stack([_family_loss(family, x, *(s[k] for s in stacks), backend="torch") for k in range(2)])
    torch.testing.assert_close(batched, each, rtol=1e-5, atol=1e-6)


def _every_op(x3, p, xl, mean, ls, xg, backend):
    """One call of each public op of the family."""
    nll = fastvae.discretized_mix_logistic_nll(x3, p, num_mixtures=MIX_M, reduction="batchmean", backend=backend)
    s = fastvae.sample_discretized_mix_logistic(p, num_mixtures=MIX_M, backend=backend)
    a = fastvae.discretized_logistic_nll(xl, mean, ls, reduction="sum", backend=backend)
    b = fastvae.discretized_gaussian_nll(xg, mean, ls, reduction="mean", backend=backend)
    return nll + a + b + fastvae.bits_per_dim(nll, 12), s


def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) through every public op (no graph break: no host read; the sampler's key
    drawn on the device) gives the uncompiled numbers, gradients and (same seed) samples."""
    x3, (p,) = _family_inputs("dmol-last")
    xl, (mean, ls) = _family_inputs("logistic")
    xg, _ = _family_inputs("gaussian")
    compile_backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(_every_op, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (_every_op, compiled):
        leaves = [t.clone().requires_grad_() for t in (p, mean, ls)]
        torch.manual_seed(9)
        loss, s = fn(x3, leaves[0], xl, leaves[1], leaves[2], xg, backend)
        results.append((loss.detach(), s, *torch.autograd.grad(loss, leaves)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_host_sync(family, backend, no_host_reads):
    """Forward, backward and the sampler read nothing back at the default validation setting (no torch
    twin checks these formulas' images)."""
    x, ts = _family_inputs(family)
    leaves = [t.requires_grad_() for t in ts]
    _family_loss(family, x, *leaves, backend=backend).backward()
    if family.startswith("dmol"):
        fastvae.sample_discretized_mix_logistic(ts[0], num_mixtures=MIX_M, channels=x.shape[-1 if
                                                family.endswith("last") else 1],
                                                layout="channels_first" if family.endswith("first")
                                                else "channels_last", backend=backend)


# strided forms of the mixture's inputs: (name, layout, x, params) from contiguous channels-last x, params
def _strided_mixtures():
    g = torch.Generator().manual_seed(12)
    b, h, w, m = 2, 3, 4, 2
    p_last = torch.cat([torch.randn(b, h, w, m, generator=g)]
                       + [torch.cat([torch.rand(b, h, w, m, generator=g) * 1.6 - 0.8,
                                     torch.rand(b, h, w, m, generator=g) * 3 - 3,
                                     torch.randn(b, h, w, m, generator=g)], -1) for _ in range(3)], -1)
    x_last = (torch.randint(0, 256, (b, h, w, 3), generator=g).double() / 255 * 2 - 1).float()
    p_first, x_first = p_last.permute(0, 3, 1, 2), x_last.permute(0, 3, 1, 2)
    wide = torch.randn(b, 10 * m + 5, h, w, generator=g)
    wide[:, :10 * m] = p_first
    return [
        # VDVAE: a (B, P, H, W) conv output permuted to (B, H, W, P)
        ("permuted", "channels_last", x_last, p_first.contiguous().permute(0, 2, 3, 1)),
        # NVAE's layout in the channels_last memory format
        ("nhwc-memory", "channels_first", x_first.contiguous(memory_format=torch.channels_last),
         p_first.contiguous(memory_format=torch.channels_last)),
        # the params a chunk of a wider output
        ("chunk", "channels_first", x_first.contiguous(), wide[:, :10 * m]),
    ]


@pytest.fixture
def allocations(monkeypatch):
    """(numel of every kernel buffer allocated, shapes of every tensor .contiguous() copied)."""
    from fastvae._triton import common

    allocs, copies = [], []
    alloc, contiguous = common.alloc, torch.Tensor.contiguous

    def counting_alloc(like, shape, dtype=None):
        out = alloc(like, shape, dtype)
        allocs.append(out.numel())
        return out

    def counting_contiguous(self, *args, **kwargs):
        out = contiguous(self, *args, **kwargs)
        if out.data_ptr() != self.data_ptr():
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(common, "alloc", counting_alloc)
    monkeypatch.setattr(torch.Tensor, "contiguous", counting_contiguous)
    return allocs, copies


STRIDED = [c[0] for c in _strided_mixtures()]


@pytest.mark.parametrize("reduction, dtype", [("none", torch.float32), ("per_sample", torch.float32),
                                              ("none", torch.float16), ("sum", torch.bfloat16)])
@pytest.mark.parametrize("case", STRIDED)
def test_strided_mixture_is_read_in_place(case, reduction, dtype, backend, request):
    """VDVAE's permuted params, NVAE's layout in channels_last memory, a chunk of a wider output: the values
    and gradients of contiguous copies; on the kernel path with no copy of x or params, one params-sized
    allocation (the gradient; fp16's is kept in fp32 and converted into a second) and the gradient (and
    the sample) in the params' dim order."""
    name, layout, x, p = next(c for c in _strided_mixtures() if c[0] == case)
    x, p = x.to(DEVICE), p.to(DEVICE, dtype)
    expect_leaf = p.detach().contiguous().requires_grad_()
    expect = fastvae.discretized_mix_logistic_nll(x.contiguous(), expect_leaf, num_mixtures=2, layout=layout,
                                                  reduction=reduction, backend=backend)
    go = torch.rand_like(expect) + 0.5
    (expect_grad,) = torch.autograd.grad(expect, expect_leaf, go)
    torch.manual_seed(4)
    expect_sample = fastvae.sample_discretized_mix_logistic(p.contiguous(), num_mixtures=2, layout=layout,
                                                            backend=backend)
    allocs, copies = request.getfixturevalue("allocations") if BACKEND == "triton" else ([], [])
    src = p.detach().requires_grad_()  # the same strides
    out = fastvae.discretized_mix_logistic_nll(x, src, num_mixtures=2, layout=layout, reduction=reduction,
                                               backend=backend)
    (grad,) = torch.autograd.grad(out, src, go)
    torch.manual_seed(4)
    sample = fastvae.sample_discretized_mix_logistic(p, num_mixtures=2, layout=layout, backend=backend)
    if BACKEND == "triton":
        from fastvae._triton import common

        assert not copies, copies
        grads = [p.numel()] * (2 if dtype == torch.float16 else 1)
        assert sorted(n for n in allocs if n >= x.numel()) == [x.numel(), *grads], allocs  # sample, grad
        order = lambda t: sorted(range(t.dim()), key=lambda d: -t.stride(d))  # noqa: E731
        assert order(grad) == order(src) and common.dense(grad)
        assert order(sample) == order(src)
    # the kernels do the same arithmetic per pixel whatever the strides; autograd's eager sums may reorder
    # (an ulp of a 16-bit gradient on the eager pass)
    tol = dict(rtol=0, atol=0) if BACKEND == "triton" else dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 \
        else dict(zip(("rtol", "atol"), TOL[dtype]))
    torch.testing.assert_close(out, expect, **tol)
    torch.testing.assert_close(grad, expect_grad, **tol)
    assert torch.equal(sample, expect_sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "per_sample"])
@pytest.mark.parametrize("kind", ONE_KINDS)
def test_one_component_channels_last_is_read_in_place(kind, reduction, dtype, backend, request):
    """x, mean and log_scale in the channels_last memory format: walked in memory order, no copy, outputs
    and gradients channels_last (fp16's gradients too, kept in fp32 until grad_output), the values of
    contiguous copies."""
    x, (mean, _), (ls, _) = _one_component(kind, (2, 3, 2, 2), dtype)
    x, mean, ls = (t.detach().contiguous(memory_format=torch.channels_last) for t in (x, mean, ls))
    expect_leaves = [t.contiguous().requires_grad_() for t in (mean, ls)]
    expect = _one_fn(kind)(x.contiguous(), *expect_leaves, reduction=reduction, backend=backend)
    go = (torch.rand_like(expect) + 0.5)
    go = go.contiguous(memory_format=torch.channels_last) if go.dim() == 4 else go
    expect_grads = torch.autograd.grad(expect, expect_leaves, go)
    allocs, copies = request.getfixturevalue("allocations") if BACKEND == "triton" else ([], [])
    leaves = [t.detach().requires_grad_() for t in (mean, ls)]
    out = _one_fn(kind)(x, *leaves, reduction=reduction, backend=backend)
    grads = torch.autograd.grad(out, leaves, go)
    if BACKEND == "triton":
        assert not copies, copies
        assert all(g.stride() == mean.stride() for g in grads)
        if reduction == "none":
            assert out.stride() == x.stride()
    # per element the same arithmetic; a per-sample sum runs in memory order, a contiguous copy's in its own
    exact = BACKEND == "triton" and reduction == "none"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-5) if dtype == torch.float32 \
        else dict(zip(("rtol", "atol"), TOL[dtype]))
    torch.testing.assert_close(out, expect, **tol)
    for a, e in zip(grads, expect_grads):
        torch.testing.assert_close(a, e, **tol)


class _Spy:
    """A kernel's launcher that records each launch's keyword arguments."""

    def __init__(self, fn, seen):
        self._fn, self._seen = fn, seen

    def __getitem__(self, grid):
        launch = self._fn[grid]

        def run(*args, **kwargs):
            self._seen.append(kwargs)
            return launch(*args, **kwargs)

        return run


@triton_only
def test_int64_offsets_give_the_same_numbers(monkeypatch):
    """Offsets are int64 (WIDE) only when one could pass int32 (a channels-first image of 2^31 / (10 M)
    pixels already does): forced on for small tensors, every kernel of the family (the mixture on every
    strided form, the sampler, both one-component kinds) gives the int32 launch's numbers bit for bit."""
    from fastvae._triton import discretized as disc_op

    def run():
        outs = []
        for _, layout, x, p in _strided_mixtures():
            leaf = p.detach().clone().requires_grad_()
            for reduction in ("none", "per_sample"):
                out = fastvae.discretized_mix_logistic_nll(x, leaf, num_mixtures=2, layout=layout,
                                                           reduction=reduction, backend="triton")
                outs += [out, *torch.autograd.grad(out.sum(), leaf)]
            torch.manual_seed(2)
            outs.append(fastvae.sample_discretized_mix_logistic(p, num_mixtures=2, layout=layout,
                                                                backend="triton"))
        for kind in ONE_KINDS:
            x, ts = _family_inputs(kind)
            leaves = [t.requires_grad_() for t in ts]
            out = _family_loss(kind, x, *leaves, backend="triton", reduction="none")
            outs += [out, *torch.autograd.grad(out.sum(), leaves)]
        return outs

    narrow = run()
    seen = []
    disc_k = disc_op.disc_k
    for name in ("dmol_fwd_kernel", "dmol_sample_kernel", "discretized_fwd_kernel"):
        monkeypatch.setattr(disc_k, name, _Spy(getattr(disc_k, name), seen))
    monkeypatch.setattr(disc_op, "INT32_OFFSETS", 0)
    wide = run()
    assert len(seen) == 3 * 3 + 2 and all(kw["WIDE"] for kw in seen)
    for a, b in zip(narrow, wide):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_int64_offsets_chosen_from_the_extent():
    """The host picks WIDE from the largest element offset: a 3-channel image of 3000^2 pixels with M = 10
    channels first keeps int32 (params' last offset 100 x 9e6 - 1), 5000^2 pixels pass 2^31 in the params
    (k * spatial in the old kernel wrapped there) and take int64; a permuted params' strides count, not its
    shape (metadata only: meta tensors)."""
    pytest.importorskip("triton")
    from fastvae._triton.discretized import _int64_offsets

    meta = dict(device="meta")
    small = torch.empty(1, 100, 3000, 3000, **meta)
    assert not _int64_offsets(9_000_000 + 64, torch.empty(1, 3, 3000, 3000, **meta), small)
    big = torch.empty(1, 100, 5000, 5000, **meta)
    assert _int64_offsets(25_000_000 + 64, torch.empty(1, 3, 5000, 5000, **meta), big)
    assert _int64_offsets(25_000_000 + 64, big.permute(0, 2, 3, 1))
    assert _int64_offsets(2**31) and not _int64_offsets(2**31 - 1)  # the index bound itself (pixels, counters)


@triton_only
def test_sampler_key_uses_all_64_bits():
    """Two keys that differ only in their high 32 bits draw different samples (Philox's second key word)."""
    from fastvae._triton.discretized import _dmol_sample_op

    p = _fixed_mixture(64, 3, "channels_last")
    lo = torch.tensor([12345], dtype=torch.int64, device=DEVICE)
    a = _dmol_sample_op(p, lo, 3, 3, False)
    b = _dmol_sample_op(p, lo + (1 << 32), 3, 3, False)
    assert torch.equal(a, _dmol_sample_op(p, lo.clone(), 3, 3, False)) and not torch.equal(a, b)


def _extreme_check(out, ref, pairs):
    """Finite, and close to float64: the kernels' terms are exact functions of fp32 inputs up to a few ulps
    of the largest term (|log scale| up to 100, |logit| up to 1e4 here: ~1e-5 relative to that size), and a
    flushed exponential changes a term by < 2^-126, so rtol 1e-5 with atol 1e-5 of the largest magnitude."""
    assert torch.isfinite(out).all()
    scale = max(1.0, ref.detach().abs().max().item())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5 * scale)
    for a, e in pairs:
        assert torch.isfinite(a.grad).all()
        scale = max(1.0, e.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=1e-5, atol=1e-5 * scale)


@triton_only
def test_mixture_extremes_under_gpu_math(gpu_math):
    """Logits spread by thousands (softmax terms far below fp32's normals), log scales up to 100 (e^-s
    subnormal or zero: the density branch), coefficients at +-40 (tanh saturated, 1 - tanh^2 ~ 1e-35): the
    float64 formula's loss and gradients, all finite, with the GPU's flushing exp/log."""
    b, h, w, m = 2, 2, 3, 4
    x = _images(b, h, w, 3, "channels_last")
    p = _params(b, h, w, 3, m, "channels_last")
    p[..., :m] = torch.randn(b, h, w, m) * 2000
    for c in range(3):
        base = m + 3 * m * c
        p[..., base + m:base + 2 * m] = torch.tensor([95.0, 88.0, -7.5, 60.0])
        p[..., base + 2 * m:base + 3 * m] = torch.tensor([40.0, -40.0, 0.3, 20.0])
    p[0, 0, 0, :m] = torch.tensor([0.0, 1e4, -1e4, 100.0])  # one pixel's mass on a wide component
    p, p64 = _pair(p, torch.float32)
    out = fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=m, reduction="none", backend="triton")
    ref = -dmol_log_prob(x.double(), p64, m)
    backward_both(out, ref)
    _extreme_check(out, ref, [(p, p64)])


@triton_only
@pytest.mark.parametrize("kind", ONE_KINDS)
def test_one_component_extremes_under_gpu_math(kind, gpu_math):
    """Log scales from -40 (DDPM's v^3 past fp32's range) to 100 (e^-s subnormal or zero, which made IAF's
    0 * inf gradient NaN), means anywhere: finite, the float64 formula's numbers."""
    n = 64
    ls = torch.cat([torch.linspace(-40.0, -20.0, 8), torch.linspace(-6.0, 2.0, 8), torch.linspace(80.0, 104.0, 48)])
    if kind == "logistic":
        x = torch.randint(0, 256, (n,)).double() / 256
        mean = torch.rand(n) * 1.2 - 0.1
    else:
        x = torch.randint(0, 256, (n,)).double() / 255 * 2 - 1
        x[:4] = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
        mean = torch.rand(n) * 2.2 - 1.1
        # at log scales -40..-20: x at the mean, above it, below it, the mean inside x's bin
        mean[4:8] = (x[4:8] + torch.tensor([0.0, 0.3, -0.3, 0.5 / 255], dtype=torch.float64)).float()
    x = x.float().to(DEVICE).reshape(4, 16)
    (mean, mean64), (ls, ls64) = _pair(mean.reshape(4, 16), torch.float32), _pair(ls.reshape(4, 16), torch.float32)
    out = _one_fn(kind)(x, mean, ls, reduction="none", backend="triton")
    ref = _one_ref(kind, x.double(), mean64, ls64)
    backward_both(out, ref)
    _extreme_check(out, ref, [(mean, mean64), (ls, ls64)])
