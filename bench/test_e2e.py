"""A whole VAE training step (zero_grad, forward, loss, backward, Adam step) in fp32, five ways: the loss
written eagerly as VAE code writes it (``F.gaussian_nll_loss``), the same loss with the Gaussian NLL written by
hand ("formula": no ``var * ones_like(x_hat)``), torch.compile of the eager model + either loss, and the loss
from fastvae (the Triton kernels on CUDA, its torch backend on CPU).

Two models: an MLP VAE on 784-dim inputs (2 x 512 hidden, latent 64) and a small conv VAE on 3 x 64 x 64
images (4 stride-2 convs, latent 128). On CUDA the process is capped at 70 GB: a batch that does not fit is
skipped, and the largest batch that fits, per model and implementation, goes into the JSON.

``test_mlp_vae_fit_batch`` finds the largest MLP VAE batch each implementation fits in one fixed memory
(CUDA: the 70 GB cap, by trying steps; CPU: the profiler's peak of a step against ``FIT_CPU_BYTES``), by
doubling and then bisection. Its torch.compile is dynamic: one compile across all the batch sizes tried.
"""

from __future__ import annotations

import gc
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from _fit import fit_batch
from conftest import Batch, Bench, Case, _cpu_peak_bytes, _is_oom, is_quick
from torch import nn

import fastvae

VAR = 0.5  # the decoder's fixed variance


class MLPVAE(nn.Module):
    def __init__(self, features: int = 784, hidden: int = 512, latent: int = 64):
        super().__init__()
        self.shape = (features,)
        self.encoder = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.fc_mu, self.fc_logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, features),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class ConvVAE(nn.Module):
    def __init__(self, channels: int = 3, latent: int = 128, width: int = 32):
        super().__init__()
        self.shape = (channels, 64, 64)
        w = [channels, width, 2 * width, 4 * width, 8 * width]
        enc: list[nn.Module] = []
        dec: list[nn.Module] = []
        for i in range(4):  # 64 -> 32 -> 16 -> 8 -> 4
            enc += [nn.Conv2d(w[i], w[i + 1], 4, 2, 1), nn.ReLU()]
            dec += [nn.ConvTranspose2d(w[4 - i], w[3 - i], 4, 2, 1), nn.ReLU() if i < 3 else nn.Sigmoid()]
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.fc_mu, self.fc_logvar = nn.Linear(w[4] * 16, latent), nn.Linear(w[4] * 16, latent)
        self.fc_dec = nn.Linear(latent, w[4] * 16)
        self.decoder = nn.Sequential(nn.Unflatten(1, (w[4], 4, 4)), *dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc_dec(z))


def eager_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    x_hat = model.decode(z)
    recon = F.gaussian_nll_loss(x_hat, x, VAR, reduction="sum") / x.shape[0]
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kld


def formula_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    x_hat = model.decode(z)
    recon = torch.sum(0.5 * (math.log(VAR) + (x - x_hat) ** 2 / VAR)) / x.shape[0]
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return recon + kld


def loss_for(impl: str, bench: Bench, dynamic: bool = False) -> Callable[..., torch.Tensor]:
    """The loss of a training implementation: eager / formula, torch.compile of either, or fastvae's."""
    return bench.impl(impl, eager_loss, lambda backend: fastvae_loss, formula_loss, dynamic=dynamic)


def fastvae_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mu, logvar = model.encode(x)
    z, kld = fastvae.reparameterize_kl(mu, logvar, reduction="batchmean")
    x_hat = model.decode(z)
    return fastvae.gaussian_nll_loss(x_hat, x, VAR, reduction="batchmean") + kld


def train_step(model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> Callable[[Batch], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(b: Batch) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, *b.args).backward()
        opt.step()

    return step


def run_train(
    name: str, model_cls: type[nn.Module], benchmark, bench: Bench, batch: int, impl: str, limits: dict
) -> None:
    smallest_oom = limits["train_oom_batch"].get(name, {}).get(impl)
    if smallest_oom is not None and batch > smallest_oom:
        pytest.skip(f"{name} {impl}: batch {smallest_oom} did not fit")
    torch.manual_seed(0)
    model = model_cls().to(bench.device)
    loss_fn = loss_for(impl, bench)
    case = Case(name, "train", impl, torch.float32, (batch, *model.shape))

    def make() -> Batch:
        return Batch((torch.rand(case.shape, device=bench.device),))

    cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its conv algorithms
    try:
        bench.run(benchmark, case, train_step(model, loss_fn), make, items=batch, key=("train", case.shape))
    except pytest.skip.Exception:
        limits["train_oom_batch"].setdefault(name, {})[impl] = batch
        raise
    finally:
        torch.backends.cudnn.benchmark = cudnn
    best = limits["train_max_batch"].setdefault(name, {})
    best[impl] = max(best.get(impl, 0), batch)


def test_mlp_vae(benchmark, bench, train_limits, mlp_batch, train_impl):
    run_train("mlp_vae", MLPVAE, benchmark, bench, mlp_batch, train_impl, train_limits)


def test_conv_vae(benchmark, bench, train_limits, conv_batch, train_impl):
    run_train("conv_vae", ConvVAE, benchmark, bench, conv_batch, train_impl, train_limits)


FIT_CPU_BYTES = 1 << 30  # the CPU's fixed memory for the fit search (the quick grid: 32 MiB)


def _fits(model: nn.Module, step: Callable[[Batch], None], batch: int, device: torch.device, cap: int) -> bool:
    """One training step at ``batch``: True if it ran (CUDA, under the process's memory cap) or if its peak,
    inputs included, stays within ``cap`` bytes (CPU)."""
    try:
        x = Batch((torch.rand(batch, *model.shape, device=device),))
        if device.type == "cuda":
            step(x)
            torch.cuda.synchronize(device)
            return True
        return x.nbytes() + _cpu_peak_bytes(lambda: step(x)) <= cap
    except Exception as e:
        if not _is_oom(e):
            raise
        return False
    finally:
        x = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def test_mlp_vae_fit_batch(benchmark, bench, train_limits, train_impl, pytestconfig):
    """The largest MLP VAE training batch of each implementation in one fixed memory (not timed)."""
    torch.manual_seed(0)
    model = MLPVAE().to(bench.device)
    loss_fn = loss_for(train_impl, bench, dynamic=True)
    step = train_step(model, loss_fn)
    step(Batch((torch.rand(2, *model.shape, device=bench.device),)))  # Adam's state exists before the search
    cuda = bench.device.type == "cuda"
    quick = is_quick(pytestconfig)
    cap = FIT_CPU_BYTES >> (5 if quick else 0)
    # the quick grid (the dry run of ci/gpu.sh) only shows the search works: a few tries, each a profiled step
    start, limit = (1 << 18, 1 << 26) if cuda else (1 << 6, 1 << (9 if quick else 20))
    best, tries = fit_batch(lambda b: _fits(model, step, b, bench.device, cap), start, limit)
    memory = f"{torch.cuda.get_device_properties(bench.device).total_memory:.3g} B card, 70 GB cap" if cuda \
        else f"{cap} B of step peak"
    train_limits["train_fit_batch"].setdefault("mlp_vae", {})[train_impl] = best
    benchmark.extra_info.update(fit_batch=best, fit_tries=tries, fit_memory=memory, impl=train_impl)
    # pytest-benchmark needs one call to keep this row (it has no "op": the report's tables leave it out)
    benchmark.pedantic(lambda: None, rounds=1)
    assert best > 0, f"{train_impl}: batch {start} does not fit in {memory}"
