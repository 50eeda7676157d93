"""Gumbel-softmax and its KL to the uniform prior: the eager path bitwise torch's F.gumbel_softmax; the kernels
against torch's formulas around the same (regenerated) noise, statistically (the Gumbel-max property) and for
reproducibility per seed; the KL's reductions against float64; layouts, second order, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND, DTYPES

import fastvae
from fastvae.functional.gumbel import _as_bks
from fastvae.reference import gumbel as gumbel_ref


def _noise(logits: torch.Tensor, dim: int, seed_state: int) -> torch.Tensor:
    """The kernels' noise for the seed that torch.manual_seed(seed_state) makes them draw."""
    from fastvae._triton import common, gumbel

    torch.manual_seed(seed_state)
    seed = common.new_seed(logits.device, None)
    bks = _as_bks(logits.detach(), dim)
    return gumbel._noise_op(bks, seed).reshape(logits.shape)


@pytest.mark.skipif(BACKEND != "torch", reason="the eager path is torch's computation")
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dim", [-1, 1])
def test_eager_is_torch_bitwise(hard, dim, device):
    x = torch.randn(3, 6, 4, device=device)
    torch.manual_seed(5)
    ours = fastvae.gumbel_softmax(x, 0.7, hard, dim=dim)
    torch.manual_seed(5)
    assert torch.equal(ours, F.gumbel_softmax(x, 0.7, hard, dim=dim))


