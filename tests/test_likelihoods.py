"""Bernoulli (BCE with logits), Poisson, NB and ZINB: values and gradients against torch's own losses and the
scvi-tools formulas in float64, per dtype, shape, reduction and broadcast form, on whichever backend this pass
runs (see conftest.py); torch's OpInfo samples for the two drop-ins; and, in the Triton pass, the fp32
digamma / lgamma device functions, full output coverage and proof that the kernels (not a fallback) ran."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from _launches import count_launches
from _oracle import backward_both, check
from conftest import BACKEND, DEVICE, DTYPES, TOL
from fastvae.kernels import negative_binomial as nb_k
from fastvae.kernels.bernoulli import load_bcast

import fastvae
from fastvae import reference
from fastvae.reference.likelihoods import log_nb_positive, log_zinb_positive

REDUCTIONS = ["none", "sum", "mean", "batchmean", "per_sample"]
triton_only = pytest.mark.skipif(BACKEND != "triton", reason="kernel tests run in the Triton pass")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "per_sample":
        return x.flatten(1).sum(1) if x.dim() > 1 else x
    if reduction == "batchmean":
        return x.sum() / x.shape[0]
    return x.sum() if reduction == "sum" else x.mean()


def _pair(t: torch.Tensor, dtype: torch.dtype, grad: bool = True):
    """A leaf in dtype and its float64 twin holding the same (rounded) values."""
    low = t.to(DEVICE).to(dtype)
    return low.clone().requires_grad_(grad), low.double().requires_grad_(grad)


# ------------------------------------------------------------------------------------------------ Bernoulli

BCE_FORMS = {  # name -> (weight shape, pos_weight shape) for an input of shape (B, F) or (B, C, F)
    "plain": (None, None),
    "weight-full": ("full", None),
    "weight-feature": ("feature", None),
    "weight-row": ("row", None),
    "weight-scalar": ("scalar", None),
    "pos-weight": (None, "feature"),
    "both": ("full", "feature"),
}


def _bcast_shape(kind, shape):
    if kind is None:
        return None
    return {"full": shape, "feature": shape[-1:], "row": (shape[0],) + (1,) * (len(shape) - 1),
            "scalar": (1,)}[kind]


# every form on a 2-D input; the ones whose index formula changes with the rank on a 3-D one too
BCE_CASES = [((33, 5), f) for f in BCE_FORMS] + [((4, 3, 6), f) for f in ("weight-feature", "weight-row", "both")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, form", BCE_CASES, ids=[f"{len(s)}d-{f}" for s, f in BCE_CASES])
def test_bce_with_logits_matches_torch(dtype, shape, reduction, form, backend):
    (x, x64), (t, t64) = _pair(torch.randn(shape) * 3, dtype), _pair(torch.rand(shape), dtype)
    w_kind, p_kind = BCE_FORMS[form]
    w = w64 = p = p64 = None
    if w_kind:
        w, w64 = _pair(torch.rand(_bcast_shape(w_kind, shape)) + 0.5, dtype, grad=False)
    if p_kind:
        p, p64 = _pair(torch.rand(_bcast_shape(p_kind, shape)) * 3 + 0.2, dtype, grad=False)
    out = fastvae.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=p, backend=backend)
    ref = _reduce(F.binary_cross_entropy_with_logits(x64, t64, w64, reduction="none", pos_weight=p64), reduction)
    assert out.shape == ref.shape
    backward_both(out, ref)
    check(out, ref, dtype, [(x, x64), (t, t64)])


def test_bce_extreme_logits(backend, device):
    x = torch.tensor([-200.0, -30.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 30.0, 200.0], device=device).requires_grad_()
    t = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.3, 0.0, 1.0, 0.0, 1.0], device=device)
    out = fastvae.binary_cross_entropy_with_logits(x, t, reduction="none", backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(x64, t.double(), reduction="none")
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-12)
    # torch's own fp32 gradient, sigmoid(x) - t, rounds sigmoid(x) before the difference: an ulp of 1
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size_average, reduce", [(None, False), (True, None), (False, None), (False, True)])
def test_bce_legacy_reduction_args(size_average, reduce, backend, device):
    x, t = torch.randn(6, 4, device=device), torch.rand(6, 4, device=device)
    out = fastvae.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce, backend=backend)
    ref = F.binary_cross_entropy_with_logits(x, t, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(out, ref)


def test_bce_errors(backend, device):
    x, t = torch.randn(4, 3, device=device), torch.rand(4, 3, device=device)
    bce = fastvae.binary_cross_entropy_with_logits
    with pytest.raises(ValueError, match=re.escape("Target size (torch.Size([4])) must be the same as input size")):
        bce(x, t[:, 0], backend=backend)
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        bce(x, t, reduction="foo", backend=backend)
    with pytest.raises(RuntimeError, match=r"weight.*size of tensor a \(3\) must match the size of tensor b \(5\)"):
        bce(x, t, weight=torch.rand(5, device=device), backend=backend)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(5\) must match the size of tensor b \(3\)"):
        bce(x, t, pos_weight=torch.rand(5, device=device), backend=backend)
    with pytest.raises(RuntimeError, match=re.escape("doesn't match the broadcast shape [2, 4, 3]")):
        bce(x, t, weight=torch.rand(2, 4, 3, device=device), reduction="none", backend=backend)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        bce(x, t, weight=torch.rand(3, device=device, requires_grad=True), backend=backend)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        bce(x, [0.0, 1.0], backend=backend)
    # torch rejects an integer target (RuntimeError) and logits (NotImplementedError): both, and a TypeError
    for args in ((x, t.long()), (x, t > 0.5), (x.long(), t)):
        with pytest.raises(RuntimeError, match="must have a floating-point dtype"):
            bce(*args, backend=backend)
        with pytest.raises(TypeError):
            bce(*args, backend=backend)


def _leaves(sample):
    return [a.detach().clone().requires_grad_() for a in (sample.input, *sample.args)]


def _kw(sample):
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in sample.kwargs.items()}


def _opinfo():
    """torch's OpInfo module; it imports expecttest, which not every environment has (skip, not fail)."""
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
    from torch.testing._internal import common_methods_invocations

    return common_methods_invocations


