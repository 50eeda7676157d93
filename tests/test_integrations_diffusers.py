"""fastvae.integrations.diffusers against the real diffusers (installed by ci/integrations.sh): a small
AutoencoderKL built from a config (nothing downloaded) encodes a batch, and the patched posterior's sample (same
generator), kl, kl(other), nll, mode and their gradients equal diffusers' own: to float tolerance on the eager
path, to the kernels' under the interpreter (where the noise is the kernel's: z is compared with diffusers'
formula for that noise). Then a training step runs patched, on the kernels in the Triton pass."""

from __future__ import annotations

import sys

import pytest
import torch
from _launches import count_launches
from conftest import BACKEND, DEVICE

from fastvae import distributions
from fastvae.integrations import UnsupportedVersionError

KERNELS = BACKEND == "triton"


def test_missing_library_names_the_extra(monkeypatch):
    import fastvae.integrations.diffusers as fv_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    extra = r"needs diffusers: pip install diffusers \(in a fastvae checkout: pip install -e '\.\[diffusers\]'\)"
    with pytest.raises(ImportError, match=extra):
        fv_diffusers.apply()


def test_import_does_not_import_diffusers():
    """Importing the integration costs nothing: diffusers is imported by apply() alone."""
    import subprocess
    from pathlib import Path

    code = "import sys, fastvae.integrations.diffusers; assert 'diffusers' not in sys.modules, 'imported'"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr


def test_bad_backend_patches_nothing():
    import fastvae.integrations.diffusers as fv_diffusers

    with pytest.raises(ValueError, match="backend must be"):
        fv_diffusers.apply(backend="cuda")
    assert not fv_diffusers._patches.applied


diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders import vae as diffusers_vae  # noqa: E402

import fastvae.integrations.diffusers as fv_diffusers  # noqa: E402

DiffusersPosterior = diffusers_vae.DiagonalGaussianDistribution


@pytest.fixture
def patched():
    modules = fv_diffusers.apply(backend=BACKEND)
    yield modules
    fv_diffusers.revert()


def _model() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         layers_per_block=1, norm_num_groups=4, sample_size=16).to(DEVICE)


def test_apply_and_revert_every_module(patched):
    import diffusers.models.autoencoders.autoencoder_kl as kl_module

    assert "diffusers.models.autoencoders.autoencoder_kl" in patched and diffusers_vae.__name__ in patched
    for name in patched:  # each patched module holds fastvae's posterior, the swapped quantizer, or both
        held = vars(sys.modules[name])
        assert "DiagonalGaussianDistribution" in held or "VectorQuantizer" in held, name
        if "DiagonalGaussianDistribution" in held:
            assert issubclass(held["DiagonalGaussianDistribution"], distributions.DiagonalGaussianDistribution)
        if "VectorQuantizer" in held:
            assert held["VectorQuantizer"] is not DiffusersVQ and issubclass(held["VectorQuantizer"], DiffusersVQ)
    # nothing left in diffusers that still holds diffusers' class
    left = [n for n, m in sys.modules.items() if n.startswith("diffusers.") and m is not None
            and vars(m).get("DiagonalGaussianDistribution") is DiffusersPosterior]
    assert not left
    fv_diffusers.revert()
    assert kl_module.DiagonalGaussianDistribution is DiffusersPosterior
    assert diffusers_vae.DiagonalGaussianDistribution is DiffusersPosterior
    fv_diffusers.apply(backend=BACKEND)  # the fixture reverts


def test_moved_name_says_which_and_versions(monkeypatch):
    monkeypatch.delattr(diffusers_vae, "DiagonalGaussianDistribution")
    with pytest.raises(UnsupportedVersionError, match=r"diffusers .* has no diffusers\.models\.autoencoders\.vae"
                       r"\.DiagonalGaussianDistribution.*supported are diffusers >= "):
        fv_diffusers.apply()


def _video_model():
    """A video VAE (5-D posteriors: (B, 2C, T, H, W)), where diffusers has one (Wan's, from 0.33)."""
    if not hasattr(diffusers, "AutoencoderKLWan"):
        pytest.skip(f"diffusers {diffusers.__version__} has no AutoencoderKLWan")
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                      temperal_downsample=[False], latents_mean=[0.0] * 4,
                                      latents_std=[1.0] * 4).to(DEVICE)


