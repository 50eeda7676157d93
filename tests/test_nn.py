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
    out = loss_fn(x_hat, x, mu, lv, logvar_x)
    loss, recon, kl = _hand_written(x_hat, x, mu, lv, 0.7, var=0.2, logvar_x=logvar_x)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.recon, recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-5)
    assert out.beta == 0.7
    summed = fnn.ELBOLoss(likelihood=likelihood, var=0.2, beta=0.7, reduction="sum", backend=backend)
    torch.testing.assert_close(summed(x_hat, x, mu, lv, logvar_x).loss, loss * 16, rtol=1e-5, atol=1e-4)


def test_free_bits_stop_the_kl_gradient_of_quiet_dims(backend, device):
    mu = torch.randn(64, 4, device=device)
    lv = torch.randn(64, 4, device=device) * 0.2
    mu[:, :2] *= 0.01  # dims 0, 1 carry almost no information: their KL is far below the floor
    lv[:, :2] *= 0.01
    mu[:, 2:] *= 2.0  # dims 2, 3 are far above it (KL about 2 nats)
    mu.requires_grad_(), lv.requires_grad_()
    x = torch.rand(64, 6, device=device)
    out = fnn.ELBOLoss(var=1.0, free_bits=0.5, backend=backend)(x.flip(0), x, mu, lv)
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
        betas.append(loss_fn(x, x.flip(0), mu, mu).beta)
        loss_fn.step()
    assert betas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_elbo_bad_arguments():
    with pytest.raises(ValueError, match="likelihood must be"):
        fnn.ELBOLoss(likelihood="laplace")
    with pytest.raises(ValueError, match="free_bits must be >= 0"):
        fnn.ELBOLoss(free_bits=-1)
    with pytest.raises(ValueError, match="mean is not valid"):
        fnn.ELBOLoss(reduction="mean")
    with pytest.raises(ValueError, match="needs logvar_x"):
        x = torch.rand(2, 3)
        fnn.ELBOLoss(likelihood="gaussian-learned-var")(x, x, x, x)


def test_elbo_gradients_match_eager(backend, device):
    x = torch.rand(16, 12, device=device)
    leaves = [torch.rand(16, 12, device=device), torch.randn(16, 5, device=device), torch.randn(16, 5, device=device)]
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.clone().requires_grad_() for t in leaves]
    fnn.ELBOLoss(var=0.3, beta=2.0, backend=backend)(ours[0], x, ours[1], ours[2]).loss.backward()
    recon = F.gaussian_nll_loss(ref[0], x, torch.full_like(x, 0.3), reduction="sum") / 16
    kld = -0.5 * torch.sum(1 + ref[2] - ref[1] ** 2 - ref[2].exp()) / 16
    (recon + 2.0 * kld).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_elbo_takes_the_fused_kl_and_checkpoints_its_step(backend, device):
    x, mu, lv = torch.rand(8, 3, device=device), torch.randn(8, 2, device=device), torch.randn(8, 2, device=device)
    z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean", backend=backend)
    loss_fn = fnn.ELBOLoss(beta=0.5, backend=backend)
    torch.testing.assert_close(loss_fn(x, x.flip(0), mu, lv, kl=kl).loss, loss_fn(x, x.flip(0), mu, lv).loss)
    with pytest.raises(ValueError, match="kl must be the reduced KL"):
        loss_fn(x, x.flip(0), mu, lv, kl=torch.ones(8, device=device))
    for _ in range(3):
        loss_fn.step()
    restored = fnn.ELBOLoss(beta=0.5)
    restored.load_state_dict(loss_fn.state_dict())
    assert restored.steps == 3