@pytest.mark.parametrize("op", ["bce", "poisson"])
def test_torch_opinfo_samples(op, backend, device):
    dtype = torch.float32
    ops = _opinfo()
    if op == "bce":
        gen, theirs_fn = ops.sample_inputs_binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
        ours_fn = fastvae.binary_cross_entropy_with_logits
    else:
        gen, theirs_fn, ours_fn = ops.sample_inputs_poisson_nll_loss, F.poisson_nll_loss, fastvae.poisson_nll_loss
    # drawn without grad (the Poisson samples take abs_() in place) and made leaves that want one
    samples = list(gen(None, device, dtype, requires_grad=False))
    assert len(samples) > 20
    for sample in samples:
        ours, theirs = _leaves(sample), _leaves(sample)
        out = ours_fn(*ours, **_kw(sample), backend=backend)
        ref = theirs_fn(*theirs, **_kw(sample))
        assert out.shape == ref.shape and out.dtype == ref.dtype, sample
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        weight = torch.rand_like(ref) + 0.5
        (out * weight).sum().backward()
        (ref * weight).sum().backward()
        for a, b in zip(ours, theirs):
            if b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_torch_opinfo_poisson_errors(backend, device):
    errors = list(_opinfo().error_inputs_poisson_nll_loss(None, device))
    assert errors
    for err in errors:
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            fastvae.poisson_nll_loss(s.input, *s.args, **s.kwargs, backend=backend)


# ------------------------------------------------------------------------------------------------- Poisson


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_input", [True, False])
@pytest.mark.parametrize("full", [False, True])
def test_poisson_matches_torch(dtype, reduction, log_input, full, backend):
    shape = (24, 7)
    x_raw = torch.randn(shape) * 0.7 if log_input else torch.rand(shape) * 4 + 0.1
    (x, x64), (t, t64) = _pair(x_raw, dtype), _pair(torch.rand(shape) * 6 + 0.05, dtype)
    out = fastvae.poisson_nll_loss(x, t, log_input=log_input, full=full, reduction=reduction, backend=backend)
    ref = _reduce(F.poisson_nll_loss(x64, t64, log_input=log_input, full=full, reduction="none"), reduction)
    backward_both(out, ref)
    check(out, ref, dtype, [(x, x64), (t, t64)])


def test_poisson_broadcast_and_errors(backend, device):
    x, t = torch.randn(4, 3, device=device), torch.rand(3, device=device) * 3
    torch.testing.assert_close(
        fastvae.poisson_nll_loss(x, t, reduction="none", backend=backend), F.poisson_nll_loss(x, t, reduction="none")
    )
    with pytest.raises(RuntimeError, match=r"size of tensor a \(3\) must match the size of tensor b \(4\)"):
        fastvae.poisson_nll_loss(x, torch.rand(3, 3, device=device), backend=backend)
    with pytest.raises(ValueError, match="abc is not a valid value for reduction"):
        fastvae.poisson_nll_loss(x, x, reduction="abc", backend=backend)
    out = fastvae.poisson_nll_loss(x, x.abs(), size_average=False, backend=backend)
    torch.testing.assert_close(out, F.poisson_nll_loss(x, x.abs(), size_average=False))


# ----------------------------------------------------------------------------------------------- NB / ZINB

THETA_FORMS = ["full", "feature", "scalar"]
# fp32 against float64: lgamma(x + th) - lgamma(th) - lgamma(x + 1) cancels terms several times the result
NB_TOL = {**TOL, torch.float32: (3e-5, 3e-6)}


def _counts(shape):
    """Overdispersed counts with zeros: NB-like draws from a gamma-Poisson mixture."""
    rate = torch.distributions.Gamma(0.7, 0.3).sample(shape)
    return torch.poisson(rate)


def _nb_inputs(shape, dtype, theta_form, zi):
    x = _counts(shape).to(DEVICE).to(dtype)
    x64 = x.double()
    mu = _pair(torch.rand(shape) * 8 + 0.05, dtype)
    th_shape = {"full": shape, "feature": shape[-1:], "scalar": ()}[theta_form]
    th = _pair(torch.rand(th_shape) * 4 + 0.2, dtype)
    pi = _pair(torch.randn(shape) * 1.5, dtype) if zi else (None, None)
    return (x, x64), mu, th, pi


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("theta_form", THETA_FORMS)
@pytest.mark.parametrize("zi", [False, True], ids=["nb", "zinb"])
def test_nb_zinb_match_scvi_formulas(dtype, reduction, theta_form, zi, backend):
    shape = (40, 9)
    (x, x64), (mu, mu64), (th, th64), (pi, pi64) = _nb_inputs(shape, dtype, theta_form, zi)
    assert (x == 0).any() and (x > 0).any()
    if zi:
        out = fastvae.zinb_nll(x, mu, th, pi, reduction=reduction, backend=backend)
        ref = _reduce(-log_zinb_positive(x64, mu64, th64, pi64), reduction)
        grads = [(mu, mu64), (th, th64), (pi, pi64)]
    else:
        out = fastvae.negative_binomial_nll(x, mu, th, reduction=reduction, backend=backend)
        ref = _reduce(-log_nb_positive(x64, mu64, th64), reduction)
        grads = [(mu, mu64), (th, th64)]
    assert out.shape == ref.shape
    backward_both(out, ref)
    check(out, ref, dtype, grads, tol=NB_TOL[dtype])


def test_nb_formula_is_the_negative_binomial_log_pmf():
    # the scvi parameterization against torch.distributions: total_count = theta, p = mu / (mu + theta)
    x = _counts((50, 6)).double()
    mu, th = torch.rand(50, 6, dtype=torch.float64) * 5 + 0.1, torch.rand(6, dtype=torch.float64) * 3 + 0.3
    ref = torch.distributions.NegativeBinomial(total_count=th, logits=torch.log(mu) - torch.log(th)).log_prob(x)
    torch.testing.assert_close(log_nb_positive(x, mu, th, eps=0.0), ref, rtol=1e-10, atol=1e-10)
    pi = torch.randn(50, 6, dtype=torch.float64)
    p_drop = torch.sigmoid(pi)
    zinb = torch.where(x == 0, torch.log(p_drop + (1 - p_drop) * ref.exp()), torch.log1p(-p_drop) + ref)
    # eps > 0: at eps = 0 neither of scvi's cases (x < eps, x > eps) holds at x = 0
    torch.testing.assert_close(log_zinb_positive(x, mu, th, pi, eps=1e-12), zinb, rtol=1e-9, atol=1e-9)


