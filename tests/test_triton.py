"""The Triton path beyond value parity (which test_functional covers for both backends): every output element
written, sums as accurate as an fp64 oracle allows, the in-kernel sampler's statistics and reproducibility,
eps regenerated (not stored) in backward, deterministic reductions, in-place backward scaling, and
torch.compile over a training step. Runs in the Triton pass only (interpreter on CPU, or CUDA)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from _launches import count_launches
from _torch_compat import gaussian_nll_loss as torch_gaussian_nll_loss
from conftest import BACKEND, DEVICE
from fastvae.kernels import sampling as sampling_k
from scipy import stats

import fastvae
from fastvae import reference

pytestmark = pytest.mark.skipif(BACKEND != "triton", reason="kernel tests run in the Triton pass")

ODD_SIZES = [1, 7, 1000003]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


def _grads_f64(fn, *tensors):
    """fn's value and gradients computed in float64 from the same inputs."""
    leaves = [_leaf(t.double()) for t in tensors]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


def _assert_close(actual, expected, rtol, atol=0.0):
    assert torch.isfinite(actual).all(), "an output element was never written"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", ODD_SIZES)
def test_sample_kl_writes_every_element(poisoned, n):
    mu, lv = _leaf(_randn(n)), _leaf(_randn(n, scale=0.5))
    gz = _randn(2, n)
    z, kl = fastvae.reparameterize_kl(mu, lv, reduction="sum", num_samples=2, backend="triton")
    (z * gz).sum().add(kl * 0.7).backward()
    # the sample part of the gradient follows from z itself: d z/d mu = 1, d z/d logvar = 0.5 (z - mu)
    _, (gmu_kl, glv_kl) = _grads_f64(lambda m, v: reference.gaussian_kl(m, v) * 0.7, mu, lv)
    z64, mu64 = z.detach().double(), mu.detach().double()
    _assert_close(mu.grad, gz.double().sum(0) + gmu_kl, 1e-5, 1e-6)
    _assert_close(lv.grad, 0.5 * ((z64 - mu64) * gz.double()).sum(0) + glv_kl, 1e-5, 1e-5)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("n", ODD_SIZES)
def test_kl_sum_accuracy(poisoned, n):
    mu, lv = _randn(n), _randn(n, scale=0.5)
    kl = fastvae.gaussian_kl(mu, lv, reduction="sum", backend="triton")
    ref = reference.gaussian_kl(mu.double(), lv.double(), reduction="sum")
    assert abs(kl.double() - ref) <= 1e-6 * ref.abs()


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("var_form", ["element", "scalar", "row"])
def test_nll_writes_every_element(poisoned, n, var_form):
    x, t = _leaf(_randn(n, 1)), _randn(n, 1)
    var = _leaf({"element": torch.rand(n, 1), "scalar": torch.rand(1, 1), "row": torch.rand(n)}[var_form] + 0.1)
    var = _leaf(var.to(DEVICE))
    loss = fastvae.gaussian_nll_loss(x, t, var, reduction="sum", backend="triton")
    loss.backward()
    ref, (gx, gv) = _grads_f64(
        lambda a, v: torch_gaussian_nll_loss(a, t.double(), v, reduction="sum"), x, var
    )
    assert abs(loss.double() - ref) <= 1e-6 * ref.abs()
    _assert_close(x.grad, gx, 1e-5, 1e-6)
    _assert_close(var.grad, gv, 1e-5 if var_form != "scalar" else 1e-6, 1e-5)


# rows much shorter than a tile (several rows a program, lengths not a multiple of 4), about a tile, and
# longer than a tile (a row spans programs: the LONG_ROWS path)
ROW_SHAPES = [(1000, 3), (37, 29), (3, 700), (2, 2500), (1, 4099), (5, 4, 333)]


