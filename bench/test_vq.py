"""Discrete latents: ``fastvae.vector_quantize`` (search, losses, straight-through) against taming-
transformers' VectorQuantizer2 (diffusers' VectorQuantizer is a copy: the N x K expanded distances),
torch.compile of it and the fastvae paths; ``fastvae.lookup_free_quantize`` against vector-quantize-pytorch's
LFQ entropy (its enumeration of every code for every token); with the peak memory above the inputs.

The VQ search's bound is ``torch.mm(z, codebook.T)`` alone at the same shape (the argmin epilogue is cheap;
the N x K write and read it saves is not): ``test_vq_search_bound`` times it in the same run.

Grid on CUDA: N = 65536 tokens, K = 16384, D = 256 (image tokenizers) and K = 1024, D = 8 (an audio codec's
stage); LFQ at d = 14 and Open-MAGVIT2's d = 18 over 2048 tokens. On the CPU: N = 4096, K = 1024.
"""

from __future__ import annotations

import pytest
import torch
from conftest import Batch, Bench, Case, bench_device, is_quick

import fastvae


def _vq_sizes(config: pytest.Config) -> list[tuple[int, int, int]]:
    if is_quick(config):
        return [(256, 64, 8)]
    if bench_device().type == "cuda":
        return [(65536, 16384, 256), (65536, 1024, 8)]
    return [(4096, 1024, 64), (4096, 1024, 8)]


def _lfq_sizes(config: pytest.Config) -> list[tuple[int, int]]:
    if is_quick(config):
        return [(128, 6)]
    if bench_device().type == "cuda":
        return [(2048, 14), (2048, 18)]
    return [(512, 10), (512, 12)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "nkd" in metafunc.fixturenames:
        sizes = _vq_sizes(metafunc.config)
        metafunc.parametrize("nkd", sizes, ids=[f"{n}x{k}x{d}" for n, k, d in sizes])
    if "vq_dtype" in metafunc.fixturenames:
        # bf16 on CUDA: what tokenizers train in (the tensor cores' 16-bit rate); fp32 runs as tf32x3
        dts = [torch.float32, torch.bfloat16] if bench_device().type == "cuda" and not is_quick(metafunc.config) \
            else [torch.float32]
        metafunc.parametrize("vq_dtype", dts, ids=[str(t).removeprefix("torch.") for t in dts])
    if "nd" in metafunc.fixturenames:
        sizes = _lfq_sizes(metafunc.config)
        metafunc.parametrize("nd", sizes, ids=[f"{n}x{d}" for n, d in sizes])


def taming_vq(z, codebook):
    """VectorQuantizer2.forward (legacy=True, beta = 0.25) on flattened tokens: the expanded N x K distances."""
    d = (z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", z, codebook.t()))
    idx = torch.argmin(d, dim=1)
    z_q = codebook[idx]
    loss = torch.mean((z_q.detach() - z) ** 2) + 0.25 * torch.mean((z_q - z.detach()) ** 2)
    return z + (z_q - z).detach(), loss


def peers_lfq_entropy(z, inv_temperature=100.0):
    """vector-quantize-pytorch's LFQ entropy auxiliary loss: every code for every token (N x K held)."""
    d = z.shape[1]
    bits = (torch.arange(1 << d, device=z.device)[:, None] >> torch.arange(d, device=z.device)) & 1
    codebook = bits.to(z.dtype) * 2 - 1
    prob = (2 * inv_temperature * z @ codebook.t()).softmax(-1)
    log = lambda t: t.clamp(min=1e-5).log()  # noqa: E731
    per_sample = (-prob * log(prob)).sum(-1).mean()
    avg = prob.mean(0)
    return per_sample - (-avg * log(avg)).sum()


def _make_vq(n: int, k: int, d: int, mode: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Batch:
    grad = mode == "fwdbwd"
    z = torch.randn(n, d, device=device, dtype=dtype).requires_grad_(grad)
    codebook = torch.randn(k, d, device=device, dtype=dtype).requires_grad_(grad)
    # the quantized tokens' gradient (the decoder's), and the loss's (None: a scalar, whose gradient is 1)
    return Batch((z, codebook), (torch.randn(n, d, device=device, dtype=dtype), None) if grad else ())


def test_vector_quantize(benchmark, bench: Bench, nkd, vq_dtype, mode, impl):
    n, k, d = nkd
    case = Case("vector_quantize", mode, impl, vq_dtype, (n, k, d))

    def fv(backend):
        def run(z, codebook):
            out = fastvae.vector_quantize(z, codebook, preset="taming_legacy", backend=backend)
            return out.quantized, out.loss

        return run

    bench.run_op(benchmark, case, taming_vq, fv, lambda: _make_vq(n, k, d, mode, bench.device, vq_dtype), items=n)


def test_vq_search_bound(benchmark, bench: Bench, nkd, vq_dtype):
    """torch.mm(z, codebook.T) alone: the FLOPs every search does, the time the fused search approaches (fp32:
    torch's default full-precision fp32 GEMM, tf32 off)."""
    n, k, d = nkd
    case = Case("vq_search_mm", "fwd", "mm", vq_dtype, (n, k, d))

    def step(b: Batch) -> None:
        torch.mm(b.args[0], b.args[1].t())

    bench.run(benchmark, case, step, lambda: _make_vq(n, k, d, "fwd", bench.device, vq_dtype), items=n)


def test_lfq_entropy(benchmark, bench: Bench, nd, mode, impl):
    n, d = nd
    case = Case("lfq_entropy", mode, impl, torch.float32, (n, d))

    def fv(backend):
        def run(z):
            out = fastvae.lookup_free_quantize(z, backend=backend)
            return out.per_sample_entropy - out.codebook_entropy

        return run

    def make() -> Batch:
        return Batch(((torch.randn(n, d, device=bench.device) * 0.02).requires_grad_(mode == "fwdbwd"),))

    bench.run_op(benchmark, case, peers_lfq_entropy, fv, make, items=n)