def test_nb_theta_gradient_needs_digamma(backend, device):
    # large counts and small theta: the digamma difference dominates the theta gradient
    x = torch.tensor([[0.0, 1.0, 30.0, 500.0]], device=device)
    mu = torch.tensor([[0.5, 2.0, 25.0, 400.0]], device=device, requires_grad=True)
    th = torch.tensor([0.05, 0.3, 2.0, 40.0], device=device, requires_grad=True)
    fastvae.negative_binomial_nll(x, mu, th, backend=backend).backward()
    th64 = th.detach().double().requires_grad_()
    (-log_nb_positive(x.double(), mu.detach().double(), th64)).sum().backward()
    torch.testing.assert_close(th.grad.double(), th64.grad, rtol=2e-5, atol=1e-5)


def test_nb_errors(backend, device):
    x, mu = torch.ones(4, 3, device=device), torch.rand(4, 3, device=device) + 0.1
    th = torch.rand(3, device=device) + 0.1
    # the formula's torch ops broadcast every argument with every other: what cannot fails as torch's does
    with pytest.raises(RuntimeError, match=r"mu of shape \(4, 2\) does not broadcast with x .*size of tensor a "
                       r"\(3\) must match the size of tensor b \(2\) at non-singleton dimension 1"):
        fastvae.negative_binomial_nll(x, mu[:, :2], th, backend=backend)
    with pytest.raises(ValueError, match=r"theta of shape \(5,\) does not broadcast with x and mu"):
        fastvae.negative_binomial_nll(x, mu, torch.rand(5, device=device), backend=backend)
    with pytest.raises(ValueError, match=r"pi_logits of shape \(5, 1\) does not broadcast"):
        fastvae.zinb_nll(x, mu, th, torch.randn(5, 1, device=device), backend=backend)
    with pytest.raises(ValueError, match="eps must be a number"):
        fastvae.negative_binomial_nll(x, mu, th, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastvae.zinb_nll(x, mu, th, mu, reduction="avg", backend=backend)
    with pytest.raises(TypeError, match="theta must be a torch.Tensor"):
        fastvae.negative_binomial_nll(x, mu, 1.0, backend=backend)


def test_nb_gradient_of_data_takes_the_eager_path(backend, device):
    x = _counts((5, 4)).to(device).requires_grad_()
    mu, th = torch.rand(5, 4, device=device) + 0.1, torch.rand(4, device=device) + 0.1
    fastvae.negative_binomial_nll(x, mu, th, backend=backend).backward()
    x64 = x.detach().double().requires_grad_()
    (-log_nb_positive(x64, mu.double(), th.double())).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- Triton pass only


@triton_only
@pytest.mark.parametrize("fn", ["digamma", "lgamma"])
def test_special_functions_fp32_accuracy(fn):
    x64 = torch.logspace(-6, 6, 3001, dtype=torch.float64, device=DEVICE)
    x = x64.float()
    out = torch.empty_like(x)
    nb_k.special_fn_kernel[(triton.cdiv(x.numel(), 1024),)](
        x, out, x.numel(), FN=0 if fn == "digamma" else 1, BLOCK=1024
    )
    exact = (torch.digamma if fn == "digamma" else torch.lgamma)(x.double())
    err = (out.double() - exact).abs()
    # relative where |f| >= 1, absolute near the roots (psi(1.4616) = 0, lgamma(1) = lgamma(2) = 0)
    mixed = (err / exact.abs().clamp(min=1.0)).max().item()
    assert mixed < (1e-6 if fn == "digamma" else 2e-6), mixed
    if fn == "digamma":  # as accurate as torch's own fp32 digamma, to a few ulps
        torch_fp32 = (torch.digamma(x).double() - exact).abs()
        assert mixed < 4 * max((torch_fp32 / exact.abs().clamp(min=1.0)).max().item(), 3e-7)


@triton_only
def test_special_functions_limits():
    """The poles and limits torch gives: lgamma(0) = inf, digamma(0) = -inf, both inf at inf, NaN in, NaN
    out; a subnormal x keeps lgamma = -log x to fp32 accuracy (a reciprocal of it would overflow)."""
    x = torch.tensor([0.0, float("inf"), float("nan"), 1e-40, 1e-45, 3.0e-39], device=DEVICE)
    out = {}
    for fn in ("digamma", "lgamma"):
        out[fn] = torch.empty_like(x)
        nb_k.special_fn_kernel[(1,)](x, out[fn], x.numel(), FN=0 if fn == "digamma" else 1, BLOCK=1024)
    lg, psi = out["lgamma"].cpu(), out["digamma"].cpu()
    assert lg[0] == float("inf") and psi[0] == float("-inf")
    assert lg[1] == float("inf") and psi[1] == float("inf")
    assert lg[2].isnan() and psi[2].isnan()
    exact = torch.lgamma(x[3:].double().cpu())
    torch.testing.assert_close(lg[3:].double(), exact, rtol=1e-6, atol=0)
    assert (psi[3:] < -1e38).all()  # -1/x: at least fp32's largest magnitude, or -inf


@pytest.fixture
def launches():
    """Counts the launches of each loss kernel; a test asserts the kernel ran rather than a fallback."""
    with count_launches("bce_logits_fwd_kernel", "poisson_nll_fwd_kernel", "nb_nll_fwd_kernel") as counts:
        yield counts


def _odd_case(op, n_rows, n_cols, form):
    """(fn(leaves...), leaves, float64 oracle fn) for one op at an odd size."""
    shape = (n_rows, n_cols)
    if op == "bce":
        x, t = torch.randn(shape) * 3, torch.rand(shape)
        w = torch.rand(n_cols) + 0.5 if form == "feature" else None
        p = torch.rand(n_cols) * 2 + 0.2 if form == "feature" else None

        def fn(a, b, red, w=w, p=p):
            w_, p_ = (None if v is None else v.to(a.device, a.dtype) for v in (w, p))
            return F.binary_cross_entropy_with_logits(a, b, w_, reduction="none", pos_weight=p_) if red is None \
                else fastvae.binary_cross_entropy_with_logits(a, b, w_, reduction=red, pos_weight=p_,
                                                              backend="triton")
        return fn, [x, t]
    if op == "poisson":
        x, t = torch.rand(shape) * 3 + 0.1, torch.rand(shape) * 5

        def fn(a, b, red):
            return F.poisson_nll_loss(a, b, log_input=False, full=True, reduction="none") if red is None \
                else fastvae.poisson_nll_loss(a, b, log_input=False, full=True, reduction=red, backend="triton")
        return fn, [x, t]
    x = _counts(shape)
    mu, pi = torch.rand(shape) * 5 + 0.1, torch.randn(shape)
    th = torch.rand(n_cols if form == "feature" else shape) + 0.3

    def fn(m, th_, p, red):
        x_ = x.to(m.device, m.dtype)
        return -log_zinb_positive(x_, m, th_, p) if red is None \
            else fastvae.zinb_nll(x_, m, th_, p, reduction=red, backend="triton")
    return fn, [mu, th, pi]


@triton_only
@pytest.mark.parametrize("op", ["bce", "poisson", "zinb"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (3, 1001)])
@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample"])
def test_writes_every_element_and_takes_the_kernel(poisoned, launches, op, size, reduction):
    fn, raw = _odd_case(op, *size, "feature" if size[1] > 1 else "full")
    leaves = [t.to(DEVICE).requires_grad_() for t in raw]
    twins = [t.detach().double().requires_grad_() for t in leaves]
    out = fn(*leaves, reduction)
    ref = _reduce(fn(*twins, None), reduction)
    backward_both(out, ref)
    assert sum(launches.values()) == 1, launches
    assert torch.isfinite(out).all(), "a loss element was never written"
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-5)
    for a, b in zip(leaves, twins):
        assert torch.isfinite(a.grad).all(), "a gradient element was never written"
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-5, atol=1e-5)


