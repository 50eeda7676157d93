"""What only a GPU can show: tensors past 2^31 elements, CUDA-graph capture and replay with fresh noise, and
no host synchronization anywhere in a forward+backward step. Run by ci/gpu.sh; skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND

import fastvae
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
