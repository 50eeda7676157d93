"""One switch for the kernels: FASTVAE_BACKEND at import, ``fastvae.set_backend`` / ``use_backend`` later, a
call's own ``backend=`` over both; every public entry (functions, nn modules, distributions, the example
models) follows it. The routing is seen by a stand-in for ``fastvae._triton`` (every kernel entry raises
``Routed``), so these tests run in the eager pass too; a subprocess under TRITON_INTERPRET=1 runs the real
kernels from the global setting alone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastvae
from fastvae import _checks
from fastvae import nn as fnn
from fastvae.distributions import DiagonalGaussianDistribution, Normal
from fastvae.models import MLPVAE

ROOT = Path(__file__).resolve().parents[1]


class Routed(Exception):
    """Raised by the stand-in kernels: the call took the kernel path."""


class FakeKernels:
    """Stands in for ``fastvae._triton``: any entry (``sample_kl``, ``sampling.FORM_CLAMPED``, ...) is another
    stand-in, and calling one raises Routed with its name."""

    def __init__(self, name: str = "_triton"):
        self._name = name

    def __getattr__(self, attr: str) -> FakeKernels:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return FakeKernels(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise Routed(self._name)


@pytest.fixture
def kernels_stand_in(monkeypatch):
    """Kernels "runnable" on CPU tensors (as under the interpreter), and fastvae._triton the stand-in."""
    monkeypatch.setattr(_checks, "interpreting", lambda: True)
    monkeypatch.setattr(_checks, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(fastvae, "_triton", FakeKernels(), raising=False)
    previous = fastvae.get_backend()
    fastvae.set_backend(None)
    yield
    fastvae.set_backend(previous)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


# every public entry that has a kernel path: (name, call(backend) -> result)
CALLS = {
    "gaussian_kl": lambda b: fastvae.gaussian_kl(_t(4, 3), _t(4, 3), backend=b),
    "reparameterize": lambda b: fastvae.reparameterize(_t(4, 3), _t(4, 3), backend=b),
    "reparameterize_kl": lambda b: fastvae.reparameterize_kl(_t(4, 3), _t(4, 3), backend=b),
    "gaussian_nll_loss": lambda b: fastvae.gaussian_nll_loss(_t(4, 3), _t(4, 3), torch.ones(4, 3), backend=b),
    "gaussian_nll_loss_logvar": lambda b: fastvae.gaussian_nll_loss_logvar(_t(4, 3), _t(4, 3), _t(4, 3),
                                                                            backend=b),
    "binary_cross_entropy_with_logits": lambda b: fastvae.binary_cross_entropy_with_logits(
        _t(4, 3), torch.rand(4, 3), backend=b),
    "poisson_nll_loss": lambda b: fastvae.poisson_nll_loss(_t(4, 3), torch.rand(4, 3), backend=b),
    "sample_log_weights": lambda b: fastvae.sample_log_weights(_t(4, 3), _t(4, 3), num_samples=2, backend=b),
    "mmd": lambda b: fastvae.mmd(_t(6, 3), backend=b),
    "nn.GaussianKL": lambda b: fnn.GaussianKL(backend=b)(_t(4, 3), _t(4, 3)),
    "nn.Reparameterize": lambda b: fnn.Reparameterize(backend=b)(_t(4, 3), _t(4, 3)),
    "nn.GaussianNLLLoss": lambda b: fnn.GaussianNLLLoss(backend=b)(_t(4, 3), _t(4, 3), torch.ones(4, 3)),
    "nn.ELBOLoss": lambda b: fnn.ELBOLoss(backend=b)(torch.rand(4, 3), torch.rand(4, 3), _t(4, 2), _t(4, 2)),
    "DiagonalGaussianDistribution.sample": lambda b: DiagonalGaussianDistribution(_t(2, 4, 3, 3),
                                                                                  backend=b).sample(),
    "DiagonalGaussianDistribution.kl": lambda b: DiagonalGaussianDistribution(_t(2, 4, 3, 3), backend=b).kl(),
    "Normal.rsample": lambda b: Normal(_t(4, 3), torch.rand(4, 3) + 0.5, backend=b).rsample(),
    "kl_divergence(Normal, Normal)": lambda b: torch.distributions.kl_divergence(
        Normal(_t(4, 3), torch.rand(4, 3) + 0.5, backend=b), Normal(_t(4, 3), torch.rand(4, 3) + 0.5, backend=b)),
    "models.MLPVAE": lambda b: MLPVAE((1, 4, 4), latent_dim=2, hidden=(8,), backend=b)(torch.rand(2, 1, 4, 4)),
}


def _routed(call, backend=None) -> bool:
    try:
        call(backend)
    except Routed:
        return True
    return False


@pytest.mark.parametrize("name", list(CALLS))
def test_every_entry_follows_the_global_backend(name, kernels_stand_in):
    call = CALLS[name]
    assert not _routed(call)  # the default on CPU tensors: eager
    fastvae.set_backend("triton")
    assert _routed(call)
    assert not _routed(call, "torch")  # the call's own backend wins
    fastvae.set_backend("torch")
    assert not _routed(call)
    assert _routed(call, "triton")
    with fastvae.use_backend("triton"):
        assert _routed(call)
    assert fastvae.get_backend() == "torch"
    fastvae.set_backend(None)
    with fastvae.use_backend("torch"):
        assert not _routed(call)
    assert fastvae.get_backend() is None


def test_modules_read_the_setting_at_each_call(kernels_stand_in):
    """A module (or a model) built before set_backend follows the setting at call time."""
    loss, model = fnn.GaussianKL(), MLPVAE((1, 4, 4), latent_dim=2, hidden=(8,))
    mu = _t(4, 3)
    loss(mu, mu)
    model(torch.rand(2, 1, 4, 4))
    with fastvae.use_backend("triton"):
        with pytest.raises(Routed):
            loss(mu, mu)
        with pytest.raises(Routed):
            model(torch.rand(2, 1, 4, 4))


def test_use_backend_restores_on_exceptions():
    previous = fastvae.get_backend()
    fastvae.set_backend("torch")
    try:
        with pytest.raises(KeyError):
            with fastvae.use_backend(None):
                assert fastvae.get_backend() is None
                raise KeyError("inside")
        assert fastvae.get_backend() == "torch"
        with pytest.raises(ValueError, match="backend must be"):  # a bad name leaves the setting as it was
            with fastvae.use_backend("cuda"):
                pass
        assert fastvae.get_backend() == "torch"
    finally:
        fastvae.set_backend(previous)


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", 1, True])
def test_invalid_values_raise_value_error(bad):
    previous = fastvae.get_backend()
    with pytest.raises(ValueError, match="backend must be None, 'torch' or 'triton'"):
        fastvae.set_backend(bad)
    assert fastvae.get_backend() == previous  # unchanged
    with pytest.raises(ValueError, match="backend must be"):
        fastvae.gaussian_kl(_t(2, 2), _t(2, 2), backend=bad)
    for build in (lambda: fnn.GaussianKL(backend=bad), lambda: fnn.ELBOLoss(backend=bad),
                  lambda: DiagonalGaussianDistribution(_t(2, 4, 1, 1), backend=bad),
                  lambda: Normal(_t(2), torch.ones(2), backend=bad),
                  lambda: MLPVAE((1, 4, 4), latent_dim=2, hidden=(8,), backend=bad)):
        with pytest.raises(ValueError, match="backend must be"):
            build()


def test_triton_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(_checks, "interpreting", lambda: False)
    with fastvae.use_backend("triton"):
        with pytest.raises(ValueError, match="backend='triton' needs"):
            fastvae.active_path("cpu")
        with pytest.raises(ValueError, match="backend='triton' needs"):
            fastvae.gaussian_kl(_t(2, 2), _t(2, 2))
        assert fastvae.active_path("cpu", backend="torch") == "torch"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("FASTVAE_BACKEND", "TRITON_INTERPRET")}
    # the installed fastvae, not the checkout's directory: a wheel's fastvae.kernels exists only installed
    # (package-dir maps kernels/ there), so neither the checkout nor the cwd goes on the path
    environ.update(env, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=environ, cwd=ROOT / "tests")


@pytest.mark.parametrize("value, expect", [("torch", "torch"), ("TRITON", "triton"), (" triton ", "triton"),
                                           ("auto", None), ("", None), ("none", None)])
def test_env_var_values(value, expect, monkeypatch):
    monkeypatch.setenv("FASTVAE_BACKEND", value)
    assert _checks._backend_from_env() == expect
    monkeypatch.setenv("FASTVAE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTVAE_BACKEND must be 'auto', 'torch' or 'triton', got 'cuda'"):
        _checks._backend_from_env()


def test_env_var_at_import():
    """The setting is read once, at import: a fresh process sees it (and a bad value fails the import)."""
    r = _python("import fastvae; print(repr(fastvae.get_backend()))", FASTVAE_BACKEND="torch")
    assert r.returncode == 0 and r.stdout.strip() == "'torch'", r.stderr
    r = _python("import fastvae", FASTVAE_BACKEND="cuda")
    assert r.returncode != 0
    assert "ValueError: FASTVAE_BACKEND must be 'auto', 'torch' or 'triton', got 'cuda'" in r.stderr


def test_env_triton_runs_the_kernels_on_cpu_under_the_interpreter():
    """TRITON_INTERPRET=1 FASTVAE_BACKEND=triton: CPU calls with no backend= run the kernels (launches
    counted) with the eager numbers; set_backend(None) puts CPU calls back on the eager path, "torch" pins it."""
    r = _python("""
        import torch, fastvae
        from fastvae import reference
        from fastvae.distributions import DiagonalGaussianDistribution
        from _launches import count_launches
        assert fastvae.get_backend() == "triton"
        assert fastvae.active_path("cpu") == "triton (interpreter)"
        assert fastvae.active_path("cpu", torch.float64) == "torch"  # float64 is always eager
        mu, lv = torch.randn(4, 3), torch.randn(4, 3)
        with count_launches() as counts:
            kl = fastvae.gaussian_kl(mu, lv)
            post = DiagonalGaussianDistribution(torch.randn(2, 4, 3, 3))
            post_kl = post.kl()
            elbo = fastvae.nn.ELBOLoss(likelihood="mse")(torch.rand(4, 3), torch.rand(4, 3), mu, lv)
        assert counts["sample_kl_fwd_kernel"] == 3, counts
        torch.testing.assert_close(kl, reference.gaussian_kl(mu, lv, None, None, "sum"))
        torch.testing.assert_close(post_kl, 0.5 * torch.sum(post.mean ** 2 + post.var - 1 - post.logvar,
                                                            dim=[1, 2, 3]))
        assert torch.isfinite(elbo)
        fastvae.set_backend(None)
        assert fastvae.active_path("cpu") == "torch"
        with count_launches() as counts:
            fastvae.gaussian_kl(mu, lv)
        assert sum(counts.values()) == 0, counts
        with fastvae.use_backend("triton"), count_launches() as counts:
            fastvae.gaussian_kl(mu, lv)
        assert counts["sample_kl_fwd_kernel"] == 1, counts
        # "torch" pins the eager path even where the kernels could run; a call's backend="triton" still launches
        fastvae.set_backend("torch")
        assert fastvae.active_path("cpu") == "torch"
        with count_launches() as counts:
            fastvae.gaussian_kl(mu, lv)
            DiagonalGaussianDistribution(torch.randn(2, 4, 3, 3)).sample()
        assert sum(counts.values()) == 0, counts
        with count_launches() as counts:
            fastvae.gaussian_kl(mu, lv, backend="triton")
        assert counts["sample_kl_fwd_kernel"] == 1, counts
        print("ok")
    """, FASTVAE_BACKEND="triton", TRITON_INTERPRET="1")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