@triton_only
def test_common_forms_take_the_kernel(launches):
    x, t = torch.randn(16, 3, 8, device=DEVICE), torch.rand(16, 3, 8, device=DEVICE)
    for w in (None, torch.rand(8, device=DEVICE), torch.rand(3, 1, device=DEVICE), torch.rand(16, 1, 1, device=DEVICE),
              torch.rand(1, device=DEVICE), torch.rand(16, 3, 8, device=DEVICE)):
        fastvae.binary_cross_entropy_with_logits(x, t, w, pos_weight=torch.rand(8, device=DEVICE), backend="triton")
    cnt = torch.poisson(torch.rand(16, 24, device=DEVICE) * 3)
    mu = torch.rand(16, 24, device=DEVICE) + 0.1
    for th in (torch.rand(24, device=DEVICE), torch.rand(1, 24, device=DEVICE), torch.rand(16, 24, device=DEVICE),
               torch.rand((), device=DEVICE)):
        fastvae.negative_binomial_nll(cnt, mu.requires_grad_(), th.requires_grad_(), backend="triton")
        fastvae.zinb_nll(cnt, mu, th, torch.randn(16, 24, device=DEVICE), backend="triton")
    fastvae.poisson_nll_loss(x, t, backend="triton")
    assert launches == {"bce_logits_fwd_kernel": 6, "nb_nll_fwd_kernel": 8, "poisson_nll_fwd_kernel": 1}


@triton_only
def test_backward_scales_in_place_and_refuses_a_second_backward():
    x = torch.randn(32, 8, device=DEVICE, requires_grad=True)
    t = torch.rand(32, 8, device=DEVICE)
    loss = fastvae.binary_cross_entropy_with_logits(x, t, backend="triton")
    (2.5 * loss).backward(retain_graph=True)
    x64 = x.detach().double().requires_grad_()
    (2.5 * F.binary_cross_entropy_with_logits(x64, t.double())).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@triton_only
def test_reductions_are_deterministic():
    cnt = _counts((64, 300)).to(DEVICE)
    mu, th, pi = torch.rand(64, 300, device=DEVICE) + 0.1, torch.rand(300, device=DEVICE) + 0.2, \
        torch.randn(64, 300, device=DEVICE)
    a = [fastvae.zinb_nll(cnt, mu, th, pi, backend="triton") for _ in range(2)]
    assert torch.equal(a[0], a[1])
    ref = reference.zinb_nll(cnt.double(), mu.double(), th.double(), pi.double(), 1e-8, "sum")
    assert abs(a[0].double() - ref) <= 1e-6 * ref.abs()


# ------------------------------------------------------------------------------------------------ nn modules


def test_modules_match_torch_modules(backend, device):
    x, t = torch.randn(12, 5, device=device), torch.rand(12, 5, device=device)
    w, p = torch.rand(5, device=device) + 0.5, torch.rand(5, device=device) + 0.5
    ours = fastvae.nn.BCEWithLogitsLoss(weight=w, pos_weight=p, reduction="sum", backend=backend)
    torch.testing.assert_close(ours(x, t), torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=p, reduction="sum")(x, t))
    assert set(ours.state_dict()) == {"weight", "pos_weight"}
    ours = fastvae.nn.PoissonNLLLoss(full=True, backend=backend)
    torch.testing.assert_close(ours(x, t * 4), torch.nn.PoissonNLLLoss(full=True)(x, t * 4))
    cnt, mu = _counts((12, 5)).to(device), torch.rand(12, 5, device=device) + 0.1
    th, pi = torch.rand(5, device=device) + 0.2, torch.randn(12, 5, device=device)
    torch.testing.assert_close(fastvae.nn.NegativeBinomialNLLLoss(backend=backend)(cnt, mu, th),
                               fastvae.negative_binomial_nll(cnt, mu, th, backend="torch"), rtol=3e-5, atol=1e-5)
    torch.testing.assert_close(fastvae.nn.ZINBNLLLoss(reduction="batchmean", backend=backend)(cnt, mu, th, pi),
                               fastvae.zinb_nll(cnt, mu, th, pi, reduction="batchmean", backend="torch"),
                               rtol=3e-5, atol=1e-5)


@pytest.mark.parametrize("likelihood", ["bernoulli", "poisson", "nb", "zinb"])
def test_elbo_likelihoods(likelihood, backend, device):
    b, d, z = 16, 10, 3
    mu, lv = torch.randn(b, z, device=device), torch.randn(b, z, device=device) * 0.3
    x_hat = torch.randn(b, d, device=device).requires_grad_()
    th, pi = (torch.rand(d, device=device) + 0.3).requires_grad_(), torch.randn(b, d, device=device)
    if likelihood == "bernoulli":
        x = torch.rand(b, d, device=device)
        expect = F.binary_cross_entropy_with_logits(x_hat.double(), x.double(), reduction="sum") / b
    elif likelihood == "poisson":
        x = _counts((b, d)).to(device)
        expect = F.poisson_nll_loss(x_hat.double(), x.double(), reduction="sum") / b
    else:
        x = _counts((b, d)).to(device)
        args = (x.double(), x_hat.double().exp(), th.double())
        expect = -(log_nb_positive(*args) if likelihood == "nb" else log_zinb_positive(*args, pi.double())).sum() / b
    loss_fn = fastvae.nn.ELBOLoss(likelihood=likelihood, backend=backend)
    mean = x_hat.exp() if likelihood in ("nb", "zinb") else x_hat  # NB/ZINB take the mean itself
    out = loss_fn(mean, x, mu, lv, theta=th, pi_logits=pi, return_terms=True)
    kl = reference.gaussian_kl(mu.double(), lv.double(), reduction="batchmean")
    torch.testing.assert_close(out.recon.double(), expect, rtol=3e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), expect + kl, rtol=3e-5, atol=1e-5)
    out.loss.backward()
    assert torch.isfinite(x_hat.grad).all() and (x_hat.grad != 0).any()
    if likelihood in ("nb", "zinb"):
        with pytest.raises(ValueError, match="needs theta"):
            loss_fn(mean, x, mu, lv)


