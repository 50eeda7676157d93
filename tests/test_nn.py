"""The modules are thin: each equals its function, and ELBOLoss equals the hand-written negative ELBO with its
free bits and beta schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastvae
from fastvae import nn as fnn


def test_gaussian_nll_module_is_torch_drop_in(backend, device):
    x, t = torch.randn(10, 4, device=device), torch.randn(10, 4, device=device)
    var = torch.rand(10, 1, device=device) + 0.1
    for kwargs in ({}, {"full": True, "reduction": "sum"}, {"eps": 0.3, "reduction": "none"}):
        ours = fnn.GaussianNLLLoss(**kwargs, backend=backend)(x, t, var)
        torch.testing.assert_close(ours, torch.nn.GaussianNLLLoss(**kwargs)(x, t, var))


def test_kl_and_reparameterize_modules(backend, device):
    mu, lv = torch.randn(6, 3, device=device), torch.randn(6, 3, device=device)
    torch.testing.assert_close(fnn.GaussianKL("batchmean", backend)(mu, lv),
                               fastvae.gaussian_kl(mu, lv, reduction="batchmean", backend=backend))
    assert fnn.Reparameterize(num_samples=5, backend=backend)(mu, lv).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="abc is not valid"):
        fnn.GaussianKL("abc")


def _hand_written(x_hat, x, mu, lv, beta, var=None, logvar_x=None, free_bits=0.0):
    if logvar_x is None:
        recon = (0.5 * (math.log(var) + (x - x_hat) ** 2 / var)).sum() / x.shape[0]
    else:
        recon = (0.5 * (logvar_x + (x - x_hat) ** 2 * torch.exp(-logvar_x))).sum() / x.shape[0]
    kl_dim = (-0.5 * (1 + lv - mu**2 - lv.exp())).mean(0)
    kl_term = kl_dim.clamp(min=free_bits).sum() if free_bits else kl_dim.sum()
    return recon + beta * kl_term, recon, kl_dim.sum()


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned-var"])
def test_elbo_matches_hand_written(likelihood, backend, device):
    x, x_hat = torch.rand(16, 12, device=device), torch.rand(16, 12, device=device)
    mu, lv = torch.randn(16, 5, device=device), torch.randn(16, 5, device=device) * 0.4
    logvar_x = torch.randn(12, device=device) * 0.3 if likelihood != "gaussian" else None
    loss_fn = fnn.ELBOLoss(likelihood=likelihood, var=0.2, beta=0.7, backend=backend)
    out = loss_fn(x_hat, x, mu, lv, logvar_x, return_terms=True)
    loss, recon, kl = _hand_written(x_hat, x, mu, lv, 0.7, var=0.2, logvar_x=logvar_x)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-5)
    assert out.beta == 0.7
    summed = fnn.ELBOLoss(likelihood=likelihood, var=0.2, beta=0.7, reduction="sum", backend=backend)
    torch.testing.assert_close(summed(x_hat, x, mu, lv, logvar_x), loss * 16, rtol=1e-5, atol=1e-4)


def test_free_bits_stop_the_kl_gradient_of_quiet_dims(backend, device):
    mu = torch.randn(64, 4, device=device)
    lv = torch.randn(64, 4, device=device) * 0.2
    mu[:, :2] *= 0.01  # dims 0, 1 carry almost no information: their KL is far below the floor
    lv[:, :2] *= 0.01
    mu[:, 2:] *= 2.0  # dims 2, 3 are far above it (KL about 2 nats)
    mu.requires_grad_(), lv.requires_grad_()
    x = torch.rand(64, 6, device=device)
    out = fnn.ELBOLoss(var=1.0, free_bits=0.5, backend=backend)(x.flip(0), x, mu, lv, return_terms=True)
    loss, _, kl = _hand_written(x.flip(0), x, mu.detach(), lv.detach(), 1.0, var=1.0, free_bits=0.5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert torch.all(mu.grad[:, :2] == 0) and torch.all(lv.grad[:, :2] == 0)
    assert torch.all(mu.grad[:, 2:] != 0)


def test_beta_schedule_follows_steps(backend, device):
    loss_fn = fnn.ELBOLoss(beta_schedule=lambda step: min(1.0, step / 4), backend=backend)
    x, mu = torch.rand(8, 3, device=device), torch.randn(8, 2, device=device)
    betas = []
    for _ in range(6):
        loss_fn(x, x.flip(0), mu, mu)
        betas.append(loss_fn.last.beta)
        loss_fn.step()
    assert betas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_elbo_bad_arguments():
    with pytest.raises(ValueError, match="likelihood must be"):
        fnn.ELBOLoss(likelihood="laplace")
    with pytest.raises(ValueError, match="free_bits must be >= 0"):
        fnn.ELBOLoss(free_bits=-1)
    with pytest.raises(ValueError, match="mean is not valid"):
        fnn.ELBOLoss(reduction="mean")
    with pytest.raises(ValueError, match="none is not valid"):
        fnn.ELBOLoss(likelihood="mse", recon_reduction="none")
    with pytest.raises(ValueError, match="backend must be"):
        fnn.ELBOLoss(backend="cuda")
    with pytest.raises(ValueError, match="needs logvar_x"):
        x = torch.rand(2, 3)
        fnn.ELBOLoss(likelihood="gaussian-learned-var")(x, x, x, x)


def test_elbo_gradients_match_eager(backend, device):
    x = torch.rand(16, 12, device=device)
    leaves = [torch.rand(16, 12, device=device), torch.randn(16, 5, device=device), torch.randn(16, 5, device=device)]
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    fnn.ELBOLoss(var=0.3, beta=2.0, backend=backend)(ours[0], x, ours[1], ours[2]).backward()
    recon = F.gaussian_nll_loss(ref[0], x, torch.full_like(x, 0.3), reduction="sum") / 16
    kld = -0.5 * torch.sum(1 + ref[2] - ref[1] ** 2 - ref[2].exp()) / 16
    (recon + 2.0 * kld).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_elbo_takes_the_fused_kl_and_checkpoints_its_step(backend, device):
    x, mu, lv = torch.rand(8, 3, device=device), torch.randn(8, 2, device=device), torch.randn(8, 2, device=device)
    z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean", backend=backend)
    loss_fn = fnn.ELBOLoss(beta=0.5, backend=backend)
    torch.testing.assert_close(loss_fn(x, x.flip(0), mu, lv, kl=kl), loss_fn(x, x.flip(0), mu, lv))
    with pytest.raises(ValueError, match="kl must be the reduced KL"):
        loss_fn(x, x.flip(0), mu, lv, kl=torch.ones(8, device=device))
    for _ in range(3):
        loss_fn.step()
    restored = fnn.ELBOLoss(beta=0.5)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.steps == 3


# ---------------------------------------------------------------------------------------- the losses people write

SHAPES = [(4, 3, 8, 8), (5, 12)]


def _antixk_vanilla_vae_loss(recons, x, mu, log_var, kld_weight):
    """PyTorch-VAE's VanillaVAE.loss_function (AntixK), line for line."""
    recons_loss = F.mse_loss(recons, x)
    kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
    loss = recons_loss + kld_weight * kld_loss
    return {"loss": loss, "Reconstruction_Loss": recons_loss.detach(), "KLD": -kld_loss.detach()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_elbo_mse_is_antixk_vanilla_vae_loss(shape, dtype, backend, device):
    """ELBOLoss(likelihood="mse", beta=kld_weight) is PyTorch-VAE's loss: F.mse_loss's element mean plus
    kld_weight times the batch mean of the per-sample KL sums; value and gradients, the reconstruction term
    bit for bit (torch's own op), and used as a loss: a 0-d tensor to call backward() on."""
    kld_weight = 0.00025  # PyTorch-VAE's M_N
    leaves = [torch.rand(shape, dtype=dtype, device=device), torch.randn(shape[0], 6, dtype=dtype, device=device),
              torch.randn(shape[0], 6, dtype=dtype, device=device) * 0.5]
    x = torch.rand(shape, dtype=dtype, device=device)
    ours, ref = ([t.clone().requires_grad_() for t in leaves] for _ in range(2))
    criterion = fnn.ELBOLoss(likelihood="mse", beta=kld_weight, backend=backend)
    loss = criterion(ours[0], x, *ours[1:])
    expect = _antixk_vanilla_vae_loss(ref[0], x, *ref[1:], kld_weight)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.dtype == dtype
    assert torch.equal(criterion.last.recon, expect["Reconstruction_Loss"])  # F.mse_loss itself
    assert not criterion.last.loss.requires_grad  # logging does not hold the graph
    torch.testing.assert_close(criterion.last.kl, -expect["KLD"])
    torch.testing.assert_close(loss, expect["loss"])
    loss.backward()
    expect["loss"].backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)
    # the terms with their graph on request
    terms = criterion(ours[0], x, *ours[1:], return_terms=True)
    assert terms.recon.requires_grad and torch.equal(terms.loss.detach(), loss.detach())


