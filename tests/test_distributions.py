"""fastvae.distributions against their peers' formulas in float64: ldm's / diffusers' DiagonalGaussianDistribution
(written out below, line for line) and torch.distributions' Normal, Independent and kl_divergence, values,
gradients, shapes and errors, on whichever backend this pass runs (see conftest.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _launches import count_launches
from conftest import BACKEND, DEVICE, DTYPES, TOL
from torch.distributions import Independent, kl_divergence
from torch.distributions import Normal as TorchNormal
from torch.distributions.kl import _dispatch_kl, _kl_normal_normal

from fastvae.distributions import DiagonalGaussianDistribution, Normal
from fastvae.reference.common import clamp_grad_at_bounds

KERNELS = BACKEND == "triton"
kernels_only = pytest.mark.skipif(not KERNELS, reason="launch counts: the Triton pass")


class LdmPosterior:
    """diffusers' DiagonalGaussianDistribution (models/autoencoders/vae.py, as ldm's), the oracle."""

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean, device=self.parameters.device,
                                                   dtype=self.parameters.dtype)

    def sample(self, noise):
        return self.mean + self.std * noise

    def kl(self, other=None):
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample, dims=(1, 2, 3)):
        if self.deterministic:
            return torch.Tensor([0.0])
        logtwopi = np.log(2.0 * np.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=dims)

    def mode(self):
        return self.mean


# image latents (B, 2C, H, W), video latents (B, 2C, T, H, W) (kl sums dims 1-3: shape (B, W)), odd sizes; halves
# of C * H * W elements a multiple of the kernels' 16-byte rows or not (located per row or per element)
SHAPES = [(2, 8, 5, 3), (2, 6, 3, 4, 5), (3, 2, 1, 7), (2, 4, 4, 4)]


def _params(shape, dtype, scale=1.0):
    """Fresh random parameters in dtype (log-variances about N(0, 0.5^2)) and their float64 twin."""
    t = torch.randn(shape, dtype=torch.float64) * scale
    c = shape[1] // 2
    t[:, c:] *= 0.5
    low = t.to(dtype).to(DEVICE)
    return low.clone().requires_grad_(), low.double().requires_grad_()


def _check(actual, expected, dtype, grads=(), widen=1.0):
    rtol, atol = TOL[dtype]
    rtol, atol = rtol * widen, atol * widen
    assert actual.dtype == dtype and actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.detach().double(), expected.detach(), rtol=rtol, atol=atol * scale)
    for a, e in grads:
        assert a.grad is not None and a.grad.dtype == a.dtype
        scale = max(1.0, e.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=rtol, atol=atol * scale)


def _backward(out, ref):
    w = torch.rand(ref.shape, dtype=torch.float64, device=ref.device) + 0.5
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()


# ------------------------------------------------------------------------ DiagonalGaussianDistribution


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ldm_kl_and_mode(dtype, shape, backend):
    p, p64 = _params(shape, dtype)
    post, ref = DiagonalGaussianDistribution(p, backend=backend), LdmPosterior(p64)
    assert post.parameters is p and post.mode().shape == ref.mode().shape
    assert post.mode().data_ptr() == p.data_ptr()  # a view: the first half
    kl = post.kl()
    _backward(kl, ref.kl())
    _check(kl, ref.kl(), dtype, [(p, p64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ldm_kl_other(dtype, shape, backend):
    p, p64 = _params(shape, dtype)
    o, o64 = _params(shape, dtype, scale=0.7)
    kl = DiagonalGaussianDistribution(p, backend=backend).kl(DiagonalGaussianDistribution(o, backend=backend))
    ref = LdmPosterior(p64).kl(LdmPosterior(o64))
    _backward(kl, ref)
    _check(kl, ref, dtype, [(p, p64), (o, o64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ldm_sample_then_kl(dtype, shape, backend):
    """z = mean + std * eps with the gradients of diffusers' formula for that eps, and the kl() after it (from
    the sampling pass on the kernels) equal to a kl() alone, values and gradients."""
    p, p64 = _params(shape, dtype)
    post, ref = DiagonalGaussianDistribution(p, backend=backend), LdmPosterior(p64)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    z = post.sample(generator=gen)
    kl = post.kl()
    if not KERNELS:  # the eager path draws eps as diffusers does: same generator, same numbers
        eps = torch.randn(ref.mean.shape, generator=gen.manual_seed(3), device=DEVICE, dtype=dtype).double()
    else:  # the kernel's noise, recovered from z (exact up to z's rounding)
        eps = ((z.detach().double() - ref.mean) / ref.std).detach()
        assert eps.abs().max() < 6 and abs(eps.mean()) < 0.5
    z_ref = ref.sample(eps)
    w = torch.rand(z_ref.shape, dtype=torch.float64, device=DEVICE) + 0.5
    g_kl = torch.rand(ref.kl().shape, dtype=torch.float64, device=DEVICE) + 0.5
    ((z.double() * w).sum() + (kl.double() * g_kl).sum()).backward()
    ((z_ref * w).sum() + (ref.kl() * g_kl).sum()).backward()
    # a half-precision z is rounded before eps is recovered from it: its gradient to logvar carries that
    widen = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    _check(z, z_ref, dtype, widen=widen)
    _check(kl, ref.kl(), dtype, [(p, p64)], widen=widen)
    # the same KL and gradients as a kl() alone
    p1, p2 = (p.detach().clone().requires_grad_() for _ in range(2))
    post1 = DiagonalGaussianDistribution(p1, backend=backend)
    post1.sample()
    kl_after = post1.kl()
    kl_alone = DiagonalGaussianDistribution(p2, backend=backend).kl()
    for out in (kl_after, kl_alone):
        (out.double() * g_kl).sum().backward()
    torch.testing.assert_close(kl_after, kl_alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dims", [(1, 2, 3), (1, 2), (0, 1, 2, 3)])
def test_ldm_nll(dtype, shape, dims, backend):
    p, p64 = _params(shape, dtype)
    x = torch.randn(p.shape[0], p.shape[1] // 2, *p.shape[2:], dtype=torch.float64).to(DEVICE)
    x, x64 = x.to(dtype).requires_grad_(), x.to(dtype).double().requires_grad_()
    nll = DiagonalGaussianDistribution(p, backend=backend).nll(x, dims=list(dims))
    ref = LdmPosterior(p64).nll(x64, dims=list(dims))
    _backward(nll, ref)
    _check(nll, ref, dtype, [(p, p64), (x, x64)])


def test_ldm_clamp_values_and_gradient(backend):
    """logvar clamped to [-30, 20] with torch.clamp's gradient: zero outside, passed on the bounds."""
    p = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    lv = p[:, 4:]
    lv[0, 0, 0] = torch.tensor([-45.0, -30.0, -29.5])
    lv[0, 1, 0] = torch.tensor([25.0, 20.0, 19.5])
    lv[1, 0, 0] = torch.tensor([1e4, -1e4, 0.0])
    p = p.to(DEVICE)
    p32, p64 = p.float().requires_grad_(), p.clone().requires_grad_()
    post, ref = DiagonalGaussianDistribution(p32, backend=backend), LdmPosterior(p64)
    torch.testing.assert_close(post.logvar.double(), ref.logvar)
    kl, kl_ref = post.kl(), ref.kl()
    _backward(kl, kl_ref)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-5, atol=1e-6)
    assert (p32.grad[0, 4, 0, 0] == 0) and (p32.grad[0, 5, 0, 0] == 0) and (p32.grad[1, 4, 0, :2] == 0).all()
    assert (p32.grad[0, 4, 0, 2] != 0) and (p32.grad[0, 5, 0, 2] != 0)
    # on the bounds (-30, 20) as the installed torch: passed up to 2.13, zero from 2.14
    on_bounds = torch.stack([p32.grad[0, 4, 0, 1], p32.grad[0, 5, 0, 1]])
    assert bool((on_bounds != 0).all() if clamp_grad_at_bounds() else (on_bounds == 0).all())