def test_compile_fullgraph(backend):
    """Every op of the family traced into one graph (no host sync, no graph break) gives the eager numbers."""
    cnt = _counts((8, 12)).to(DEVICE)
    mu = (torch.rand(8, 12, device=DEVICE) + 0.1).requires_grad_()
    th = (torch.rand(12, device=DEVICE) + 0.3).requires_grad_()
    pi, logits = torch.randn(8, 12, device=DEVICE).requires_grad_(), torch.randn(8, 12, device=DEVICE).requires_grad_()

    def step(mu, th, pi, logits):
        return (fastvae.zinb_nll(cnt, mu, th, pi, reduction="batchmean", backend=backend)
                + fastvae.negative_binomial_nll(cnt, mu, th, reduction="mean", backend=backend)
                + fastvae.binary_cross_entropy_with_logits(logits, cnt.clamp(max=1), backend=backend)
                + fastvae.poisson_nll_loss(logits, cnt, reduction="sum", backend=backend))

    # the interpreter cannot run under inductor on CPU; aot_eager still traces one graph with the custom ops
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (mu, th, pi, logits)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_trainer_bernoulli(objective, tmp_path, backend):
    """--likelihood bernoulli on the digits (in [0, 1]): a logit decoder, the fused BCE as the ELBO's and the
    IWAE bound's reconstruction term, and on the Triton pass the kernels run."""
    for mod in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(mod)
    import json

    from fastvae import train

    argv = ["--epochs", "1", "--max-steps", "3", "--batch-size", "32", "--latent-dim", "4", "--likelihood",
            "bernoulli", "--objective", objective, "--num-samples", "3", "--device", torch.device(DEVICE).type,
            "--out", str(tmp_path), "--backend", backend]
    with count_launches() as counts:
        assert train.main(argv) == 0
    if BACKEND == "triton":
        assert counts["bce_logits_fwd_kernel"] > 0 and counts["sample_kl_fwd_kernel"] > 0
    (line,) = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # a Bernoulli log-likelihood of 64 pixels is negative: the ELBO is below 0 and finite
    assert -64 * math.log(2) * 2 < line["test_elbo"] < 0


# ------------------------------------------------------------------------- second order, torch.func, compile


def _second_order_case(op: str, dtype: torch.dtype):
    """(fn(*leaves) -> loss, leaves) on fixed random data: the op at dtype (fastvae) or its float64 oracle (the
    torch twin for BCE and Poisson, scvi's formulas for NB/ZINB) when ``oracle``."""
    g = torch.Generator().manual_seed(7)
    shape = (6, 5)

    def r(*s, lo=0.0, scale=1.0, normal=False):
        t = torch.randn(*s, generator=g) if normal else torch.rand(*s, generator=g)
        return (t * scale + lo).to(DEVICE, dtype)

    if op.startswith("bce"):
        x, t = r(*shape, normal=True, scale=2.0), r(*shape)
        w, p = (r(5, lo=0.5), r(5, lo=0.2, scale=2.0)) if op == "bce-weighted" else (None, None)

        def fn(x, t, oracle=False):
            f = F.binary_cross_entropy_with_logits if oracle else fastvae.binary_cross_entropy_with_logits
            kw = {} if oracle else {"backend": BACKEND}
            ww, pp = (None if v is None else v.to(x.dtype) for v in (w, p))
            return f(x, t, ww, reduction="sum", pos_weight=pp, **kw)
        return fn, [x, t]
    if op.startswith("poisson"):
        log_input = op == "poisson-log"
        x = r(*shape, normal=True, scale=0.7) if log_input else r(*shape, lo=0.2, scale=3.0)
        t = r(*shape, lo=0.1, scale=5.0)

        def fn(x, t, oracle=False):
            f = F.poisson_nll_loss if oracle else fastvae.poisson_nll_loss
            kw = {} if oracle else {"backend": BACKEND}
            return f(x, t, log_input=log_input, full=True, reduction="sum", **kw)
        return fn, [x, t]
    cnt = _counts(shape).to(DEVICE, dtype)
    mu, th, pi = r(*shape, lo=0.1, scale=5.0), r(5, lo=0.3, scale=3.0), r(*shape, normal=True)

    def fn(mu, th, pi, oracle=False):
        c = cnt.to(mu.dtype)
        if oracle:
            return (-(log_nb_positive(c, mu, th) if op == "nb" else log_zinb_positive(c, mu, th, pi))).sum()
        if op == "nb":
            return fastvae.negative_binomial_nll(c, mu, th, backend=BACKEND)
        return fastvae.zinb_nll(c, mu, th, pi, backend=BACKEND)
    return fn, [mu, th, pi]


SECOND_ORDER_OPS = ["bce", "bce-weighted", "poisson-log", "poisson-rate", "nb", "zinb"]


