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


@pytest.mark.parametrize("latent", ["vq", "rvq", "lfq", "fsq", "gumbel"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_discrete_vae_shapes_gradients_and_samples(kind, latent):
    from fastvae.models import DiscreteVAE

    model = DiscreteVAE(kind, (1, 8, 8), latent, tokens=3, codebook_size=256, num_quantizers=2)
    x = torch.rand(4, 1, 8, 8)
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out.x_hat.shape == x.shape and out.quantizer_loss.dim() == 0 and out.kl.dim() == 0
    assert out.indices.shape == ((4, 3, 2) if latent == "rvq" else (4, 3)) and out.indices.dtype == torch.int64
    assert (0 <= out.indices).all() and (out.indices < 256).all()
    counts = model.usage(out.indices)
    assert counts.shape == ((2 if latent == "rvq" else 1), 256) and (counts.sum(-1) == 12).all()
    loss = fastvae.nn.ELBOLoss(var=0.1).recon(out.x_hat, x) + out.quantizer_loss + out.kl
    loss.backward()
    encoder_grads = [p.grad for p in model.base.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in encoder_grads)  # through the bottleneck
    assert any(g.abs().sum() > 0 for g in encoder_grads)
    assert model.sample(5, generator=torch.Generator().manual_seed(1)).shape == (5, 1, 8, 8)
    assert model.encode(x)[0].shape == (4, 3 * model.code_dim)


def test_discrete_vae_rejects_untabulated_sizes():
    from fastvae.models import DiscreteVAE

    with pytest.raises(ValueError, match="power of 2"):
        DiscreteVAE("mlp", (1, 8, 8), "lfq", tokens=2, codebook_size=100)
    with pytest.raises(ValueError, match="tabulated"):
        DiscreteVAE("mlp", (1, 8, 8), "fsq", tokens=2, codebook_size=100)
    with pytest.raises(ValueError, match="latent must be"):
        DiscreteVAE("mlp", (1, 8, 8), "gaussian", tokens=2, codebook_size=16)