@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_per_sample_kl_fused_with_sampling(poisoned, shape):
    mu, lv = _leaf(_randn(*shape)), _leaf(_randn(*shape, scale=0.5))
    z, kl = fastvae.reparameterize_kl(mu, lv, reduction="per_sample", backend="triton")
    assert kl.shape == (shape[0],)
    g_kl = torch.rand(shape[0], device=DEVICE) + 0.5
    gz = _randn(*shape)
    (kl * g_kl).sum().add((z * gz).sum()).backward()
    ref, (gmu, glv) = _grads_f64(lambda m, v: (reference.gaussian_kl(m, v, reduction="per_sample")
                                               * g_kl.double()).sum(), mu, lv)
    _assert_close(kl, reference.gaussian_kl(mu.double(), lv.double(), reduction="per_sample"), 1e-6, 1e-6)
    z64, mu64 = z.detach().double(), mu.detach().double()
    _assert_close(mu.grad, gmu + gz.double(), 1e-5, 1e-5)
    _assert_close(lv.grad, glv + 0.5 * (z64 - mu64) * gz.double(), 1e-5, 1e-5)
    # the noise does not depend on the reduction: the same seed gives the same z
    torch.manual_seed(3)
    z1 = fastvae.reparameterize(mu, lv, backend="triton")
    torch.manual_seed(3)
    z2, _ = fastvae.reparameterize_kl(mu, lv, reduction="per_sample", backend="triton")
    assert torch.equal(z1, z2)


@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("var_form", ["element", "feature", "scalar-logvar"])
def test_per_sample_nll(poisoned, shape, var_form):
    x, t = _leaf(_randn(*shape)), _randn(*shape)
    var = {"element": torch.rand(shape) + 0.1, "feature": torch.rand(1, *shape[1:]) + 0.1,
           "scalar-logvar": torch.randn(())}
    var = _leaf(var[var_form].to(DEVICE))
    logvar_form = var_form == "scalar-logvar"
    loss_fn = fastvae.gaussian_nll_loss_logvar if logvar_form else fastvae.gaussian_nll_loss
    loss = loss_fn(x, t, var, reduction="per_sample", backend="triton")
    g = torch.rand(shape[0], device=DEVICE) + 0.5
    (loss * g).sum().backward()

    def ref_fn(a, v):
        if logvar_form:
            per = reference.gaussian_nll_logvar(a, t.double(), v, False, "none")
        else:
            per = reference.gaussian_nll_var(a, t.double(), v, False, 1e-6, "none")
        return per.flatten(1).sum(1)

    ref = ref_fn(x.detach().double(), var.detach().double())
    _, (gx, gv) = _grads_f64(lambda a, v: (ref_fn(a, v) * g.double()).sum(), x, var)
    _assert_close(loss, ref, 1e-6, 1e-5)
    _assert_close(x.grad, gx, 1e-5, 1e-6)
    _assert_close(var.grad, gv, 1e-5, 1e-5)


def _eps_from(z, mu, lv):
    return ((z.double() - mu.double()) / torch.exp(0.5 * lv.double())).flatten()


def test_sampler_statistics():
    n = 1 << 18
    mu, lv = _randn(n), _randn(n, scale=0.5)
    eps = _eps_from(fastvae.reparameterize(mu, lv, backend="triton"), mu, lv).cpu()
    se = 1.0 / math.sqrt(n)
    assert abs(eps.mean()) < 6 * se
    assert abs(eps.std() - 1.0) < 6 * se * math.sqrt(0.5)
    kurtosis = ((eps - eps.mean()) ** 4).mean() / eps.var() ** 2
    assert abs(kurtosis - 3.0) < 6 * math.sqrt(24.0 / n)
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-4


