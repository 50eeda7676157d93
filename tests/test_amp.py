"""Mixed precision as large-batch training runs it: 16-bit model outputs against fp32 data, mixed-dtype
posteriors, torch.autocast, and loss scales on fp16 gradients. On the Triton pass every case must run on the
kernels (launches are counted: a silent eager fallback fails), with torch's values, gradients and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _launches import count_launches
from conftest import BACKEND, DEVICE

import fastvae
from fastvae import reference

HALF = [torch.bfloat16, torch.float16]
# a 16-bit result is one rounding of the fp32 value: allow a few of its ulps
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3), torch.float32: (1e-5, 1e-5)}


def _expect_kernels(counts, *names):
    if BACKEND == "triton":
        for name in names:
            assert counts[name] > 0, f"{name} was not launched: the case fell back to eager"


def _leaf(shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_()


def _twin(t):
    return t.detach().clone().requires_grad_()


def _close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("model_dtype", HALF)
@pytest.mark.parametrize("form", ["var", "logvar"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
def test_half_model_output_fp32_target(model_dtype, form, reduction, backend):
    """The usual AMP case: the decoder's output in 16 bits, the data in fp32."""
    x_hat, x = _leaf((24, 10), model_dtype), torch.randn(24, 10, device=DEVICE)
    v = (torch.rand(24, 10, device=DEVICE) + 0.3).requires_grad_() if form == "var" else _leaf((10,), torch.float32)
    fn = fastvae.gaussian_nll_loss if form == "var" else fastvae.gaussian_nll_loss_logvar
    with count_launches() as counts:
        loss = fn(x_hat, x, v, reduction=reduction, backend=backend)
        g = torch.rand(loss.shape, device=DEVICE) + 0.5
        (loss * g).sum().backward()
    _expect_kernels(counts, "gaussian_nll_fwd_kernel")
    assert loss.dtype == torch.float32  # torch's promotion: fp16/bf16 with fp32 gives fp32
    assert x_hat.grad.dtype == model_dtype and v.grad.dtype == torch.float32
    x2, v2 = _twin(x_hat), _twin(v)
    if form == "var":
        ref = F.gaussian_nll_loss(x2, x, v2, reduction="none")
    else:
        ref = 0.5 * (v2 + (x2 - x) ** 2 * torch.exp(-v2))
    ref = reference.reduce(ref, reduction)
    (ref * g).sum().backward()
    _close(loss, ref, torch.float32)
    _close(x_hat.grad, x2.grad, model_dtype)
    _close(v.grad, v2.grad, torch.float32)


@pytest.mark.parametrize("mu_dtype, lv_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
# (2, 2048): the launch config of large tensors (2048-element tiles, 8 elements a thread: one 128-bit access
# for 16-bit rows), so the machine-code report and the compile check see it for every dtype
@pytest.mark.parametrize("shape", [(16, 12), (2, 2048)])
def test_mixed_posterior_promotes(mu_dtype, lv_dtype, shape, backend):
    mu, lv = _leaf(shape, mu_dtype), _leaf(shape, lv_dtype, 0.5)
    out_dtype = torch.promote_types(mu_dtype, lv_dtype)
    with count_launches() as counts:
        z, kl = fastvae.reparameterize_kl(mu, lv, reduction="per_sample", backend=backend)
        gz = torch.randn(z.shape, device=DEVICE)
        ((z.float() * gz).sum() + kl.float().sum()).backward()
    _expect_kernels(counts, "sample_kl_fwd_kernel", "sample_kl_bwd_kernel")
    assert z.dtype == kl.dtype == out_dtype
    assert mu.grad.dtype == mu_dtype and lv.grad.dtype == lv_dtype
    mu64, lv64 = mu.detach().double(), lv.detach().double()
    _close(kl, reference.gaussian_kl(mu64, lv64, reduction="per_sample"), out_dtype)
    z64 = z.detach().double()
    # dz/dmu = 1, dz/dlogvar = 0.5 (z - mu), whatever the noise was; the KL adds mu and 0.5 (e^lv - 1)
    _close(mu.grad, gz.double() + mu64, mu_dtype)
    _close(lv.grad, 0.5 * (z64 - mu64) * gz.double() + 0.5 * (lv64.exp() - 1), lv_dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(4, 6), (2, 2048)])
