"""Soft assignment over a codebook against float64 transcriptions of the peers (IBQ's soft one-hot, vector-
quantize-pytorch's codebook diversity loss): every output and both gradients, layouts, empty and single-token
inputs, exact zero distances, second-order gradients, determinism, memory, bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND, DTYPES

import fastvae

SHAPES = [(1, 1, 1), (37, 70, 5), (130, 129, 33)]  # (N, K, D): none a multiple of the 64-wide tiles
METRICS = ["dot", "euclidean", "sqeuclidean"]


# -- the peers, transcribed in float64 -------------------------------------------------------------------

def entropy(prob: torch.Tensor) -> torch.Tensor:
    """vector-quantize-pytorch's entropy: -(p * log(p.clamp(min=1e-20))).sum(-1)."""
    return -(prob * prob.clamp(min=1e-20).log()).sum(-1)


def peers_ibq(z: torch.Tensor, embedding: torch.Tensor, inv_temperature: float):
    """IBQ's soft one-hot: logits = einsum(z, E), soft = softmax(logits), quantized = einsum(soft, E)."""
    logits = torch.einsum("nd,kd->nk", z, embedding) * inv_temperature
    soft = logits.softmax(-1)
    return logits, soft, torch.einsum("nk,kd->nd", soft, embedding)


def peers_codebook_diversity(x: torch.Tensor, embed: torch.Tensor, temp: float, squared: bool = False):
    """vector-quantize-pytorch's codebook diversity loss: dist = -cdist(x, embed), prob = (dist * temp).softmax,
    avg_prob = prob.mean(0), loss = -entropy(avg_prob); cdist without its matmul shortcut (exact in float64,
    and its backward is 0 at distance 0). ``squared``: -cdist^2, the sqeuclidean logits."""
    dist = -torch.cdist(x, embed, compute_mode="donot_use_mm_for_euclid_dist")
    if squared:
        dist = -dist.square()
    logits = dist * temp
    prob = logits.softmax(dim=-1)
    avg_prob = prob.mean(dim=0)
    return logits, prob, avg_prob, -entropy(avg_prob)


def _direct_logits(z: torch.Tensor, e: torch.Tensor, t: float, metric: str) -> torch.Tensor:
    """The distance logits from the differences z - e (torch has no double backward of cdist's), the sqrt's
    gradient 0 at distance 0 as cdist's."""
    q = (z[:, None, :] - e[None, :, :]).square().sum(-1)
    if metric == "sqeuclidean":
        return -q * t
    pos = q > 0
    return -torch.where(pos, torch.where(pos, q, 1.0).sqrt(), 0.0) * t


def peers(z: torch.Tensor, e: torch.Tensor, t: float, metric: str, twice_differentiable: bool = False):
    """(quantized, lse, entropy, mean_probs, codebook_entropy) of the tokens z (N, D) by the peers' formulas."""
    if metric != "dot" and twice_differentiable:
        logits = _direct_logits(z, e, t, metric)
        prob = logits.softmax(-1)
        avg_prob = prob.mean(0)
        return torch.einsum("nk,kd->nd", prob, e), logits.logsumexp(-1), entropy(prob), avg_prob, entropy(avg_prob)
    if metric == "dot":
        logits, prob, quantized = peers_ibq(z, e, t)
        avg_prob = prob.mean(0)
        codebook_entropy = entropy(avg_prob)
    else:
        logits, prob, avg_prob, loss = peers_codebook_diversity(z, e, t, squared=metric == "sqeuclidean")
        quantized = torch.einsum("nk,kd->nd", prob, e)
        codebook_entropy = -loss
    return quantized, logits.logsumexp(-1), entropy(prob), avg_prob, codebook_entropy


# -- helpers -------------------------------------------------------------------------------------------

def _inputs(n, k, d, dtype, device, scale=0.6):
    z = (torch.randn(n, d, device=device) * scale).to(dtype).requires_grad_()
    e = (torch.randn(k, d, device=device) * scale).to(dtype).requires_grad_()
    return z, e


def _weights(outs):
    """A random linear combination of every output (the same for both sides)."""
    return [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]


def _combine(outs, weights):
    return sum((o.double() * w).sum() for o, w in zip(outs, weights))


