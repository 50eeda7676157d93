"""What only a GPU can show: tensors past 2^31 elements, CUDA-graph capture and replay with fresh noise, no host
synchronization in any public op (every function of ``fastvae.__all__``, every loss module of ``fastvae.nn``,
every distribution of ``fastvae.distributions``) forward or backward, and every op on a second device while
the first is current. Run by ci/gpu.sh; skipped without CUDA (the two-device tests need two GPUs)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import BACKEND

import fastvae
import fastvae.distributions
import fastvae.nn
from fastvae import reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(BACKEND != "triton", reason="runs in the Triton pass"),
]

BIG = 2**31 + 1027  # past int32 indexing, and not a multiple of any block size


def _chunked_sum(fn, *tensors, chunk=2**28):
    """A float64 reference sum over a huge tensor, a chunk at a time to bound memory."""
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    for start in range(0, tensors[0].numel(), chunk):
        total += fn(*(t[start : start + chunk].double() for t in tensors)).sum()
    return total


@pytest.fixture
def free_cache():
    yield
    torch.cuda.empty_cache()


def test_sample_kl_past_int32_indexing(free_cache):
    mu = torch.randn(BIG, device="cuda", dtype=torch.bfloat16)
    lv = (torch.randn(BIG, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_()
    mu.requires_grad_()
    z, kl = fastvae.reparameterize_kl(mu, lv, reduction="sum")
    ref = _chunked_sum(lambda m, v: reference.gaussian_kl(m, v, reduction="none"), mu.detach(), lv.detach())
    assert abs(kl.double() - ref) <= 1e-2 * ref.abs()
    # the last elements (offsets >= 2^31) were written with noise, not left as garbage
    tail = slice(BIG - 4096, BIG)
    eps = (z[tail].double() - mu[tail].double()) / torch.exp(0.5 * lv[tail].double())
    assert torch.isfinite(eps).all() and eps.abs().max() < 8 and 0.8 < eps.std() < 1.2
    gz = torch.ones_like(z)
    z.backward(gz)
    expected_glv_tail = 0.5 * (z[tail].double() - mu[tail].double()) + 0.5 * (torch.exp(lv[tail].double()) - 1)
    torch.testing.assert_close(lv.grad[tail].double(), expected_glv_tail, rtol=2e-2, atol=2e-2)


def test_nll_past_int32_indexing(free_cache):
    x = torch.randn(BIG, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(BIG, device="cuda", dtype=torch.bfloat16)
    loss = fastvae.gaussian_nll_loss(x, t, 0.7, reduction="sum")
    ref = _chunked_sum(lambda a, b: reference.gaussian_nll_var(a, b, torch.tensor(0.7, dtype=torch.float64,
                                                                                    device="cuda"),
                                                               False, 1e-6, "none"), x.detach(), t)
    assert abs(loss.double() - ref) <= 1e-2 * ref.abs()
    loss.backward()
    tail = slice(BIG - 4096, BIG)
    torch.testing.assert_close(x.grad[tail].double(), (x[tail].double() - t[tail].double()) / 0.7,
                               rtol=2e-2, atol=2e-2)


def test_no_host_sync_in_a_training_step():
    mu = torch.randn(4096, 64, device="cuda", requires_grad=True)
    lv = torch.randn(4096, 64, device="cuda", requires_grad=True)
    x, var = torch.randn(4096, 64, device="cuda"), torch.rand(4096, 64, device="cuda") + 0.1
    lvx = torch.zeros(64, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    # the tensor variance's check for negative entries reads a bool on the host, as torch's does: off here
    with _value_checks_off():
        torch.cuda.set_sync_debug_mode("error")
        try:
            z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean")
            loss = kl + fastvae.gaussian_nll_loss(z, x, var) + fastvae.gaussian_nll_loss_logvar(z, x, lvx)
            loss = loss + fastvae.gaussian_kl(mu, lv, mu * 0.5, lv * 0.5)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replays_draw_fresh_noise():
    mu = torch.randn(2048, 32, device="cuda", requires_grad=True)
    lv = torch.randn(2048, 32, device="cuda", requires_grad=True)
    x = torch.randn(2048, 32, device="cuda")

    def step():
        z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean")
        loss = kl + fastvae.gaussian_nll_loss(z, x, 0.5, reduction="batchmean")
        loss.backward()
        return z.detach(), loss.detach()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        for _ in range(2):
            step()
            mu.grad = lv.grad = None
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z_static, loss_static = step()
    seen = []
    for _ in range(3):
        mu.grad.zero_(), lv.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        z = z_static.clone()
        seen.append(z)
        # each replay's backward regenerates that replay's noise: grad_logvar follows from its z
        g_sample = 0.5 * (z - mu.detach()) * (z - x) / 0.5 / mu.shape[0]
        g_kl = 0.5 * (torch.exp(lv.detach()) - 1) / mu.shape[0]
        torch.testing.assert_close(lv.grad, g_sample + g_kl, rtol=1e-4, atol=1e-6)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vq_at_tokenizer_scale(dtype, free_cache):
    """N = 65536 tokens, K = 16384 codes, D = 256: the fused search, losses and backward against the eager path
    (its fp32 search, 4096 tokens at a time) with the peak memory above the inputs far below one N x K fp32
    buffer (4.3 GB), which taming's VectorQuantizer2 holds twice."""
    n, k, d = 65536, 16384, 256
    z = torch.randn(n, d, device="cuda", dtype=dtype).requires_grad_()
    e = torch.randn(k, d, device="cuda", dtype=dtype).requires_grad_()
    g = torch.randn(n, d, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fastvae.vector_quantize(z, e, preset="dac", backend="triton")
    gz, ge = torch.autograd.grad([out.quantized, out.loss], [z, e], [g, None])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 12 * n * d * 4 + 4 * k * d * 4, peak  # O(N D + K D): a few (N, D) fp32 terms
    ref = fastvae.vector_quantize(z, e, preset="dac", backend="torch")
    rz, re = torch.autograd.grad([ref.quantized, ref.loss], [z, e], [g, None])
    # a different index only at a near tie (the fp32 rounding of the expanded form); there the rows differ
    same = out.indices == ref.indices
    assert same.float().mean() > 0.999
    zf, ef = z.detach().float(), e.detach().float()
    dist = lambda idx: (zf - ef[idx]).square().sum(-1)  # noqa: E731
    assert (dist(out.indices) - dist(ref.indices)).abs().max() <= 1e-3 * dist(ref.indices).max()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.loss.float(), ref.loss.float(), **tol)
    torch.testing.assert_close(out.quantized[same], ref.quantized[same], **tol)
    torch.testing.assert_close(gz[same], rz[same], **tol)
    if same.all():
        torch.testing.assert_close(ge.float(), re.float(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# every public op: one call each, forward and backward
# ------------------------------------------------------------------------------------------------------------

# public callables of fastvae.__all__ that configure the library rather than compute on tensors
NOT_OPS = {"active_path", "get_backend", "set_backend", "use_backend", "get_default_validate_args",
           "set_default_validate_args"}


class Inputs:
    """Inputs of one call, drawn on the CPU from a generator seeded by the call's name and then moved to
    ``device``: the same values on every device. A later call with the same ``Inputs`` gets the same tensors
    back without copying again (a host-to-device copy is itself a synchronization)."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.device = device
        self.gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        self.leaves: list[torch.Tensor] = []
        self._made: list[Any] = []
        self._next = 0

    def rewind(self) -> Inputs:
        self._next = 0
        return self

    def _put(self, t: torch.Tensor, grad: bool) -> torch.Tensor:
        self._next += 1
        if self._next <= len(self._made):
            return self._made[self._next - 1]
        t = t.to(self.device)
        if grad:
            t.requires_grad_()
            self.leaves.append(t)
        self._made.append(t)
        return t

    def randn(self, *shape: int, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
        return self._put(scale * torch.randn(shape, generator=self.gen), grad)

    def pos(self, *shape: int, grad: bool = True) -> torch.Tensor:
        """Positive values in [0.5, 1.5): variances, rates, dispersions."""
        return self._put(torch.rand(shape, generator=self.gen) + 0.5, grad)

    def unit(self, *shape: int, grad: bool = False) -> torch.Tensor:
        return self._put(torch.rand(shape, generator=self.gen), grad)

    def module(self, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """A module built from the same seed on every device, moved there once: later calls reuse it."""
        self._next += 1
        if self._next <= len(self._made):
            return self._made[self._next - 1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=self.gen)))
            m = make().to(self.device)
        self._made.append(m)
        return m

    def counts(self, *shape: int) -> torch.Tensor:
        return self._put(torch.randint(0, 6, shape, generator=self.gen).float(), False)

    def ints(self, high: int, *shape: int) -> torch.Tensor:
        return self._put(torch.randint(0, high, shape, generator=self.gen), False)

    def pixels(self, *shape: int) -> torch.Tensor:
        """8-bit images in [-1, 1]."""
        return self._put(torch.randint(0, 256, shape, generator=self.gen).float() / 127.5 - 1.0, False)


@dataclasses.dataclass(frozen=True)
class OpCall:
    family: str
    call: Callable[[Inputs], Any]
    random: bool = False  # draws noise: compared across devices by placement and finiteness only


M = 3  # mixture components of the discretized mixture of logistics
fv = fastvae


def _encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.5 * x[:, :4], 0.1 * x[:, 4:]


def _log_lik(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.sum(-1) - x.sum(-1)) ** 2  # (K', B)


OPS: dict[str, OpCall] = {
    # fastvae.__all__
    "binary_cross_entropy_with_logits": OpCall(
        "likelihoods", lambda i: fv.binary_cross_entropy_with_logits(i.randn(8, 33), i.unit(8, 33))),
    "bits_per_dim": OpCall("discretized", lambda i: fv.bits_per_dim(100 * i.pos(8), 3 * 4 * 4)),
    "discretized_gaussian_nll": OpCall(
        "discretized", lambda i: fv.discretized_gaussian_nll(i.pixels(2, 3, 4, 4), i.randn(2, 3, 4, 4, scale=0.5),
                                                            i.randn(2, 3, 4, 4, scale=0.5) - 2)),
    "discretized_logistic_nll": OpCall(
        "discretized", lambda i: fv.discretized_logistic_nll(i.unit(2, 3, 4, 4), i.unit(2, 3, 4, 4, grad=True),
                                                            i.randn(2, 3, 4, 4, scale=0.5) - 3)),
    "discretized_mix_logistic_nll": OpCall(
        "discretized", lambda i: fv.discretized_mix_logistic_nll(i.pixels(2, 4, 4, 3), i.randn(2, 4, 4, 10 * M),
                                                                num_mixtures=M)),
    "sample_discretized_mix_logistic": OpCall(
        "discretized", lambda i: fv.sample_discretized_mix_logistic(i.randn(2, 4, 4, 10 * M, grad=False),
                                                                   num_mixtures=M), random=True),
    "estimate_log_likelihood": OpCall(
        "iwae", lambda i: fv.estimate_log_likelihood(_encode, _log_lik, i.randn(4, 8, grad=False), num_samples=8,
                                                    chunk_size=4), random=True),
    "iwae_bound": OpCall("iwae", lambda i: fv.iwae_bound(i.randn(5, 4), i.randn(5, 4))),
    "gaussian_kl": OpCall("kl", lambda i: fv.gaussian_kl(i.randn(8, 5), i.randn(8, 5), i.randn(8, 5), i.randn(8, 5))),
    "gaussian_nll_loss": OpCall(
        "gaussian_nll", lambda i: fv.gaussian_nll_loss(i.randn(8, 33), i.randn(8, 33, grad=False), i.pos(8, 33))),
    "gaussian_nll_loss[float var]": OpCall(
        "gaussian_nll", lambda i: fv.gaussian_nll_loss(i.randn(8, 33), i.randn(8, 33, grad=False), 0.5)),
    "gaussian_nll_loss_logvar": OpCall(
        "gaussian_nll", lambda i: fv.gaussian_nll_loss_logvar(i.randn(8, 33), i.randn(8, 33, grad=False),
                                                             i.randn(8, 33, scale=0.5))),
    "mmd": OpCall("latent", lambda i: fv.mmd(i.randn(16, 4), i.randn(16, 4, grad=False))),
    "mmd[prior drawn]": OpCall("latent", lambda i: fv.mmd(i.randn(16, 4), kernel="imq", unbiased=True), random=True),
    "tc_decomposition": OpCall("latent", lambda i: fv.tc_decomposition(i.randn(12, 4), i.randn(12, 4),
                                                                      i.randn(12, 4, scale=0.5), dataset_size=600)),
    "negative_binomial_nll": OpCall(
        "likelihoods", lambda i: fv.negative_binomial_nll(i.counts(8, 33), 3 * i.pos(8, 33), i.pos(33))),
    "zinb_nll": OpCall(
        "likelihoods", lambda i: fv.zinb_nll(i.counts(8, 33), 3 * i.pos(8, 33), i.pos(33), i.randn(8, 33))),
    "poisson_nll_loss": OpCall("likelihoods", lambda i: fv.poisson_nll_loss(i.randn(8, 33), i.counts(8, 33))),
    "reparameterize": OpCall("sampling", lambda i: fv.reparameterize(i.randn(8, 5), i.randn(8, 5)), random=True),
    "reparameterize_kl": OpCall("sampling", lambda i: fv.reparameterize_kl(i.randn(8, 5), i.randn(8, 5)), random=True),
    "sample_log_weights": OpCall(
        "sampling", lambda i: fv.sample_log_weights(i.randn(8, 5), i.randn(8, 5), num_samples=3), random=True),
    "vector_quantize": OpCall("vq", lambda i: fv.vector_quantize(i.randn(2, 4, 3, 3), i.randn(16, 4), dim=1)),
    "residual_vector_quantize": OpCall(
        "vq", lambda i: fv.residual_vector_quantize(i.randn(2, 4, 3, 3), i.randn(2, 16, 4), dim=1)),
    "lookup_free_quantize": OpCall("vq", lambda i: fv.lookup_free_quantize(i.randn(2, 6, 3, 3), dim=1)),
    "finite_scalar_quantize": OpCall(
        "vq", lambda i: fv.finite_scalar_quantize(i.randn(2, 3, 4, 4), [8, 5, 5], dim=1, histogram=True)),
    "gumbel_softmax": OpCall("vq", lambda i: fv.gumbel_softmax(i.randn(2, 8, 3, 3), hard=True, dim=1), random=True),
    "gumbel_softmax_kl": OpCall("vq", lambda i: fv.gumbel_softmax_kl(i.randn(2, 8, 3, 3), dim=1), random=True),
    "gumbel_softmax[codebook]": OpCall(
        "vq", lambda i: fv.gumbel_softmax(i.randn(2, 8, 3, 3), dim=1, codebook=i.randn(8, 4)), random=True),
    "soft_assign": OpCall("vq", lambda i: fv.soft_assign(i.randn(2, 4, 3, 3), i.randn(16, 4), dim=1,
                                                         metric="euclidean")),
    "kmeans": OpCall("vq", lambda i: fv.kmeans(i.randn(64, 4, grad=False), 8, iters=3), random=True),
    "codebook_usage": OpCall("vq", lambda i: fv.codebook_usage(i.ints(16, 64), 16)),
    "codebook_ema_update": OpCall(
        "vq", lambda i: fv.codebook_ema_update(i.randn(64, 4, grad=False), i.ints(16, 64), 4 * i.pos(16, grad=False),
                                              i.randn(16, 4, grad=False), dead_threshold=1.0), random=True),
    # fastvae.nn
    "nn.GaussianNLLLoss": OpCall(
        "gaussian_nll", lambda i: fv.nn.GaussianNLLLoss()(i.randn(8, 33), i.randn(8, 33, grad=False), i.pos(8, 33))),
    "nn.GaussianKL": OpCall("kl", lambda i: fv.nn.GaussianKL()(i.randn(8, 5), i.randn(8, 5))),
    "nn.Reparameterize": OpCall(
        "sampling", lambda i: fv.nn.Reparameterize()(i.randn(8, 5), i.randn(8, 5)), random=True),
    "nn.ELBOLoss": OpCall(
        "gaussian_nll", lambda i: fv.nn.ELBOLoss()(i.randn(8, 33), i.unit(8, 33), i.randn(8, 5), i.randn(8, 5))),
    "nn.BCEWithLogitsLoss": OpCall(
        "likelihoods", lambda i: fv.nn.BCEWithLogitsLoss()(i.randn(8, 33), i.unit(8, 33))),
    "nn.PoissonNLLLoss": OpCall("likelihoods", lambda i: fv.nn.PoissonNLLLoss()(i.randn(8, 33), i.counts(8, 33))),
    "nn.NegativeBinomialNLLLoss": OpCall(
        "likelihoods", lambda i: fv.nn.NegativeBinomialNLLLoss()(i.counts(8, 33), 3 * i.pos(8, 33), i.pos(33))),
    "nn.ZINBNLLLoss": OpCall(
        "likelihoods", lambda i: fv.nn.ZINBNLLLoss()(i.counts(8, 33), 3 * i.pos(8, 33), i.pos(33), i.randn(8, 33))),
    "nn.DiscretizedMixLogisticNLLLoss": OpCall(
        "discretized",
        lambda i: fv.nn.DiscretizedMixLogisticNLLLoss(M)(i.pixels(2, 4, 4, 3), i.randn(2, 4, 4, 10 * M))),
    "nn.BetaTCVAELoss": OpCall(
        "latent", lambda i: fv.nn.BetaTCVAELoss(dataset_size=600)(i.randn(12, 33), i.unit(12, 33), i.randn(12, 4),
                                                                 i.randn(12, 4), i.randn(12, 4, scale=0.5))),
    "nn.VectorQuantize": OpCall(
        "vq", lambda i: i.module(lambda: fv.nn.VectorQuantize(dim=4, codebook_size=16))(i.randn(2, 9, 4))),
    "nn.ResidualVQ": OpCall(
        "vq",
        lambda i: i.module(lambda: fv.nn.ResidualVQ(dim=4, num_quantizers=2, codebook_size=16))(i.randn(2, 9, 4))),
    "nn.FSQ": OpCall("vq", lambda i: i.module(lambda: fv.nn.FSQ([8, 5, 5]))(i.randn(2, 9, 3))),
    "nn.LFQ": OpCall("vq", lambda i: i.module(lambda: fv.nn.LFQ(codebook_size=64))(i.randn(2, 9, 6))),
    "nn.GumbelQuantize": OpCall(
        "vq", lambda i: i.module(lambda: fv.nn.GumbelQuantize(8, 4, 16))(i.randn(2, 8, 3, 3)), random=True),
    "nn.MMDVAELoss": OpCall(
        "latent", lambda i: fv.nn.MMDVAELoss()(i.randn(16, 33), i.unit(16, 33), i.randn(16, 4), i.randn(16, 4),
                                              i.randn(16, 4, scale=0.5)), random=True),
    # fastvae.distributions
    "distributions.DiagonalGaussianDistribution": OpCall("sampling", lambda i: _diagonal(i), random=True),
    "distributions.Normal": OpCall("sampling", lambda i: _normal(i), random=True),
}


def _diagonal(i: Inputs) -> tuple[torch.Tensor, ...]:
    d = fv.distributions.DiagonalGaussianDistribution(i.randn(2, 8, 3, 3))
    sample = d.sample()
    return sample, d.kl(), d.nll(sample), d.kl(fv.distributions.DiagonalGaussianDistribution(i.randn(2, 8, 3, 3)))


def _normal(i: Inputs) -> tuple[torch.Tensor, ...]:
    p = fv.distributions.Normal(i.randn(8, 5), i.pos(8, 5))
    q = fv.distributions.Normal(i.randn(8, 5), i.pos(8, 5))
    z = p.rsample()
    return z, p.log_prob(z), torch.distributions.kl_divergence(p, q)


def _public_ops() -> set[str]:
    """Every public op: the tensor functions of fastvae.__all__, the loss modules of fastvae.nn and the
    distributions of fastvae.distributions."""
    ops = {n for n in fv.__all__ if n not in NOT_OPS and inspect.isfunction(getattr(fv, n, None))}
    ops |= {f"nn.{n}" for n in fv.nn.__all__
            if inspect.isclass(getattr(fv.nn, n)) and issubclass(getattr(fv.nn, n), torch.nn.Module)}
    ops |= {f"distributions.{n}" for n in fv.distributions.__all__ if inspect.isclass(getattr(fv.distributions, n))}
    return ops


def _present(name: str) -> bool:
    """Whether the op a call names exists in this checkout (a call may land before its op does)."""
    obj: Any = fv
    for part in name.split("[")[0].split("."):
        obj = getattr(obj, part, None)
    return obj is not None


CALLS = [n for n in OPS if _present(n)]


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors of an op's result: a tensor, a (named) tuple of them, or a dataclass."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif dataclasses.is_dataclass(out):
        for f in dataclasses.fields(out):
            yield from _tensors(getattr(out, f.name))


def _run(name: str, inputs: Inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One call of ``name`` on ``inputs``, then backward from every differentiable output to its inputs:
    (outputs, gradients of the inputs; returned, never accumulated, so a call can be repeated)."""
    outs = list(_tensors(OPS[name].call(inputs.rewind())))
    diff = [o for o in outs if o.requires_grad]
    grads: list[torch.Tensor] = []
    if diff and inputs.leaves:
        total = sum(o.float().sum() for o in diff)
        grads = [g for g in torch.autograd.grad(total, inputs.leaves, allow_unused=True) if g is not None]
    return [o.detach() for o in outs], grads


@contextlib.contextmanager
def _value_checks_off() -> Iterator[None]:
    """fastvae's and torch.distributions' value checks off: each reads a bool on the host by design (as torch's
    own do), and a training loop that must not sync turns them off."""
    before, before_torch = fv.get_default_validate_args(), torch.distributions.Distribution._validate_args
    fv.set_default_validate_args(False)
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        fv.set_default_validate_args(before)
        torch.distributions.Distribution.set_default_validate_args(before_torch)


def test_every_public_op_has_a_call():
    missing = _public_ops() - {n.split("[")[0] for n in OPS}
    assert not missing, f"public ops without a call in tests/test_cuda.py's OPS: {sorted(missing)}"


@pytest.mark.parametrize("name", CALLS)
def test_no_host_sync(name):
    """Forward and backward of every public op with value checks off: no device-to-host read, no stream or
    device synchronization (torch's sync debug mode raises on each). The first call, outside the check,
    compiles the kernels."""
    inputs = Inputs(name, torch.device("cuda"))
    with _value_checks_off():
        _run(name, inputs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs, grads = _run(name, inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in outs + grads if t.is_floating_point()), name


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
@pytest.mark.parametrize("name", [pytest.param(n, id=f"{OPS[n].family}-{n}") for n in CALLS])
def test_on_the_second_device_while_the_first_is_current(name):
    """Every op with its tensors on cuda:1 while cuda:0 is current: the kernels launch on the tensors' device
    (a launch on the current one reads another device's memory), the results and gradients stay there, the
    current device is left as it was, and the values are cuda:0's (noise aside)."""
    with torch.cuda.device(0):
        outs1, grads1 = _run(name, Inputs(name, torch.device("cuda", 1)))
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
        outs0, grads0 = _run(name, Inputs(name, torch.device("cuda", 0)))
    assert outs1 and all(t.device == torch.device("cuda", 1) for t in outs1 + grads1), name
    assert all(torch.isfinite(t).all() for t in outs1 + grads1 if t.is_floating_point()), name
    if not OPS[name].random:
        assert len(outs1) == len(outs0) and len(grads1) == len(grads0)
        for a, b in zip(outs1 + grads1, outs0 + grads0):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6)


@two_gpus
def test_a_training_step_on_the_second_device():
    """The sampler's fresh noise and the fused losses end to end on cuda:1, cuda:0 current."""
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):
        mu = torch.randn(256, 16, device=dev, requires_grad=True)
        lv = torch.randn(256, 16, device=dev, requires_grad=True)
        x = torch.randn(256, 16, device=dev)
        z, kl = fastvae.reparameterize_kl(mu, lv, reduction="batchmean")
        loss = kl + fastvae.gaussian_nll_loss(z, x, 0.5, reduction="batchmean")
        loss.backward()
        torch.cuda.synchronize(dev)
    assert loss.device == dev and mu.grad.device == dev and math.isfinite(loss.item())
    eps = (z - mu) / torch.exp(0.5 * lv)
    assert 0.8 < eps.std().item() < 1.2  # noise was drawn on cuda:1, not left unwritten