@pytest.mark.parametrize("likelihood", ["mse", "gaussian", "bernoulli"])
def test_recon_reduction_names_the_scale(likelihood, backend, device):
    """The reconstruction term per recon_reduction: "mean" the element mean (1/D of "batchmean" for D
    elements a sample), "batchmean" the per-sample sum averaged over the batch, "sum" the sum; the defaults:
    "mean" for mse, the module's reduction otherwise."""
    b, d = 6, 10
    x_hat, x = torch.rand(b, d, device=device), torch.rand(b, d, device=device)
    mu, lv = torch.randn(b, 3, device=device), torch.randn(b, 3, device=device)
    per_element = {"mse": lambda: F.mse_loss(x_hat, x, reduction="none"),
                   "gaussian": lambda: F.gaussian_nll_loss(x_hat, x, torch.ones_like(x), reduction="none"),
                   "bernoulli": lambda: F.binary_cross_entropy_with_logits(x_hat, x, reduction="none")}[likelihood]()
    expect = {"mean": per_element.mean(), "batchmean": per_element.sum() / b, "sum": per_element.sum()}
    for red, value in expect.items():
        out = fnn.ELBOLoss(likelihood=likelihood, recon_reduction=red, backend=backend)(
            x_hat, x, mu, lv, return_terms=True)
        torch.testing.assert_close(out.recon, value, rtol=1e-5, atol=1e-6)
    default = fnn.ELBOLoss(likelihood=likelihood, backend=backend)
    assert default.recon_reduction == ("mean" if likelihood == "mse" else "batchmean")
    assert fnn.ELBOLoss(likelihood=likelihood, reduction="sum").recon_reduction == (
        "mean" if likelihood == "mse" else "sum")
    # per sample, as the IWAE bound takes the reconstruction terms
    torch.testing.assert_close(default.recon(x_hat, x, reduction="per_sample"), per_element.sum(1),
                               rtol=1e-5, atol=1e-6)


def test_subclass_losses_return_the_loss_tensor(backend, device):
    x, x_hat = torch.rand(8, 5, device=device), torch.rand(8, 5, device=device)
    mu, lv = torch.randn(8, 3, device=device), torch.randn(8, 3, device=device) * 0.3
    z = mu + lv.mul(0.5).exp() * torch.randn(8, 3, device=device)
    g = torch.Generator(device=device)
    m = fnn.MMDVAELoss(mmd_weight=2.0, beta=0.5, backend=backend)
    loss = m(x_hat, x, z, mu, lv, generator=g.manual_seed(0))
    terms = m(x_hat, x, z, mu, lv, generator=g.manual_seed(0), return_terms=True)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and torch.equal(loss, terms.loss)
    assert isinstance(m.last, fnn.MMDOutput) and torch.equal(m.last.mmd, terms.mmd.detach())
    tc = fnn.BetaTCVAELoss(dataset_size=100, backend=backend)
    loss = tc(x_hat, x, z, mu, lv)
    assert isinstance(loss, torch.Tensor) and isinstance(tc.last, fnn.TCVAEOutput)
    torch.testing.assert_close(loss, tc.last.loss)

