"""fastvae.integrations.scvi against the real scvi-tools (installed by ci/integrations.sh): SCVI trains on
scvi.data.synthetic_iid() for two epochs patched and unpatched from the same seed. On the eager path the ELBO
histories are equal to float tolerance (the sampler and KL are torch's own there, the NB/ZINB terms fastvae's
reference); under the interpreter the kernels run (launches counted: a silent fallback fails) and draw their
own noise, so the histories agree to the spread of a Monte Carlo ELBO."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch
from _launches import count_launches
from conftest import BACKEND

from fastvae import distributions
from fastvae.integrations import UnsupportedVersionError

KERNELS = BACKEND == "triton"


def test_missing_library_names_the_extra(monkeypatch):
    import fastvae.integrations.scvi as fv_scvi

    monkeypatch.setitem(sys.modules, "scvi", None)
    extra = r"needs scvi-tools: pip install scvi-tools \(in a fastvae checkout: pip install -e '\.\[scvi\]'\)"
    with pytest.raises(ImportError, match=extra):
        fv_scvi.apply()


scvi = pytest.importorskip("scvi")
from scvi.distributions import _negative_binomial as scvi_nb  # noqa: E402
from scvi.nn import _base_components as scvi_nn  # noqa: E402

import fastvae.integrations.scvi as fv_scvi  # noqa: E402


@pytest.fixture
def patched():
    fv_scvi.apply(backend=BACKEND)
    yield
    fv_scvi.revert()


def test_apply_and_revert():
    originals = (scvi_nn.Normal, scvi_nb.log_nb_positive, scvi_nb.log_zinb_positive)
    fv_scvi.apply(backend=BACKEND)
    try:
        assert issubclass(scvi_nn.Normal, distributions.Normal) and scvi_nn.Normal.backend == BACKEND
        assert scvi_nb.log_nb_positive is not originals[1] and scvi_nb.log_zinb_positive is not originals[2]
        qz, z = scvi.nn.Encoder(10, 3, return_dist=True)(torch.randn(4, 10))  # scvi's Encoder, as VAE builds it
        assert isinstance(qz, distributions.Normal) and z.shape == (4, 3)
        fv_scvi.apply(backend=BACKEND)  # twice: still one layer over scvi's own
    finally:
        fv_scvi.revert()
    assert (scvi_nn.Normal, scvi_nb.log_nb_positive, scvi_nb.log_zinb_positive) == originals


def test_moved_name_says_which_and_versions(monkeypatch):
    monkeypatch.delattr(scvi_nb, "log_zinb_positive")
    with pytest.raises(UnsupportedVersionError, match=r"scvi-tools .* has no scvi\.distributions\._negative_binomial"
                       r"\.log_zinb_positive.*supported are scvi-tools >= "):
        fv_scvi.apply()
    assert not issubclass(scvi_nn.Normal, distributions.Normal)  # nothing half applied


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_log_likelihoods_equal_scvi(likelihood, patched):
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(16, 30) * 5)
    mu = (torch.rand(16, 30) * 5 + 0.1).requires_grad_()
    theta = (torch.rand(30) * 3 + 0.2).requires_grad_()
    pi = torch.randn(16, 30).requires_grad_()
    cls = scvi.distributions.NegativeBinomial if likelihood == "nb" else scvi.distributions.ZeroInflatedNegativeBinomial
    kw = {} if likelihood == "nb" else {"zi_logits": pi}
    leaves = (mu, theta, pi) if likelihood == "zinb" else (mu, theta)
    outs = []
    for use in ("ours", "theirs"):
        if use == "theirs":
            fv_scvi.revert()
        lp = cls(mu=mu, theta=theta, **kw).log_prob(x)
        grads = torch.autograd.grad(lp.sum(), leaves)
        outs.append((lp.detach(), grads))
    fv_scvi.apply(backend=BACKEND)
    (lp, g), (lp_ref, g_ref) = outs
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def _train(epochs: int = 2) -> dict:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    scvi.settings.seed = 0
    adata = scvi.data.synthetic_iid(batch_size=100, n_genes=40, n_batches=2, n_labels=2)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=5, n_hidden=16, gene_likelihood="zinb")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=epochs, batch_size=64, accelerator="cpu", devices=1, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, train_size=1.0)
    return {k: torch.tensor(v.values.ravel().astype("float64")) for k, v in model.history.items()
            if k in ("elbo_train", "reconstruction_loss_train", "kl_local_train")}


def test_scvi_trains_to_the_same_elbo():
    with count_launches() as counts:
        fv_scvi.apply(backend=BACKEND)
        try:
            ours = _train()
        finally:
            fv_scvi.revert()
    theirs = _train()
    assert set(ours) == set(theirs) == {"elbo_train", "reconstruction_loss_train", "kl_local_train"}
    diffs = {k: ((ours[k] - theirs[k]).abs() / theirs[k].abs()).max().item() for k in ours}
    print("ELBO history (ours, theirs):", ours["elbo_train"].tolist(), theirs["elbo_train"].tolist(),
          "largest relative differences:", diffs)
    if KERNELS:
        # every step: the posterior's sampling pass and KL, the ZINB kernel, each with its backward
        assert counts["sample_kl_fwd_kernel"] >= 2 and counts["sample_kl_bwd_kernel"] >= 1
        assert counts["nb_nll_fwd_kernel"] >= 1
        for k in ours:  # other noise: Monte Carlo ELBOs of a model trained on other draws, to a few percent
            torch.testing.assert_close(ours[k], theirs[k], rtol=0.05, atol=0.0)
    else:
        assert sum(counts.values()) == 0
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-5)


SCVI_FORMS = {  # name -> shapes (x, mu, theta, pi), dtype: the calls scvi's own code and tests make
    "posterior-predictive": (((8, 12), (5, 8, 12), (12,), (5, 8, 12)), torch.float32),  # get_marginal_ll & co
    "one-dim": (((2,), (2,), (2,), (2,)), torch.float32),  # test_zinb_distribution: (1, 2) for ZINB, (2,) NB
    "gene-cell-theta": (((8, 12), (8, 12), (8, 12), (8, 12)), torch.float32),
    "half": (((8, 12), (8, 12), (12,), (8, 12)), torch.float16),  # ZINB's fp32 masks: an fp32 result
}


@pytest.mark.parametrize("form", list(SCVI_FORMS))
@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_patched_functions_broadcast_as_scvi(form, likelihood):
    """The patched log_nb_positive / log_zinb_positive and the distributions' log_prob: scvi's result shape,
    dtype, values and gradients for every argument shape scvi calls them with."""
    (xs, ms, ts, ps), dtype = SCVI_FORMS[form]
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(xs) * 5).to(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in (torch.rand(ms) * 5 + 0.1, torch.rand(ts) * 3 + 0.2,
                                                      torch.randn(ps))]
    if likelihood == "nb":
        leaves = leaves[:2]
    outs = []
    for use in ("ours", "theirs"):
        if use == "ours":
            fv_scvi.apply(backend=BACKEND)
        else:
            fv_scvi.revert()
        fn = scvi_nb.log_nb_positive if likelihood == "nb" else scvi_nb.log_zinb_positive
        lp = fn(x, *leaves)
        grads = torch.autograd.grad(lp.float().sum(), leaves) if dtype == torch.float32 else None
        outs.append((lp.detach(), grads))
    (lp, g), (lp_ref, g_ref) = outs
    assert lp.shape == lp_ref.shape and lp.dtype == lp_ref.dtype
    tol = {"rtol": 1e-5, "atol": 1e-4}
    if dtype == torch.float16:  # scvi's formula in fp16 (lgamma, logs) errs by up to ~1: fastvae computes in fp32
        lp, lp_ref = lp.double(), fn(x.double(), *[t.detach().double() for t in leaves])
        tol = {"rtol": 2e-3, "atol": 2e-3}  # NB's fp16 result rounded to fp16 (ZINB's is fp32)
    torch.testing.assert_close(lp, lp_ref, **tol)
    for a, b in zip(g or (), g_ref or ()):
        torch.testing.assert_close(a, b, **tol)
    if form == "posterior-predictive":  # through the distribution classes, as scvi's posterior predictive calls
        fv_scvi.apply(backend=BACKEND)
        try:
            cls = (scvi.distributions.NegativeBinomial if likelihood == "nb"
                   else scvi.distributions.ZeroInflatedNegativeBinomial)
            kw = {} if likelihood == "nb" else {"zi_logits": leaves[2]}
            assert cls(mu=leaves[0], theta=leaves[1], **kw).log_prob(x).shape == (5, 8, 12)
        finally:
            fv_scvi.revert()