@triton.jit
def _sampler_math_kernel(w_ptr, log_ptr, sin_ptr, cos_ptr, a_ptr, b_ptr, BLOCK: tl.constexpr):
    """The sampler's device math on its own: u and its log from a word, the octant's sine and cosine, and
    the normal pair of two words."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs).to(tl.uint32, bitcast=True)
    tl.store(log_ptr + offs, sampling_k._log_normal(sampling_k._unit(w, 1.0 - 2.0**-24)))
    sin, cos = sampling_k._sincos_octant(sampling_k._unit(w, 1.5))
    tl.store(sin_ptr + offs, sin)
    tl.store(cos_ptr + offs, cos)
    w2 = tl.load(w_ptr + BLOCK * tl.num_programs(0) + offs).to(tl.uint32, bitcast=True)
    a, b = sampling_k._normal_pair(w, w2)
    tl.store(a_ptr + offs, a)
    tl.store(b_ptr + offs, b)


@triton.jit
def _philox_kernel(seed_ptr, c_ptr, out_ptr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.load(c_ptr + tl.arange(0, BLOCK))
    if not WIDE:
        c = c.to(tl.int32)
    seed = tl.load(seed_ptr)
    ours = sampling_k._philox(seed, c)
    theirs = tl.randint4x(seed, c)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * BLOCK + tl.arange(0, BLOCK), ours[i].to(tl.int32, bitcast=True))
        if not WIDE:  # triton before 3.4 runs a 64-bit Philox for int64 offsets
            tl.store(out_ptr + (4 + i) * BLOCK + tl.arange(0, BLOCK), theirs[i].to(tl.int32, bitcast=True))


def _philox4x32_10(counters: np.ndarray, seed: int) -> np.ndarray:
    """Philox4x32-10 (Salmon et al. 2011) of (counter low word, high word, 0, 0) under the key (seed low
    word, high word), in numpy: the (4, n) uint32 words."""
    m32 = np.uint64(0xFFFFFFFF)
    c0, c1 = counters.astype(np.uint64) & m32, (counters.astype(np.uint64) >> np.uint64(32)) & m32
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        pa, pb = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & m32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & m32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


@pytest.mark.parametrize("wide", [False, True])
def test_philox_is_philox4x32_10(wide):
    """The sampler's Philox (one wide multiply a product) is Philox4x32-10 word for word, for int32 and int64
    counters and 64-bit seeds, checked against a numpy implementation that reproduces the published
    known-answer vector; with int32 counters it is also triton's randint4x bit for bit."""
    assert _philox4x32_10(np.zeros(1, np.int64), 0)[:, 0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                         0x9B00DBD8]
    n = 256
    counters = np.arange(n, dtype=np.int64) * 7919 + (2**33 + 2**31 if wide else 2**30)
    for seed in (0, 12345, 2**62 + 17):
        out = torch.zeros(8 * n, dtype=torch.int32, device=DEVICE)
        _philox_kernel[(1,)](torch.tensor([seed], dtype=torch.int64, device=DEVICE),
                             torch.from_numpy(counters).to(DEVICE), out, WIDE=wide, BLOCK=n)
        words = out.cpu().numpy().view(np.uint32).reshape(8, n)
        np.testing.assert_array_equal(words[:4], _philox4x32_10(counters, seed))
        if not wide:
            np.testing.assert_array_equal(words[:4], words[4:])


