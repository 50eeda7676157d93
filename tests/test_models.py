"""The example VAEs of fastvae.models: shapes for 8 x 8, 28 x 28 and 3 x 64 x 64 images, gradients, noise."""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae.models import LOGVAR_X_MIN, MLPVAE, ConvVAE, build_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("learned_var", [False, True])
def test_forward_backward(kind, shape, learned_var):
    model = build_model(kind, shape, latent_dim=4, learned_var=learned_var)
    x = torch.rand(3, *shape)
    out = model(x)
    assert out.x_hat.shape == x.shape
    assert 0 <= out.x_hat.min() and out.x_hat.max() <= 1
    assert out.mu.shape == out.logvar.shape == (3, 4)
    assert out.kl.dim() == 0 and out.kl >= 0
    if learned_var:
        assert torch.broadcast_shapes(out.logvar_x.shape, x.shape) == x.shape
        assert out.logvar_x.min() > LOGVAR_X_MIN
    else:
        assert out.logvar_x is None
    likelihood = "gaussian-learned-var" if learned_var else "gaussian"
    loss = fastvae.nn.ELBOLoss(likelihood=likelihood, var=0.1)(out.x_hat, x, out.mu, out.logvar, out.logvar_x)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("size, convs", [(8, 1), (28, 3), (64, 4), ((32, 48), 4)])
def test_conv_depth_follows_image_size(size, convs):
    model = ConvVAE(in_channels=2, image_size=size, latent_dim=3)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.encoder) == convs
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in model.decoder) == convs
    h, w = (size, size) if isinstance(size, int) else size
    assert model.sample(2).shape == (2, 2, h, w)


def test_conv_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 8 x 8"):
        ConvVAE(image_size=4)
    with pytest.raises(ValueError, match="model must be"):
        build_model("rnn", (1, 8, 8), 2)


def test_forward_is_reparameterize_kl():
    """z and the KL come from fastvae.reparameterize_kl with the generator passed to forward."""
    model = MLPVAE((1, 8, 8), latent_dim=5)
    x = torch.rand(6, 1, 8, 8)
    out = model(x, generator=torch.Generator().manual_seed(7))
    z, kl = fastvae.reparameterize_kl(out.mu, out.logvar, reduction="batchmean",
                                      generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.x_hat, model.decode(z)[0])
    again = model(x, generator=torch.Generator().manual_seed(7))
    other = model(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(again.x_hat, out.x_hat)
    assert not torch.equal(other.x_hat, out.x_hat)
