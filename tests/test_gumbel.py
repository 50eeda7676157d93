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