def test_sampler_device_math():
    """Box-Muller's pieces against float64 on words spanning their range: log u within an ulp of u's log
    (libdevice logf's own error), the octant polynomials within 1.5e-7, and pairs (r cos t, r sin t) with
    r^2 = -2 log u exactly as built and t covering the circle uniformly."""
    n = 1 << 16
    top = torch.arange(n, dtype=torch.int64) * (1 << 23) // n  # 23-bit values across [0, 2^23)
    low = torch.randint(0, 1 << 9, (n,))
    w = ((top << 9) | low).to(torch.int64)
    words = torch.cat([w, torch.randint(0, 1 << 32, (n,))]).to(torch.int64)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).to(DEVICE)
    out = [torch.empty(n, device=DEVICE) for _ in range(5)]
    _sampler_math_kernel[(n // 1024,)](words, *out, BLOCK=1024)
    log_u, sin, cos, a, b = (t.double().cpu() for t in out)
    u = (top.double() + 0.5) * 2.0**-23
    assert ((log_u - u.log()).abs() / u.log().abs()).max() < 2.4e-7  # 2 ulp
    f = top.double() * 2.0**-23 - 0.5
    assert (sin - torch.sin(math.pi / 2 * f)).abs().max() < 1.5e-7
    assert (cos - torch.cos(math.pi / 2 * f)).abs().max() < 1.5e-7
    torch.testing.assert_close(a.square() + b.square(), -2 * log_u, rtol=1e-6, atol=1e-6)
    angle = torch.atan2(b, a)
    assert stats.kstest(angle.numpy(), stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 1e-4


def test_samples_are_independent():
    n, k = 1 << 15, 4
    mu, lv = _randn(n), _randn(n, scale=0.5)
    z = fastvae.reparameterize(mu, lv, num_samples=k, backend="triton")
    eps = torch.stack([_eps_from(z[i], mu, lv) for i in range(k)]).cpu()
    corr = torch.corrcoef(eps)
    off_diag = corr - torch.eye(k, dtype=corr.dtype)
    assert off_diag.abs().max() < 6 / math.sqrt(n)


def test_backward_regenerates_forward_noise():
    mu, lv = _leaf(_randn(3000)), _leaf(_randn(3000, scale=0.5))
    z = fastvae.reparameterize(mu, lv, num_samples=3, backend="triton")
    gz = _randn(*z.shape)
    z.backward(gz)
    expected = 0.5 * ((z.detach() - mu.detach()) * gz).sum(0)
    torch.testing.assert_close(lv.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mu.grad, gz.sum(0))


def test_seed_reproduces_bitwise_and_advances():
    mu, lv = _randn(5000), _randn(5000, scale=0.5)

    def run(seed):
        torch.manual_seed(seed)
        m, v = _leaf(mu), _leaf(lv)
        z, kl = fastvae.reparameterize_kl(m, v, backend="triton")
        (z.square().sum() + kl).backward()
        return z, kl, m.grad, v.grad

    a, b = run(7), run(7)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(run(8)[0], a[0])
    torch.manual_seed(7)
    first = fastvae.reparameterize(mu, lv, backend="triton")
    second = fastvae.reparameterize(mu, lv, backend="triton")
    assert not torch.equal(first, second)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    g1 = fastvae.reparameterize(mu, lv, generator=gen, backend="triton")
    gen.manual_seed(3)
    assert torch.equal(g1, fastvae.reparameterize(mu, lv, generator=gen, backend="triton"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int64_offsets_draw_the_same_noise(monkeypatch, dtype):
    """Offsets are int64 (WIDE) only when K * n could pass int32: the arithmetic changes, not one value. Forced
    on for small tensors, z, the KLs, the log ratios and every gradient match the int32 launch bit for bit
    (and the compile check gets the WIDE kernels, which only tensors past 2^31 elements launch otherwise)."""
    from fastvae._triton import sampling as sampling_op

    mu, lv = _randn(3, 300).to(dtype), _randn(3, 300, scale=0.5).to(dtype)

    def run():
        torch.manual_seed(5)
        m, v = _leaf(mu), _leaf(lv)
        z, kl = fastvae.reparameterize_kl(m, v, num_samples=2, reduction="per_sample", backend="triton")
        z1, lr = fastvae.sample_log_weights(m, v, num_samples=3, backend="triton")
        (z.float().square().sum() + kl.float().sum() + z1.float().sum() + lr.sum()).backward()
        return z, kl, z1, lr, m.grad, v.grad

    narrow = run()
    monkeypatch.setattr(sampling_op, "INT32_OFFSETS", 0)
    with count_launches("sample_kl_fwd_kernel") as counts:
        wide = run()
    assert counts["sample_kl_fwd_kernel"] == 2
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def _saved_bytes(fn, inputs):
    """Bytes autograd keeps for backward that are not the inputs themselves."""
    ptrs = {t.data_ptr() for t in inputs}
    saved = []

    def pack(t):
        if t.data_ptr() not in ptrs:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved), out


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_eps_sized_tensor_saved(backend):
    n = 4096
    mu, lv = _leaf(_randn(n)), _leaf(_randn(n))
    nbytes, (z, kl) = _saved_bytes(
        lambda: fastvae.reparameterize_kl(mu, lv, num_samples=2, backend=backend), [mu, lv]
    )
    if backend == "triton":
        assert nbytes <= 8, f"{nbytes} bytes saved beyond mu and logvar; only the 8-byte seed may be"
    else:  # the eager formula keeps eps (and std): the check above is one that can fail
        assert nbytes >= 2 * n * mu.element_size()


def test_reductions_are_deterministic():
    mu, lv = _randn(300001), _randn(300001, scale=0.5)
    x, t, v = _randn(300001), _randn(300001), torch.rand(300001, device=DEVICE) + 0.1
    kl = [fastvae.gaussian_kl(mu, lv, backend="triton") for _ in range(2)]
    nll = [fastvae.gaussian_nll_loss(x, t, v, backend="triton") for _ in range(2)]
    assert torch.equal(kl[0], kl[1]) and torch.equal(nll[0], nll[1])


def test_nll_backward_scales_in_place_and_refuses_a_second_backward():
    x, t = _leaf(_randn(64, 8)), _randn(64, 8)
    var = _leaf(torch.rand(64, 8, device=DEVICE) + 0.1)
    loss = fastvae.gaussian_nll_loss(x, t, var, backend="triton")
    (3.0 * loss).backward(retain_graph=True)
    _, (gx, gv) = _grads_f64(lambda a, v: 3.0 * torch.nn.functional.gaussian_nll_loss(a, t.double(), v), x, var)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(var.grad.double(), gv, rtol=1e-5, atol=1e-7)
    # the saved gradient was scaled in place; a second pass must fail loudly, not double-scale
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_nll_strided_inputs():
    base = _randn(16, 40)
    x, t = _leaf(base.t()), _randn(16, 40).t()
    var = torch.rand(40, 16, device=DEVICE) + 0.1
    loss = fastvae.gaussian_nll_loss(x, t, var, reduction="sum", backend="triton")
    loss.backward()
    ref, (gx,) = _grads_f64(
        lambda a: torch.nn.functional.gaussian_nll_loss(a, t.double(), var.double(), reduction="sum"), x
    )
    assert abs(loss.double() - ref) <= 1e-6 * ref.abs()
    _assert_close(x.grad, gx, 1e-5, 1e-7)


def test_negative_var_raises_on_the_kernel_path_and_is_nan_unchecked():
    """The host check (torch's ValueError) where validation runs; unchecked, the kernel writes NaN for the
    element (no device-side flag or assert). More in test_gaussian_dropin."""
    var = torch.rand(32, 4, device=DEVICE) + 0.1
    var[3, 2] = -0.5
    with pytest.raises(ValueError, match="var has negative entry"):
        fastvae.gaussian_nll_loss(_randn(32, 4), _randn(32, 4), var, backend="triton")
    previous = fastvae.get_default_validate_args()
    fastvae.set_default_validate_args(False)
    try:
        loss = fastvae.gaussian_nll_loss(_randn(32, 4), _randn(32, 4), var, reduction="none", backend="triton")
    finally:
        fastvae.set_default_validate_args(previous)
    assert torch.isnan(loss[3, 2]) and torch.isfinite(loss[var >= 0]).all()


class _TinyVAE(torch.nn.Module):
    def __init__(self, d_in=12, d_z=3):
        super().__init__()
        self.enc = torch.nn.Linear(d_in, 2 * d_z)
        self.dec = torch.nn.Linear(d_z, d_in)

    def forward(self, x, backend):
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z, kl = fastvae.reparameterize_kl(mu, logvar, reduction="batchmean", backend=backend)
        logvar_x = torch.zeros((), device=x.device)
        recon = fastvae.gaussian_nll_loss_logvar(self.dec(z), x, logvar_x, reduction="batchmean",
                                                 backend=backend)
        return recon + kl


def test_compile_fullgraph_training_step():
    model = _TinyVAE().to(DEVICE)
    x = _randn(32, 12)
    # on CPU the kernels run in the interpreter, which inductor cannot host; aot_eager still proves the
    # step traces as one graph (forward and the AOT-compiled backward) with the custom ops in it
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    losses, grads = [], []
    for fn in (model, compiled):
        torch.manual_seed(0)
        model.zero_grad()
        loss = fn(x, "triton")
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0])
    for g_compiled, g_eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_compiled, g_eager)


@triton.jit
def _round_trip_kernel(x_ptr, stored_ptr, cast_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(stored_ptr + i, x)  # the store's own cast to bf16
    tl.store(cast_ptr + i, x.to(tl.bfloat16).to(tl.float32))  # an explicit cast and its widening


def test_bf16_conversions_round_as_the_gpu():
    """fp32 -> bf16 rounds to nearest even (cvt.rn.bf16.f32) and bf16 -> fp32 is exact, subnormals included;
    triton's interpreter truncates and flushes unless fastvae's shim is in place, so on the CPU every bf16
    output was up to an ulp off what a GPU writes. The shim comes with fastvae's kernel path (imported here
    because this kernel is the test's own)."""
    import fastvae._triton  # noqa: F401

    x = torch.cat([torch.randn(4000, device=DEVICE), torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 3.3e38, -3.3e38, 1e-40, -1e-41, 0.0, -0.0, 1.00390625,
         1.01171875], device=DEVICE)])  # the last two: ties between bf16 neighbours, to even
    n = triton.next_power_of_2(x.numel())
    xp = torch.zeros(n, device=DEVICE)
    xp[:x.numel()] = x
    stored = torch.empty(n, device=DEVICE, dtype=torch.bfloat16)
    cast = torch.empty(n, device=DEVICE)
    _round_trip_kernel[(1,)](xp, stored, cast, N=n)
    ref = xp.bfloat16()
    assert torch.equal(stored.view(torch.int16)[~ref.isnan()], ref.view(torch.int16)[~ref.isnan()])
    assert stored.isnan().equal(ref.isnan())
    torch.testing.assert_close(cast, ref.float(), rtol=0, atol=0, equal_nan=True)
