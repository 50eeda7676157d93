"""The Gaussian family as a drop-in for torch's function and the hand-written formulas: second-order gradients
(create_graph, gradgradcheck, torch.func), integer targets, broadcast posteriors, the negative-var policy (NaN
or ValueError, never a device assert), the eager sampler bit for bit against the formula, inputs read where
they lie (halves of one tensor, channels_last), 64-bit offsets forced on, and torch.compile(fullgraph=True).
Runs on whichever backend this pass runs (see conftest.py)."""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _launches import count_launches
from conftest import BACKEND, DEVICE

import fastvae
from fastvae import reference

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
kernels_only = pytest.mark.skipif(BACKEND != "triton", reason="kernel launches: the Triton pass")


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _randn(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def _expect_kernels(counts, name):
    if BACKEND == "triton":
        assert counts[name] > 0, f"{name} was not launched: the case fell back to eager"


def _logvar_nll(x, t, lv, reduction="mean"):
    return reference.reduce(0.5 * (lv + (x - t) ** 2 * torch.exp(-lv)), reduction)


# ------------------------------------------------------------------------------------- second order


@pytest.mark.parametrize("form", ["var-scalar", "var-tensor", "var-broadcast", "logvar"])
@pytest.mark.parametrize("reduction", ["mean", "per_sample"])
def test_nll_gradient_penalty_matches_torch(form, reduction, backend):
    """loss + 10 |dloss/dx_hat|^2 through create_graph: torch's gradients (the penalty's too), not the
    loss's alone."""
    x_hat, x = _randn(6, 5), _randn(6, 5)
    v = {"var-scalar": 0.7, "var-tensor": torch.rand(6, 5, device=DEVICE) + 0.3,
         "var-broadcast": torch.rand(6, 1, device=DEVICE) + 0.3, "logvar": _randn(5, scale=0.5)}[form]

    def run(xh, var, dtype, ours):
        t = x.to(dtype)
        if form == "logvar":
            loss = (fastvae.gaussian_nll_loss_logvar(xh, t, var, reduction=reduction, backend=backend) if ours
                    else _logvar_nll(xh, t, var, reduction))
        else:
            red = "none" if reduction == "per_sample" and not ours else reduction
            loss = (fastvae.gaussian_nll_loss(xh, t, var, reduction=reduction, backend=backend) if ours
                    else F.gaussian_nll_loss(xh, t, var, reduction=red))
            if red != reduction:
                loss = loss.sum(1)
        loss = loss.sum()
        g, = torch.autograd.grad(loss, xh, create_graph=True)
        assert g.requires_grad, "the gradient lost its graph: a penalty on it would silently train on nothing"
        (loss + 10 * g.pow(2).sum()).backward()
        return loss

    vs = [v, v] if isinstance(v, float) else [_leaf(v), _leaf(v.double())]
    xh, xh64 = _leaf(x_hat), _leaf(x_hat.double())
    with count_launches() as counts:
        out = run(xh, vs[0], torch.float32, True)
    _expect_kernels(counts, "gaussian_nll_fwd_kernel")
    ref = run(xh64, vs[1], torch.float64, False)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xh.grad.double(), xh64.grad, rtol=1e-4, atol=1e-6)
    if not isinstance(v, float):
        torch.testing.assert_close(vs[0].grad.double(), vs[1].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(BACKEND != "torch", reason="float64: the eager path")
def test_gradgradcheck_float64():
    def f64(*shape, positive=False):
        t = torch.randn(*shape, dtype=torch.float64, device=DEVICE)
        return (t.abs() + 0.2 if positive else t).requires_grad_()

    x, t, v, lv = f64(4, 3), f64(4, 3), f64(4, 1, positive=True), f64(3)
    assert torch.autograd.gradgradcheck(lambda *a: fastvae.gaussian_nll_loss(*a, reduction="sum"), (x, t, v))
    assert torch.autograd.gradgradcheck(lambda *a: fastvae.gaussian_nll_loss(*a, full=True, reduction="per_sample"),
                                        (x, t, f64(4, 3, positive=True)))
    assert torch.autograd.gradgradcheck(lambda *a: fastvae.gaussian_nll_loss_logvar(*a, reduction="none"),
                                        (x, t, lv))
    mu, lvq, mp, lp = f64(4, 3), f64(4, 3), f64(3), f64(1, 3)
    assert torch.autograd.gradgradcheck(lambda *a: fastvae.gaussian_kl(*a, reduction="none"), (mu, lvq, mp, lp))

    def sample(m, lvar):
        gen = torch.Generator(device=DEVICE).manual_seed(3)
        return fastvae.reparameterize_kl(m, lvar, num_samples=2, generator=gen, reduction="per_sample")

    assert torch.autograd.gradgradcheck(sample, (mu, f64(1, 3)))


def _kernel_eps(shape, num_samples, seed):
    """The noise a call with ``generator`` seeded ``seed`` draws: z for mu = 0, logvar = 0 (0 + 1 * eps)."""
    zeros = torch.zeros(shape, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return fastvae.reparameterize(zeros, zeros, num_samples=num_samples, generator=gen, backend=BACKEND)


@pytest.mark.parametrize("op", ["reparameterize", "reparameterize_kl", "gaussian_kl_prior"])
@pytest.mark.parametrize("lv_shape", [(5, 4), (1, 4)])
def test_second_order_posterior_matches_float64(op, lv_shape, backend):
    """A penalty on d(objective)/d(logvar) and d/d(mu): the create_graph gradients of the fused sampler and KL
    (fp32, on the kernels in the Triton pass) against the float64 formulas with the same eps."""
    mu0, lv0, w = _randn(5, 4), _randn(*lv_shape, scale=0.5), _randn(2, 5, 4)
    mp0, lp0 = _randn(4), _randn(5, 4, scale=0.3)
    eps = _kernel_eps((5, 4), 2, seed=9).double()

    def objective(mu, lv, mp, lp, ours):
        gen = torch.Generator(device=DEVICE).manual_seed(9)
        if op == "gaussian_kl_prior":
            return (fastvae.gaussian_kl(mu, lv, mp, lp, reduction="batchmean", backend=backend) if ours
                    else reference.gaussian_kl(mu, lv, mp, lp, "batchmean"))
        if ours and op == "reparameterize":
            return (fastvae.reparameterize(mu, lv, num_samples=2, generator=gen, backend=backend) * w).sum()
        if ours:
            z, kl = fastvae.reparameterize_kl(mu, lv, num_samples=2, generator=gen, reduction="sum", backend=backend)
            return (z * w).sum() + kl
        z = mu + torch.exp(0.5 * lv) * eps
        return (z * w.double()).sum() + (reference.gaussian_kl(mu, lv) if op == "reparameterize_kl" else 0)

    results = []
    for dtype, ours in ((torch.float32, True), (torch.float64, False)):
        leaves = [_leaf(t.to(dtype)) for t in (mu0, lv0, mp0, lp0)]
        with count_launches() as counts:
            obj = objective(*leaves, ours)
            grads = torch.autograd.grad(obj, leaves[:2], create_graph=True)
            assert grads[1].requires_grad  # (dz/dmu = 1 is a constant, as in torch)
            (obj + sum(g.pow(2).sum() for g in grads)).backward()
        if ours:
            _expect_kernels(counts, "sample_kl_fwd_kernel")
        results.append([obj.detach()] + [t.grad for t in leaves if t.grad is not None])
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@kernels_only
@pytest.mark.parametrize("case", ["log_weights", "ldm_clamped", "normal_scale"])
def test_second_order_other_sampler_forms(case):
    """The same op serves the log importance ratios, ldm's clamped posterior (split parameters) and
    torch.distributions' Normal (standard deviations): their create_graph gradients against float64 formulas
    with the kernel's eps."""
    from fastvae.distributions import DiagonalGaussianDistribution, Normal

    p0 = _randn(2, 6, 2, 2)
    p0[0, 3, 0, 0] = 25.0  # one clamped logvar: torch.clamp's zero gradient there
    w = _randn(3, 2, 3, 2, 2)

    def objective(p, ours):
        mu, raw = p.chunk(2, dim=1)
        if case == "normal_scale":
            raw = raw.abs() + 0.5
        if ours:
            torch.manual_seed(6)
            if case == "log_weights":
                z, lr = fastvae.sample_log_weights(mu, raw, num_samples=3, backend="triton")
                return (z * w).sum() + (lr * w[:, :, 0, 0, 0]).sum()
            if case == "ldm_clamped":
                dist = DiagonalGaussianDistribution(p, backend="triton")
                return (dist.sample() * w[0]).sum() + dist.kl().sum()
            q = Normal(mu, raw, backend="triton")
            prior = Normal(torch.zeros_like(mu), torch.ones_like(raw), backend="triton")
            return (q.rsample((3,)) * w).sum() + torch.distributions.kl_divergence(q, prior).sum()
        k = 1 if case == "ldm_clamped" else 3
        torch.manual_seed(6)
        eps = fastvae.reparameterize(torch.zeros(2, 3, 2, 2, device=DEVICE), torch.zeros(2, 3, 2, 2, device=DEVICE),
                                     num_samples=None if k == 1 else k, backend="triton").double()
        if case == "normal_scale":
            std, lv = raw, 2 * torch.log(raw)
        else:
            lv = torch.clamp(raw, -30.0, 20.0) if case == "ldm_clamped" else raw
            std = torch.exp(0.5 * lv)
        z = mu + std * eps
        if case == "log_weights":
            lr = (0.5 * (eps * eps - z * z + lv)).flatten(2).sum(2)
            return (z * w.double()).sum() + (lr * w[:, :, 0, 0, 0].double()).sum()
        kl = 0.5 * (torch.exp(lv) + mu * mu - 1 - lv)
        return (z * (w[0] if k == 1 else w).double()).sum() + kl.sum()

    results = []
    for dtype, ours in ((torch.float32, True), (torch.float64, False)):
        p = _leaf(p0.to(dtype))
        with count_launches("sample_kl_fwd_kernel") as counts:
            obj = objective(p, ours)
            g, = torch.autograd.grad(obj, p, create_graph=True)
            assert g.requires_grad
            (obj + g.pow(2).sum()).backward()
        assert counts["sample_kl_fwd_kernel"] > 0 or not ours
        results.append((obj.detach(), p.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_torch_func_grad_and_vmap(backend):
    """torch.func transforms run the eager path (setup_context Function, generated vmap rule) with the
    numbers of plain autograd."""
    x, t, v = _randn(4, 3), _randn(4, 3), torch.rand(4, 3, device=DEVICE) + 0.2
    mu, lv = _randn(4, 3), _randn(4, 3, scale=0.5)
    for fn, args in (
        (lambda a, b: fastvae.gaussian_nll_loss(a, t, b, backend=backend), (x, v)),
        (lambda a, b: fastvae.gaussian_nll_loss_logvar(a, t, b, reduction="sum", backend=backend), (x, lv)),
        (lambda a, b: fastvae.gaussian_kl(a, b, backend=backend), (mu, lv)),
    ):
        got = torch.func.grad(fn, argnums=(0, 1))(*args)
        leaves = [_leaf(a) for a in args]
        expect = torch.autograd.grad(fn(*leaves), leaves)
        for g, e in zip(got, expect):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    # second order through func: the Hessian-vector product of the NLL in x
    hvp = torch.func.grad(lambda a: torch.func.grad(lambda b: fastvae.gaussian_nll_loss(
        b, t, v, reduction="sum", backend=backend))(a).pow(2).sum())(x)
    torch.testing.assert_close(hvp, 2 * (x - t) / v ** 2, rtol=1e-5, atol=1e-6)
    # vmap over a batch of independent losses: the per-sample reduction
    per = torch.func.vmap(lambda a, b, c: fastvae.gaussian_nll_loss(a, b, c, reduction="sum", backend=backend))(
        x, t, v)
    torch.testing.assert_close(per, F.gaussian_nll_loss(x, t, v, reduction="none").sum(1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integer_target(target_dtype, dtype, backend):
    """uint8 pixels as the target: torch promotes them, and so do both paths (the kernel loads them in place)."""
    x_hat = (torch.rand(4, 3, 5, device=DEVICE) * 255).to(dtype).requires_grad_()
    target = torch.randint(0, 256, (4, 3, 5), device=DEVICE, dtype=target_dtype)
    var = (torch.rand(4, 3, 1, device=DEVICE) * 50 + 1).requires_grad_()
    with count_launches() as counts:
        out = fastvae.gaussian_nll_loss(x_hat, target, var, backend=backend)
        out.backward()
    _expect_kernels(counts, "gaussian_nll_fwd_kernel")
    x2, v2 = _leaf(x_hat), _leaf(var)
    ref = F.gaussian_nll_loss(x2, target, v2)
    ref.backward()
    assert out.dtype == ref.dtype
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(x_hat.grad.float(), x2.grad.float(), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(var.grad, v2.grad, rtol=rtol, atol=1e-5)
    lv = _leaf(torch.full((5,), 2.0, device=DEVICE))
    out = fastvae.gaussian_nll_loss_logvar(x_hat.detach(), target, lv, reduction="sum", backend=backend)
    torch.testing.assert_close(out, _logvar_nll(x_hat.detach(), target, lv, "sum"), rtol=rtol, atol=1e-3)


@pytest.mark.parametrize("shapes", [((6, 4), (1, 4)), ((6, 4), (6, 1)), ((1, 4), (6, 4)), ((6, 1, 3), (5, 1))])
def test_broadcast_posterior(shapes, backend):
    """A shared logvar against a batch of means (and other broadcasts the formula takes): z and the KL have the
    broadcast shape, each gradient is summed back to its input's shape."""
    mu, lv = _leaf(_randn(*shapes[0])), _leaf(_randn(*shapes[1], scale=0.5))
    shape = torch.broadcast_shapes(mu.shape, lv.shape)
    w = _randn(*shape)
    torch.manual_seed(4)
    with count_launches() as counts:
        z, kl = fastvae.reparameterize_kl(mu, lv, reduction="per_sample", backend=backend)
        ((z * w).sum() + kl.sum()).backward()
    _expect_kernels(counts, "sample_kl_fwd_kernel")
    assert z.shape == shape and kl.shape == shape[:1]
    torch.manual_seed(4)
    z_alone = fastvae.reparameterize(mu, lv, backend=backend)
    assert torch.equal(z, z_alone)
    # the formulas in float64, with the eps this z was drawn with
    eps = ((z.detach().double() - mu.detach().double()) / torch.exp(0.5 * lv.detach().double()))
    m64, l64 = _leaf(mu.double()), _leaf(lv.double())
    z64 = m64 + torch.exp(0.5 * l64) * eps
    kl64 = 0.5 * (torch.exp(l64) + m64 ** 2 - 1 - l64)
    ((z64 * w.double()).sum() + kl64.sum()).backward()
    torch.testing.assert_close(kl.double(), kl64.detach().flatten(1).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mu.grad.double(), m64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lv.grad.double(), l64.grad, rtol=1e-4, atol=1e-5)
    assert mu.grad.shape == mu.shape and lv.grad.shape == lv.shape
    out = fastvae.gaussian_kl(mu, lv, _randn(shape[-1]), reduction="none", backend=backend)
    assert out.shape == shape


def test_reparameterize_eager_is_the_formula_bitwise():
    """The eager path computes mu + exp(0.5 logvar) * eps as written (two roundings, not addcmul's one): with
    the same seed it is the hand-written formula bit for bit."""
    mu, lv = _randn(64, 33), _randn(64, 33, scale=2.0)
    for num_samples in (None, 3):
        torch.manual_seed(7)
        z = fastvae.reparameterize(mu, lv, num_samples=num_samples, backend="torch")
        torch.manual_seed(7)
        eps = torch.randn_like(mu) if num_samples is None else torch.randn(num_samples, *mu.shape, device=DEVICE)
        assert torch.equal(z, mu + torch.exp(0.5 * lv) * eps)
    torch.manual_seed(7)
    z, _ = fastvae.reparameterize_kl(mu, lv, backend="torch")
    torch.manual_seed(7)
    assert torch.equal(z, mu + torch.exp(0.5 * lv) * torch.randn_like(mu))


@kernels_only
def test_reparameterize_kernel_is_the_formula_to_ulps():
    """The kernel's z against the formula with the kernel's own eps: a few ulps (its exp, a fused multiply-add),
    documented as not bitwise."""
    mu, lv = _randn(64, 33), _randn(64, 33, scale=2.0)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    z = fastvae.reparameterize(mu, lv, generator=gen, backend="triton")
    eps = _kernel_eps(mu.shape, None, seed=2)
    noise = torch.exp(0.5 * lv) * eps
    ulps = (z - (mu + noise)).abs() / (torch.finfo(torch.float32).eps * (mu.abs() + noise.abs()))
    assert ulps.max() <= 8, f"{ulps.max().item()} ulps from the formula"


# ----------------------------------------------------------------------------------------- validation


@contextlib.contextmanager
def _validate(value):
    previous = fastvae.get_default_validate_args()
    fastvae.set_default_validate_args(value)
    try:
        yield
    finally:
        fastvae.set_default_validate_args(previous)


@pytest.mark.parametrize("var_shape", [(8, 3), (8, 1)])
def test_negative_var_nan_or_value_error(monkeypatch, var_shape, backend):
    """Validating (the default, as torch checks): ValueError on both paths. Not validating: NaN in the loss
    and gradients of the elements that read the negative entry, torch's values elsewhere. Never a device
    assert."""

    def no_assert(*args, **kwargs):
        raise AssertionError("torch._assert_async called: a device-side assert poisons the CUDA context")

    monkeypatch.setattr(torch, "_assert_async", no_assert)
    x, t = _leaf(_randn(8, 3)), _randn(8, 3)
    var = torch.rand(var_shape, device=DEVICE) + 0.5
    var[2, 0] = -0.25
    var = var.requires_grad_()
    with pytest.raises(ValueError, match="var has negative entry/entries"):
        fastvae.gaussian_nll_loss(x, t, var, backend=backend)
    with _validate(False):
        with count_launches() as counts:
            loss = fastvae.gaussian_nll_loss(x, t, var, reduction="none", backend=backend)
            loss.sum().backward()
        _expect_kernels(counts, "gaussian_nll_fwd_kernel")
        total = fastvae.gaussian_nll_loss(x.detach(), t, var.detach(), backend=backend)
    bad = torch.zeros(8, 3, dtype=torch.bool, device=DEVICE)
    bad[2] = True if var_shape[1] == 1 else bad[2]
    bad[2, 0] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(x.grad[bad]).all() and torch.isnan(total)
    assert torch.isnan(var.grad[2, 0]) and torch.isfinite(var.grad[3:]).all()
    good = var.detach().clamp(min=0.5)
    ref = F.gaussian_nll_loss(x.detach(), t, good, reduction="none")
    torch.testing.assert_close(loss[~bad].detach(), ref[~bad], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad[~bad]).all()


@pytest.mark.parametrize("value", [float("nan"), 0.0, 1e-9])
def test_var_clamp_keeps_nan_and_clamps_small(value, backend):
    """max(var, eps) as torch.clamp: a NaN variance stays NaN (a max instruction would return eps), zero and
    tiny ones take eps with the gradient passed through."""
    x, t = _randn(4, 2), _randn(4, 2)
    var = torch.full((4, 2), 0.5, device=DEVICE)
    var[1, 1] = value
    v1, v2 = _leaf(var), _leaf(var)
    with _validate(False):
        out = fastvae.gaussian_nll_loss(x, t, v1, reduction="none", backend=backend)
    ref = F.gaussian_nll_loss(x, t, v2, reduction="none")
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------- layouts


@contextlib.contextmanager
def _copies():
    """Counts .contiguous() calls that copy (return another storage)."""
    original = torch.Tensor.contiguous
    copies = []

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.numel() > 1 and out.untyped_storage().data_ptr() != self.untyped_storage().data_ptr():
            copies.append(tuple(self.shape))
        return out

    torch.Tensor.contiguous = counting
    try:
        yield copies
    finally:
        torch.Tensor.contiguous = original


@pytest.mark.parametrize("dim", [1, -1])
def test_chunked_posterior_read_in_place(dim, backend):
    """``mu, logvar = h.chunk(2, dim)``: the kernels read both halves where they lie (no copy), with the values
    and gradients of contiguous copies of them."""
    h = _leaf(_randn(4, 6, 10) if dim == -1 else _randn(4, 10, 3))
    w = _randn(*h.chunk(2, dim)[0].shape)
    results = []
    for copy in (False, True):
        h.grad = None
        mu, lv = h.chunk(2, dim)
        if copy:
            mu, lv = mu.contiguous(), lv.contiguous()
        torch.manual_seed(8)
        with _copies() as copies:
            z, kl = fastvae.reparameterize_kl(mu, lv, reduction="mean", backend=backend)
            ((z * w).sum() + kl).backward()
        if BACKEND == "triton" and not copy:
            assert copies == [], f"copied {copies}"
        results.append((z, kl, h.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@kernels_only
def test_chunked_posterior_allocates_only_outputs(monkeypatch):
    from fastvae._triton import common

    sizes = []
    original = common.alloc

    def alloc(like, shape, dtype=None):
        sizes.append(math.prod(shape))
        return original(like, shape, dtype)

    monkeypatch.setattr(common, "alloc", alloc)
    h = _leaf(_randn(16, 64))
    mu, lv = h.chunk(2, 1)
    z = fastvae.reparameterize(mu, lv, backend="triton")
    assert [s for s in sizes if s] == [mu.numel()]  # z; the KL and log-ratio slots are empty
    sizes.clear()
    z.sum().backward()
    assert [s for s in sizes if s] == [mu.numel(), mu.numel()]  # the two gradients, nothing besides


@pytest.mark.parametrize("var_kind", ["element", "scalar", "channel-broadcast"])
@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample"])
def test_nll_channels_last_read_in_memory_order(var_kind, reduction, backend):
    """channels_last input and target are read in place; the per-element loss and the gradient come back
    channels_last, with the numbers of the contiguous call."""
    cl = torch.channels_last
    x = _randn(2, 3, 4, 5).to(memory_format=cl)
    t = _randn(2, 3, 4, 5).to(memory_format=cl)
    var = {"element": (torch.rand(2, 3, 4, 5, device=DEVICE) + 0.3).to(memory_format=cl),
           "scalar": 0.6, "channel-broadcast": torch.rand(2, 1, 4, 5, device=DEVICE) + 0.3}[var_kind]
    weight = torch.rand({"none": (2, 3, 4, 5), "sum": (), "per_sample": (2,)}[reduction], device=DEVICE) + 0.5
    results = []
    for layout in (cl, torch.contiguous_format):
        xl = _leaf(x.contiguous(memory_format=layout))
        tl_ = t.contiguous(memory_format=layout)
        vl = var if isinstance(var, float) else _leaf(var.contiguous(memory_format=layout))
        # per element, the incoming gradient in the loss's layout (a contiguous one would be copied to it)
        wl = weight.contiguous(memory_format=layout) if weight.dim() == 4 else weight
        with _copies() as copies:
            out = fastvae.gaussian_nll_loss(xl, tl_, vl, reduction=reduction, backend=backend)
            (out * wl).sum().backward()
        if BACKEND == "triton" and layout == cl:
            assert copies == [], f"copied {copies}"
        if layout == cl:
            assert xl.grad.is_contiguous(memory_format=cl)
            if reduction == "none":
                assert out.is_contiguous(memory_format=cl)
        results.append((out, xl.grad) + (() if isinstance(var, float) else (vl.grad,)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@kernels_only
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_nll_channels_last_allocates_only_outputs(monkeypatch, reduction):
    """channels_last x_hat, target and var: the forward allocates the loss (per element for "none", else
    partials), dloss/dx_hat and dloss/dvar, nothing else input-sized; backward scales them in place."""
    from fastvae._triton import common

    sizes = []
    original = common.alloc

    def alloc(like, shape, dtype=None):
        sizes.append(math.prod(shape))
        return original(like, shape, dtype)

    monkeypatch.setattr(common, "alloc", alloc)
    cl = torch.channels_last
    x = _leaf(_randn(2, 3, 4, 5).to(memory_format=cl))
    t = _randn(2, 3, 4, 5).to(memory_format=cl)
    var = _leaf((torch.rand(2, 3, 4, 5, device=DEVICE) + 0.3).to(memory_format=cl))
    with _copies() as copies:
        loss = fastvae.gaussian_nll_loss(x, t, var, reduction=reduction, backend="triton")
        n = x.numel()
        assert sum(s == n for s in sizes) == (3 if reduction == "none" else 2), sizes
        sizes.clear()
        (loss * torch.ones_like(loss)).sum().backward()
    assert [s for s in sizes if s == n] == [] and copies == []
    assert x.grad.is_contiguous(memory_format=cl) and var.grad.is_contiguous(memory_format=cl)


# ------------------------------------------------------------------------------------------ 64 bit


@kernels_only
@pytest.mark.parametrize("var_kind", ["element", "last-dim-1", "first-dim-1", "middle"])
def test_nll_int64_offsets_match(monkeypatch, var_kind):
    """Offsets are int64 (WIDE) only past 2^31 elements; forced on for a small tensor, the loss and gradients
    match the int32 launch bit for bit (and the compile check gets the WIDE kernel)."""
    nll_op = importlib.import_module("fastvae._triton.gaussian_nll")
    x, t = _randn(3, 4, 50), _randn(3, 4, 50)
    var = {"element": torch.rand(3, 4, 50), "last-dim-1": torch.rand(3, 4, 1), "first-dim-1": torch.rand(1, 4, 50),
           "middle": torch.rand(3, 1, 50)}[var_kind].to(DEVICE) + 0.2

    def run():
        xl, vl = _leaf(x), _leaf(var)
        out = fastvae.gaussian_nll_loss(xl, t, vl, reduction="per_sample", backend="triton")
        (out * torch.arange(3.0, device=DEVICE)).sum().backward()
        return out, xl.grad, vl.grad

    narrow = run()
    monkeypatch.setattr(nll_op, "INT32_OFFSETS", 0)
    wide = run()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


@kernels_only
def test_sampler_int64_offsets_split_and_prior(monkeypatch):
    """The sampler's WIDE path for the halves of one tensor and a prior: bit for bit the int32 launch."""
    sampling_op = importlib.import_module("fastvae._triton.sampling")
    h, mp, lp = _randn(3, 2 * 70), _randn(70), _randn(3, 70, scale=0.3)

    def run():
        hl, mpl, lpl = _leaf(h), _leaf(mp), _leaf(lp)
        mu, lv = hl.chunk(2, 1)
        torch.manual_seed(5)
        z = fastvae.reparameterize(mu, lv, num_samples=2, backend="triton")
        kl = fastvae.gaussian_kl(mu, lv, mpl, lpl, reduction="per_sample", backend="triton")
        (z.square().sum() + kl.sum()).backward()
        return z, kl, hl.grad, mpl.grad, lpl.grad

    narrow = run()
    monkeypatch.setattr(sampling_op, "INT32_OFFSETS", 0)
    wide = run()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("op", ["reparameterize", "gaussian_kl", "reparameterize_kl", "nll_scalar", "nll_tensor",
                                "nll_logvar"])
def test_compile_fullgraph(op, backend):
    """torch.compile(fullgraph=True) through each op: one graph (no host sync, no graph break), the eager
    numbers and gradients. aot_eager on CPU (the interpreter cannot run inside inductor's generated code)."""
    torch._dynamo.reset()
    mu, lv, t = _randn(6, 4), _randn(6, 4, scale=0.5), _randn(6, 4)
    var = torch.rand(6, 4, device=DEVICE) + 0.3

    def fn(a, b):
        if op == "reparameterize":
            return fastvae.reparameterize(a, b, backend=backend).square().sum()
        if op == "gaussian_kl":
            return fastvae.gaussian_kl(a, b, reduction="batchmean", backend=backend)
        if op == "reparameterize_kl":
            z, kl = fastvae.reparameterize_kl(a, b, backend=backend)
            return z.square().sum() + kl
        if op == "nll_scalar":
            return fastvae.gaussian_nll_loss(a, t, 0.5, reduction="sum", backend=backend)
        if op == "nll_tensor":
            return fastvae.gaussian_nll_loss(a, t, var + b.abs(), backend=backend)
        return fastvae.gaussian_nll_loss_logvar(a, t, b, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    results = []
    for f in (fn, compiled):
        a, b = _leaf(mu), _leaf(lv)
        torch.manual_seed(0)
        out = f(a, b)
        out.backward()
        results.append((out, a.grad, b.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