@pytest.mark.skipif(BACKEND != "triton", reason="the kernels' noise")
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_against_the_formula_with_its_noise(dtype, hard, backend, device):
    x = torch.randn(2, 300, 3, 2, device=device).to(dtype).requires_grad_()  # K = 300: three code tiles
    torch.manual_seed(9)
    y, kl = fastvae.gumbel_softmax_kl(x, 0.6, hard, dim=1, reduction="none", backend=backend)
    noise = _noise(x, 1, 9)
    xr = x.detach().double().requires_grad_()
    yr = gumbel_ref.gumbel_softmax(xr, noise.double(), 0.6, hard, 1)
    klr = gumbel_ref.kl_to_uniform(xr, 1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(y.double(), yr.detach(), **tol)
    torch.testing.assert_close(kl.double(), klr.detach(), **tol)
    assert kl.dtype == torch.float32 and y.dtype == dtype
    gy = torch.randn_like(yr)
    g, = torch.autograd.grad((y * gy.to(dtype)).sum() + 0.3 * kl.sum(), x)
    gr, = torch.autograd.grad((yr * gy).sum() + 0.3 * klr.sum(), xr)
    torch.testing.assert_close(g.double(), gr, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@pytest.mark.skipif(BACKEND != "triton", reason="the kernels' noise")
def test_kernel_noise_is_reproducible_and_fresh(backend, device):
    x = torch.randn(8, 40, device=device)
    torch.manual_seed(1)
    a = fastvae.gumbel_softmax(x, backend=backend)
    b = fastvae.gumbel_softmax(x, backend=backend)
    torch.manual_seed(1)
    assert torch.equal(a, fastvae.gumbel_softmax(x, backend=backend))
    assert not torch.equal(a, b)
    g = torch.Generator(device=device).manual_seed(4)
    c = fastvae.gumbel_softmax(x, generator=g, backend=backend)
    assert torch.equal(c, fastvae.gumbel_softmax(x, generator=torch.Generator(device=device).manual_seed(4),
                                                 backend=backend))


def test_hard_samples_follow_the_categorical(backend, device):
    """Gumbel-max: argmax(logits + g) ~ Categorical(softmax(logits)); 4096 draws (a few seconds of interpreted
    programs), each frequency within 4.5 standard errors of its probability (a false alarm ~1e-5 a run)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5], device=device)
    n = 4096
    torch.manual_seed(2)
    y = fastvae.gumbel_softmax(logits.expand(n, 5).contiguous(), hard=True, backend=backend)
    assert torch.equal(y.sum(-1), torch.ones(n, device=device))
    freq = y.mean(0).double()
    p = logits.double().softmax(0)
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_kl_reductions(reduction, backend, device):
    x = torch.randn(4, 16, 3, 5, device=device)
    _, kl = fastvae.gumbel_softmax_kl(x, dim=1, reduction=reduction, backend=backend)
    per = math.log(16) + (x.double().log_softmax(1).exp() * x.double().log_softmax(1)).sum(1)
    want = {"none": per, "sum": per.sum(), "mean": per.mean(), "batchmean": per.sum() / 4}[reduction]
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-6)


def test_channels_first_read_in_place(device):
    x = torch.randn(2, 8, 3, 3, device=device)
    assert _as_bks(x, 1).data_ptr() == x.data_ptr() and _as_bks(x, 1).shape == (2, 8, 9)
    assert _as_bks(x.permute(0, 2, 3, 1), -1).shape == (18, 8, 1)


def test_second_order_gradients(backend, device):
    dt = torch.float64 if backend == "torch" else torch.float32
    x = torch.randn(3, 5, device=device, dtype=dt, requires_grad=True)
    torch.manual_seed(4)
    y, kl = fastvae.gumbel_softmax_kl(x, 0.5, backend=backend)
    g, = torch.autograd.grad((y[:, 0] ** 2).sum() + kl, x, create_graph=True)
    gg, = torch.autograd.grad(g.pow(2).sum(), x)
    if backend == "torch":
        torch.manual_seed(4)
        noise = gumbel_ref.gumbel_noise(x, None)
    else:
        noise = _noise(x, -1, 4)
    xr = x.detach().double().requires_grad_()
    yr = gumbel_ref.gumbel_softmax(xr, noise.double(), 0.5, False, -1)
    gr, = torch.autograd.grad((yr[:, 0] ** 2).sum() + gumbel_ref.kl_to_uniform(xr, -1).sum() / 3, xr,
                              create_graph=True)
    ggr, = torch.autograd.grad(gr.pow(2).sum(), xr)
    torch.testing.assert_close(gg.double(), ggr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(tau=0.0), ValueError, "tau"),
        (dict(dim=3), ValueError, "dim"),
        (dict(reduction="batch"), ValueError, "reduction"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvae.gumbel_softmax_kl(torch.randn(3, 4), **kwargs)
    with pytest.raises(TypeError, match="logits"):
        fastvae.gumbel_softmax(torch.ones(3, 4, dtype=torch.long))


@pytest.mark.skipif(BACKEND != "torch", reason="the eager path's compile test")
def test_compiles_without_graph_break():
    x = torch.randn(6, 9, requires_grad=True)
    fn = lambda x: fastvae.gumbel_softmax_kl(x, 0.5)[1]  # noqa: E731  (the KL: no noise to compare)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


# --------------------------------------------------------------------------------------------------------
# the codebook product z_q = y . E (taming's GumbelQuantize, DALL-E's dVAE)
# --------------------------------------------------------------------------------------------------------


def _same_noise(x: torch.Tensor, dim: int, seed_state: int, backend: str) -> torch.Tensor:
    """The noise a call after torch.manual_seed(seed_state) draws: the kernels' Philox, or torch's draw in x's
    dtype on the eager path."""
    if backend == "triton":
        return _noise(x, dim, seed_state)
    torch.manual_seed(seed_state)
    return gumbel_ref.gumbel_noise(x.detach(), None)


def _taming_gumbel_quantize(logits, gumbels, codebook, tau, hard, index=None):
    """taming-transformers' GumbelQuantize.forward after its proj, codes on dim 1: F.gumbel_softmax(logits,
    tau, hard, dim=1) with the noise ``gumbels``, the einsum with the codebook, and its KL term
    sum(qy log(qy K + 1e-10), dim=1).mean(). ``index``: the one-hot's position where it was taken at the
    caller's precision (the eager path's argmax of a 16-bit y_soft)."""
    y_soft = ((logits + gumbels) / tau).softmax(1)
    y = y_soft
    if hard:
        index = y_soft.max(1, keepdim=True)[1] if index is None else index.unsqueeze(1)
        y_hard = torch.zeros_like(logits).scatter_(1, index, 1.0)
        y = y_hard - y_soft.detach() + y_soft
    pattern = {4: "b n h w, n d -> b d h w", 2: "b n, n d -> b d"}[logits.dim()]
    z_q = torch.einsum(pattern, y, codebook)
    qy = F.softmax(logits, dim=1)
    diff = torch.sum(qy * torch.log(qy * logits.shape[1] + 1e-10), dim=1).mean()
    return z_q, diff


@pytest.mark.parametrize("layout", ["bkhw", "nk"])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codebook_product_matches_taming(dtype, hard, layout, backend, device):
    """z_q and taming's KL term from gumbel_softmax_kl(codebook=E, reduction="mean"), and the gradients to the
    logits and the codebook, against the float64 transcription with the same noise. K = 150: three code
    tiles; 40 positions: two position tiles (the codebook gradient's sum over them)."""
    shape = (2, 150, 5, 4) if layout == "bkhw" else (40, 150)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    e = torch.randn(150, 20, device=device).to(dtype).requires_grad_()
    torch.manual_seed(9)
    zq, kl = fastvae.gumbel_softmax_kl(x, 0.6, hard, dim=1, codebook=e, reduction="mean", backend=backend)
    noise = _same_noise(x, 1, 9, backend)
    # the eager path takes the argmax of its own 16-bit y_soft (torch's); the kernels' v is fp32
    index = gumbel_ref.gumbel_softmax(x.detach(), noise, 0.6, False, 1).argmax(1) if hard and \
        backend == "torch" else None
    xr, er = x.detach().double().requires_grad_(), e.detach().double().requires_grad_()
    zr, klr = _taming_gumbel_quantize(xr, noise.double(), er, 0.6, hard, index)
    assert zq.dtype == dtype and zq.shape == ((2, 20, 5, 4) if layout == "bkhw" else (40, 20))
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if backend == "torch":  # the eager path is taming's computation in x's dtype, bitwise
        assert torch.equal(zq, _taming_gumbel_quantize(x.detach(), noise, e.detach(), 0.6, hard)[0])
    # the kernels compute in fp32 whatever the dtype; the eager path in x's (bf16's y_soft and einsum: 8 bits)
    rtol, atol = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-6)}.get(dtype, (2e-2, 1e-2))
    if dtype == torch.bfloat16 and backend == "torch":
        rtol, atol = 5e-2, 4e-2
    w = torch.randn(zr.shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((zq.double() * w).sum() + kl, (x, e))
    grads_ref = torch.autograd.grad((zr * w).sum() + klr, (xr, er))
    for a, r in ((zq, zr), (kl, klr), *zip(grads, grads_ref)):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(a.double(), r.detach(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("hard", [False, True])
def test_codebook_product_is_the_sample_times_the_codebook(hard, backend, device, poisoned):
    """gumbel_softmax(codebook=E) draws gumbel_softmax's sample for the same seed and returns its product with
    E, forward and backward (the fused backward against the sampler's own and torch's einsum); D = 300 spans
    three feature tiles of the forward and of the codebook gradient; the indices are the sample's argmax."""
    from fastvae.functional.gumbel import gumbel_quantize

    x = torch.randn(37, 70, device=device, requires_grad=True)
    e = torch.randn(70, 300, device=device, requires_grad=True)
    torch.manual_seed(2)
    zq = fastvae.gumbel_softmax(x, 0.8, hard, codebook=e, backend=backend)
    torch.manual_seed(2)
    y = fastvae.gumbel_softmax(x, 0.8, hard, backend=backend)
    torch.manual_seed(2)
    zq2, _, idx = gumbel_quantize(x, e, 0.8, hard, -1, "sum", None, backend)
    ref = y @ e
    torch.testing.assert_close(zq, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(zq, zq2) and torch.equal(idx, y.argmax(-1))
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((zq * w).sum(), (x, e))
    grads_ref = torch.autograd.grad((ref * w).sum(), (x, e))
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


def test_codebook_second_order_gradients(backend, device):
    """create_graph=True: the differentiable formula around the regenerated noise (the kernels' backward
    writes plain values)."""
    dt = torch.float64 if backend == "torch" else torch.float32
    x = torch.randn(3, 5, device=device, dtype=dt, requires_grad=True)
    e = torch.randn(5, 16, device=device, dtype=dt, requires_grad=True)
    torch.manual_seed(4)
    zq, kl = fastvae.gumbel_softmax_kl(x, 0.5, codebook=e, backend=backend)
    gx, ge = torch.autograd.grad((zq ** 2).sum() + kl, (x, e), create_graph=True)
    gg = torch.autograd.grad(gx.pow(2).sum() + ge.pow(2).sum(), (x, e))
    noise = _same_noise(x, -1, 4, backend)
    xr, er = x.detach().double().requires_grad_(), e.detach().double().requires_grad_()
    zr = gumbel_ref.gumbel_softmax(xr, noise.double(), 0.5, False, -1) @ er
    gxr, ger = torch.autograd.grad((zr ** 2).sum() + gumbel_ref.kl_to_uniform(xr, -1).sum() / 3, (xr, er),
                                   create_graph=True)
    ggr = torch.autograd.grad(gxr.pow(2).sum() + ger.pow(2).sum(), (xr, er))
    for a, r in zip(gg, ggr):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize(
    ("codebook", "error"),
    [
        (torch.randn(5, 3), ValueError),  # K = 5 codes for 4 logits
        (torch.randn(4), ValueError),
        (torch.randn(1, 4, 3), ValueError),
        (torch.randn(4, 3, dtype=torch.float64), ValueError),
        (torch.ones(4, 3, dtype=torch.long), TypeError),
    ],
)
def test_bad_codebook_names_the_argument(codebook, error):
    with pytest.raises(error, match="codebook"):
        fastvae.gumbel_softmax(torch.randn(3, 4), codebook=codebook)
    with pytest.raises(error, match="codebook"):
        fastvae.gumbel_softmax_kl(torch.randn(2, 4, 3, 3), dim=1, codebook=codebook)


@pytest.mark.skipif(BACKEND != "triton", reason="the kernels never write y; the eager path is torch's einsum")
def test_codebook_product_never_holds_the_sample(device):
    """Peak bytes above the inputs: the forward holds z_q and a few floats a position, not the (B, K, H, W)
    sample; forward and backward hold the logits' gradient (the logits' size) and E's, not y and its
    gradient as the eager path (taming's F.gumbel_softmax + einsum) does."""
    from _memory import cpu_peak_bytes

    if device.type != "cpu":
        pytest.skip("CPU allocator events")
    x = torch.randn(2, 512, 8, 8, requires_grad=True)
    e = torch.randn(512, 16, requires_grad=True)
    y_bytes = x.numel() * 4  # 256 KiB: one (B, K, H, W) fp32 sample
    zq_bytes = 2 * 16 * 64 * 4

    def forward():
        fastvae.gumbel_softmax(x, 0.7, dim=1, codebook=e, backend="triton")

    def step(backend):
        zq = fastvae.gumbel_softmax(x, 0.7, dim=1, codebook=e, backend=backend)
        torch.autograd.grad(zq.sum(), (x, e))

    eager = cpu_peak_bytes(lambda: step("torch"))
    with torch.no_grad():
        fwd = cpu_peak_bytes(forward)
    both = cpu_peak_bytes(lambda: step("triton"))
    assert eager >= 2 * y_bytes, eager
    assert fwd < zq_bytes + y_bytes // 16, fwd
    assert both < y_bytes + 3 * e.numel() * 4 + 2 * zq_bytes + y_bytes // 16, both
