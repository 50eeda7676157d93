"""LFQ against the peers' enumeration of all 2^d codes in float64 (vector-quantize-pytorch's LFQ without its
log clamp): the exact per-sample and codebook entropies, their gradients, the grouped (BSQ) bound, indices,
16-bit inputs, layouts, second-order gradients, memory, bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND, DTYPES

import fastvae
from fastvae.reference import lfq as lfq_ref

SHAPES = [(1, 1), (37, 5), (130, 9)]  # (N, d): K = 2, 32 and 512 codes (several 128-code tiles)


def _oracle(z: torch.Tensor, tau: float, scale: float, gamma: float, cw: float, ew: float):
    ps, cb = lfq_ref.enumerated_entropies(z, tau, scale)
    q = torch.where(z > 0, scale, -scale).to(z.dtype)
    commit = ((z - q) ** 2).mean()
    return ew * (ps - gamma * cb) + cw * commit, ps, cb


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropies_and_gradients_match_the_enumeration(dtype, shape, backend, device):
    n, d = shape
    # a temperature at which the softmax is neither one-hot nor uniform, where the entropies carry gradient
    z = (torch.randn(n, d, device=device) * 0.02).to(dtype).requires_grad_()
    out = fastvae.lookup_free_quantize(z, codebook_scale=1.5, diversity_gamma=0.7, backend=backend)
    zr = z.detach().double().requires_grad_()
    loss, ps, cb = _oracle(zr, 100.0, 1.5, 0.7, 0.25, 0.1)
    # float64: the enumeration's log_softmax of logits ~2 tau |z| d subtracts numbers of that size; the two
    # exact forms agree to ~1e-10 relative
    rtol, atol = (1e-8, 1e-10) if dtype == torch.float64 else (1e-4, 1e-5)
    torch.testing.assert_close(out.per_sample_entropy.double(), ps, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.codebook_entropy.double(), cb, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.loss.double(), loss, rtol=rtol, atol=atol)
    g, = torch.autograd.grad(out.loss, z)
    gr, = torch.autograd.grad(loss, zr)
    # the entropy's gradient is a difference of near-equal sums over the codes (sum_c W b_i - sigmoid sum_c W):
    # the factorized and the enumerated forms agree to ~1e-7 of its largest entry in float64, ~1e-4 in fp32;
    # a 16-bit gradient rounds once more
    gtol = dict(rtol=1e-6, atol=1e-7 * gr.abs().max()) if dtype == torch.float64 else \
        dict(rtol=1e-3, atol=1e-4 * gr.abs().max())
    if dtype in (torch.float16, torch.bfloat16):
        gtol = dict(rtol=1e-2, atol=1e-2 * gr.abs().max())
    torch.testing.assert_close(g.double(), gr, **gtol)


def test_indices_and_quantized(backend, device):
    z = torch.tensor([[0.3, -0.2, 0.0, 1.0], [-1.0, -1.0, -1.0, -1.0]], device=device, requires_grad=True)
    out = fastvae.lookup_free_quantize(z, codebook_scale=0.5, backend=backend)
    assert out.indices.tolist() == [1 + 8, 0]  # bit i is 2^i; z = 0 is not positive
    torch.testing.assert_close(out.quantized, torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.5] * 4], device=device))
    g = torch.randn(2, 4, device=device)
    (out.quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g)  # straight-through


@pytest.mark.parametrize("groups", [2, 3])
def test_grouped_entropy_is_the_bsq_upper_bound(groups, backend, device):
    z = torch.randn(60, 6, device=device) * 0.02
    exact = fastvae.lookup_free_quantize(z, backend=backend).codebook_entropy
    grouped = fastvae.lookup_free_quantize(z, groups=groups, backend=backend).codebook_entropy
    parts = sum(lfq_ref.enumerated_entropies(c.double(), 100.0, 1.0)[1] for c in z.chunk(groups, -1))
    torch.testing.assert_close(grouped.double(), parts, rtol=1e-4, atol=1e-5)
    assert grouped >= exact - 1e-5


def test_channels_first_bits(backend, device):
    x = torch.randn(2, 5, 3, 4, device=device) * 0.02
    out = fastvae.lookup_free_quantize(x, dim=1, backend=backend)
    ref = fastvae.lookup_free_quantize(x.permute(0, 2, 3, 1), backend=backend)
    assert out.indices.shape == (2, 3, 4) and torch.equal(out.indices, ref.indices)
    torch.testing.assert_close(out.codebook_entropy, ref.codebook_entropy)
    assert out.quantized.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_stay_finite_where_the_peers_overflow(dtype, backend, device):
    """vector-quantize-pytorch issue 85: NaN in this entropy under fp16 (its logits 2 tau z . c overflow fp16
    at |z| of a few); here the logits and entropies are computed in fp32 from the 16-bit values."""
    z = (torch.randn(64, 8, device=device) * 40).to(dtype).requires_grad_()
    out = fastvae.lookup_free_quantize(z, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
    assert out.loss.dtype == torch.float32
    _, cb = lfq_ref.enumerated_entropies(z.detach().double(), 100.0, 1.0)
    torch.testing.assert_close(out.codebook_entropy.double(), cb, rtol=1e-4, atol=1e-4)


def test_second_order_gradients(backend, device):
    dt = torch.float64 if backend == "torch" else torch.float32
    z = (torch.randn(6, 3, device=device, dtype=dt) * 0.02).requires_grad_()
    f = lambda t: fastvae.lookup_free_quantize(t, backend=backend).loss  # noqa: E731
    if dt == torch.float64:
        assert torch.autograd.gradgradcheck(f, (z,))
    g, = torch.autograd.grad(f(z), z, create_graph=True)
    gg, = torch.autograd.grad(g.pow(2).sum(), z)
    zr = z.detach().double().requires_grad_()
    gr, = torch.autograd.grad(_oracle(zr, 100.0, 1.0, 1.0, 0.25, 0.1)[0], zr, create_graph=True)
    ggr, = torch.autograd.grad(gr.pow(2).sum(), zr)
    torch.testing.assert_close(gg.double(), ggr, rtol=1e-3, atol=1e-3 * ggr.abs().max())


def test_memory_is_linear_in_tokens_and_codes(backend, device):
    """The kernels hold O(N d + K) above the inputs (K floats of log pbar kept for backward); the peers'
    enumeration holds N x K probabilities several times over."""
    from _memory import cpu_peak_bytes

    if device.type != "cpu" or backend != "triton":
        pytest.skip("the kernels' CPU allocator events")
    n, d = 512, 12
    z = (torch.randn(n, d) * 0.02).requires_grad_()

    def ours():
        fastvae.lookup_free_quantize(z, backend=backend).loss.backward()

    def peers():
        _oracle(z, 100.0, 1.0, 1.0, 0.25, 0.1)[0].backward()

    nk = n * (1 << d) * 4
    assert cpu_peak_bytes(peers) >= 3 * nk
    assert cpu_peak_bytes(ours) < 30 * n * d * 4 + 4 * (1 << d) * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(inv_temperature=0.0), "inv_temperature"),
        (dict(codebook_scale=-1.0), "codebook_scale"),
        (dict(groups=0), "groups"),
        (dict(groups=5), "groups"),
        (dict(dim=3), "dim"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastvae.lookup_free_quantize(torch.randn(4, 6), **kwargs)


def test_too_many_bits_a_group():
    with pytest.raises(ValueError, match="groups"):
        fastvae.lookup_free_quantize(torch.randn(2, 30))
    assert fastvae.lookup_free_quantize(torch.randn(2, 30) * 0.01, groups=3).indices.shape == (2,)
    with pytest.raises(TypeError, match="z"):
        fastvae.lookup_free_quantize(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.skipif(BACKEND != "torch", reason="the eager path's compile test")
def test_compiles_without_graph_break():
    z = torch.randn(20, 5, requires_grad=True) * 0.02
    fn = lambda z: fastvae.lookup_free_quantize(z).loss  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(z), fn(z))