def _grad_of_grad(fn, leaves, oracle=False):
    """(gradient, gradient of <gradient, v>) for a fixed direction v: the Hessian-vector product."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grads = torch.autograd.grad(fn(*leaves, oracle=oracle), leaves, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]  # NB takes no pi
    v = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).reshape(t.shape) for t in leaves]
    hvp = torch.autograd.grad(sum((gr * vi).sum() for gr, vi in zip(grads, v)), leaves, allow_unused=True)
    return [gr.detach() for gr in grads], [torch.zeros_like(t) if h is None else h for t, h in zip(leaves, hvp)]


@pytest.mark.parametrize("op", SECOND_ORDER_OPS)
def test_create_graph_gives_the_second_order_terms(op, backend, launches):
    """create_graph=True on fp32 inputs (the kernels on the Triton pass: launches counted) gives the float64
    oracle's Hessian-vector product; the kernels' one-pass backward alone would give a constant gradient."""
    fn, leaves = _second_order_case(op, torch.float32)
    g, hvp = _grad_of_grad(fn, leaves)
    assert sum(launches.values()) == (1 if BACKEND == "triton" else 0), launches
    g64, hvp64 = _grad_of_grad(fn, [t.double() for t in leaves], oracle=True)
    assert any(h.abs().max() > 0.1 for h in hvp64)  # the second-order terms are there to lose
    # fp32 formulas against float64: lgamma/digamma/trigamma differences of O(10) terms, 1e-5 of their scale
    for a, b in zip(g + hvp, g64 + hvp64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.skipif(BACKEND == "triton", reason="float64 takes the eager path on either backend: run once")
@pytest.mark.parametrize("op", SECOND_ORDER_OPS)
def test_gradgradcheck_float64(op, backend):
    """Double backward of the float64 (always eager) path against finite differences."""
    fn, leaves = _second_order_case(op, torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a), leaves)


@pytest.mark.parametrize("op", SECOND_ORDER_OPS)
def test_torch_func_grad_and_vmap(op, backend):
    """torch.func.grad and vmap (over a batch of independent problems) take the eager path and give its
    numbers, on either backend setting."""
    fn, leaves = _second_order_case(op, torch.float32)
    grads = torch.func.grad(lambda *a: fn(*a), argnums=tuple(range(len(leaves))))(*leaves)
    expect, _ = _grad_of_grad(fn, leaves)
    for a, b in zip(grads, expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    batch = [torch.stack([t, t.flip(0)]) for t in leaves]
    out = torch.func.vmap(lambda *a: fn(*a))(*batch)
    expect = torch.stack([fn(*[b[i] for b in batch]) for i in range(2)])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ torch's conventions, invalid values


BCE_DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.float64),
                   (torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("x_dtype, t_dtype", BCE_DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
def test_bce_result_dtype_is_torchs(x_dtype, t_dtype, backend, device):
    """torch's BCE with logits returns the target's dtype (it multiplies into 1 - target in place), whatever
    the logits', weight's or pos_weight's (an integer weight included)."""
    x, t = torch.randn(5, 4, device=device, dtype=x_dtype), torch.rand(5, 4, device=device, dtype=t_dtype)
    for w, p in ((None, None), (torch.rand(4, device=device, dtype=torch.float64), None),
                 (torch.randint(1, 3, (4,), device=device), torch.randint(1, 3, (5, 1), device=device))):
        out = fastvae.binary_cross_entropy_with_logits(x, t, w, pos_weight=p, reduction="none", backend=backend)
        ref = F.binary_cross_entropy_with_logits(x.double(), t.double(), None if w is None else w.double(),
                                                 pos_weight=None if p is None else p.double(), reduction="none")
        assert out.dtype == F.binary_cross_entropy_with_logits(x, t, w, pos_weight=p).dtype == t_dtype
        rtol, atol = TOL[_coarser(x_dtype, t_dtype)]  # the loss is rounded to the target's dtype
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).eps > torch.finfo(b).eps else b


@pytest.mark.parametrize("log_input", [True, False])
@pytest.mark.parametrize("kinds", ["int-target", "int-input", "both-int", "broadcast-input", "broadcast-target"])
def test_poisson_integers_and_broadcasting_as_torch(kinds, log_input, backend, device):
    """Integer operands (torch promotes them: an integer tensor counts as the default float dtype) and
    broadcasting in either direction: torch's dtype, shape and numbers."""
    x = torch.rand(4, 6, device=device) * 3 + 0.2
    t = torch.poisson(torch.rand(4, 6, device=device) * 4)
    if "int" in kinds and kinds != "int-target":
        x = x.round().long() + 1
    if kinds in ("int-target", "both-int"):
        t = t.long()
    if kinds == "broadcast-input":
        x = x[:1]
    if kinds == "broadcast-target":
        t = t[:, :1].expand(4, 1)
    for full in (False, True):
        out = fastvae.poisson_nll_loss(x, t, log_input=log_input, full=full, reduction="none", backend=backend)
        ref = F.poisson_nll_loss(x, t, log_input=log_input, full=full, reduction="none")
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


NB_BCAST = {  # name -> shapes of (x, mu, theta, pi): every direction the formula's torch ops broadcast
    "posterior-predictive": ((4, 6), (3, 4, 6), (6,), (3, 4, 6)),
    "counts-broadcast": ((6,), (4, 6), (1, 6), (4, 6)),
    "pi-per-row": ((4, 6), (4, 6), (6,), (4, 1)),
    "mu-per-row": ((4, 6), (4, 1), (6,), (4, 6)),
    "all-1d": ((6,), (6,), (6,), (6,)),
    "scalar-theta-0d": ((4, 6), (4, 6), (), (4, 6)),
}


@pytest.mark.parametrize("form", list(NB_BCAST))
@pytest.mark.parametrize("zi", [False, True], ids=["nb", "zinb"])
def test_nb_zinb_broadcast_as_scvi(form, zi, backend, device):
    """The loss has the broadcast shape of all arguments, values and every gradient as scvi's formula's in
    float64; integer counts promote as torch's lgamma does."""
    xs, ms, ts, ps = NB_BCAST[form]
    x = _counts(xs).to(device).long()
    (mu, mu64), (th, th64), (pi, pi64) = (_pair(torch.rand(ms) * 5 + 0.1, torch.float32),
                                          _pair(torch.rand(ts) * 3 + 0.3, torch.float32),
                                          _pair(torch.randn(ps), torch.float32))
    if zi:
        out = fastvae.zinb_nll(x, mu, th, pi, reduction="none", backend=backend)
        ref = -log_zinb_positive(x.double(), mu64, th64, pi64)
        pairs = [(mu, mu64), (th, th64), (pi, pi64)]
    else:
        out = fastvae.negative_binomial_nll(x, mu, th, reduction="none", backend=backend)
        ref = -log_nb_positive(x.double(), mu64, th64)
        pairs = [(mu, mu64), (th, th64)]
    assert out.shape == ref.shape and out.dtype == torch.float32
    backward_both(out, ref)
    check(out, ref, torch.float32, pairs, tol=NB_TOL[torch.float32])