@kernels_only
@pytest.mark.parametrize("closed", [True, False])
def test_ldm_clamp_gradient_on_the_bounds_follows_torch(monkeypatch, closed, backend):
    """The kernel's clamp takes either convention of torch.clamp's gradient on the bounds (the installed torch
    is probed at import: passed up to torch 2.13, zero from 2.14); here both, whichever torch runs the test."""
    from fastvae._triton import sampling

    monkeypatch.setattr(sampling, "CLAMP_CLOSED", closed)
    p = torch.zeros(1, 2, 1, 3, device=DEVICE)
    p[0, 1, 0] = torch.tensor([-30.0, 20.0, 0.5])
    p.requires_grad_()
    DiagonalGaussianDistribution(p, backend=backend).kl().sum().backward()
    g = p.grad[0, 1, 0]
    assert g[2] != 0 and bool((g[:2] != 0).all() if closed else (g[:2] == 0).all())


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_ldm_deterministic(shape, backend):
    p, p64 = _params(shape, torch.float32)
    post, ref = DiagonalGaussianDistribution(p, True, backend=backend), LdmPosterior(p64, True)
    assert post.deterministic
    assert torch.equal(post.kl(), ref.kl()) and torch.equal(post.nll(ref.mean), ref.nll(ref.mean))
    assert torch.equal(post.std, torch.zeros_like(post.mean)) and torch.equal(post.var, post.std)
    z = post.sample(generator=torch.Generator(device=DEVICE).manual_seed(1))
    torch.testing.assert_close(z.double(), ref.mean)