# model, input shape, the posterior's kl()/nll() shape: diffusers sums dims 1-3, so (B, W) for video
MODELS = {"AutoencoderKL": (_model, (2, 3, 16, 16), (2,)), "AutoencoderKLWan": (_video_model, (1, 3, 1, 16, 16),
                                                                              (1, 8))}


def _encode(model, x):
    return model.encode(x).latent_dist


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.encoder.parameters()]


@pytest.mark.parametrize("kind", list(MODELS))
def test_posterior_equals_diffusers(kind, patched):
    """Each method of the posterior of a real diffusers VAE, patched against unpatched, values and encoder
    gradients."""
    build, x_shape, out_shape = MODELS[kind]
    model = build()
    x = torch.rand(x_shape, device=DEVICE)
    x_other = torch.rand(x_shape, device=DEVICE)
    with torch.no_grad():
        target = torch.randn(_encode(model, x).mean.shape, device=DEVICE)
    results = {}
    for name in ("ours", "theirs"):
        if name == "theirs":
            fv_diffusers.revert()
        post, other = _encode(model, x), _encode(model, x_other)
        expected = distributions.DiagonalGaussianDistribution if name == "ours" else DiffusersPosterior
        assert isinstance(post, expected)
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        z = post.sample(generator=gen)
        if name == "ours" and KERNELS:  # the kernel's noise, in diffusers' formula below
            results["eps"] = ((z - post.mean) / torch.exp(0.5 * post.logvar)).detach()
        if name == "theirs" and KERNELS:
            z = post.mean + post.std * results["eps"]
        outs = {"sample": z, "kl": post.kl(), "kl_other": post.kl(other), "nll": post.nll(target),
                "mode": post.mode()}
        assert outs["kl"].shape == outs["kl_other"].shape == outs["nll"].shape == out_shape
        grads = {}
        for key, out in outs.items():
            model.zero_grad()
            w = torch.linspace(0.5, 1.5, out.numel(), device=DEVICE).reshape(out.shape)
            (out * w).sum().backward(retain_graph=True)
            grads[key] = _grads(model)
        results[name] = ({k: v.detach() for k, v in outs.items()}, grads)
        fv_diffusers.apply(backend=BACKEND)
    (ours, g_ours), (theirs, g_theirs) = results["ours"], results["theirs"]
    rtol, atol = (1e-5, 1e-5) if not KERNELS else (1e-4, 1e-4)
    worst = {}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=rtol, atol=atol)
        worst[key] = (ours[key] - theirs[key]).abs().max().item()
        for a, b in zip(g_ours[key], g_theirs[key]):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))
            worst[key + "_grad"] = max(worst.get(key + "_grad", 0.0), (a - b).abs().max().item())
    print(kind, "largest differences:", {k: f"{v:.2e}" for k, v in worst.items()})
    if not KERNELS:  # the same generator draws the same noise
        assert torch.equal(ours["mode"], theirs["mode"])


