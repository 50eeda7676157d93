"""The discretized mixture of logistics of image VAEs, M = 10, three channels, summed: forward and
forward+backward (the gradient to the params) of 32 x 3 x 256 x 256 and 128 x 3 x 64 x 64 images on CUDA,
and small batches of 32 x 32 images (1 and 8 images: about 2^16.6 and 2^19.6 parameters); smaller ones on
CPU; channels last as openai/vdvae lays them out.

Eager and compile run openai/vdvae's ``discretized_mix_logistic_loss`` (bench/conftest.py's harness records
the peak memory of each above its inputs: the eager formulation's (B, H, W, 3, M) temporaries against the
fused kernel's params-sized gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Batch, Bench, Case, bench_device, is_quick

import fastvae

M = 10


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The image shapes (B, C, H, W) of this module (conftest's hook parametrizes dtype, mode and impl)."""
    if "image_batch" in metafunc.fixturenames:
        quick = is_quick(metafunc.config)
        cuda = bench_device().type == "cuda"
        shapes = [(2, 3, 8, 8)] if quick else ([(1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 256, 256), (128, 3, 64, 64)]
                                               if cuda else [(4, 3, 32, 32), (8, 3, 64, 64)])
        metafunc.parametrize("image_batch", shapes, ids=["x".join(map(str, s)) for s in shapes])


def vdvae_loss(x: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741  (vdvae's names)
    """openai/vdvae's discretized_mix_logistic_loss (8-bit), summed over the batch instead of its per-dim
    mean: x (B, H, W, 3) in [-1, 1], l (B, H, W, 10M)."""
    xs = list(x.shape)
    nr_mix = l.shape[-1] // 10
    logit_probs = l[:, :, :, :nr_mix]
    l = torch.reshape(l[:, :, :, nr_mix:], xs + [nr_mix * 3])  # noqa: E741
    means = l[:, :, :, :, :nr_mix]
    log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.0)
    coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = torch.reshape(x, xs + [1]) + torch.zeros(xs + [nr_mix], dtype=l.dtype, device=x.device)
    m2 = torch.reshape(means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :],
                       [xs[0], xs[1], xs[2], 1, nr_mix])
    m3 = torch.reshape(means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
                       + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :], [xs[0], xs[1], xs[2], 1, nr_mix])
    means = torch.cat([torch.reshape(means[:, :, :, 0, :], [xs[0], xs[1], xs[2], 1, nr_mix]), m2, m3], dim=3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min,
        torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)), log_pdf_mid - np.log(127.5))))
    log_probs = log_probs.sum(dim=3) + F.log_softmax(logit_probs, dim=-1)
    return -torch.logsumexp(log_probs, -1).sum()


def fastvae_fn(backend: str):
    return lambda x, p: fastvae.discretized_mix_logistic_nll(x, p, num_mixtures=M, reduction="sum",
                                                             backend=backend)


def make(shape, dtype: torch.dtype, mode: str, device: torch.device) -> Batch:
    b, c, h, w = shape
    x = torch.randint(0, 256, (b, h, w, c), device=device).float() / 127.5 - 1.0
    p = torch.randn(b, h, w, M * 10, device=device)
    rest = p[..., M:].reshape(b, h, w, c, 3 * M)
    rest[..., M:2 * M] = rest[..., M:2 * M] * 0.5 - 2.0  # log scales around -2
    p = torch.cat([p[..., :M], rest.flatten(-2)], dim=-1)
    p = p.to(dtype).requires_grad_(mode == "fwdbwd")
    return Batch((x, p), (None,) if mode == "fwdbwd" else ())


def min_bytes(shape, mode: str, itemsize: int) -> int:
    """Params and images read once (fp32 images), the params' gradient written once."""
    b, c, h, w = shape
    pix = b * h * w
    return pix * (10 * M * itemsize + 4 * c) + (pix * 10 * M * itemsize if mode == "fwdbwd" else 0)


def test_dmol_nll(benchmark, bench: Bench, image_batch, dtype, mode, impl):
    case = Case("dmol_nll", mode, impl, dtype, tuple(image_batch))
    itemsize = torch.empty((), dtype=dtype).element_size()
    bench.run_op(benchmark, case, vdvae_loss, fastvae_fn, lambda: make(image_batch, dtype, mode, bench.device),
                 nbytes=min_bytes(image_batch, mode, itemsize))