@pytest.mark.parametrize("zi", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("bad", ["x", "mu", "theta", "mu-tiny"])
def test_nb_invalid_values_give_nan(bad, zi, backend, device):
    """A negative count, mean or inverse dispersion: NaN in that element's loss and in every gradient through
    it, on both paths (scvi's formula gives a finite value for some of them, e.g. mu in (-eps, 0) or any
    negative value at a zero count of ZINB); the other elements untouched. With validation on: ValueError."""
    x = torch.tensor([[0.0, 3.0, 0.0, 7.0]], device=device)
    mu = torch.tensor([[1.5, 2.0, 0.7, 4.0]], device=device)
    th = torch.tensor([0.8, 1.2, 2.0, 0.5], device=device)
    pi = torch.tensor([[0.3, -0.2, 1.0, 0.1]], device=device)
    col = 0  # a zero count: where scvi's ZINB would select a finite branch
    if bad == "x":
        x[0, 1] = -2.0
        col = 1
    elif bad == "mu":
        mu[0, col] = -0.5
    elif bad == "mu-tiny":
        mu[0, col] = -1e-9  # inside (-eps, 0): log(mu + eps) is finite there
    else:
        th[col] = -0.5
    mu, th, pi = (t.requires_grad_() for t in (mu, th, pi))
    if zi:
        out = fastvae.zinb_nll(x, mu, th, pi, reduction="none", backend=backend)
    else:
        out = fastvae.negative_binomial_nll(x, mu, th, reduction="none", backend=backend)
    assert out[0, col].isnan() and torch.isfinite(out[0, 2:] if col < 2 else out[0, :1]).all()
    out.sum().backward()
    for t in ((mu, th, pi) if zi else (mu, th)):
        assert t.grad.flatten()[col if t.dim() == 1 or t.shape[-1] > 1 else 0].isnan(), t
    fastvae.set_default_validate_args(True)
    try:
        with pytest.raises(ValueError, match="must be >= 0"):
            fastvae.negative_binomial_nll(x, mu, th, backend=backend)
    finally:
        fastvae.set_default_validate_args(None)


# --------------------------------------------------------------------------------- layouts and GPU numerics


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t (B, C, H, W) in a dense non-contiguous layout: channels_last, or (B, W, H, C) memory order."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)


@triton_only
@pytest.mark.parametrize("op", ["bce", "poisson", "zinb"])
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
@pytest.mark.parametrize("reduction", ["none", "sum", "per_sample"])
def test_dense_layouts_are_read_in_place(op, layout, reduction, monkeypatch, launches):
    """Inputs sharing a dense non-contiguous layout: no copy (``.contiguous()`` never copies), no full-size
    buffer beyond the outputs, the elementwise loss and every gradient in the inputs' memory format, values
    as the float64 oracle's."""
    from fastvae._triton import common

    shape = (2, 3, 4, 5)
    n = math.prod(shape)
    if op == "bce":
        raw = [torch.randn(shape) * 2, torch.rand(shape)]
    elif op == "poisson":  # no zero target: torch's full=True target gradient is NaN there (0 * log 0)
        raw = [torch.randn(shape) * 0.5, torch.rand(shape) * 3 + 0.1]
    else:
        raw = [torch.rand(shape) * 4 + 0.1, torch.rand(shape) * 2 + 0.3, torch.randn(shape)]
    cnt = _layout(_counts(shape).to(DEVICE), layout)
    leaves = [_layout(t.to(DEVICE), layout).requires_grad_() for t in raw]
    twins = [t.detach().double().contiguous().requires_grad_() for t in raw]

    def run(ts, oracle):
        if op == "bce":
            return (F.binary_cross_entropy_with_logits(*ts, reduction="none") if oracle else
                    fastvae.binary_cross_entropy_with_logits(*ts, reduction=reduction, backend="triton"))
        if op == "poisson":
            return (F.poisson_nll_loss(*ts, full=True, reduction="none") if oracle else
                    fastvae.poisson_nll_loss(*ts, full=True, reduction=reduction, backend="triton"))
        return (-log_zinb_positive(cnt.double(), *ts) if oracle else
                fastvae.zinb_nll(cnt, *ts, reduction=reduction, backend="triton"))

    copies, full_buffers = [], []
    original_contiguous, original_alloc = torch.Tensor.contiguous, common.alloc

    def contiguous(self, *a, **k):
        out = original_contiguous(self, *a, **k)
        if out.data_ptr() != self.data_ptr():
            copies.append(tuple(self.shape))
        return out

    def alloc(like, shape_, dtype=None):
        if math.prod(shape_) == n:
            full_buffers.append(shape_)
        return original_alloc(like, shape_, dtype)

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    monkeypatch.setattr(common, "alloc", alloc)
    out = run(leaves, False)
    if reduction == "none":
        assert out.stride() == leaves[0].stride()
    go = torch.rand_like(out)  # in out's layout, as autograd's grad of a channels_last activation is
    out.backward(go)
    monkeypatch.undo()
    assert sum(launches.values()) == 1, launches
    assert not copies, copies
    assert len(full_buffers) == len(leaves) + (reduction == "none"), full_buffers  # the gradients (and loss)
    ref = _reduce(run(twins, True), reduction)
    ref.backward(go.double().contiguous())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-5)
    for a, b in zip(leaves, twins):
        assert a.grad.stride() == a.stride(), (a.grad.stride(), a.stride())
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-5, atol=1e-5)


@triton.jit
def _plain_log_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.log(tl.load(x_ptr + offs)))


@triton_only
@pytest.mark.parametrize("fn", ["digamma", "lgamma"])
def test_special_functions_under_gpu_flush_to_zero(fn, gpu_math):
    """lgamma / digamma from subnormal to huge arguments with exp, log and division flushing subnormals as on a
    GPU: the float64 values rounded to fp32 (a plain tl.log of a subnormal gives -inf there: the emulation
    bites). Subnormal x: lgamma = -log x = 92-103 and psi = -1/x (-inf in fp32 below 2^-128)."""
    probe = torch.tensor([1e-40, 1.0], device=DEVICE)
    plain = torch.empty_like(probe)
    _plain_log_kernel[(1,)](probe, plain, BLOCK=2)
    assert plain[0] == float("-inf")  # what the shift's log(den) gave at x = 1e-40 before
    x = torch.tensor([0.0, 1e-45, 1e-42, 1e-40, 2.0 ** -127.5, 3e-39, 1.1e-38, 1.2e-38, 1e-30, 5.4e-20, 5.43e-20,
                      1e-12, 1e-6, 0.3, 1.4616, 4.0, 7.9, 1e6, 1e30, 1e37, float("inf")], device=DEVICE)
    out = torch.empty_like(x)
    nb_k.special_fn_kernel[(1,)](x, out, x.numel(), FN=0 if fn == "digamma" else 1, BLOCK=32)
    exact = (torch.digamma if fn == "digamma" else torch.lgamma)(x.double().cpu())
    # the float64 value rounded to fp32 (-inf where it passes fp32's range), to 2e-6 relative: the accuracy of
    # the series (test_special_functions_fp32_accuracy) and, below 2^-64, of fp32's log and the 149 log 2 step
    # (a few ulps of a value of at least 44); absolute 1e-6 near lgamma's roots at 1 and 2 and psi's at 1.4616
    torch.testing.assert_close(out.cpu().double(), exact.float().double(), rtol=2e-6, atol=1e-6)


