"""torch.compile(fullgraph=True) over a VAE step on the eager-reference path (the Triton path's compile test
lives in test_triton.py): fastvae's checks and dispatch must trace without a graph break."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND

import fastvae

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="reference-path compile test")


class _VAE(torch.nn.Module):
    def __init__(self, d_in: int = 16, d_z: int = 4):
        super().__init__()
        self.enc = torch.nn.Linear(d_in, 2 * d_z)
        self.dec = torch.nn.Linear(d_z, d_in)
        self.elbo = fastvae.nn.ELBOLoss(var=0.5, free_bits=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.enc(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(mu, logvar)
        var = torch.full_like(x, 0.5)
        nll = fastvae.gaussian_nll_loss(self.dec(z), x, var, reduction="batchmean")
        return nll + self.elbo(self.dec(mu), x, mu, logvar)


def test_compile_fullgraph_step_matches_eager():
    # inductor draws its own random numbers unless told to fall back to torch's generator; config.patch, not
    # monkeypatch: undoing a monkeypatch deletes the entry on some torch versions, hiding it from every later
    # compile in the process ("torch._inductor.config.fallback_random does not exist")
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        _step_matches_eager()


def _step_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _VAE(), torch.randn(8, 16)
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        torch.manual_seed(1)
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
