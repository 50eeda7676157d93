"""Finite scalar quantization: ``fastvae.finite_scalar_quantize`` against vector-quantize-pytorch's ``FSQ``
forward (bound, round_ste, codes_to_indices; ``dim = len(levels)`` and one codebook, so its projections and
rearranges are identities and views), torch.compile of it and the fastvae paths, with the peak memory above
the inputs. Outputs: the codes (straight-through) and the int64 indices; forward+backward differentiates the
codes.

Levels: [8, 5, 5, 5] (K = 1000, the paper's ~2^10) and [4] * 16 (K = 4^16 = 4.3e9). The peer's constructor
builds its implicit codebook (all K codes, ``_indices_to_codes(arange(K))``) unless told not to (PR 137 made
it lazy): at 4^16 that is 4.3e9 x 16 floats, so the peer here is its forward alone, which never reads it, and
its indices are cast to int64 (its ``.to(int32)`` overflows past 2^31 codes, and its float32 sum of
``codes * basis`` is inexact there: the same arithmetic, the same cost).

Grid: 2^22 tokens on CUDA (64 x 65536), 2^16 on the CPU (16 x 4096), (2, 128) in quick mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import Batch, Bench, Case, bench_device, is_quick

import fastvae

LEVELS = {"8-5-5-5": [8, 5, 5, 5], "4x16": [4] * 16}


def _sizes(config: pytest.Config) -> list[tuple[int, int]]:
    if is_quick(config):
        return [(2, 128)]
    if bench_device().type == "cuda":
        return [(64, 65536)]
    return [(16, 4096)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bn" in metafunc.fixturenames:
        sizes = _sizes(metafunc.config)
        metafunc.parametrize("bn", sizes, ids=[f"{b}x{n}" for b, n in sizes])
    if "levels" in metafunc.fixturenames:
        metafunc.parametrize("levels", list(LEVELS.values()), ids=list(LEVELS))


def round_ste(z: torch.Tensor) -> torch.Tensor:
    zhat = z.round()
    return z + (zhat - z).detach()


def peers_fsq(levels: list[int], device: torch.device) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """vector-quantize-pytorch's FSQ(levels).forward on (B, N, d) tokens, d = len(levels): its buffers made
    once (as its constructor does), the forward transcribed op for op (force_quantization_f32: z.float())."""
    _levels = torch.tensor(levels, dtype=torch.int32, device=device)
    _basis = torch.cumprod(torch.tensor([1] + levels[:-1], device=device), dim=0, dtype=torch.int32)

    def bound(z, eps=1e-3):
        half_l = (_levels - 1) * (1 + eps) / 2
        offset = torch.where(_levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def quantize(z):
        quantized = round_ste(bound(z))
        half_width = _levels // 2
        return quantized / half_width

    def codes_to_indices(zhat):
        half_width = _levels // 2
        zhat = zhat * half_width + half_width
        return (zhat * _basis).sum(dim=-1).to(torch.int64)  # the peer's int32 overflows at 4^16 codes

    def forward(z):
        codes = quantize(z.float())
        return codes.type(z.dtype), codes_to_indices(codes)

    return forward


def _step(fn: Callable[..., tuple[torch.Tensor, ...]], mode: str) -> Callable[[Batch], None]:
    """Forward (codes and indices), or forward then the codes' gradient to z (the indices take none)."""

    def fwd(b: Batch) -> None:
        fn(*b.args)

    def fwdbwd(b: Batch) -> None:
        codes, _ = fn(*b.args)
        torch.autograd.grad(codes, b.args[0], b.grad_outputs[0])

    return fwd if mode == "fwd" else fwdbwd


def test_fsq(benchmark, bench: Bench, bn, levels, mode, impl):
    b, n = bn
    d = len(levels)
    case = Case(f"fsq_{'-'.join(map(str, levels)) if d < 8 else f'{levels[0]}x{d}'}", mode, impl, torch.float32,
                (b, n, d))
    peer = peers_fsq(levels, bench.device)

    def fv(backend):
        def run(z):
            out = fastvae.finite_scalar_quantize(z, levels, backend=backend)
            return out.quantized, out.indices

        return run

    def make() -> Batch:
        grad = mode == "fwdbwd"
        z = (torch.randn(b, n, d, device=bench.device) * 2).requires_grad_(grad)
        return Batch((z,), (torch.randn(b, n, d, device=bench.device),) if grad else ())

    fn = bench.impl(case.impl, peer, fv)
    # z read, codes and indices written
    bench.run(benchmark, case, _step(fn, mode), make, nbytes=b * n * (8 * d + 8), items=b * n)
