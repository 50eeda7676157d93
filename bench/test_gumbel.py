"""Gumbel-softmax posteriors with a codebook (taming-transformers' GumbelQuantize, DALL-E's dVAE): the relaxed
sample y (soft, or hard straight-through), z_q = einsum('b n h w, n d -> b d h w', y, E) and the KL term
``kl_weight * sum(qy * log(qy * K + 1e-10), dim=1).mean()``, against ``fastvae.gumbel_softmax_kl(logits, tau,
hard, dim=1, codebook=E, reduction="mean")`` (z_q formed in the sampling pass: on the kernels the (B, K, H, W)
sample is never written), eager, torch.compile and the fastvae paths, with the peak memory above the inputs.
Forward+backward takes the gradients to the logits and the codebook (z_q's gradient the decoder's, the
loss's 1). taming's ``ind = soft_one_hot.argmax(1)`` is left out of every implementation, as the indices are
in bench/test_vq.py (torch.compile would drop an unused one anyway).

Grid: DALL-E's K = 8192 codes over 32 x 32 latents, D = 256, batch 8 on CUDA (the sample alone is 256 MiB
in fp32); B = 4, K = 2048, 16 x 16, D = 64 on the CPU; (2, 64, 4, 4, 16) in quick mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import Batch, Bench, Case, bench_device, is_quick

import fastvae

KL_WEIGHT = 5e-4  # taming's default
TAU = 1.0


def _sizes(config: pytest.Config) -> list[tuple[int, int, int, int, int]]:
    if is_quick(config):
        return [(2, 64, 4, 4, 16)]
    if bench_device().type == "cuda":
        return [(8, 8192, 32, 32, 256)]
    return [(4, 2048, 16, 16, 64)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bkhwd" in metafunc.fixturenames:
        sizes = _sizes(metafunc.config)
        metafunc.parametrize("bkhwd", sizes, ids=["x".join(map(str, s)) for s in sizes])
    if "hard" in metafunc.fixturenames:
        metafunc.parametrize("hard", [False, True], ids=["soft", "hard"])


def _taming(logits, codebook, hard):
    """GumbelQuantize.forward after its proj (taming-transformers, as in DALL-E's dVAE): z_q and diff."""
    soft_one_hot = F.gumbel_softmax(logits, tau=TAU, dim=1, hard=hard)
    z_q = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, codebook)
    qy = F.softmax(logits, dim=1)
    diff = KL_WEIGHT * torch.sum(qy * torch.log(qy * logits.shape[1] + 1e-10), dim=1).mean()
    return z_q, diff


def taming_soft(logits, codebook):
    return _taming(logits, codebook, False)


def taming_hard(logits, codebook):
    return _taming(logits, codebook, True)


def test_gumbel_quantize(benchmark, bench: Bench, bkhwd, hard, mode, impl):
    b, k, h, w, d = bkhwd
    case = Case(f"gumbel_quantize_{'hard' if hard else 'soft'}", mode, impl, torch.float32, (b, k, h, w, d))

    def fv(backend):
        def run(logits, codebook):
            z_q, kl = fastvae.gumbel_softmax_kl(logits, TAU, hard, dim=1, codebook=codebook, reduction="mean",
                                                backend=backend)
            return z_q, KL_WEIGHT * kl

        return run

    def make() -> Batch:
        grad = mode == "fwdbwd"
        logits = torch.randn(b, k, h, w, device=bench.device).requires_grad_(grad)
        codebook = torch.randn(k, d, device=bench.device).requires_grad_(grad)
        return Batch((logits, codebook), (torch.randn(b, d, h, w, device=bench.device), None) if grad else ())

    eager = taming_hard if hard else taming_soft
    # the logits and the codebook read, z_q written (what a fused pass must move at least)
    nbytes = 4 * (b * k * h * w + k * d + b * d * h * w)
    bench.run_op(benchmark, case, eager, fv, make, nbytes=nbytes, items=b * h * w)
