"""The public functions against torch's own implementations and float64 closed forms, values and gradients,
per dtype, shape and reduction, on whichever backend this pass runs (see conftest.py)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from _oracle import backward_both, check
from _torch_compat import gaussian_nll_loss as torch_gaussian_nll_loss
from conftest import BACKEND, DTYPES, TOL
from torch.distributions import Normal, kl_divergence

import fastvae

REDUCTIONS = ["none", "sum", "mean", "batchmean", "per_sample"]
SHAPES = [(7,), (33, 5), (4, 3, 6)]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "batchmean":
        return x.sum() / x.shape[0]
    if reduction == "per_sample":
        return x if x.dim() == 1 else x.flatten(1).sum(1)
    return x.sum() if reduction == "sum" else x.mean()


def _inputs(shape, dtype, device, *scales):
    """Fresh random leaves (never zeros) in dtype, with their float64 twins for the oracle."""
    out = []
    for s in scales:
        t = (torch.randn(shape, dtype=torch.float64) * s).to(device)
        low = t.to(dtype)
        out.append((low.clone().requires_grad_(), low.double().requires_grad_()))
    return out


# ---------------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_kl_standard_prior(dtype, shape, reduction, backend, device):
    (mu, mu64), (lv, lv64) = _inputs(shape, dtype, device, 1.0, 0.7)
    out = fastvae.gaussian_kl(mu, lv, reduction=reduction, backend=backend)
    elementwise = kl_divergence(Normal(mu64, torch.exp(0.5 * lv64)), Normal(0.0, 1.0))
    ref = _reduce(elementwise, reduction)
    backward_both(out, ref)
    check(out, ref, dtype, [(mu, mu64), (lv, lv64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior_shape", [(20, 6), (6,)])
def test_gaussian_kl_two_gaussians(dtype, reduction, prior_shape, backend, device):
    (mu, mu64), (lv, lv64) = _inputs((20, 6), dtype, device, 1.0, 0.7)
    (mp, mp64), (lp, lp64) = _inputs(prior_shape, dtype, device, 0.8, 0.5)
    out = fastvae.gaussian_kl(mu, lv, mp, lp, reduction=reduction, backend=backend)
    elementwise = kl_divergence(Normal(mu64, torch.exp(0.5 * lv64)), Normal(mp64, torch.exp(0.5 * lp64)))
    ref = _reduce(elementwise, reduction)
    backward_both(out, ref)
    check(out, ref, dtype, [(mu, mu64), (lv, lv64), (mp, mp64), (lp, lp64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [((20, 6), (1, 6)), ((20, 1), (20, 6)), ((6,), (20, 6))])
@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample"])
def test_gaussian_kl_broadcast_posterior(dtype, shapes, reduction, backend, device):
    """mu and logvar broadcast together, as the closed form does: the KL over the broadcast shape, each
    gradient summed back to its input's shape."""
    (mu, mu64), = _inputs(shapes[0], dtype, device, 1.0)
    (lv, lv64), = _inputs(shapes[1], dtype, device, 0.7)
    out = fastvae.gaussian_kl(mu, lv, reduction=reduction, backend=backend)
    ref = _reduce(0.5 * (torch.exp(lv64) + mu64 ** 2 - 1 - lv64), reduction)
    assert out.shape == ref.shape
    backward_both(out, ref)
    check(out, ref, dtype, [(mu, mu64), (lv, lv64)])