def test_half_posterior_log_weights(dtype, shape, backend):
    """sample_log_weights on 16-bit mu/logvar (small and large-tensor tiles): each log ratio and its
    gradients from the samples it drew, in float64."""
    mu, lv = _leaf(shape, dtype), _leaf(shape, dtype, 0.5)
    with count_launches() as counts:
        z, lr = fastvae.sample_log_weights(mu, lv, num_samples=2, backend=backend)
        g = torch.rand(lr.shape, device=DEVICE) + 0.5
        (lr * g).sum().backward()
    _expect_kernels(counts, "sample_kl_fwd_kernel", "sample_kl_bwd_kernel")
    assert z.dtype == dtype and lr.dtype == torch.float32
    mu64, lv64, z64 = mu.detach().double(), lv.detach().double(), z.detach().double()
    eps = (z64 - mu64) * torch.exp(-0.5 * lv64)
    # log N(z; 0, I) - log N(z; mu, e^lv) per row, z as stored (rounded to 16 bits)
    _close(lr, (0.5 * (eps.square() - z64.square() + lv64)).flatten(2).sum(-1), dtype)  # z rounded to 16 bits
    gk = g.double()[:, :, None]
    _close(mu.grad, -(gk * z64).sum(0), dtype)
    _close(lv.grad, (gk * 0.5 * (1 - z64 * (z64 - mu64))).sum(0), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_runs_losses_in_fp32_on_the_kernels(dtype, backend):
    """Under autocast the losses come out in fp32 like torch's, the sample keeps its dtype, the kernels run."""
    device_type = torch.device(DEVICE).type
    mu, lv = _leaf((32, 8), dtype), _leaf((32, 8), dtype, 0.5)
    x_hat, x = _leaf((32, 20), dtype), torch.randn(32, 20, device=DEVICE)
    with count_launches() as counts:
        with torch.autocast(device_type, dtype=dtype):
            z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean", backend=backend)
            recon = fastvae.gaussian_nll_loss(x_hat, x.to(dtype), 0.5, reduction="batchmean", backend=backend)
            recon_lv = fastvae.gaussian_nll_loss_logvar(x_hat, x, torch.zeros((), device=DEVICE), backend=backend)
            kl_alone = fastvae.gaussian_kl(mu, lv, backend=backend)
            loss = recon + kl + recon_lv + kl_alone + z.float().sum()
        loss.backward()
    _expect_kernels(counts, "sample_kl_fwd_kernel", "gaussian_nll_fwd_kernel", "sample_kl_bwd_kernel")
    assert z.dtype == dtype
    assert kl.dtype == recon.dtype == recon_lv.dtype == kl_alone.dtype == torch.float32
    assert mu.grad.dtype == lv.grad.dtype == x_hat.grad.dtype == dtype
    ref = F.gaussian_nll_loss(x_hat.detach().double(), x.to(dtype).double(), torch.full((32, 20), 0.5,
                                                                                      dtype=torch.float64))
    _close(recon, ref * 20, torch.float32)  # batchmean of the elementwise mean over 20 features
    _close(kl, reference.gaussian_kl(mu.double(), lv.double(), reduction="batchmean"), torch.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_integer_target_and_shared_logvar(dtype, backend):
    """uint8 pixels against a 16-bit decoder output under autocast (fp32 loss, torch's promotion of the
    integer target, read by the kernel as it is), and a (1, D) logvar shared by a 16-bit batch of means."""
    device_type = torch.device(DEVICE).type
    x_hat = (torch.rand(8, 12, device=DEVICE) * 255).to(dtype).requires_grad_()
    pixels = torch.randint(0, 256, (8, 12), device=DEVICE, dtype=torch.uint8)
    mu, lv = _leaf((8, 4), dtype), _leaf((1, 4), torch.float32, 0.5)
    with count_launches() as counts:
        with torch.autocast(device_type, dtype=dtype):
            recon = fastvae.gaussian_nll_loss(x_hat, pixels, 100.0, reduction="sum", backend=backend)
            kl = fastvae.gaussian_kl(mu, lv, reduction="sum", backend=backend)
        (recon + kl).backward()
    _expect_kernels(counts, "gaussian_nll_fwd_kernel", "sample_kl_fwd_kernel")
    assert recon.dtype == kl.dtype == torch.float32
    assert x_hat.grad.dtype == mu.grad.dtype == dtype and lv.grad.dtype == torch.float32 and lv.grad.shape == (1, 4)
    x64 = _twin(x_hat.double())
    ref = F.gaussian_nll_loss(x64, pixels, torch.full((8, 12), 100.0, dtype=torch.float64, device=DEVICE),
                              reduction="sum")
    ref.backward()
    _close(recon, ref, torch.float32)
    _close(x_hat.grad, x64.grad, dtype)
    m64, l64 = _twin(mu.double()), _twin(lv.double())
    kl64 = reference.gaussian_kl(m64, l64, reduction="sum")
    kl64.backward()
    _close(kl, kl64, torch.float32)
    _close(mu.grad, m64.grad, dtype)
    _close(lv.grad, l64.grad, torch.float32)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


# fp16 gradients under a loss scale at a size where 1/N is far below fp16's normal range (2^22 elements:
# 1/N = 2^-22, under the smallest normal 2^-14): the kernel may not round or flush what the scale would keep
N_LARGE = 1 << 22


# the interpreter takes ~20 s a case at this size: it runs the two ends, the reference pass all four
_INTERPRETER_SKIP = pytest.mark.skipif(BACKEND == "triton" and DEVICE == "cpu", reason="interpreter time")


@pytest.mark.slow
@pytest.mark.parametrize("target_dtype, scale", [
    (torch.float16, 1.0),
    pytest.param(torch.float16, 2.0**15, marks=_INTERPRETER_SKIP),
    pytest.param(torch.float32, 1.0, marks=_INTERPRETER_SKIP),
    (torch.float32, 2.0**16),
])
def test_fp16_gradient_under_a_loss_scale_as_precise_as_eager(target_dtype, scale, backend):
    """fp16 model output, fp16 or fp32 data, reduction="mean", backward with grad_output = loss scale (the
    largest power of two fp16 holds when the loss itself is fp16)."""
    torch.manual_seed(0)
    x_hat = torch.randn(N_LARGE, device=DEVICE).half().requires_grad_()
    x = torch.randn(N_LARGE, device=DEVICE).to(target_dtype)
    var = (torch.rand(N_LARGE, device=DEVICE) + 0.5).half()
    exact = (x_hat.detach().double() - x.double()) / var.double() / N_LARGE * scale
    with count_launches() as counts:
        loss = fastvae.gaussian_nll_loss(x_hat, x, var, backend=backend)
        loss.backward(torch.tensor(scale, dtype=loss.dtype, device=DEVICE))
    _expect_kernels(counts, "gaussian_nll_fwd_kernel", "scale_grad_kernel")
    eager_x = _twin(x_hat)
    eager = F.gaussian_nll_loss(eager_x, x, var)
    eager.backward(torch.tensor(scale, dtype=eager.dtype, device=DEVICE))
    ours, theirs = _rel_err(x_hat.grad, exact), _rel_err(eager_x.grad, exact)
    # no worse than eager (and far from the 1e-2 and 3.5 % zeros of a gradient rounded before the scale)
    assert ours <= 1.1 * theirs + 1e-4, (ours, theirs)
    flushed = ((x_hat.grad == 0) & (exact.abs() > 2.0**-24)).float().mean().item()
    assert flushed <= ((eager_x.grad == 0) & (exact.abs() > 2.0**-24)).float().mean().item() + 1e-4


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_amp_runs_the_kernels(amp, tmp_path):
    """--amp bf16 / fp16 (with a GradScaler): the kernels of the sampler and both losses run, the loss is
    finite. The trainer picks the kernels on CUDA, and on CPU under the interpreter."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from fastvae import train

    argv = ["--epochs", "1", "--max-steps", "2", "--batch-size", "32", "--latent-dim", "4", "--amp", amp,
            "--device", torch.device(DEVICE).type, "--out", str(tmp_path), "--backend", BACKEND]
    with count_launches() as counts:
        assert train.main(argv) == 0
    _expect_kernels(counts, "sample_kl_fwd_kernel", "sample_kl_bwd_kernel", "gaussian_nll_fwd_kernel")
    (line,) = [ln for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "nan" not in line and "inf" not in line.lower().replace("info", "")