def test_ldm_attributes_made_on_read(backend):
    p, p64 = _params(SHAPES[0], torch.float32)
    post, ref = DiagonalGaussianDistribution(p, backend=backend), LdmPosterior(p64)
    post.sample()
    post.kl()
    if KERNELS:  # the eager path is diffusers' formula, which makes them
        assert not {"logvar", "std", "var"} & set(vars(post)), "sample() and kl() made a logvar, std or var tensor"
    for name in ("logvar", "std", "var"):
        torch.testing.assert_close(getattr(post, name).double(), getattr(ref, name), rtol=1e-6, atol=1e-7)
        assert getattr(post, name).shape == getattr(ref, name).shape


def test_ldm_generator_and_seed_reproduce(backend):
    p = torch.randn(2, 4, 3, 3, device=DEVICE)
    post = DiagonalGaussianDistribution(p, backend=backend)
    gen = torch.Generator(device=DEVICE)
    a = post.sample(generator=gen.manual_seed(5))
    b = post.sample(generator=gen.manual_seed(5))
    c = post.sample(generator=gen.manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    d = post.sample()
    torch.manual_seed(9)
    assert torch.equal(d, post.sample())
    # a list of generators, one per image (diffusers' randn_tensor): each image its own noise
    gens = [torch.Generator(device=DEVICE).manual_seed(s) for s in (1, 2)]
    e = post.sample(generator=gens)
    single = DiagonalGaussianDistribution(p[1:], backend=backend).sample(generator=[gens[1].manual_seed(2)])
    assert e.shape == a.shape and torch.equal(e[1:], single)


def test_ldm_bad_input(backend):
    with pytest.raises(TypeError, match="parameters must be a torch.Tensor"):
        DiagonalGaussianDistribution([1.0, 2.0])
    with pytest.raises(TypeError, match="parameters must have a floating-point dtype"):
        DiagonalGaussianDistribution(torch.ones(2, 4, 1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="parameters must have a dim 1"):
        DiagonalGaussianDistribution(torch.ones(4))
    with pytest.raises(ValueError, match="backend must be"):
        DiagonalGaussianDistribution(torch.ones(2, 4, 1, 1), backend="bogus")
    # what diffusers' formulas reject, rejected alike: a 3-D posterior has no dim 3 to sum
    post = DiagonalGaussianDistribution(torch.randn(2, 4, 5, device=DEVICE), backend=backend)
    with pytest.raises(IndexError):
        post.kl()


@kernels_only
def test_ldm_one_pass_each_way(poisoned):
    """sample() + kl(): one sampling launch reading parameters in place (the KL finished by the row sums), one
    backward launch; nothing but the 8-byte seed saved beside parameters; every output element written."""
    p = torch.randn(3, 8, 5, 7, device=DEVICE, requires_grad=True)
    saved = []

    def pack(t):
        if t.data_ptr() != p.data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    with count_launches() as fwd, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        post = DiagonalGaussianDistribution(p, backend="triton")
        z = post.sample()
        kl = post.kl()
    assert dict(fwd) == {"sample_kl_fwd_kernel": 1, "sum_row_partials_kernel": 1}
    assert sum(saved) <= 8, f"{sum(saved)} bytes saved beside parameters"
    with count_launches() as bwd:
        (z.sum() + kl.sum()).backward()
    assert bwd["sample_kl_bwd_kernel"] == 1 and sum(bwd.values()) == 1
    assert torch.isfinite(z).all() and torch.isfinite(kl).all() and torch.isfinite(p.grad).all()
    with count_launches() as alone:
        DiagonalGaussianDistribution(p, backend="triton").kl(DiagonalGaussianDistribution(p.detach().flip(0)))
    assert alone["sample_kl_fwd_kernel"] == 1


# ------------------------------------------------------------------------------------------------ Normal


def _normal_params(shape, dtype, scale_floor=0.3):
    loc = torch.randn(shape, dtype=torch.float64)
    scale = torch.rand(shape, dtype=torch.float64) + scale_floor
    return [(t.to(dtype).to(DEVICE).requires_grad_(), t.to(dtype).double().to(DEVICE).requires_grad_())
            for t in (loc, scale)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(7,), (4, 5)])
@pytest.mark.parametrize("sample_shape", [(), (3,), (2, 3)])
def test_normal_rsample(dtype, batch, sample_shape, backend):
    (loc, loc64), (scale, scale64) = _normal_params(batch, dtype)
    q = Normal(loc, scale, backend=backend)
    assert isinstance(q, TorchNormal)
    torch.manual_seed(4)
    z = q.rsample(sample_shape)
    assert z.shape == torch.Size(sample_shape) + batch and z.dtype == dtype
    if not KERNELS:  # torch's own rsample, the same numbers
        torch.manual_seed(4)
        assert torch.equal(z, TorchNormal(loc, scale).rsample(sample_shape))
    eps = ((z.detach().double() - loc64) / scale64).detach()
    z_ref = loc64 + eps * scale64
    _backward(z, z_ref)
    widen = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    _check(z, z_ref, dtype, [(loc, loc64), (scale, scale64)], widen=widen)
    s = q.sample(sample_shape)
    assert s.shape == z.shape and not s.requires_grad


def _kl_pairs():
    return {
        "fastvae-fastvae": (Normal, Normal),
        "fastvae-torch": (Normal, TorchNormal),
        "torch-fastvae": (TorchNormal, Normal),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", list(_kl_pairs()))
@pytest.mark.parametrize("shapes", [((6, 5), (6, 5)), ((6, 5), (5,)), ((5,), (6, 5)), ((6, 5), ())])
def test_normal_kl_pairs(dtype, pair, shapes, backend):
    """kl_divergence in every pairing with fastvae's Normal, broadcast batch shapes included, against torch's
    own KL of Normals in float64, values and gradients."""
    p_cls, q_cls = _kl_pairs()[pair]
    (m, m64), (s, s64) = _normal_params(shapes[0], dtype)
    (mq, mq64), (sq, sq64) = _normal_params(shapes[1], dtype, scale_floor=0.5)
    kw = lambda cls: {"backend": backend} if cls is Normal else {}  # noqa: E731
    kl = kl_divergence(p_cls(m, s, **kw(p_cls)), q_cls(mq, sq, **kw(q_cls)))
    ref = _kl_normal_normal(TorchNormal(m64, s64), TorchNormal(mq64, sq64))
    _backward(kl, ref)
    _check(kl, ref, dtype, [(m, m64), (s, s64), (mq, mq64), (sq, sq64)])


@pytest.mark.parametrize("reinterpreted", [1, 2])
def test_normal_kl_inside_independent(reinterpreted, backend):
    (m, m64), (s, s64) = _normal_params((3, 4, 5), torch.float32)
    (mq, mq64), (sq, sq64) = _normal_params((3, 4, 5), torch.float32, scale_floor=0.5)
    for q_cls in (Normal, TorchNormal):
        qkw = {"backend": backend} if q_cls is Normal else {}
        kl = kl_divergence(Independent(Normal(m, s, backend=backend), reinterpreted),
                           Independent(q_cls(mq, sq, **qkw), reinterpreted))
        ref = kl_divergence(Independent(TorchNormal(m64, s64), reinterpreted),
                            Independent(TorchNormal(mq64, sq64), reinterpreted))
        assert kl.shape == ref.shape == (3, 4)[: 3 - reinterpreted]
        torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)


def test_torch_normal_is_unchanged():
    assert _dispatch_kl(TorchNormal, TorchNormal) is _kl_normal_normal
    assert _dispatch_kl(Normal, TorchNormal) is not _kl_normal_normal
    assert TorchNormal.rsample is not Normal.rsample and "rsample" not in vars(TorchNormal).get("__wrapped__", {})


@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_everything_else_is_torch(dtype, backend):
    (loc, _), (scale, _) = _normal_params((4, 3), dtype)
    q, t = Normal(loc, scale, backend=backend), TorchNormal(loc, scale)
    x = torch.randn(4, 3, device=DEVICE).to(dtype)
    assert q.batch_shape == t.batch_shape and q.event_shape == t.event_shape
    for name in ("log_prob", "cdf"):
        assert torch.equal(getattr(q, name)(x), getattr(t, name)(x))
    assert torch.equal(q.entropy(), t.entropy()) and torch.equal(q.mean, t.mean) and torch.equal(q.stddev, t.stddev)
    e = q.expand((2, 4, 3))
    assert type(e) is Normal and e.backend == q.backend and e.batch_shape == (2, 4, 3)
    assert e.rsample().shape == (2, 4, 3)
    assert Normal(0.0, 1.0).batch_shape == torch.Size()


def test_normal_validation_and_errors():
    with pytest.raises(ValueError, match="scale"):
        Normal(torch.zeros(3), -torch.ones(3), validate_args=True)
    with pytest.raises(ValueError, match="backend must be"):
        Normal(torch.zeros(3), torch.ones(3), backend="cuda")
    q = Normal(torch.zeros(3), torch.ones(3), validate_args=True)
    with pytest.raises(ValueError):
        q.log_prob(torch.zeros(4))


def test_normal_reproducible_and_statistics(backend):
    n = 1 << 14
    q = Normal(torch.randn(n, device=DEVICE), torch.rand(n, device=DEVICE) + 0.5, backend=backend)
    torch.manual_seed(2)
    a = q.rsample((2,))
    torch.manual_seed(2)
    assert torch.equal(a, q.rsample((2,)))
    eps = ((a.double() - q.loc.double()) / q.scale.double()).flatten()
    se = 1 / math.sqrt(eps.numel())
    assert abs(eps.mean().item()) < 6 * se and abs(eps.std().item() - 1) < 6 * se
    assert abs(torch.corrcoef(eps.reshape(2, n))[0, 1].item()) < 6 / math.sqrt(n)


@kernels_only
def test_normal_on_the_kernels(poisoned):
    """rsample and the KL each one launch (no eps saved: the seed alone beside loc and scale), Independent's
    too; torch's own pair launches nothing."""
    loc = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    scale = (torch.rand(6, 5, device=DEVICE) + 0.5).requires_grad_()
    with count_launches() as counts:
        q = Normal(loc, scale, backend="triton")
        z = q.rsample()
        kl = kl_divergence(q, TorchNormal(torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)))
        kli = kl_divergence(Independent(q, 1), Independent(Normal(0.0, 1.0, backend="triton").expand((6, 5)), 1))
        (z.sum() + kl.sum() + kli.sum()).backward()
    assert counts["sample_kl_fwd_kernel"] == 3 and counts["sample_kl_bwd_kernel"] == 3
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()
    with count_launches() as none:
        kl_divergence(TorchNormal(loc, scale), TorchNormal(0.0, 1.0))
    assert sum(none.values()) == 0