def test_training_step_runs_patched(patched):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 16, 16, device=DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    with count_launches() as counts:
        post = model.encode(x).latent_dist
        assert isinstance(post, distributions.DiagonalGaussianDistribution)
        z = post.sample()
        recon = model.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-3 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if KERNELS:  # one sampling pass with its KL, one backward: no silent eager fallback
        assert counts["sample_kl_fwd_kernel"] == 1 and counts["sample_kl_bwd_kernel"] == 1
    else:
        assert sum(counts.values()) == 0
    # AutoencoderKL's own forward samples the patched posterior too
    out = model(x, sample_posterior=True, generator=torch.Generator(device=DEVICE).manual_seed(0)).sample
    assert out.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_class_keeps_diffusers_semantics(patched, dtype):
    """The class diffusers now builds against diffusers' own on the same parameters: dtypes (bf16 parameters,
    a float64 prior, uint8 pixels promote as torch does), broadcasting (a shared prior, a batch of priors,
    a broadcasting sample), the deterministic posterior, values to the path's tolerance."""
    ours_cls = vars(diffusers_vae)["DiagonalGaussianDistribution"]
    assert ours_cls is not DiffusersPosterior
    p = torch.randn(3, 8, 4, 4, device=DEVICE).to(dtype)
    one = torch.randn(1, 8, 4, 4, device=DEVICE).to(dtype)
    p64 = torch.randn(3, 8, 4, 4, dtype=torch.float64, device=DEVICE)
    x = torch.randn(1, 4, 4, 4, device=DEVICE)
    pixels = torch.randint(0, 255, (3, 4, 4, 4), dtype=torch.uint8, device=DEVICE)
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    cases = {
        "kl": lambda c: c(p).kl(),
        "kl_shared_prior": lambda c: c(p).kl(c(one)),
        "kl_batch_of_priors": lambda c: c(one).kl(c(p)),
        "kl_float64_prior": lambda c: c(p).kl(c(p64)),
        "nll_broadcast": lambda c: c(p).nll(x),
        "nll_pixels": lambda c: c(p).nll(pixels),
        "mode": lambda c: c(p).mode(),
        "std": lambda c: c(p).std,
        "deterministic_kl": lambda c: c(p, deterministic=True).kl(),
        "deterministic_sample": lambda c: c(p, deterministic=True).sample(),
    }
    for name, case in cases.items():
        ours, theirs = case(ours_cls), case(DiffusersPosterior)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and ours.device == theirs.device, name
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, rtol=tol[0], atol=tol[1] * scale, msg=name)
    z = ours_cls(p).sample(generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert z.dtype == dtype and z.shape == (3, 4, 4, 4)


def test_apply_without_backend_follows_the_global_setting():
    """apply() with no backend installs fastvae's class itself: each posterior follows fastvae.set_backend at
    its calls (here "torch": diffusers' numbers for the same generator)."""
    import fastvae

    fv_diffusers.apply()
    try:
        assert vars(diffusers_vae)["DiagonalGaussianDistribution"] is distributions.DiagonalGaussianDistribution
        p = torch.randn(2, 8, 3, 3, device=DEVICE)
        with fastvae.use_backend("torch"):
            ours = diffusers_vae.DiagonalGaussianDistribution(p).sample(torch.Generator(DEVICE).manual_seed(1))
        theirs = DiffusersPosterior(p).sample(torch.Generator(DEVICE).manual_seed(1))
        assert torch.equal(ours, theirs)
    finally:
        fv_diffusers.revert()


# ------------------------------------------------------------------------------------ VQModel's quantizer

DiffusersVQ = diffusers_vae.VectorQuantizer


def _vq_model():
    torch.manual_seed(0)
    return diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                             layers_per_block=1, norm_num_groups=4, sample_size=16, num_vq_embeddings=24,
                             vq_embed_dim=4).to(DEVICE)


def test_vector_quantizer_swapped_and_restored(patched):
    vq_module = sys.modules[diffusers.VQModel.__module__]  # diffusers.models.vq_model before 0.28

    assert vq_module.__name__ in patched
    ours = vq_module.VectorQuantizer
    assert ours is not DiffusersVQ and issubclass(ours, DiffusersVQ)
    assert diffusers_vae.VectorQuantizer is ours
    assert type(_vq_model().quantize) is ours
    fv_diffusers.revert()
    assert vq_module.VectorQuantizer is DiffusersVQ and diffusers_vae.VectorQuantizer is DiffusersVQ
    assert type(_vq_model().quantize) is DiffusersVQ
    fv_diffusers.apply(backend=BACKEND)  # the fixture reverts


