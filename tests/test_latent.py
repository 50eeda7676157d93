"""Batch-level latent terms: tc_decomposition (β-TCVAE) and mmd (InfoVAE, WAE) against float64 versions of the
peers' eager formulas, values and gradients per dtype; the estimators' statistics; argument errors; the
kernel path's memory."""

from __future__ import annotations

import math

import pytest
import torch
from _launches import count_launches
from conftest import BACKEND, DEVICE, DTYPES, TOL

import fastvae

LOG_2PI = math.log(2 * math.pi)
TC_KERNELS = ("tc_fwd_kernel", "tc_bwd_rows_kernel", "tc_bwd_cols_kernel")
MMD_KERNELS = ("mmd_fwd_kernel", "mmd_bwd_kernel")
# one tile, about one, several (tiles of 16 and 32 rows on the kernel path); D below and past 16
TC_SHAPES = [(2, 1), (7, 3), (33, 10), (70, 17)]


# --- the peers' formulas (rtqichen/beta-tcvae vae_quant.py, YannDubs/disentangling-vae losses.py), float64 ---

def log_density(x, mu, logvar):
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 * torch.exp(-logvar))


def weight_matrix(b: int, n: int, kind: str) -> torch.Tensor:
    """log w (B, B): the paper's MSS (1/N on the diagonal, the stratum weight at (i, i+1 mod B)), or the
    peers' ``log_importance_weight_matrix`` as written (1/N in column 0)."""
    m = b - 1
    strat = (n - m) / (n * m)
    w = torch.full((b, b), 1.0 / m, dtype=torch.float64)
    if kind == "paper":
        i = torch.arange(b)
        w[i, (i + 1) % b] = strat
        w[i, i] = 1.0 / n
    else:
        w.view(-1)[:: m + 1] = 1.0 / n
        w.view(-1)[1:: m + 1] = strat
        w[m - 1, 0] = strat
    return w.log()


def peer_tc(z, mu, lv, n: int, estimator: str, kind: str = "paper"):
    """(log_qz, log_prod_qzi, log_qzx, log_pz) per sample from the full (B, B, D) matrix."""
    b = z.shape[0]
    mat = log_density(z[:, None], mu[None], lv[None])
    log_qzx = log_density(z, mu, lv).sum(1)
    log_pz = log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    if estimator == "mws":  # rtqichen's
        log_prod = (torch.logsumexp(mat, 1) - math.log(b * n)).sum(1)
        log_qz = torch.logsumexp(mat.sum(2), 1) - math.log(b * n)
    elif kind == "disvae":  # the weights added per dimension, then summed for the joint
        mat = mat + weight_matrix(b, n, "peers")[:, :, None]
        log_qz = torch.logsumexp(mat.sum(2), 1)
        log_prod = torch.logsumexp(mat, 1).sum(1)
    else:
        w = weight_matrix(b, n, kind)
        log_qz = torch.logsumexp(w + mat.sum(2), 1)
        log_prod = torch.logsumexp(w[:, :, None] + mat, 1).sum(1)
    return log_qz, log_prod, log_qzx, log_pz