# --------------------------------------------------- broadcasting, dtypes and devices as the originals


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batches", [(3, 1), (1, 3)], ids=["shared-prior", "prior-batch"])
def test_ldm_kl_other_broadcasts(dtype, batches, backend):
    """kl(other) with other of another batch size broadcasts as diffusers' formula: one prior for the batch,
    or one posterior against a batch of priors; values, shape and gradients."""
    p, p64 = _params((batches[0], 4, 3, 2), dtype)
    o, o64 = _params((batches[1], 4, 3, 2), dtype, scale=0.7)
    kl = DiagonalGaussianDistribution(p, backend=backend).kl(DiagonalGaussianDistribution(o, backend=backend))
    ref = LdmPosterior(p64).kl(LdmPosterior(o64))
    assert kl.shape == ref.shape == (3,)
    _backward(kl, ref)
    _check(kl, ref, dtype, [(p, p64), (o, o64)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [((2, 4, 3, 3), (1, 2, 3, 3)), ((1, 4, 3, 3), (3, 2, 3, 3)),
                                    ((2, 4, 3, 3), (2, 2, 1, 3))], ids=["sample-1", "params-1", "sample-row"])
def test_ldm_nll_broadcasts(dtype, shapes, backend):
    p, p64 = _params(shapes[0], dtype)
    x = torch.randn(shapes[1], dtype=torch.float64).to(DEVICE)
    x, x64 = x.to(dtype).requires_grad_(), x.to(dtype).double().requires_grad_()
    nll = DiagonalGaussianDistribution(p, backend=backend).nll(x)
    ref = LdmPosterior(p64).nll(x64)
    assert nll.shape == ref.shape
    _backward(nll, ref)
    _check(nll, ref, dtype, [(p, p64), (x, x64)])


def test_ldm_dtypes_promote_as_diffusers(backend):
    """A float64 prior or sample against float32 parameters, or uint8 pixels: torch's promotion, as in
    diffusers' formula (the values those of the formula in the promoted dtype)."""
    p = torch.randn(2, 4, 3, 3, device=DEVICE)
    post = DiagonalGaussianDistribution(p, backend=backend)
    o64 = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    kl = post.kl(DiagonalGaussianDistribution(o64, backend=backend))
    ref = LdmPosterior(p).kl(LdmPosterior(o64))
    assert kl.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(kl, ref)
    x64 = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    assert post.nll(x64).dtype == torch.float64
    torch.testing.assert_close(post.nll(x64), LdmPosterior(p).nll(x64))
    pixels = torch.randint(0, 4, (2, 2, 3, 3), dtype=torch.uint8, device=DEVICE)
    ref = LdmPosterior(p).nll(pixels)
    assert post.nll(pixels).dtype == ref.dtype == torch.float32
    torch.testing.assert_close(post.nll(pixels), ref, rtol=1e-5, atol=1e-5)


def test_device_mismatch_is_a_device_error():
    """Tensors on two devices: fastvae.DeviceError, a RuntimeError as torch raises (meta stands in for a
    second device)."""
    from fastvae import DeviceError

    post = DiagonalGaussianDistribution(torch.randn(2, 4, 1, 1))
    meta = DiagonalGaussianDistribution(torch.randn(2, 4, 1, 1, device="meta"))
    with pytest.raises(DeviceError, match="same device"):
        post.kl(meta)
    with pytest.raises(RuntimeError, match="same device"):
        post.nll(torch.randn(2, 2, 1, 1, device="meta"))
    q = Normal(torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError, match="same device"):
        kl_divergence(q, TorchNormal(torch.zeros(3, device="meta"), torch.ones(3, device="meta"),
                                     validate_args=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [((5, 4), (1, 4)), ((5, 1), (4,)), ((3,), ())], ids=str)
def test_normal_broadcast_loc_and_scale(dtype, shapes, backend):
    """Normal(loc, scale) of two shapes (a shared scale, as a learned per-feature sigma): the batch shape,
    samples, gradients reduced to each parameter's own shape, log_prob and the KL, all as torch's Normal."""
    (loc, loc64), _ = _normal_params(shapes[0], dtype)
    _, (scale, scale64) = _normal_params(shapes[1], dtype)
    q, t = Normal(loc, scale, backend=backend), TorchNormal(loc64, scale64)
    assert q.batch_shape == t.batch_shape
    z = q.rsample((2,))
    assert z.shape == (2, *t.batch_shape) and z.dtype == dtype
    eps = ((z.detach().double() - loc64.detach()) / scale64.detach()).detach()
    z_ref = loc64 + eps * scale64
    _backward(z, z_ref)
    widen = 1.0 if dtype in (torch.float32, torch.float64) else 4.0
    _check(z, z_ref, dtype, [(loc, loc64), (scale, scale64)], widen=widen)
    assert loc.grad.shape == loc.shape and scale.grad.shape == scale.shape
    prior = TorchNormal(torch.zeros(t.batch_shape[-1:], dtype=torch.float64, device=DEVICE), 1.0)
    kl = kl_divergence(q, TorchNormal(prior.loc.to(dtype), prior.scale.to(dtype)))
    _check(kl, kl_divergence(t, prior), dtype)


# ------------------------------------------------------------------------------- second order (create_graph)


def _grad_of_grad(f, inputs):
    """d/d inputs of <d f(inputs) . w / d inputs, v>: the create_graph path, fixed weights w and v."""
    gen = torch.Generator().manual_seed(11)
    out = f(*inputs)
    w = (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * w).sum(), inputs, create_graph=True)
    s = sum((g * (torch.rand(g.shape, generator=gen, dtype=torch.float64) + 0.5).to(g.device, g.dtype)).sum()
            for g in grads)
    return torch.autograd.grad(s, inputs, allow_unused=True, materialize_grads=True)


def _second_order_matches(ours, ref, inputs, inputs64, dtype):
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(ours, inputs64)
    for a, e in zip(_grad_of_grad(ours, inputs), _grad_of_grad(ref, inputs64)):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double(), e, rtol=2e-4, atol=2e-4 * scale)