def _close(actual, expected, rtol, atol):
    """actual close to the float64 expectation, atol relative to its largest magnitude."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach(), rtol=rtol, atol=atol * scale,
                               equal_nan=True)


TOLS = {  # (rtol, atol): fp32 compute; 16-bit inputs round the quantized output and the gradients once more
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


# -- values and gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_and_gradients_match_the_peers(dtype, shape, metric, backend, device, request):
    if backend == "triton":  # every buffer the kernels write starts as NaN: an unwritten element shows
        request.getfixturevalue("poisoned")
    n, k, d = shape
    z, e = _inputs(n, k, d, dtype, device)
    tau = 0.5 if metric != "sqeuclidean" else 2.0  # logits of a few nats' spread: neither one-hot nor uniform
    out = fastvae.soft_assign(z, e, temperature=tau, metric=metric, backend=backend)
    zr, er = (x.detach().double().requires_grad_() for x in (z, e))
    ref = peers(zr, er, 1.0 / tau, metric)
    rtol, atol = TOLS[dtype]
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.quantized.shape == (n, d) and out.quantized.dtype == dtype
    assert out.lse.shape == out.entropy.shape == (n,) and out.mean_probs.shape == (k,)
    assert out.codebook_entropy.shape == () and out.lse.dtype == stat_dtype
    for a, r in zip(out, ref):
        _close(a, r, rtol, atol)
    w = _weights(ref)
    gz, ge = torch.autograd.grad(_combine(out, w), (z, e))
    gzr, ger = torch.autograd.grad(_combine(ref, w), (zr, er))
    assert gz.dtype == dtype and ge.dtype == dtype
    _close(gz, gzr, rtol, atol)
    _close(ge, ger, rtol, atol)


@pytest.mark.parametrize("metric", METRICS)
def test_each_output_alone_and_mixed_dtypes(metric, backend, device):
    """Each output's gradient alone (the others take none: the backward's switches), with a 16-bit z and an
    fp32 codebook (promoted: quantized in fp32, gradients in each input's dtype)."""
    z = (torch.randn(40, 6, device=device) * 0.6).half().requires_grad_()
    e = (torch.randn(20, 6, device=device) * 0.6).requires_grad_()
    zr, er = (x.detach().double().requires_grad_() for x in (z, e))
    for i in range(5):
        ref = peers(zr, er, 2.0, metric)
        out = fastvae.soft_assign(z, e, temperature=0.5, metric=metric, backend=backend)
        assert out.quantized.dtype == torch.float32
        w = torch.randn(ref[i].shape, dtype=torch.float64, device=device)
        gz, ge = torch.autograd.grad((out[i].double() * w).sum(), (z, e))
        gzr, ger = torch.autograd.grad((ref[i] * w).sum(), (zr, er))
        assert gz.dtype == torch.float16 and ge.dtype == torch.float32
        _close(gz, gzr, 4e-3, 4e-3)
        _close(ge, ger, 2e-5, 2e-5)


def test_zero_distances_have_zero_gradient(backend, device):
    """Tokens equal to codes: integer-valued inputs make the fp32 expansion exact, so the distance is exactly
    0; its gradient is 0 there (torch's cdist backward), never NaN or inf."""
    e = torch.randint(-2, 3, (9, 4), device=device).float()
    z = torch.cat([e[:5], torch.randint(-2, 3, (3, 4), device=device).float()]).requires_grad_()
    e.requires_grad_()
    out = fastvae.soft_assign(z, e, metric="euclidean", backend=backend)
    zr, er = (x.detach().double().requires_grad_() for x in (z, e))
    ref = peers(zr, er, 1.0, "euclidean")
    w = _weights(ref)
    gz, ge = torch.autograd.grad(_combine(out, w), (z, e))
    gzr, ger = torch.autograd.grad(_combine(ref, w), (zr, er))
    assert torch.isfinite(gz).all() and torch.isfinite(ge).all()
    _close(gz, gzr, 2e-5, 2e-5)
    _close(ge, ger, 2e-5, 2e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_channels_first_map_equals_channels_last(metric, backend, device):
    x = (torch.randn(2, 5, 3, 7, device=device) * 0.6).requires_grad_()
    e = (torch.randn(11, 5, device=device) * 0.6).requires_grad_()
    out = fastvae.soft_assign(x, e, metric=metric, dim=1, backend=backend)
    last = x.detach().permute(0, 2, 3, 1).contiguous().requires_grad_()
    ref = fastvae.soft_assign(last, e, metric=metric, backend=backend)
    assert out.quantized.shape == x.shape and out.quantized.is_contiguous()
    assert out.lse.shape == out.entropy.shape == (2, 3, 7)
    torch.testing.assert_close(out.quantized, ref.quantized.permute(0, 3, 1, 2))
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a, b)
    g = torch.randn_like(x)
    gx, ge = torch.autograd.grad((out.quantized * g).sum() + out.entropy.sum() + out.codebook_entropy, (x, e))
    gl, ger = torch.autograd.grad((ref.quantized * g.permute(0, 2, 3, 1)).sum() + ref.entropy.sum()
                                  + ref.codebook_entropy, (last, e))
    torch.testing.assert_close(gx, gl.permute(0, 3, 1, 2))
    torch.testing.assert_close(ge, ger)


def test_empty_input(backend, device):
    z = torch.randn(0, 3, 4, device=device, requires_grad=True)
    e = torch.randn(6, 4, device=device, requires_grad=True)
    out = fastvae.soft_assign(z, e, metric="euclidean", backend=backend)
    assert out.quantized.shape == (0, 3, 4) and out.lse.shape == out.entropy.shape == (0, 3)
    assert out.mean_probs.shape == (6,) and out.mean_probs.isnan().all() and out.codebook_entropy.isnan()
    gz, ge = torch.autograd.grad(out.quantized.sum() + out.lse.sum() + out.entropy.sum(), (z, e))
    assert gz.shape == z.shape and torch.equal(ge, torch.zeros_like(e))


def test_single_token_and_single_code(backend, device):
    z = torch.tensor([[0.5, -1.0]], device=device, requires_grad=True)
    e = torch.tensor([[2.0, 1.0]], device=device, requires_grad=True)
    out = fastvae.soft_assign(z, e, temperature=0.5, metric="sqeuclidean", backend=backend)
    # one code: p = 1, so quantized = e, H = 0, pbar = 1, lse = s = -2 ||z - e||^2 = -2 (2.25 + 4)
    torch.testing.assert_close(out.quantized, e.detach())
    torch.testing.assert_close(out.lse, torch.tensor([-12.5], device=device))
    assert out.entropy.abs().max() < 1e-6 and out.mean_probs.tolist() == [1.0]
    gz, = torch.autograd.grad(out.lse.sum(), z)  # d(-2 ||z - e||^2)/dz = -4 (z - e)
    torch.testing.assert_close(gz, -4.0 * (z - e).detach())


@pytest.mark.parametrize("metric", METRICS)
def test_second_order_gradients(metric, backend, device):
    dt = torch.float64 if backend == "torch" else torch.float32
    z = (torch.randn(7, 3, device=device, dtype=dt) * 0.6).requires_grad_()
    e = (torch.randn(5, 3, device=device, dtype=dt) * 0.6).requires_grad_()
    w = _weights(peers(z.detach().double(), e.detach().double(), 1.0, metric))

    def f(zz, ee):
        return _combine(fastvae.soft_assign(zz, ee, temperature=1.0, metric=metric, backend=backend), w)

    if dt == torch.float64:
        assert torch.autograd.gradgradcheck(f, (z, e))
    gz, ge = torch.autograd.grad(f(z, e), (z, e), create_graph=True)
    hz, he = torch.autograd.grad(gz.pow(2).sum() + ge.pow(2).sum(), (z, e))
    zr, er = (x.detach().double().requires_grad_() for x in (z, e))
    gzr, ger = torch.autograd.grad(_combine(peers(zr, er, 1.0, metric, True), w), (zr, er), create_graph=True)
    hzr, her = torch.autograd.grad(gzr.pow(2).sum() + ger.pow(2).sum(), (zr, er))
    _close(hz, hzr, 1e-4, 1e-4)
    _close(he, her, 1e-4, 1e-4)


def test_no_host_reads_and_deterministic(backend, device, no_host_reads):
    z = (torch.randn(70, 9, device=device) * 0.6).requires_grad_()
    e = (torch.randn(80, 9, device=device) * 0.6).requires_grad_()
    runs = []
    for _ in range(2):
        out = fastvae.soft_assign(z, e, metric="euclidean", backend=backend)
        loss = out.quantized.sum() + out.entropy.sum() - out.codebook_entropy
        runs.append(list(out) + list(torch.autograd.grad(loss, (z, e))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # fixed summation orders: bitwise the same


@pytest.mark.skipif(BACKEND != "triton", reason="the kernels' feature chunks")
@pytest.mark.parametrize("metric", METRICS)
def test_wide_codes_sweep_in_chunks(metric, backend, device):
    """D past the kernels' chunks: the logits accumulate over several BLOCK_D chunks and the D-wide outputs
    (quantized, both gradients) take one sweep over the codes (tokens) per BLOCK_V chunk."""
    from fastvae._triton import soft_assign as sa_triton

    d = 2 * sa_triton.BLOCK_V + 3  # three output chunks, the last one partial
    z, e = _inputs(20, 70, d, torch.float32, device, scale=0.15)
    out = fastvae.soft_assign(z, e, metric=metric, backend=backend)
    zr, er = (x.detach().double().requires_grad_() for x in (z, e))
    ref = peers(zr, er, 1.0, metric)
    for a, r in zip(out, ref):
        _close(a, r, 2e-5, 2e-5)
    w = _weights(ref)
    gz, ge = torch.autograd.grad(_combine(out, w), (z, e))
    gzr, ger = torch.autograd.grad(_combine(ref, w), (zr, er))
    _close(gz, gzr, 2e-5, 2e-5)
    _close(ge, ger, 2e-5, 2e-5)


@pytest.mark.skipif(BACKEND != "triton", reason="the kernels' launches")
def test_frozen_codebook_skips_the_code_pass(device):
    """A codebook without a gradient (an EMA codebook): z's gradient as before, and no code-tile backward."""
    from _launches import count_launches

    z, e = _inputs(30, 20, 6, torch.float32, device)
    frozen = e.detach()
    with count_launches() as counts:
        out = fastvae.soft_assign(z, frozen, metric="sqeuclidean", temperature=3.0, backend="triton")
        gz, = torch.autograd.grad(out.quantized.sum() - out.codebook_entropy, z)
    assert counts["soft_assign_bwd_dz_kernel"] == 1 and counts["soft_assign_bwd_de_kernel"] == 0
    zr = z.detach().double().requires_grad_()
    ref = peers(zr, frozen.double(), 1.0 / 3.0, "sqeuclidean")
    gzr, = torch.autograd.grad(ref[0].sum() - ref[4], zr)
    _close(gz, gzr, 2e-5, 2e-5)


@pytest.mark.skipif(BACKEND != "triton", reason="the custom op's registrations")
def test_custom_op_registrations(device):
    """Schema, fake (meta) implementation with the channels-first output strides, and autograd registration."""
    from fastvae._triton import soft_assign as sa_triton

    x = torch.randn(2, 5, 3, 4, device=device).movedim(1, -1).reshape(2, 12, 5).requires_grad_()
    e = torch.randn(7, 5, device=device, requires_grad=True)
    for metric in (0, 2):
        torch.library.opcheck(sa_triton._soft_assign_op, (x, e, 1.5, metric),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_memory_is_linear_in_tokens_and_codes(backend, device):
    """Forward and backward hold O(N D + K D + N + K) above the inputs on the kernels' path; the peers' eager
    formula holds several N x K buffers."""
    from _memory import cpu_peak_bytes

    if device.type != "cpu" or backend != "triton":
        pytest.skip("the kernels' CPU allocator events")
    n, k, d = 512, 512, 4
    z, e = _inputs(n, k, d, torch.float32, device)

    def ours():
        out = fastvae.soft_assign(z, e, metric="euclidean", backend=backend)
        (out.quantized.sum() + out.entropy.sum() - out.codebook_entropy).backward()

    def eager_peers():
        out = peers(z, e, 1.0, "euclidean")
        (out[0].sum() + out[2].sum() - out[4]).backward()

    nk = n * k * 4
    assert cpu_peak_bytes(eager_peers) >= 3 * nk
    # O(N D + K D) tensors and about ten of N or K floats (46 KB measured), a sixteenth of one N x K buffer
    peak = cpu_peak_bytes(ours)
    assert peak < 16 * (n + k) * (d + 1) * 4 and peak < nk // 16


def test_eager_path_chunks_the_tokens(monkeypatch):
    """The eager formula takes the tokens a chunk at a time: the same numbers as one chunk, and without
    autograd no N x K buffer (the chunk's logits at most)."""
    from _memory import cpu_peak_bytes

    from fastvae.reference import soft_assign as sa_ref

    n, k = 4000, 50
    z, e = torch.randn(n, 6) * 0.6, torch.randn(k, 6) * 0.6
    whole = sa_ref.soft_assign(z, e, 2.0, "euclidean", chunk=n)
    for a, b in zip(sa_ref.soft_assign(z, e, 2.0, "euclidean", chunk=64), whole):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(sa_ref, "CHUNK_ELEMENTS", 64 * k)

    def evaluate():
        with torch.no_grad():
            fastvae.soft_assign(z, e, metric="euclidean", backend="torch")

    assert cpu_peak_bytes(evaluate) < n * k * 4 // 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(metric="cosine"), ValueError, "metric"),
        (dict(dim=2), ValueError, "dim"),
        (dict(codebook=torch.randn(6)), ValueError, "codebook"),
        (dict(codebook=torch.randn(0, 6)), ValueError, "codebook"),
        (dict(z=torch.randn(4, 0), codebook=torch.randn(3, 0)), ValueError, "codebook"),
        (dict(codebook=torch.randn(3, 5)), ValueError, "codebook"),
        (dict(codebook=torch.ones(3, 6, dtype=torch.long)), TypeError, "codebook"),
        (dict(z=torch.ones(4, 6, dtype=torch.long)), TypeError, "z"),
        (dict(codebook=torch.randn(3, 6, device="meta")), ValueError, "codebook"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = dict(z=torch.randn(4, 6), codebook=torch.randn(3, 6))
    args.update(kwargs)
    z, codebook = args.pop("z"), args.pop("codebook")
    with pytest.raises(error, match=match):
        fastvae.soft_assign(z, codebook, **args)