def _posterior(shape, dtype, lv_mean=-1.0):
    z0 = torch.randn(shape, device=DEVICE)
    mu = (z0 + 0.3 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    lv = (lv_mean + 0.5 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    z = (mu.detach().float() + torch.exp(0.5 * lv.detach().float()) * torch.randn(shape, device=DEVICE))
    return z.to(dtype).requires_grad_(), mu, lv


def _oracle_inputs(*ts):
    return [t.detach().double().cpu().requires_grad_() for t in ts]


def _close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def _dtype_cases(shapes):
    """Every shape in fp32 (and fp64 on the reference); the half types on the last, which spans several tiles
    (the tiles are the same code whatever the dtype: interpreter seconds)."""
    return [(dt, s) for dt in DTYPES for s in shapes if dt in (torch.float32, torch.float64) or s == shapes[-1]]


@pytest.mark.parametrize("estimator", ["mss", "mws"])
@pytest.mark.parametrize("dtype,shape", _dtype_cases(TC_SHAPES))
def test_tc_values_and_gradients(poisoned, dtype, shape, estimator, backend):
    z, mu, lv = _posterior(shape, dtype)
    n = 5 * shape[0] + 3
    with count_launches(*TC_KERNELS) as counts:
        out = fastvae.tc_decomposition(z, mu, lv, dataset_size=n, estimator=estimator, reduction="none",
                                       log_densities=True, backend=backend)
        weights = [torch.rand(shape[0], device=DEVICE, dtype=torch.float64) + 0.5 for _ in out]
        sum(o.double() @ w for o, w in zip(out, weights)).backward()
    if BACKEND == "triton":
        assert dict(counts) == {name: 1 for name in TC_KERNELS}
    z64, mu64, lv64 = _oracle_inputs(z, mu, lv)
    dens = peer_tc(z64, mu64, lv64, n, estimator)
    log_qz, log_prod, log_qzx, log_pz = dens
    expect = (log_qzx - log_qz, log_qz - log_prod, log_prod - log_pz, *dens)
    sum(e @ w.cpu() for e, w in zip(expect, weights)).backward()
    for name, a, e in zip(out._fields, out, expect):
        assert a.shape == (shape[0],)
        assert a.dtype == (dtype if name in out._fields[:3] else torch.promote_types(dtype, torch.float32))
        _close(a, e, dtype if name in out._fields[:3] else torch.promote_types(dtype, torch.float32), name)
    for name, a, e in (("z", z, z64), ("mu", mu, mu64), ("logvar", lv, lv64)):
        assert a.grad.dtype == dtype
        _close(a.grad, e.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("reduction", ["none", "per_sample", "sum", "mean"])
def test_tc_reductions_and_the_sum_of_terms(reduction, backend):
    """mutual_info + total_correlation + dimwise_kl = E[log q(z|x) - log p(z)], for either estimator."""
    z, mu, lv = _posterior((37, 6), torch.float32)
    for estimator in ("mss", "mws"):
        out = fastvae.tc_decomposition(z, mu, lv, dataset_size=500, estimator=estimator, reduction=reduction,
                                       log_densities=True, backend=backend)
        per = out.log_qzx - out.log_pz
        kl = {"none": per, "per_sample": per, "sum": per.sum(), "mean": per.mean()}[reduction]
        total = out.mutual_info + out.total_correlation + out.dimwise_kl
        assert total.shape == kl.shape
        torch.testing.assert_close(total, kl, rtol=1e-5, atol=1e-4)
        assert out.total_correlation.shape == ((37,) if reduction in ("none", "per_sample") else ())
    plain = fastvae.tc_decomposition(z, mu, lv, dataset_size=500, reduction=reduction, backend=backend)
    assert plain.log_qz is None and plain.log_pz is None and len(plain) == 7


@pytest.mark.torch_only
def test_reference_chunks():
    """The CPU path's chunks over rows (recomputed in backward) give the one-chunk values and gradients."""
    from fastvae import reference

    z, mu, lv = _posterior((23, 4), torch.float64)
    grads = []
    for chunk in (None, 5):
        for t in (z, mu, lv):
            t.grad = None
        out = reference.tc_log_densities(z, mu, lv, dataset_size=99, mss=True, chunk=chunk)
        sum((o * (k + 1)).sum() for k, o in enumerate(out)).backward()
        grads.append((out, [t.grad.clone() for t in (z, mu, lv)]))
    for a, b in zip(grads[0][0] + tuple(grads[0][1]), grads[1][0] + tuple(grads[1][1])):
        torch.testing.assert_close(a, b)


def test_mss_peers_differ():
    """The numbers the docstring of tc_decomposition quotes: the paper's MSS against the peers' matrices."""
    g = torch.Generator().manual_seed(0)
    b, d, n = 64, 10, 1000
    mu = torch.randn(b, d, generator=g, dtype=torch.float64)
    lv = -2.0 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    z = mu + torch.exp(0.5 * lv) * torch.randn(b, d, generator=g, dtype=torch.float64)
    ours = fastvae.tc_decomposition(z, mu, lv, dataset_size=n, backend="torch")
    got = {}
    for kind in ("paper", "rtqichen", "disvae"):
        log_qz, log_prod, log_qzx, log_pz = peer_tc(z, mu, lv, n, "mss", kind)
        got[kind] = ((log_qzx - log_qz).mean().item(), (log_qz - log_prod).mean().item(),
                     (log_prod - log_pz).mean().item())
    torch.testing.assert_close(torch.tensor(got["paper"], dtype=torch.float64), torch.stack(ours[:3]))
    quoted = {"paper": (6.90, 4.16, -0.35), "rtqichen": (4.19, 6.17, 0.35), "disvae": (41.86, -31.50, 0.35)}
    for kind, terms in quoted.items():
        assert all(abs(a - q) < 0.006 for a, q in zip(got[kind], terms)), (kind, got[kind])


@pytest.mark.torch_only  # a property of the estimator (the oracle tests cover the kernels); minutes interpreted
def test_tc_statistics(backend):
    """Independent latent dims give TC near 0 under MSS; correlated ones TC > 0, near the closed form.

    Population: N = 200000 posteriors N(mu_j, s2 I) with mu ~ N(0, C), so the aggregate posterior is
    N(0, C + s2 I) and TC = -1/2 log det of its correlation matrix."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    b, s2, big_n = 512, 0.25, 200000
    results = {}
    for name, rho in (("independent", 0.0), ("correlated", 0.9)):
        cov = torch.tensor([[1.0, rho], [rho, 1.0]])
        chol = torch.linalg.cholesky(cov).to(DEVICE)
        estimates = []
        for _ in range(4):  # four batches of the population
            mu = torch.randn(b, 2, generator=g, device=DEVICE) @ chol.T
            lv = torch.full_like(mu, math.log(s2))
            z = mu + math.sqrt(s2) * torch.randn(b, 2, generator=g, device=DEVICE)
            estimates.append(fastvae.tc_decomposition(z, mu, lv, dataset_size=big_n, backend=backend)
                             .total_correlation.item())
        r = rho / (1 + s2)
        results[name] = (sum(estimates) / len(estimates), -0.5 * math.log(1 - r * r))
    est, exact = results["independent"]
    assert exact == 0.0 and abs(est) < 0.03, results
    est, exact = results["correlated"]
    assert est > 0.2 and abs(est - exact) < 0.08, results


def test_tc_bad_input(backend):
    z = torch.randn(4, 3, device=DEVICE)
    kw = dict(dataset_size=10, backend=backend)
    with pytest.raises(ValueError, match="one shape"):
        fastvae.tc_decomposition(z, z[:3], z, **kw)
    with pytest.raises(ValueError, match="D = 0"):
        fastvae.tc_decomposition(z[:, :0], z[:, :0], z[:, :0], **kw)
    with pytest.raises(ValueError, match="\\(B, D\\)"):
        fastvae.tc_decomposition(z[0], z[0], z[0], **kw)
    with pytest.raises(ValueError, match="mss.*at least 2"):
        fastvae.tc_decomposition(z[:1], z[:1], z[:1], **kw)
    fastvae.tc_decomposition(z[:1], z[:1], z[:1], estimator="mws", **kw)  # MWS takes one sample
    with pytest.raises(ValueError, match="dataset_size must be at least the batch size 4"):
        fastvae.tc_decomposition(z, z, z, dataset_size=3, backend=backend)
    with pytest.raises(TypeError, match="dataset_size"):
        fastvae.tc_decomposition(z, z, z, dataset_size=10.0, backend=backend)
    with pytest.raises(ValueError, match="estimator"):
        fastvae.tc_decomposition(z, z, z, estimator="mcmc", **kw)
    with pytest.raises(ValueError, match="reduction"):
        fastvae.tc_decomposition(z, z, z, reduction="batchmean", **kw)
    with pytest.raises(TypeError, match="mu"):
        fastvae.tc_decomposition(z, z.long(), z, **kw)


# --- MMD: ShengjiaZhao/MMD-VAE, AntixK/PyTorch-VAE (InfoVAE, WAE_MMD), WAE (Tolstikhin et al.) ---

def zhao_mmd(x, y):
    def k(a, b):
        d = a.shape[1]
        return torch.exp(-((a[:, None] - b[None]) ** 2).mean(2) / float(d))

    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def pytorch_vae_mmd(z, prior_z, kernel: str, z_var: float):
    """compute_mmd of PyTorch-VAE's InfoVAE (and, for imq, WAE_MMD) without the loss's 1/(B(B-1))."""
    def k(x1, x2):
        dim = x2.shape[-1]
        x1, x2 = x1[:, None], x2[None]
        if kernel == "rbf":
            return torch.exp(-((x1 - x2) ** 2).mean(-1) / (2.0 * dim * z_var))
        c = 2 * dim * z_var
        kern = c / (1e-7 + c + ((x1 - x2) ** 2).sum(-1))
        return kern.sum() - kern.diag().sum()

    return k(prior_z, prior_z).mean() + k(z, z).mean() - 2 * k(prior_z, z).mean()


def wae_imq(x, y, scales):
    n = x.shape[0]
    stat = 0.0
    for c in scales:
        def k(a, b, c=c):
            return c / (c + ((a[:, None] - b[None]) ** 2).sum(-1))
        off = 1.0 - torch.eye(n, dtype=x.dtype)
        stat = stat + ((k(x, x) + k(y, y)) * off).sum() / (n * n - n) - k(x, y).sum() * 2.0 / (n * n)
    return stat


def _samples(n, m, d, dtype):
    x = (torch.randn(n, d, device=DEVICE) * 0.8 + 0.2).to(dtype).requires_grad_()
    y = torch.randn(m, d, device=DEVICE).to(dtype).requires_grad_()
    return x, y


MMD_CASES = [  # (n, m, D)
    (2, 2, 1), (9, 5, 3), (40, 40, 8), (33, 70, 20),
]


# each kernel with each estimate, not every pairing
@pytest.mark.parametrize("kernel,unbiased", [("rbf", False), ("imq", True), ("rbf", "paired"), ("imq", False)])
@pytest.mark.parametrize("dtype,case", _dtype_cases(MMD_CASES))
def test_mmd_values_and_gradients(poisoned, dtype, case, kernel, unbiased, backend):
    n, m, d = case
    if unbiased == "paired":
        m = n
    x, y = _samples(n, m, d, dtype)
    scales = [0.5 * d, 2.0 * d] if d > 3 else 1.3
    with count_launches(*MMD_KERNELS) as counts:
        out = fastvae.mmd(x, y, kernel=kernel, scale=scales, unbiased=unbiased, backend=backend)
        (out.double() * 1.7).backward()
    if BACKEND == "triton":
        assert counts["mmd_fwd_kernel"] >= 1 and counts["mmd_bwd_kernel"] >= 1
    x64, y64 = _oracle_inputs(x, y)
    inv = [1 / s for s in (scales if isinstance(scales, list) else [scales])]

    def ksum(a, b, skip):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        k = sum(torch.exp(-d2 * s) if kernel == "rbf" else 1 / (1 + d2 * s) for s in inv)
        return (k.sum() - k.diag().sum()) if skip else k.sum()

    if unbiased is False:
        expect = ksum(x64, x64, False) / n**2 + ksum(y64, y64, False) / m**2 - 2 * ksum(x64, y64, False) / (n * m)
    else:
        cxy = (n * (n - 1)) if unbiased == "paired" else n * m
        expect = (ksum(x64, x64, True) / (n * (n - 1)) + ksum(y64, y64, True) / (m * (m - 1))
                  - 2 * ksum(x64, y64, unbiased == "paired") / cxy)
    (expect * 1.7).backward()
    assert out.shape == () and out.dtype == dtype
    _close(out, expect, dtype, "mmd")
    _close(x.grad, x64.grad, dtype, "grad x")
    _close(y.grad, y64.grad, dtype, "grad y")


def test_mmd_reproduces_the_peers(backend):
    x = torch.randn(48, 6, dtype=torch.float64) * 0.7 + 0.1
    y = torch.randn(48, 6, dtype=torch.float64)
    b, d = x.shape
    cast = dict(backend=backend)
    if BACKEND == "triton":  # the kernels compute in fp32
        x, y = x.float().to(DEVICE), y.float().to(DEVICE)
    tol = dict(rtol=1e-5, atol=1e-6) if BACKEND == "triton" else dict(rtol=1e-9, atol=1e-12)
    x64, y64 = x.double().cpu(), y.double().cpu()

    def close(a, e):
        torch.testing.assert_close(a.double().cpu(), e, **tol)

    close(fastvae.mmd(x, y, kernel="rbf", scale=d * d, **cast), zhao_mmd(x64, y64))
    z_var = 2.0
    close(fastvae.mmd(x, y, kernel="rbf", scale=2 * d * d * z_var, **cast),
          pytorch_vae_mmd(x64, y64, "rbf", z_var))
    paired = fastvae.mmd(x, y, kernel="imq", scale=2 * d * z_var, unbiased="paired", **cast)
    torch.testing.assert_close(b * (b - 1) * paired.double().cpu(), pytorch_vae_mmd(x64, y64, "imq", z_var),
                               rtol=1e-5, atol=1e-6)  # their 1e-7 in the denominator
    scales = [c * 2 * d for c in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)]
    close(fastvae.mmd(x, y, kernel="imq", scale=scales, unbiased=True, **cast), wae_imq(x64, y64, scales))


def test_mmd_prior_samples(backend):
    """y=None draws the standard-normal prior from the generator, reproducibly."""
    x = torch.randn(40, 4, device=DEVICE)
    g = torch.Generator(device=DEVICE)
    a = fastvae.mmd(x, generator=g.manual_seed(5), backend=backend)
    b = fastvae.mmd(x, generator=g.manual_seed(5), backend=backend)
    c = fastvae.mmd(x, generator=g, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    y = torch.randn(40, 4, device=DEVICE, generator=g.manual_seed(5))
    assert torch.equal(a, fastvae.mmd(x, y, backend=backend))


@pytest.mark.torch_only  # a property of the estimator (the oracle tests cover the kernels' values)
def test_mmd_statistics(backend):
    """The unbiased MMD of two samples of one distribution is near 0 and grows with a shift. Measured over
    200 seeds at these sizes: mean -3e-4, standard deviation 1.6e-3 per estimate; a shift of 0.5 in every
    dim gives about 0.06."""
    same = [fastvae.mmd(torch.randn(256, 4, device=DEVICE), torch.randn(256, 4, device=DEVICE), unbiased=True,
                        backend=backend).item() for _ in range(4)]
    assert abs(sum(same) / 4) < 4 * 1.6e-3 / 2, same  # 4 standard errors of the mean of 4
    x, y = torch.randn(256, 4, device=DEVICE), torch.randn(256, 4, device=DEVICE)
    shifted = [fastvae.mmd(x + s, y, unbiased=True, backend=backend).item() for s in (0.5, 1.0, 2.0)]
    assert all(u < v for u, v in zip(shifted, shifted[1:])) and shifted[0] > 10 * 1.6e-3, shifted


def test_mmd_bad_input(backend):
    x = torch.randn(5, 3, device=DEVICE)
    kw = dict(backend=backend)
    with pytest.raises(ValueError, match="y must have shape"):
        fastvae.mmd(x, torch.randn(5, 4, device=DEVICE), **kw)
    with pytest.raises(ValueError, match="D = 0"):
        fastvae.mmd(x[:, :0], **kw)
    with pytest.raises(ValueError, match="x must have shape"):
        fastvae.mmd(x[0], **kw)
    for bad in (0.0, -1.0, float("nan"), float("inf"), [1.0, float("nan")]):
        with pytest.raises(ValueError, match="scale"):
            fastvae.mmd(x, scale=bad, **kw)
    with pytest.raises(ValueError, match="scale"):
        fastvae.mmd(x, scale=[], **kw)
    with pytest.raises(TypeError, match="scale"):
        fastvae.mmd(x, scale="1", **kw)
    with pytest.raises(ValueError, match="kernel"):
        fastvae.mmd(x, kernel="laplace", **kw)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fastvae.mmd(x[:1], x, unbiased=True, **kw)
    with pytest.raises(ValueError, match="one size"):
        fastvae.mmd(x, x[:4], unbiased="paired", **kw)
    with pytest.raises(ValueError, match="unbiased"):
        fastvae.mmd(x, x, unbiased="yes", **kw)
    with pytest.raises(TypeError, match="y"):
        fastvae.mmd(x, x.long(), **kw)


@pytest.mark.skipif(BACKEND != "triton" or DEVICE != "cpu", reason="the kernels' memory, under the interpreter")
def test_tc_kernel_memory_is_linear_in_the_batch():
    """Forward and backward at B = 1024 hold O(B D) above the inputs: the per-row outputs, the (B, D) per-dim
    log-sum-exp and the gradients; the eager (B, B, D) would be 1024 times the inputs' size. (The launch
    tiles are the ones a GPU gets: a test-only tile would be recorded and compiled as a specialization.)"""
    b, d = 1024, 2  # D = 2: 128-row tiles, the fewest interpreted passes
    z, mu, lv = (torch.randn(b, d).requires_grad_() for _ in range(3))

    def step():
        out = fastvae.tc_decomposition(z, mu, lv, dataset_size=10 * b, backend="triton")
        (out.mutual_info + 2 * out.total_correlation + 3 * out.dimwise_kl).backward()

    from _memory import cpu_peak_bytes

    peak = cpu_peak_bytes(step)
    inputs = 3 * b * d * 4
    assert 0 < peak <= 4 * inputs, (peak, inputs)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (z, mu, lv))


def test_tc_distributed_equals_the_concatenated_batch(tmp_path, backend):
    """Two gloo processes with 6 rows each: the shares of the estimate add up to the single-process value on
    the 12 rows, and every rank's gradients are the single-process ones of its rows (MSS pairs row 5 with
    row 6, on the other rank)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built")
    from _latent_dist import distributed_rank

    mp.spawn(distributed_rank, args=(2, f"file://{tmp_path / 'init'}", backend, 6), nprocs=2, join=True)


@pytest.mark.torch_only  # the kernels' path is the same calls; a training run is minutes under the interpreter
@pytest.mark.parametrize("objective", ["btcvae", "wae"])  # infovae: wae's path with a KL weight
def test_trainer_latent_objectives(tmp_path, objective, backend):
    """--objective btcvae / wae train, and metrics.jsonl has their terms per epoch."""
    for mod in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(mod)
    import json

    from fastvae import train

    argv = ["--epochs", "1", "--max-steps", "3", "--batch-size", "32", "--latent-dim", "4", "--objective",
            objective, "--tc-beta", "4", "--mmd-weight", "5", "--device", torch.device(DEVICE).type,
            "--out", str(tmp_path), "--backend", backend]
    assert train.main(argv) == 0
    (line,) = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    names = ["train_mutual_info", "train_total_correlation", "train_dimwise_kl"] if objective == "btcvae" else [
        "train_mmd"]
    assert all(math.isfinite(line[k]) for k in names + ["train_loss", "test_elbo"]), line


def _terms(module, *args, **kwargs):
    """The module's output with its terms (the losses return the 0-d loss unless asked for the terms)."""
    import inspect

    if "return_terms" in inspect.signature(module.forward).parameters:
        kwargs["return_terms"] = True
    return module(*args, **kwargs)


def test_losses_modules(backend):
    """BetaTCVAELoss at weights (1, 1, 1) is the negative ELBO with the decomposed KL; MMDVAELoss adds
    mmd_weight * MMD to ELBOLoss's loss."""
    z, mu, lv = _posterior((24, 3), torch.float32)
    x, x_hat = torch.rand(24, 10, device=DEVICE), torch.rand(24, 10, device=DEVICE)
    tc = _terms(fastvae.nn.BetaTCVAELoss(dataset_size=100, tc_beta=1.0, backend=backend), x_hat, x, z, mu, lv)
    terms = fastvae.tc_decomposition(z, mu, lv, dataset_size=100, backend=backend)
    torch.testing.assert_close(tc.loss, tc.recon + sum(terms[:3]))
    weighted = _terms(fastvae.nn.BetaTCVAELoss(dataset_size=100, tc_beta=6.0, mi_weight=0.5, dw_weight=2.0,
                                               backend=backend), x_hat, x, z, mu, lv)
    torch.testing.assert_close(weighted.loss, tc.recon + 0.5 * terms[0] + 6.0 * terms[1] + 2.0 * terms[2])
    g = torch.Generator(device=DEVICE)
    m = _terms(fastvae.nn.MMDVAELoss(mmd_weight=3.0, beta=0.5, backend=backend), x_hat, x, z, mu, lv,
               generator=g.manual_seed(1))
    elbo = _terms(fastvae.nn.ELBOLoss(beta=0.5, backend=backend), x_hat, x, mu, lv)
    expect = fastvae.mmd(z, kernel="imq", unbiased=True, generator=g.manual_seed(1), backend=backend)
    torch.testing.assert_close(m.loss, elbo.loss + 3.0 * expect)
    (tc.loss + m.loss).backward()
    assert all(torch.isfinite(t.grad).all() for t in (z, mu, lv))


# --- drop-in behaviour: second order, torch.func, torch.compile, no host sync, strides, dtypes, 64-bit ---

def _tc_loss(z, mu, lv, backend):
    out = fastvae.tc_decomposition(z, mu, lv, dataset_size=40, backend=backend)
    return out.mutual_info + 2.0 * out.total_correlation + 3.0 * out.dimwise_kl


def _mmd_loss(x, y, backend):
    return fastvae.mmd(x, y, kernel="imq", scale=[0.7, 3.0], unbiased=True, backend=backend)


def _tc_inputs(b=6, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(b, d, generator=g)
    lv = 0.5 * torch.randn(b, d, generator=g) - 1.0
    z = mu + torch.exp(0.5 * lv) * torch.randn(b, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (z, mu, lv)]


def _mmd_inputs(n=6, m=5, d=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(6)
    return [(torch.randn(k, d, generator=g) * s).to(DEVICE, dtype) for k, s in ((n, 0.8), (m, 1.0))]


FAMILIES = {"tc": (_tc_loss, _tc_inputs), "mmd": (_mmd_loss, _mmd_inputs)}


def _grad_of_grad(loss, inputs, backend, vs):
    """(first-order grads, the gradient of sum_i <grad_i, v_i>), both through create_graph=True."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(loss(*xs, backend), xs, create_graph=True)
    second = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), xs)
    return grads, second


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_second_order(family, backend):
    """create_graph=True gives the eager formula's second-order numbers on the call's path (the kernels'
    forward, the differentiable eager backward), against float64; the plain backward (no graph) agrees with
    the create_graph one; gradgradcheck on the float64 eager path."""
    loss, make = FAMILIES[family]
    inputs = make()
    vs = [torch.randn_like(t) for t in inputs]
    grads, second = _grad_of_grad(loss, inputs, backend, vs)
    grads64, second64 = _grad_of_grad(loss, [t.double() for t in inputs], "torch", [v.double() for v in vs])
    for a, e in zip(grads + second, grads64 + second64):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    plain = torch.autograd.grad(loss(*xs, backend), xs)
    for a, e in zip(plain, grads):
        torch.testing.assert_close(a, e.detach(), rtol=1e-4, atol=1e-5)
    if BACKEND == "torch":
        small = [t.double()[:4].requires_grad_() for t in inputs]
        assert torch.autograd.gradgradcheck(lambda *ts: loss(*ts, "torch"), small)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_func(family, backend):
    """torch.func.grad (on the eager path, whatever the backend) gives autograd's gradient; vmap over a
    stack of independent problems gives each problem's value."""
    loss, make = FAMILIES[family]
    inputs = make()
    argnums = tuple(range(len(inputs)))
    grads = torch.func.grad(lambda *ts: loss(*ts, backend), argnums=argnums)(*inputs)
    xs = [t.clone().requires_grad_() for t in inputs]
    expect = torch.autograd.grad(loss(*xs, "torch"), xs)
    for a, e in zip(grads, expect):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    stacks = [torch.stack([t, t.flip(0) * 0.9]) for t in inputs]
    batched = torch.func.vmap(lambda *ts: loss(*ts, backend))(*stacks)
    each = torch.stack([loss(*(s[k] for s in stacks), "torch") for k in range(2)])
    torch.testing.assert_close(batched, each, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compile_fullgraph(family, backend):
    """torch.compile(fullgraph=True) takes forward and backward whole (no graph break: no host read) and gives
    the uncompiled numbers."""
    loss, make = FAMILIES[family]
    inputs = make()
    compile_backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda *ts: loss(*ts, backend), fullgraph=True, backend=compile_backend)
    xs = [t.clone().requires_grad_() for t in inputs]
    out = compiled(*xs)
    grads = torch.autograd.grad(out, xs)
    ys = [t.clone().requires_grad_() for t in inputs]
    expect = loss(*ys, backend)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, torch.autograd.grad(expect, ys)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_prior_samples(backend):
    """y=None (the prior drawn in the call) and log_densities=True compile without a graph break too."""
    x = _mmd_inputs()[0]
    compile_backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    out = torch.compile(lambda t: fastvae.mmd(t, backend=backend), fullgraph=True, backend=compile_backend)(x)
    assert out.shape == () and torch.isfinite(out)
    z, mu, lv = _tc_inputs()

    def dens(z, mu, lv):
        return fastvae.tc_decomposition(z, mu, lv, dataset_size=40, reduction="sum", log_densities=True,
                                        backend=backend)

    got = torch.compile(dens, fullgraph=True, backend=compile_backend)(z, mu, lv)
    for a, e in zip(got, dens(z, mu, lv)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_host_sync(family, backend, no_host_reads):
    """Forward and backward read nothing back and copy no host list to the device (at the default
    validation setting: these formulas have no torch twin that checks values)."""
    loss, make = FAMILIES[family]
    xs = [t.requires_grad_() for t in make()]
    loss(*xs, backend).backward()
    if family == "mmd":
        fastvae.mmd(xs[0], scale=1.5, backend=backend).backward()


def test_group_size_check_only_under_validation(monkeypatch):
    """group=: the equal-rows check (an all-reduce and a host read) runs only when value checks are on."""
    from fastvae._checks import set_default_validate_args
    from fastvae.functional import latent

    calls = []

    def all_reduce(sizes, *args, **kwargs):  # another rank holds 5 rows
        calls.append(sizes.clone())
        sizes[0] = 5

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce, raising=False)
    z = torch.zeros(3, 2)
    latent._check_equal_rows(z, object(), 2)  # default: no check, no collective
    assert not calls
    set_default_validate_args(True)
    try:
        with pytest.raises(ValueError, match="this rank has 3, others between 3 and 5"):
            latent._check_equal_rows(z, object(), 2)
    finally:
        set_default_validate_args(None)
    assert len(calls) == 1


def _copies(monkeypatch):
    """2-D tensors ``.contiguous()`` copied during the call (the kernels should read inputs in place)."""
    copied = []
    original = torch.Tensor.contiguous

    def contiguous(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.dim() == 2 and out.data_ptr() != self.data_ptr():
            copied.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    return copied


def test_strided_inputs_are_read_in_place(backend, monkeypatch):
    """mu, logvar = h.chunk(2, dim=1) and a transposed z (tc), a chunk and a transposed y (mmd): the same
    values and gradients as contiguous copies; on the kernel path tc copies no input and returns gradients
    in the input's layout where it is dense (mmd copies strided inputs row-major, by design)."""
    b, d = 7, 3
    g = torch.Generator().manual_seed(8)
    h = torch.randn(b, 2 * d, generator=g).to(DEVICE).requires_grad_()
    zt = torch.randn(d, b, generator=g).to(DEVICE).requires_grad_()
    y_t = torch.randn(d, 5, generator=g).to(DEVICE).requires_grad_()
    allocs = []
    if BACKEND == "triton":  # every buffer the ops allocate: the outputs, the saved statistics, the gradients
        from fastvae._triton import common

        alloc = common.alloc
        monkeypatch.setattr(common, "alloc", lambda like, shape, dtype=None: allocs.append(tuple(shape))
                            or alloc(like, shape, dtype))
    copied = _copies(monkeypatch)
    mu, lv = h.chunk(2, dim=1)
    lv_shift = lv - 1.0  # a new tensor of the caller's, before the count
    allocs.clear()
    out = _tc_loss(zt.t(), mu, lv_shift, backend)
    got = torch.autograd.grad(out, (h, zt))
    if BACKEND == "triton":  # 4 per-row outputs and the (B, D) lse; dmu (contiguous: mu is a strided view),
        # dz and dlogvar (dense inputs: in their layouts, through alloc_like's flat buffer)
        assert sorted(allocs) == sorted([(b,)] * 4 + [(b, d)] * 2 + [(b * d,)] * 2), allocs
    assert not copied, copied
    allocs.clear()
    out_m = _mmd_loss(h[:, :d], y_t.t(), backend)
    got_m = torch.autograd.grad(out_m, (h, y_t))
    if BACKEND == "triton":  # the partial sums, the 0-d result, dx, dy; x and y copied row-major, by design
        # (runtime strides in the MMD's distance loop spill on sm_90; the copies are O(n D) of O(n^2 D) work)
        assert len(allocs) == 4 and allocs[1] == () and sorted(allocs[2:]) == [(5, d), (b, d)], allocs
        assert sorted(copied) == [(5, d), (b, d)], copied
    monkeypatch.undo()
    h2, zt2, y2 = (t.detach().clone().requires_grad_() for t in (h, zt, y_t))
    mu2, lv2 = (t.contiguous() for t in h2.chunk(2, dim=1))
    expect = _tc_loss(zt2.t().contiguous(), mu2, lv2 - 1.0, backend)
    torch.testing.assert_close(out, expect)
    for a, e in zip(got, torch.autograd.grad(expect, (h2, zt2))):
        torch.testing.assert_close(a, e)
    expect_m = _mmd_loss(h2[:, :d].contiguous(), y2.t().contiguous(), backend)
    torch.testing.assert_close(out_m, expect_m)
    for a, e in zip(got_m, torch.autograd.grad(expect_m, (h2, y2))):
        torch.testing.assert_close(a, e)
    if BACKEND == "triton":  # the op's own gradient of a transposed (dense) input keeps its layout
        from fastvae._triton.latent import _grad_buffer

        assert _grad_buffer(zt.detach().t()).stride() == zt.t().stride()
        assert _grad_buffer(mu.detach()).is_contiguous()


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.float16, torch.float16)])
def test_mixed_dtypes_promote(dtypes, backend):
    """Inputs of different floating dtypes: the result in torch's promoted dtype, each gradient in its
    input's dtype, the numbers of the float64 formula."""
    z, mu, lv = (t.to(dt).requires_grad_() for t, dt in zip(_tc_inputs(), dtypes))
    out = fastvae.tc_decomposition(z, mu, lv, dataset_size=40, reduction="none", backend=backend)
    promoted = torch.promote_types(torch.promote_types(dtypes[0], dtypes[1]), dtypes[2])
    assert all(t.dtype == promoted for t in out[:3])
    sum(t.float().sum() for t in out[:3]).backward()
    z64, mu64, lv64 = _oracle_inputs(z, mu, lv)
    log_qz, log_prod, log_qzx, log_pz = peer_tc(z64, mu64, lv64, 40, "mss")
    expect = (log_qzx - log_qz, log_qz - log_prod, log_prod - log_pz)
    sum(e.sum() for e in expect).backward()
    for a, e in zip(out[:3], expect):
        _close(a, e, promoted, "term")
    for t, e in ((z, z64), (mu, mu64), (lv, lv64)):
        assert t.grad.dtype == t.dtype
        _close(t.grad, e.grad, torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16, "grad")
    x, y = (t.to(dt).requires_grad_() for t, dt in zip(_mmd_inputs(), dtypes))
    m = fastvae.mmd(x, y, backend=backend)
    assert m.dtype == torch.promote_types(dtypes[0], dtypes[1])
    m.backward()
    assert x.grad.dtype == x.dtype and y.grad.dtype == y.dtype


def test_scale_and_shape_errors(backend):
    """A tensor scale is a TypeError (it would be read on the host each call and its gradient dropped);
    mismatched shapes are a ShapeError, a RuntimeError as torch's own."""
    x = torch.randn(5, 3, device=DEVICE)
    for bad in (torch.tensor(2.0), [1.0, torch.tensor(2.0)], torch.tensor(2.0, requires_grad=True)):
        with pytest.raises(TypeError, match="not a tensor"):
            fastvae.mmd(x, scale=bad, backend=backend)
    with pytest.raises(RuntimeError, match="y must have shape"):
        fastvae.mmd(x, torch.randn(5, 4, device=DEVICE), backend=backend)
    with pytest.raises(RuntimeError, match="one shape"):
        fastvae.tc_decomposition(x, x[:4], x, dataset_size=10, backend=backend)


def test_mmd_many_scales(backend):
    """More scales than one backward launch takes (8): the launches' gradients add up."""
    x, y = (t.requires_grad_() for t in _mmd_inputs())
    scales = [0.3 * (k + 1) for k in range(11)]
    out = fastvae.mmd(x, y, kernel="rbf", scale=scales, backend=backend)
    out.backward()
    x64, y64 = _oracle_inputs(x, y)
    expect = fastvae.mmd(x64, y64, kernel="rbf", scale=scales, backend="torch")
    expect.backward()
    _close(out, expect, torch.float32, "mmd")
    _close(x.grad, x64.grad, torch.float32, "grad x")
    _close(y.grad, y64.grad, torch.float32, "grad y")


def test_wide_offsets():
    """WIDE (int64 element offsets) is chosen from the sizes: on for tensors that span 2^31 elements, off
    below (meta tensors: no memory)."""
    pytest.importorskip("triton")
    from fastvae._triton.latent import _wide

    assert not _wide(torch.empty(1 << 20, 64, device="meta"))
    assert _wide(torch.empty(1 << 25, 64, device="meta"))
    # a chunk of a wide tensor: its row stride, not its own numel, decides
    h = torch.empty(1 << 24, 128, device="meta")
    assert h[:, :64].numel() < 2**31 and _wide(h[:, :64])
    assert _wide(torch.empty(1 << 31, 1, device="meta").t())  # one row of 2^31 elements


@pytest.mark.skipif(BACKEND != "triton", reason="the kernels' int64 offsets")
def test_forced_wide_offsets_are_bitwise_equal(monkeypatch):
    """The kernels' int64 offset arithmetic (forced on small, strided tensors) gives bitwise the int32
    path's values and gradients."""
    from fastvae._triton import latent as latent_op

    def run():
        g = torch.Generator().manual_seed(9)
        h = torch.randn(9, 8, generator=g).to(DEVICE).requires_grad_()
        zt = torch.randn(4, 9, generator=g).to(DEVICE).requires_grad_()
        mu, lv = h.chunk(2, dim=1)
        out = (_tc_loss(zt.t(), mu, lv - 1.0, "triton") + _mmd_loss(h[:, :4], zt.t(), "triton")
               + fastvae.mmd(zt.t(), h[:, 4:], scale=[0.1 * k + 0.5 for k in range(9)], backend="triton"))
        return (out, *torch.autograd.grad(out, (h, zt)))

    # the narrow launches take the wide ones' scales a launch, so that both sum the 9 scales in one order
    monkeypatch.setattr(latent_op, "MMD_BWD_SCALES", latent_op.MMD_BWD_SCALES_WIDE)
    narrow = run()
    monkeypatch.setattr(latent_op, "INT32_OFFSETS", 0)
    with count_launches(*TC_KERNELS, *MMD_KERNELS) as counts:
        wide = run()
    assert counts["tc_fwd_kernel"] == 1 and counts["mmd_bwd_kernel"] == 2 + 2 * 3  # 9 scales: 4 + 4 + 1 wide
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_nan_input_gives_nan(family, backend):
    """An invalid (NaN) input element gives NaN in the loss and in the gradients it reaches, never a finite
    value (the MMD's distance clamp keeps NaN on the GPU too); no exception, no device assert."""
    loss, make = FAMILIES[family]
    xs = make()
    xs[1][2, 1] = float("nan")  # mu (tc) or y (mmd)
    xs = [t.requires_grad_() for t in xs]
    out = loss(*xs, backend)
    out.backward()
    assert torch.isnan(out)
    for t in xs:
        assert torch.isnan(t.grad).any()