SECOND_ORDER_DTYPES = [torch.float32] + ([torch.float64] if BACKEND == "torch" else [])


@pytest.mark.parametrize("dtype", SECOND_ORDER_DTYPES)
@pytest.mark.parametrize("method", ["kl", "kl_other", "nll", "sample"])
def test_ldm_create_graph(method, dtype, backend):
    """Second-order gradients through the posterior's methods equal those of diffusers' formula in float64
    (gradgradcheck on the eager path in float64); sample() compared for the noise it drew."""
    p, p64 = _params((2, 4, 3, 2), dtype)
    o, o64 = _params((1, 4, 3, 2), dtype, scale=0.7)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64, device=DEVICE)
    if method == "sample":
        with torch.no_grad():
            z = DiagonalGaussianDistribution(p, backend=backend).sample(torch.Generator(DEVICE).manual_seed(2))
            ref = LdmPosterior(p64)
            eps = ((z.double() - ref.mean) / ref.std).detach()

        def ours(p):
            return DiagonalGaussianDistribution(p, backend=backend).sample(
                torch.Generator(DEVICE).manual_seed(2)) ** 2

        def theirs(p):
            return LdmPosterior(p).sample(eps) ** 2
        _second_order_matches(ours, theirs, (p,), (p64,), dtype)
        return
    if method == "kl_other":
        def call(cls):
            return lambda p, o: cls(p).kl(cls(o))
        inputs, inputs64 = (p, o), (p64, o64)
    else:
        def call(cls):
            return (lambda p: cls(p).kl()) if method == "kl" else (lambda p: cls(p).nll(x.to(p.dtype)))
        inputs, inputs64 = (p,), (p64,)
    ours = call(lambda t: DiagonalGaussianDistribution(t, backend=backend))
    _second_order_matches(ours, call(LdmPosterior), inputs, inputs64, dtype)


