"""FSQ against a float64 transcription of vector-quantize-pytorch's FSQ (the paper's bound, round_ste,
codes_to_indices): values, indices, straight-through gradients, ties, huge implicit codebooks, the histogram,
layouts, bad arguments."""

from __future__ import annotations

import pytest
import torch
from _oracle import peers_fsq
from conftest import BACKEND, DTYPES

import fastvae

LEVELS = [[8, 5, 5, 5], [7, 5, 5, 5, 5], [2], [8, 6, 5]]


@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_peers(dtype, levels, backend, device):
    z = (torch.randn(67, len(levels), device=device) * 2).to(dtype).requires_grad_()
    out = fastvae.finite_scalar_quantize(z, levels, backend=backend)
    zr = z.detach().double().requires_grad_()
    q, idx = peers_fsq(zr, levels)
    g = torch.randn_like(q)
    (q * g).sum().backward()
    gz, = torch.autograd.grad(out.quantized, z, g.to(dtype))
    # the same levels except where bound(z) lies within the fp32 rounding of tanh of a rounding boundary
    same = out.indices == idx
    lv = torch.tensor(levels, dtype=torch.float64, device=device)
    half_l, offset = (lv - 1) * (1 + 1e-3) / 2, torch.where(lv % 2 == 0, 0.5, 0.0)
    b = torch.tanh(zr.detach() + torch.atanh(offset / half_l)) * half_l - offset
    near = ((b - b.floor() - 0.5).abs() < 1e-5 * half_l).any(-1)
    assert (same | near).all()
    tol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}.get(dtype, (1e-2, 1e-2))
    torch.testing.assert_close(out.quantized.double()[same], q.detach()[same], rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(gz.double(), zr.grad, rtol=tol[0] * 10, atol=tol[1] * 10)


def test_ties_round_as_torch_round(backend, device):
    """z = -shift puts bound(z) exactly on -0.5 for even L (tanh(0) = 0 exactly): a tie that torch.round sends to
    the even -0; the fp32 eager path is the oracle there (float64 would not tie), with random z beside it."""
    from fastvae.reference.fsq import fsq as eager_fsq
    from fastvae.reference.fsq import fsq_constants

    levels = [2, 4, 6]
    shift = torch.tensor(fsq_constants(levels)[2], dtype=torch.float32, device=device)
    z = torch.cat([-shift[None, :], torch.randn(200, 3, device=device)])
    out = fastvae.finite_scalar_quantize(z, levels, backend=backend)
    q, idx = eager_fsq(z, levels)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.quantized, q, rtol=0, atol=0)


def test_huge_implicit_codebook_is_never_built(backend, device):
    """vector-quantize-pytorch PR 137: FSQ(levels=[4] * 16) tried to allocate its 4.3e9-code codebook."""
    z = torch.randn(33, 16, device=device)
    out = fastvae.finite_scalar_quantize(z, [4] * 16, backend=backend)
    _, idx = peers_fsq(z.double(), [4] * 16)
    assert torch.equal(out.indices, idx) and int(out.indices.max()) < 4**16
    with pytest.raises(ValueError, match="histogram"):
        fastvae.finite_scalar_quantize(z, [4] * 16, histogram=True, backend=backend)


def test_histogram_counts_every_token(backend, device):
    z = torch.randn(500, 3, device=device)
    out = fastvae.finite_scalar_quantize(z, [4, 3, 2], histogram=True, backend=backend)
    assert out.counts.dtype == torch.int64 and out.counts.shape == (24,)
    assert torch.equal(out.counts, torch.bincount(out.indices, minlength=24))


def test_channels_first_read_in_place(backend, device):
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    out = fastvae.finite_scalar_quantize(x, [8, 5, 5], dim=1, backend=backend)
    ref = fastvae.finite_scalar_quantize(x.permute(0, 2, 3, 1), [8, 5, 5], backend=backend)
    assert torch.equal(out.indices, ref.indices) and out.quantized.is_contiguous()
    torch.testing.assert_close(out.quantized, ref.quantized.permute(0, 3, 1, 2))
    g = torch.randn_like(x)
    gx, = torch.autograd.grad(out.quantized, x, g)
    gr, = torch.autograd.grad(ref.quantized, x, g.permute(0, 2, 3, 1))
    torch.testing.assert_close(gx, gr)


def test_second_order_gradient_of_the_straight_through_surrogate(backend, device):
    dt = torch.float64 if backend == "torch" else torch.float32
    z = torch.randn(5, 3, device=device, dtype=dt, requires_grad=True)
    g, = torch.autograd.grad(fastvae.finite_scalar_quantize(z, [8, 5, 5], backend=backend).quantized.sum(), z,
                             create_graph=True)
    gg, = torch.autograd.grad(g.sum(), z)
    zr = z.detach().double().requires_grad_()
    gr, = torch.autograd.grad(peers_fsq(zr, [8, 5, 5])[0].sum(), zr, create_graph=True)
    ggr, = torch.autograd.grad(gr.sum(), zr)
    torch.testing.assert_close(gg.double(), ggr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("levels", "kwargs", "error", "match"),
    [
        ([8, 5], {}, ValueError, "levels"),
        ([8, 1, 5], {}, ValueError, "levels"),
        ("855", {}, TypeError, "levels"),
        ([8, 5, 5], dict(dim=4), ValueError, "dim"),
    ],
)
def test_bad_arguments_name_the_argument(levels, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvae.finite_scalar_quantize(torch.randn(4, 3), levels, **kwargs)


@pytest.mark.skipif(BACKEND != "torch", reason="the eager path's compile test")
def test_compiles_without_graph_break():
    z = torch.randn(20, 3, requires_grad=True)
    fn = lambda z: fastvae.finite_scalar_quantize(z, [8, 5, 5]).quantized  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(z), fn(z))