@triton_only
def test_losses_under_gpu_flush_to_zero(gpu_math):
    """NB with eps = 0 and a subnormal mean, Poisson on a subnormal rate, BCE and Poisson where exp underflows:
    the float64 values under the GPU's flushing exp/log/division, each within 1.2e-38 absolute (exp's flushed
    subnormal, 2^-126) or 1e-5 relative."""
    x = torch.tensor([[0.0, 1.0, 3.0]], device=DEVICE)
    mu, th = torch.tensor([[1e-40, 1e-40, 2.0]], device=DEVICE), torch.tensor([0.5, 1e-39, 1.5], device=DEVICE)
    out = fastvae.negative_binomial_nll(x, mu, th, eps=0.0, reduction="none", backend="triton")
    ref = -log_nb_positive(x.double(), mu.double(), th.double(), eps=0.0)
    # atol: th (log th - log(th + mu)) cancels to ~1e-40 at a zero count, fp32 keeps an ulp of log 0.5 there
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    rate = torch.tensor([1e-40, 3e-39, 0.5], device=DEVICE)
    t = torch.tensor([1.0, 2.0, 0.0], device=DEVICE)
    out = fastvae.poisson_nll_loss(rate, t, log_input=False, eps=0.0, reduction="none", backend="triton")
    torch.testing.assert_close(out.double(), F.poisson_nll_loss(rate.double(), t.double(), log_input=False, eps=0.0,
                                                                reduction="none"), rtol=1e-5, atol=0)
    logits = torch.tensor([-100.0, -90.0, 90.0, 100.0], device=DEVICE)
    for target in (torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)):
        out = fastvae.binary_cross_entropy_with_logits(logits, target, reduction="none", backend="triton")
        ref = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1.2e-38)
    log_rate = torch.tensor([-100.0, -90.0], device=DEVICE)
    out = fastvae.poisson_nll_loss(log_rate, torch.zeros(2, device=DEVICE), reduction="none", backend="triton")
    torch.testing.assert_close(out.double(), torch.exp(torch.tensor([-100.0, -90.0], dtype=torch.float64)),
                               rtol=0, atol=1.2e-38)


@triton_only
def test_every_op_runs_under_the_inputs_device_guard(monkeypatch):
    """Each custom op (and so each launch) enters common.device_guard with its inputs' device."""
    from fastvae._triton import common

    seen = []
    original = common.device_guard

    def guard(device):
        seen.append(device)
        return original(device)

    monkeypatch.setattr(common, "device_guard", guard)
    x, t = torch.randn(4, 3, device=DEVICE, requires_grad=True), torch.rand(4, 3, device=DEVICE)
    fastvae.binary_cross_entropy_with_logits(x, t, backend="triton").backward()
    fastvae.poisson_nll_loss(x, t, backend="triton")
    fastvae.zinb_nll(t.round(), t + 0.1, t[0] + 0.5, x, backend="triton")
    assert len(seen) >= 4 and all(d == torch.device(DEVICE) for d in seen), seen


@triton.jit
def _bcast_probe_kernel(w_ptr, out_ptr, start, div, mod, mul, mod2, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), load_bcast(w_ptr, offs, offs >= 0, div, mod, mul, mod2, MODE))


@triton_only
@pytest.mark.parametrize("start", [2**31 - 3, 3 * 2**31 + 5, 2**40 + 11])
def test_broadcast_index_past_int32(start):
    """The kernels' offsets are int64 from the program id on (no narrow/wide switch): the broadcast operand's
    index formula at element offsets past 2^31 (where an int32 product would wrap negative) reads the right
    value, for the per-feature, per-channel and middle-dim forms (the offsets without a 2^31-element tensor)."""
    from fastvae.kernels.bernoulli import OP_INDEXED

    w = torch.arange(60, dtype=torch.float32, device=DEVICE)
    out = torch.empty(16, device=DEVICE)
    offs = torch.arange(start, start + 16, dtype=torch.int64)
    for div, mod, mul, mod2 in ((1, 7, 1, 1), (13, 5, 1, 1), (91, 4, 7, 7)):
        _bcast_probe_kernel[(1,)](w, out, start, div, mod, mul, mod2, MODE=OP_INDEXED.value, BLOCK=16)
        expect = ((offs // div) % mod) * mul + offs % mod2
        torch.testing.assert_close(out.cpu(), expect.float())


@pytest.mark.parametrize("op", ["bce", "poisson", "zinb"])
def test_chunks_of_one_tensor(op, backend, device):
    """Operands chunked from one decoder output (``a, b = h.chunk(2, dim=1)``: strided, not dense) give the
    float64 oracle's values and gradients (the kernel path reads a contiguous copy of such a view)."""
    h = torch.randn(6, 8, device=device).requires_grad_()
    h64 = h.detach().double().requires_grad_()
    cnt = _counts((6, 4)).to(device)

    def run(h, oracle):
        a, b = h.chunk(2, dim=1)
        if op == "bce":
            f = F.binary_cross_entropy_with_logits if oracle else fastvae.binary_cross_entropy_with_logits
            return f(a, torch.sigmoid(b), reduction="sum", **({} if oracle else {"backend": backend}))
        if op == "poisson":
            f = F.poisson_nll_loss if oracle else fastvae.poisson_nll_loss
            return f(a, cnt.to(h.dtype), reduction="sum", **({} if oracle else {"backend": backend}))
        mu, th = a.exp(), F.softplus(b) + 0.1
        c = cnt.to(h.dtype)
        return -log_zinb_positive(c, mu, th, b).sum() if oracle else fastvae.zinb_nll(c, mu, th, b, backend=backend)

    out, ref = run(h, False), run(h64, True)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2e-5, atol=1e-5)