@pytest.mark.parametrize("dtype", SECOND_ORDER_DTYPES)
@pytest.mark.parametrize("method", ["rsample", "kl", "log_prob"])
def test_normal_create_graph(method, dtype, backend):
    """Second-order gradients through Normal's rsample (for the noise it drew), KL and log_prob equal
    torch.distributions' in float64."""
    (loc, loc64), (scale, scale64) = _normal_params((4, 3), dtype)
    (mq, mq64), (sq, sq64) = _normal_params((3,), dtype, scale_floor=0.5)
    x = torch.randn(4, 3, dtype=torch.float64, device=DEVICE)
    inputs, inputs64 = (loc, scale), (loc64, scale64)
    if method == "rsample":
        with torch.no_grad():
            torch.manual_seed(5)
            z = Normal(loc, scale, backend=backend).rsample()
            eps = ((z.double() - loc64) / scale64).detach()

        def ours(loc, scale):
            torch.manual_seed(5)
            return Normal(loc, scale, backend=backend).rsample() ** 2

        def theirs(loc, scale):
            return (loc + scale * eps) ** 2
    elif method == "kl":
        inputs, inputs64 = (loc, scale, mq, sq), (loc64, scale64, mq64, sq64)

        def ours(loc, scale, mq, sq):
            return kl_divergence(Normal(loc, scale, backend=backend), TorchNormal(mq, sq))

        def theirs(loc, scale, mq, sq):
            return kl_divergence(TorchNormal(loc, scale), TorchNormal(mq, sq))
    else:
        def ours(loc, scale):
            return Normal(loc, scale, backend=backend).log_prob(x.to(loc.dtype))

        def theirs(loc, scale):
            return TorchNormal(loc, scale).log_prob(x)
    _second_order_matches(ours, theirs, inputs, inputs64, dtype)