def test_vq_model_equals_diffusers(patched):
    """A real VQModel (its codebook spread out so that codes compete), patched against unpatched: the decoded
    sample, the commitment loss, the indices and every parameter's gradient."""
    ours_model = _vq_model()
    fv_diffusers.revert()
    theirs_model = _vq_model()
    fv_diffusers.apply(backend=BACKEND)
    assert type(ours_model.quantize) is not DiffusersVQ and type(theirs_model.quantize) is DiffusersVQ
    with torch.no_grad():
        theirs_model.quantize.embedding.weight.normal_()
    ours_model.load_state_dict(theirs_model.state_dict())  # the same keys: the subclass adds none
    x = torch.rand(2, 3, 16, 16, device=DEVICE)
    results = []
    for model in (ours_model, theirs_model):
        sample = model(x).sample
        # the quantizer's own return (VQModel's output carries its loss only from diffusers 0.28 on)
        _, commit_loss, (_, _, indices) = model.quantize(model.encode(x).latents)
        w = torch.linspace(0.5, 1.5, sample.numel(), device=DEVICE).reshape(sample.shape)
        model.zero_grad()
        ((sample * w).sum() + commit_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sample.detach(), commit_loss.detach(), indices, grads))
    (s0, l0, i0, g0), (s1, l1, i1, g1) = results
    assert torch.equal(i0, i1) and i0.shape == (2 * 8 * 8,)
    rtol, atol = (1e-5, 1e-5) if not KERNELS else (1e-4, 1e-4)
    torch.testing.assert_close(s0, s1, rtol=rtol, atol=atol)
    torch.testing.assert_close(l0, l1, rtol=rtol, atol=atol)
    assert g0.keys() == g1.keys() and "quantize.embedding.weight" in g0
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=rtol, atol=atol * max(1.0, g1[name].abs().max().item()),
                                   msg=name)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [False, True])
@pytest.mark.parametrize("remap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vector_quantizer_keeps_diffusers_semantics(patched, dtype, remap, sane_index_shape, legacy, tmp_path):
    """The swapped quantizer against diffusers' on the same weights: the legacy flag's beta placement, remap
    (onto a used subset, unknown codes to the extra index), sane_index_shape, the return tuple, dtypes and
    the gradients to z and the codebook."""
    import numpy as np

    if KERNELS and dtype == torch.float64:
        pytest.skip("float64 runs the eager path")
    used = None
    if remap:
        used = str(tmp_path / "used.npy")
        np.save(used, np.arange(0, 16, 2))
    kwargs = dict(n_e=16, vq_embed_dim=3, beta=0.3, remap=used, unknown_index="extra",
                  sane_index_shape=sane_index_shape, legacy=legacy)
    ours_cls = vars(diffusers_vae)["VectorQuantizer"]
    ours, theirs = ours_cls(**kwargs).to(DEVICE, dtype), DiffusersVQ(**kwargs).to(DEVICE, dtype)
    with torch.no_grad():
        theirs.embedding.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    z = torch.randn(2, 3, 5, 4, device=DEVICE, dtype=dtype)
    outs = []
    for q in (ours, theirs):
        zz = z.clone().requires_grad_(True)
        z_q, loss, (perplexity, encodings, indices) = q(zz)
        assert perplexity is None and encodings is None
        w = torch.linspace(0.5, 1.5, z_q.numel(), device=DEVICE, dtype=dtype).reshape(z_q.shape)
        gz, ge = torch.autograd.grad((z_q * w).sum() + loss, (zz, q.embedding.weight))
        outs.append((z_q.detach(), loss.detach(), indices, gz, ge))
    (q0, l0, i0, gz0, ge0), (q1, l1, i1, gz1, ge1) = outs
    assert i0.shape == i1.shape and i0.dtype == i1.dtype and torch.equal(i0, i1)
    assert q0.shape == q1.shape and q0.dtype == q1.dtype and q0.is_contiguous()
    assert l0.shape == l1.shape == () and l0.dtype == l1.dtype
    rtol, atol = (1e-12, 1e-12) if dtype == torch.float64 else ((1e-6, 1e-6) if not KERNELS else (1e-5, 1e-5))
    for a, b in ((q0, q1), (l0, l1), (gz0, gz1), (ge0, ge1)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    # the codebook entries of the indices: diffusers' own method, inherited
    shape = (2, 5, 4, 3)
    torch.testing.assert_close(ours.get_codebook_entry(i0.reshape(-1) if not remap else i0.reshape(2, -1), shape),
                               theirs.get_codebook_entry(i1.reshape(-1) if not remap else i1.reshape(2, -1), shape))