def test_gaussian_kl_closed_form(backend, device):
    mu = torch.randn(64, 8, device=device)
    lv = torch.randn(64, 8, device=device) * 0.5
    closed = -0.5 * torch.sum(1 + lv.double() - mu.double() ** 2 - lv.double().exp())
    torch.testing.assert_close(fastvae.gaussian_kl(mu, lv, backend=backend).double(), closed, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_matches_parts(dtype, reduction, backend, device):
    mu = torch.randn(40, 9, device=device).to(dtype)
    lv = (torch.randn(40, 9, device=device) * 0.5).to(dtype)
    torch.manual_seed(3)
    z, kl = fastvae.reparameterize_kl(mu, lv, reduction=reduction, backend=backend)
    torch.manual_seed(3)
    z_alone = fastvae.reparameterize(mu, lv, backend=backend)
    assert torch.equal(z, z_alone)
    kl_alone = fastvae.gaussian_kl(mu, lv, reduction=reduction, backend=backend)
    torch.testing.assert_close(kl, kl_alone, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ reparameterize


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_samples", [None, 1, 3])
def test_reparameterize_shapes_and_gradients(dtype, shape, num_samples, backend, device):
    mu = torch.randn(shape, device=device).to(dtype).requires_grad_()
    lv = (torch.randn(shape, device=device) * 0.5).to(dtype).requires_grad_()
    z = fastvae.reparameterize(mu, lv, num_samples=num_samples, backend=backend)
    assert z.shape == (shape if num_samples is None else (num_samples, *shape)) and z.dtype == dtype
    gz = torch.randn(z.shape, device=device).to(dtype)
    z.backward(gz)
    rtol, atol = TOL[dtype]
    z64, mu64, gz64 = z.detach().double(), mu.detach().double(), gz.double()
    sample_dims = () if num_samples is None else (0,)
    # dz/dmu = 1 and dz/dlogvar = 0.5 * (z - mu): the gradient follows from z whatever eps was
    expect_mu = gz64.sum(sample_dims) if sample_dims else gz64
    expect_lv = 0.5 * (z64 - mu64) * gz64
    expect_lv = expect_lv.sum(sample_dims) if sample_dims else expect_lv
    # half-precision z is rounded, so z - mu carries that rounding: widen atol by the magnitude of z
    z_ulp = 0.0 if dtype in (torch.float32, torch.float64) else 8 * torch.finfo(dtype).eps * z64.abs().max().item()
    torch.testing.assert_close(mu.grad.double(), expect_mu, rtol=rtol, atol=atol * 4)
    torch.testing.assert_close(lv.grad.double(), expect_lv, rtol=rtol, atol=atol * 4 + z_ulp * gz64.abs().max())


def test_reparameterize_statistics(backend, device):
    # a million draws on the reference path; the interpreter is slower, test_triton covers it at 2^18
    n = 1_000_000 if BACKEND == "torch" else 1 << 17
    mu = torch.randn(n, device=device)
    lv = torch.randn(n, device=device) * 0.5
    eps = ((fastvae.reparameterize(mu, lv, backend=backend).double() - mu.double()) / torch.exp(0.5 * lv.double()))
    se = 1 / math.sqrt(n)
    assert abs(eps.mean().item()) < 6 * se
    assert abs(eps.std().item() - 1) < 6 * se * math.sqrt(0.5)


def test_reparameterize_reproducible(backend, device):
    mu = torch.randn(300, device=device)
    lv = torch.randn(300, device=device)
    torch.manual_seed(11)
    a = fastvae.reparameterize(mu, lv, backend=backend)
    b = fastvae.reparameterize(mu, lv, backend=backend)
    torch.manual_seed(11)
    assert torch.equal(a, fastvae.reparameterize(mu, lv, backend=backend))
    assert not torch.equal(a, b)
    gen = torch.Generator(device=device)
    draws = []
    for seed in (5, 5, 6):
        gen.manual_seed(seed)
        draws.append(fastvae.reparameterize(mu, lv, generator=gen, backend=backend))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


# ------------------------------------------------------------------------------------------ Gaussian NLL

VAR_FORMS = {  # input shape -> var shape, one per form torch accepts
    "element": ((12, 5), (12, 5)),
    "last-dim-1": ((12, 5), (12, 1)),
    "no-last-dim": ((12, 5), (12,)),
    "middle-dim-1": ((4, 3, 5, 6), (4, 1, 5, 6)),
    "first-dim-1": ((12, 5), (1, 5)),
    "scalar": ((12, 1), (1, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", list(VAR_FORMS))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("full", [False, True])
def test_gaussian_nll_matches_torch(dtype, form, reduction, full, backend, device):
    in_shape, var_shape = VAR_FORMS[form]
    (x, x64), (t, t64) = _inputs(in_shape, dtype, device, 1.0, 1.0)
    v = (torch.rand(var_shape, dtype=torch.float64) + 0.2).to(device).to(dtype)
    v, v64 = v.clone().requires_grad_(), v.double().requires_grad_()
    out = fastvae.gaussian_nll_loss(x, t, v, full=full, reduction=reduction, backend=backend)
    ref = torch_gaussian_nll_loss(x64, t64, v64, full=full, reduction=reduction)
    backward_both(out, ref)
    check(out, ref, dtype, [(x, x64), (t, t64), (v, v64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_nll_float_var_and_batchmean(dtype, reduction, backend, device):
    (x, x64), (t, t64) = _inputs((16, 10), dtype, device, 1.0, 1.0)
    out = fastvae.gaussian_nll_loss(x, t, 0.3, reduction=reduction, backend=backend)
    elementwise = torch_gaussian_nll_loss(x64, t64, 0.3, reduction="none")
    ref = _reduce(elementwise, reduction)
    backward_both(out, ref)
    check(out, ref, dtype, [(x, x64), (t, t64)])


@pytest.mark.parametrize("eps", [1e-6, 0.25])
def test_gaussian_nll_clamp_keeps_torch_gradient(eps, backend, device):
    x = torch.randn(30, 4, device=device, requires_grad=True)
    t = torch.randn(30, 4, device=device)
    v = (torch.rand(30, 4, device=device) * 0.5).requires_grad_()  # with eps=0.25 about half clamp
    out = fastvae.gaussian_nll_loss(x, t, v, eps=eps, backend=backend)
    out.backward()
    x2, v2 = x.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = F.gaussian_nll_loss(x2, t, v2, eps=eps)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-5, atol=1e-7)


LOGVAR_FORMS = {
    "scalar": ((16, 6), ()),
    "per-feature": ((16, 6), (6,)),
    "per-row": ((16, 6), (16, 1)),
    "per-element": ((16, 6), (16, 6)),
    "per-channel": ((2, 3, 4, 5), (1, 3, 1, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", list(LOGVAR_FORMS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("full", [False, True])
def test_gaussian_nll_logvar(dtype, form, reduction, full, backend, device):
    in_shape, lv_shape = LOGVAR_FORMS[form]
    (x, x64), (t, t64) = _inputs(in_shape, dtype, device, 1.0, 1.0)
    (lv, lv64), = _inputs(lv_shape, dtype, device, 0.5)
    out = fastvae.gaussian_nll_loss_logvar(x, t, lv, full=full, reduction=reduction, backend=backend)
    elementwise = 0.5 * (lv64 + (x64 - t64) ** 2 * torch.exp(-lv64)) + (0.5 * math.log(2 * math.pi) if full else 0)
    ref = _reduce(elementwise, reduction)
    backward_both(out, ref)
    check(out, ref, dtype, [(x, x64), (t, t64), (lv, lv64)])


@pytest.mark.torch_only
def test_gradcheck_float64(device):
    mu = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    lv = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    mp = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    lp = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fastvae.gaussian_kl(*a, reduction="none"), (mu, lv, mp, lp))
    x = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(5, 3, dtype=torch.float64, device=device, requires_grad=True)
    v = (torch.rand(5, 1, dtype=torch.float64, device=device) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fastvae.gaussian_nll_loss(*a, reduction="sum"), (x, t, v))
    assert torch.autograd.gradcheck(lambda *a: fastvae.gaussian_nll_loss_logvar(*a), (x, t, lp))


def test_half_inputs_return_their_dtype(backend, device):
    for dtype in (torch.float16, torch.bfloat16):
        mu = torch.randn(8, 4, device=device).to(dtype)
        assert fastvae.gaussian_kl(mu, mu, backend=backend).dtype == dtype
        assert fastvae.reparameterize(mu, mu, backend=backend).dtype == dtype
        assert fastvae.gaussian_nll_loss(mu, mu.flip(0), 1.0, backend=backend).dtype == dtype


# ---------------------------------------------------------------------------------------------- bad input


def _cases(device):
    f = torch.randn(4, 3, device=device)
    i = torch.ones(4, 3, dtype=torch.int64, device=device)
    return f, i


def test_bad_input_posterior(backend, device):
    f, i = _cases(device)
    # shapes that do not broadcast: torch's RuntimeError for ``mu + exp(0.5 * logvar) * eps``, and a ValueError
    for err in (ValueError, RuntimeError):
        with pytest.raises(err, match=r"logvar of shape \(4, 2\) does not broadcast with mu.*\(4, 3\)"):
            fastvae.reparameterize(f, f[:, :2], backend=backend)
    with pytest.raises(TypeError, match="mu must have a floating-point dtype"):
        fastvae.gaussian_kl(i, f, backend=backend)
    with pytest.raises(TypeError, match="logvar must be a torch.Tensor"):
        fastvae.reparameterize_kl(f, 1.0, backend=backend)
    with pytest.raises(ValueError, match="per_sample.*no dims"):
        fastvae.gaussian_kl(f[0, 0], f[0, 0], reduction="per_sample", backend=backend)
    with pytest.raises(ValueError, match="mu_p of shape \\(5,\\) does not broadcast with mu and logvar"):
        fastvae.gaussian_kl(f, f, torch.randn(5, device=device), backend=backend)
    with pytest.raises(ValueError, match="abc is not valid"):
        fastvae.gaussian_kl(f, f, reduction="abc", backend=backend)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_samples must be >= 1"):
            fastvae.reparameterize(f, f, num_samples=bad, backend=backend)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="num_samples must be None or an int"):
            fastvae.reparameterize(f, f, num_samples=bad, backend=backend)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        fastvae.reparameterize(f, f, generator=3, backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        fastvae.reparameterize(f, f, backend="bogus")
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="logvar is on meta"):
        fastvae.reparameterize(f, meta, backend=backend)


def test_bad_input_nll(backend, device):
    f, i = _cases(device)
    with pytest.raises(ValueError, match="var has negative entry"):
        fastvae.gaussian_nll_loss(f, f, -0.5, backend=backend)
    with pytest.raises(ValueError, match="var has negative entry"):
        fastvae.gaussian_nll_loss(f, f.flip(0), f, backend=backend)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        fastvae.gaussian_nll_loss(f, f, torch.ones(4, 2, device=device), backend=backend)
    with pytest.raises(ValueError, match="abc is not valid"):
        fastvae.gaussian_nll_loss(f, f, 1.0, reduction="abc", backend=backend)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        fastvae.gaussian_nll_loss(f, [1.0], 1.0, backend=backend)
    with pytest.raises(RuntimeError, match="with a bool tensor is not supported"):  # torch's error
        fastvae.gaussian_nll_loss(f, i.bool(), 1.0, backend=backend)
    with pytest.raises(TypeError, match="var must have a floating-point dtype"):
        fastvae.gaussian_nll_loss(f, f, i, backend=backend)
    # torch raises RuntimeError here; fastvae.ShapeError is that and a ValueError naming the argument
    for err in (ValueError, RuntimeError):
        with pytest.raises(err, match=r"target of shape \(4, 2\).*size of tensor a \(3\) must match.*dimension 1"):
            fastvae.gaussian_nll_loss(f, f[:, :2], 1.0, backend=backend)
    with pytest.raises(ValueError, match="logvar of shape \\(2,\\) does not broadcast to input"):
        fastvae.gaussian_nll_loss_logvar(f, f, torch.zeros(2, device=device), backend=backend)
    with pytest.raises(ValueError, match="var is on meta"):
        fastvae.gaussian_nll_loss(f, f, torch.ones(4, 3, device="meta"), backend=backend)


@pytest.mark.torch_only
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter makes CPU runnable")
def test_triton_backend_needs_cuda():
    f = torch.randn(3)
    with pytest.raises(ValueError, match="backend='triton' needs"):
        fastvae.gaussian_kl(f, f, backend="triton")


def test_drop_in_for_a_hand_written_vae_loss(backend, device):
    """What users replace: the PyTorch-VAE style loss, term by term, to the same numbers."""
    x, x_hat = torch.rand(32, 20, device=device), torch.rand(32, 20, device=device)
    mu, lv = torch.randn(32, 4, device=device), torch.randn(32, 4, device=device) * 0.3
    recon = F.gaussian_nll_loss(x_hat, x, torch.full_like(x, 0.1), reduction="sum") / 32
    kld = -0.5 * torch.sum(1 + lv - mu.pow(2) - lv.exp()) / 32
    ours = (fastvae.gaussian_nll_loss(x_hat, x, torch.full_like(x, 0.1), reduction="batchmean", backend=backend)
            + fastvae.gaussian_kl(mu, lv, reduction="batchmean", backend=backend))
    torch.testing.assert_close(ours, recon + kld, rtol=1e-6, atol=1e-6)


def _saved_bytes(fn, inputs=()) -> int:
    """Bytes autograd keeps for backward beyond the inputs themselves (which the caller holds anyway)."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in ptrs:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


@pytest.mark.torch_only
@pytest.mark.parametrize("form", ["var", "logvar"])
def test_eager_nll_keeps_less_for_backward_than_the_formula(form, device):
    """The CPU path writes the gradient in forward: one input-sized tensor kept beyond the inputs (saved for a
    create_graph backward), where autograd through the formula keeps several."""
    x = torch.randn(64, 50, device=device, requires_grad=True)
    t = torch.randn(64, 50, device=device)
    v = (torch.rand(64, 50, device=device) + 0.1).requires_grad_()
    if form == "var":
        ours = _saved_bytes(lambda: fastvae.gaussian_nll_loss(x, t, v, backend="torch"), (x, t, v))
        eager = _saved_bytes(lambda: F.gaussian_nll_loss(x, t, v), (x, t, v))
    else:
        ours = _saved_bytes(lambda: fastvae.gaussian_nll_loss_logvar(x, t, v, backend="torch"), (x, t, v))
        eager = _saved_bytes(lambda: (0.5 * (v + (x - t) ** 2 * torch.exp(-v))).mean(), (x, t, v))
    assert ours <= 2 * x.numel() * x.element_size() < eager
