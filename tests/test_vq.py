"""Vector quantization against float64 transcriptions of the peers' formulas: taming-transformers'
VectorQuantizer2 (legacy and fixed), vector-quantize-pytorch's cosine search and rotation trick, vqtorch's and
DAC's weightings; indices, losses, gradients, ties, layouts, empty and single-token inputs, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND, DTYPES

import fastvae
from fastvae.functional.vq import _token_view

SHAPES = [(1, 1, 1), (37, 70, 5), (130, 129, 33), (65, 200, 80)]  # (N, K, D): no multiples of the tiles


def _brute_force(z: torch.Tensor, e: torch.Tensor, cosine: bool) -> torch.Tensor:
    """taming's search in float64: the expanded distances, torch.argmin (first index on ties)."""
    z, e = z.double(), e.double()
    if cosine:  # vector-quantize-pytorch's use_cosine_sim: l2norm both, argmax of the similarity
        return (F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).t()).argmax(-1)
    d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
    return d.argmin(-1)


def _distance(z, e, idx, cosine):
    z, e = z.double(), e.double()
    if cosine:
        return -(F.normalize(z, dim=-1) * F.normalize(e, dim=-1)[idx]).sum(-1)
    return (z - e[idx]).pow(2).sum(-1)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_search_matches_float64(dtype, shape, metric, backend, device):
    n, k, d = shape
    z = torch.randn(n, d, device=device).to(dtype)
    e = torch.randn(k, d, device=device).to(dtype)
    out = fastvae.vector_quantize(z, e, metric=metric, backend=backend)
    ref = _brute_force(z, e, metric == "cosine")
    assert out.indices.dtype == torch.int64 and out.indices.shape == (n,)
    if dtype in (torch.float64, torch.float32) and metric == "euclidean" and d < 8:
        torch.testing.assert_close(out.indices, ref, rtol=0, atol=0)
    # elsewhere a different index is allowed only at a near tie: within the rounding of the expanded form,
    # about D ulps of fp32 at the scale of ||z||^2 + ||e||^2 (the values are the same 16-bit numbers)
    got, best = _distance(z, e, out.indices, metric == "cosine"), _distance(z, e, ref, metric == "cosine")
    scale = z.double().pow(2).sum(-1) + e.double().pow(2).sum(-1).max() if metric == "euclidean" else 1.0
    assert (got - best <= 8 * d * 2**-23 * scale + 1e-12).all()
    assert (out.indices != ref).float().mean() <= 0.05


@pytest.mark.parametrize("heads", [2, 3])
def test_one_codebook_per_head(heads, backend, device):
    z = torch.randn(4, 5, 6 * heads, device=device)
    e = torch.randn(heads, 40, 6, device=device)
    out = fastvae.vector_quantize(z, e, backend=backend)
    assert out.indices.shape == (4, 5, heads)
    zh = z.reshape(20, heads, 6)
    for h in range(heads):
        torch.testing.assert_close(out.indices.reshape(20, heads)[:, h], _brute_force(zh[:, h], e[h], False))
    torch.testing.assert_close(out.quantized.reshape(20, heads, 6),
                               torch.stack([e[h][out.indices.reshape(20, heads)[:, h]] for h in range(heads)], 1))


def test_ties_go_to_the_lowest_index(backend, device):
    e = torch.randn(150, 4, device=device)
    e[140] = e[3]  # an exact duplicate, in another tile of 64 codes
    e[70] = e[3]
    z = torch.cat([e[3:4], e[3:4] + 1e-3, e[140:141]])
    out = fastvae.vector_quantize(z, e, backend=backend)
    assert out.indices.tolist() == [3, 3, 3]


def test_nan_token_gives_index_of_torch_argmin(backend, device):
    z = torch.randn(3, 4, device=device)
    z[1, 2] = float("nan")
    e = torch.randn(100, 4, device=device)
    out = fastvae.vector_quantize(z, e, backend=backend)
    assert out.indices[1] == _brute_force(z, e, False)[1] == 0
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_feature_maps_read_in_place(layout, backend, device):
    b, d, h, w = 2, 8, 3, 5
    x = torch.randn(b, d, h, w, device=device)
    e = torch.randn(33, d, device=device)
    if layout == "channels_first":
        z, dim = x, 1
    else:
        z, dim = x.permute(0, 2, 3, 1).contiguous(), -1
    view = _token_view(z.movedim(dim, -1), d)
    assert view.data_ptr() == z.data_ptr()  # the kernel reads the map where it lies
    out = fastvae.vector_quantize(z, e, dim=dim, backend=backend)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, d)
    ref = _brute_force(tokens, e, False)
    torch.testing.assert_close(out.indices.reshape(-1), ref)
    assert out.quantized.shape == z.shape and out.quantized.is_contiguous()
    torch.testing.assert_close(out.quantized.movedim(dim, -1).reshape(-1, d), e[ref])


def _taming(z, e, beta, legacy):
    """VectorQuantizer2.forward's loss and output in float64 (taming-transformers, diffusers' copy)."""
    idx = _brute_force(z, e, False)
    z_q = e[idx]
    if legacy:
        loss = torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
    else:
        loss = beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
    return z + (z_q - z).detach(), loss


@pytest.mark.parametrize("preset", ["taming_legacy", "taming", "vqtorch", "dac"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_and_gradients_match_the_peers(dtype, preset, backend, device):
    z0 = torch.randn(50, 6, device=device)
    e0 = torch.randn(30, 6, device=device)
    z, e = z0.to(dtype).requires_grad_(), e0.to(dtype).requires_grad_()
    out = fastvae.vector_quantize(z, e, preset=preset, backend=backend)
    w = torch.randn_like(out.quantized)
    (out.loss + (out.quantized * w).sum()).backward()

    zr, er = z.detach().double().requires_grad_(), e.detach().double().requires_grad_()
    if preset.startswith("taming"):
        q, loss = _taming(zr, er, 0.25, preset == "taming_legacy")
    else:  # vqtorch: (1 - beta) commitment + beta codebook, beta = .95; DAC: .25 commitment + 1.0 codebook
        cw, bw = (0.05, 0.95) if preset == "vqtorch" else (0.25, 1.0)
        zq = er[_brute_force(zr, er, False)]
        loss = cw * F.mse_loss(zr, zq.detach()) + bw * F.mse_loss(zq, zr.detach())
        q = zr + (zq - zr).detach()
    (loss + (q * w.double()).sum()).backward()
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}.get(dtype, (2e-2, 2e-2))
    torch.testing.assert_close(out.loss.double(), loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.quantized.double(), q, rtol=rtol, atol=atol)
    torch.testing.assert_close(z.grad.double(), zr.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(e.grad.double(), er.grad, rtol=rtol, atol=atol)


def _lucidrains_rotate_to(src, tgt):
    """vector-quantize-pytorch's rotate_to / efficient_rotation_trick_transform, transcribed."""
    safe_div = lambda num, den: num / den.clamp(min=1e-6)  # noqa: E731
    norm_src, norm_tgt = src.norm(dim=-1, keepdim=True), tgt.norm(dim=-1, keepdim=True)
    u, q, e = safe_div(src, norm_src), safe_div(tgt, norm_tgt), src
    e3 = e[:, None, :]
    w = F.normalize(u + q, dim=1).detach()
    rot = (e3 - 2 * (e3 @ w[:, :, None] @ w[:, None, :])
           + 2 * (e3 @ u[:, :, None].detach() @ q[:, None, :].detach())).squeeze(1)
    return rot * safe_div(norm_tgt, norm_src).detach()


def test_rotation_trick_matches_vector_quantize_pytorch(backend, device):
    z = torch.randn(40, 7, device=device, dtype=torch.float64 if backend == "torch" else torch.float32)
    e = torch.randn(25, 7, device=device, dtype=z.dtype)
    z.requires_grad_()
    out = fastvae.vector_quantize(z, e, estimator="rotation", backend=backend)
    g = torch.randn_like(out.quantized)
    (out.quantized * g).sum().backward()
    zr = z.detach().double().requires_grad_()
    q = _lucidrains_rotate_to(zr, e.double()[_brute_force(zr, e, False)])
    (q * g.double()).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-12) if z.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.quantized.double(), q.detach(), **tol)
    torch.testing.assert_close(out.quantized.double(), e.double()[out.indices], **tol)  # the value is z_q
    torch.testing.assert_close(z.grad.double(), zr.grad, **tol)
    assert not torch.allclose(z.grad, g)  # the gradient is rotated, not copied as straight-through does


def _oracle(z, e, idx, cosine, rotation, cw, bw):
    """The peers' VQ in float64 at given indices, tokens (N, H, Dh) and codebook (H, K, Dh): taming's
    straight-through and losses, vector-quantize-pytorch's cosine (unit tokens and codes, the losses between
    them) and its rotate_to."""
    if cosine:
        z, e = F.normalize(z, dim=-1), F.normalize(e, dim=-1)
    zq = torch.stack([e[h][idx[:, h]] for h in range(e.shape[0])], 1)
    loss = cw * torch.mean((zq.detach() - z) ** 2) + bw * torch.mean((zq - z.detach()) ** 2)
    if rotation:
        q = _lucidrains_rotate_to(z.reshape(-1, z.shape[-1]), zq.reshape(-1, z.shape[-1])).reshape(z.shape)
    else:
        q = z + (zq - z).detach()
    return q, loss


@pytest.mark.parametrize("layout", ["tokens", "channels_first", "heads"])
@pytest.mark.parametrize("estimator", ["straight_through", "rotation"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_values_and_gradients_match_float64(dtype, metric, estimator, layout, backend, device):
    """The kernel path's one pass (z_q, both losses) and its backward (z through the estimator, the losses and
    F.normalize for cosine; the codebook through its loss, summed per code) against float64."""
    heads, k, dh = (2, 70, 5) if layout == "heads" else (1, 70, 10)
    if layout == "channels_first":
        x, dim = torch.randn(3, dh, 7, 11, device=device), 1
    else:
        x, dim = torch.randn(131, heads * dh, device=device), -1
    e0 = torch.randn(heads, k, dh, device=device)
    z, e = x.to(dtype).requires_grad_(), (e0 if heads > 1 else e0[0]).to(dtype).requires_grad_()
    out = fastvae.vector_quantize(z, e, dim=dim, metric=metric, estimator=estimator, preset="dac", backend=backend)
    w = torch.randn_like(out.quantized)
    (out.loss + (out.quantized * w).sum()).backward()
    assert z.grad.dtype == z.dtype and z.grad.stride() == z.stride()
    assert out.quantized.stride() == z.stride()  # z_q comes back in z's layout, not copied from another

    zr = z.detach().double().movedim(dim, -1).reshape(-1, heads, dh).requires_grad_()
    er = e.detach().double().reshape(heads, k, dh).requires_grad_()
    idx = out.indices.reshape(-1, heads)
    q, loss = _oracle(zr, er, idx, metric == "cosine", estimator == "rotation", 0.25, 1.0)
    wr = w.double().movedim(dim, -1).reshape(q.shape)
    (loss + (q * wr).sum()).backward()
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5)}.get(dtype, (2e-2, 2e-2))
    torch.testing.assert_close(out.loss.double(), loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.quantized.double().movedim(dim, -1).reshape(q.shape), q, rtol=rtol, atol=atol)
    torch.testing.assert_close(z.grad.double().movedim(dim, -1).reshape(zr.shape), zr.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(e.grad.double().reshape(er.shape), er.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("estimator", ["straight_through", "rotation"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_gradient_penalty_matches_float64(metric, estimator, backend, device):
    """create_graph=True: the kernel path's backward gives way to the differentiable formula at the same
    indices, so a penalty on the gradient trains z and the codebook with torch's numbers."""
    z = torch.randn(40, 6, device=device, requires_grad=True)
    e = torch.randn(25, 6, device=device, requires_grad=True)
    w = torch.randn(40, 6, device=device)

    def penalty(z, e, **kw):
        out = fastvae.vector_quantize(z, e, metric=metric, estimator=estimator, **kw)
        (g,) = torch.autograd.grad(out.loss + (out.quantized * w.to(z.dtype)).sum(), z, create_graph=True)
        return g.pow(2).sum(), out.indices

    p, idx = penalty(z, e, backend=backend)
    p.backward()
    zr, er = z.detach().double().requires_grad_(), e.detach().double().requires_grad_()
    q, loss = _oracle(zr[:, None], er[None], idx[:, None], metric == "cosine", estimator == "rotation", 0.25, 1.0)
    (g,) = torch.autograd.grad(loss + (q[:, 0] * w.double()).sum(), zr, create_graph=True)
    g.pow(2).sum().backward()
    torch.testing.assert_close(z.grad.double(), zr.grad, rtol=1e-4, atol=1e-5)
    # every path from the codebook into dL/dz passes a stop-gradient (the commitment's sg(z_q), the
    # estimator's detached codes): the penalty does not reach it, in torch's graph nor here
    assert er.grad is None and (e.grad is None or not e.grad.any())


def test_empty_and_single_token(backend, device):
    e = torch.randn(9, 4, device=device)
    out = fastvae.vector_quantize(torch.randn(0, 4, device=device), e, backend=backend)
    assert out.indices.shape == (0,) and out.quantized.shape == (0, 4) and torch.isnan(out.loss)  # mean of none
    one = torch.randn(1, 4, device=device)
    assert fastvae.vector_quantize(one, e, backend=backend).indices.item() == _brute_force(one, e, False).item()


def test_codebook_usage_matches_the_one_hot_formula(device):
    idx = torch.randint(0, 20, (500,), device=device)
    idx[idx == 7] = 8  # an unused code
    usage = fastvae.codebook_usage(idx, 20)
    onehot = F.one_hot(idx, 20).double()
    p = onehot.mean(0)
    torch.testing.assert_close(usage.counts, onehot.sum(0).long())
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    torch.testing.assert_close(usage.perplexity.double(), ent.exp(), rtol=1e-6, atol=0)
    assert usage.active.item() == int((p > 0).sum())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(metric="l1"), ValueError, "metric"),
        (dict(estimator="gumbel"), ValueError, "estimator"),
        (dict(preset="mine"), ValueError, "preset"),
        (dict(dim=5), ValueError, "dim"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvae.vector_quantize(torch.randn(3, 4), torch.randn(5, 4), **kwargs)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="codebook"):
        fastvae.vector_quantize(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="codebook"):
        fastvae.vector_quantize(torch.randn(3, 4), torch.randn(0, 4))
    with pytest.raises(TypeError, match="z"):
        fastvae.vector_quantize(torch.ones(3, 4, dtype=torch.long), torch.randn(5, 4))
    with pytest.raises(TypeError, match="indices"):
        fastvae.codebook_usage(torch.rand(3), 4)
    with pytest.raises(ValueError, match="codebook_size"):
        fastvae.codebook_usage(torch.zeros(3, dtype=torch.long), 0)


@pytest.mark.skipif(BACKEND != "torch", reason="the eager path's compile test")
def test_compiles_without_graph_break():
    z, e = torch.randn(20, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True)
    fn = lambda z, e: fastvae.vector_quantize(z, e, estimator="rotation").loss  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(z, e), fn(z, e))


def _lucidrains_ema(z, idx, cluster_size, embed_avg, decay, eps):
    """vector-quantize-pytorch's EuclideanCodebook EMA step (one-hot form), float64."""
    onehot = F.one_hot(idx, cluster_size.shape[0]).double()
    cluster_size = cluster_size * decay + onehot.sum(0) * (1 - decay)
    embed_avg = embed_avg * decay + (onehot.t() @ z.double()) * (1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.numel() * eps) * total
    return embed_avg / smoothed[:, None], cluster_size, embed_avg


def test_ema_update_matches_vector_quantize_pytorch_over_steps(backend, device):
    k, d = 12, 5
    codebook = torch.randn(k, d, device=device)
    size, avg = torch.zeros(k, device=device), codebook.clone()
    ref = (codebook.double(), size.double(), avg.double())
    for _ in range(3):
        z = torch.randn(64, d, device=device)
        idx = fastvae.vector_quantize(z, codebook, backend=backend).indices
        out = fastvae.codebook_ema_update(z, idx, size, avg, decay=0.9)
        ref = _lucidrains_ema(z, idx, ref[1], ref[2], 0.9, 1e-5)
        codebook, size, avg = out.codebook, out.cluster_size, out.embed_sum
        torch.testing.assert_close(codebook.double(), ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(size.double(), ref[1], rtol=1e-6, atol=1e-6)
        assert not out.dead.any()


def test_ema_sums_are_in_a_fixed_order():
    z = torch.randn(5000, 3)
    idx = torch.randint(0, 7, (5000,))
    counts, sums = fastvae.reference.code_sums(z, idx, 9)
    again = fastvae.reference.code_sums(z, idx, 9)[1]
    assert torch.equal(sums, again)
    # ~700 fp32 terms a code: their rounding, against the float64 sums
    torch.testing.assert_close(sums.double(), torch.zeros(9, 3, dtype=torch.float64).index_add_(0, idx, z.double()),
                               rtol=1e-4, atol=1e-4)
    assert counts.tolist()[7:] == [0, 0]


def test_dead_codes_are_replaced_from_the_batch(device):
    k, d = 6, 4
    z = torch.randn(30, d, device=device)
    idx = torch.zeros(30, dtype=torch.long, device=device)  # every token on code 0: codes 1-5 starve
    g = torch.Generator(device=device).manual_seed(5)
    out = fastvae.codebook_ema_update(z, idx, torch.ones(k, device=device), torch.randn(k, d, device=device),
                                      decay=0.5, dead_threshold=0.6, generator=g)
    assert out.dead.tolist() == [False] + [True] * 5
    for row in out.codebook[1:]:  # each replacement is a token of the batch
        assert (row == z).all(1).any()
    assert torch.equal(out.cluster_size[1:], torch.full((5,), 0.6, device=device))
    torch.testing.assert_close(out.embed_sum[1:], out.codebook[1:] * 0.6)


def _rvq_reference(z, codebooks, cw, bw):
    """r_{s+1} = r_s - sg(q_s); output z + sg(sum q - z); per-stage losses summed; float64."""
    residual, total, idxs, commit, book = z, 0, [], 0, 0
    for cb in codebooks:
        idx = _brute_force(residual, cb, False)
        q = cb[idx]
        commit = commit + F.mse_loss(residual, q.detach())
        book = book + F.mse_loss(q, residual.detach())
        total = total + q
        residual = residual - q.detach()
        idxs.append(idx)
    return z + (total - z).detach(), torch.stack(idxs, -1), cw * commit + bw * book


@pytest.mark.parametrize("stages", [1, 3])
def test_residual_vq_matches_the_intended_detach(stages, backend, device):
    dtype = torch.float64 if backend == "torch" else torch.float32
    z = torch.randn(4, 6, 7, device=device, dtype=dtype).requires_grad_()
    cbs = (torch.randn(stages, 20, 7, device=device, dtype=dtype) / (1 + torch.arange(stages, device=device)
                                                                      )[:, None, None]).requires_grad_()
    out = fastvae.residual_vector_quantize(z, cbs, preset="dac", backend=backend)
    w = torch.randn_like(out.quantized)
    (out.loss + (out.quantized * w).sum()).backward()
    zr, cr = z.detach().double().reshape(-1, 7).requires_grad_(), cbs.detach().double().requires_grad_()
    q, idx, loss = _rvq_reference(zr, cr, 0.25, 1.0)
    (loss + (q * w.double().reshape(-1, 7)).sum()).backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(out.indices.reshape(-1, stages), idx)
    torch.testing.assert_close(out.loss.double(), loss, **tol)
    torch.testing.assert_close(out.quantized.double().reshape(-1, 7), q, **tol)
    torch.testing.assert_close(z.grad.double().reshape(-1, 7), zr.grad, **tol)
    torch.testing.assert_close(cbs.grad.double(), cr.grad, **tol)
    if stages > 1:  # the last stage's commitment reaches the encoder (EnCodec's and DAC's residual cuts it)
        zz = z.detach().requires_grad_()
        last = fastvae.residual_vector_quantize(zz, cbs.detach()[-1:].expand(2, -1, -1).contiguous(),
                                                commitment_weight=1.0, codebook_weight=0.0, backend=backend)
        assert torch.autograd.grad(last.commitment, zz)[0].abs().sum() > 0


def test_residual_vq_rejects_cosine():
    with pytest.raises(ValueError, match="metric"):
        fastvae.residual_vector_quantize(torch.randn(3, 4), torch.randn(2, 5, 4), metric="cosine")


def _lloyd(tokens, centres, iters):
    for _ in range(iters):
        idx = _brute_force(tokens, centres, False)
        new = torch.stack([tokens[idx == j].mean(0) if (idx == j).any() else centres[j]
                           for j in range(centres.shape[0])])
        centres = new
    return centres


def test_kmeans_is_lloyd_from_the_same_start(backend, device):
    centres = torch.tensor([[5.0, 0, 0], [-5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]], device=device)
    z = (centres[torch.arange(200, device=device) % 4] + 0.3 * torch.randn(200, 3, device=device))
    g = torch.Generator(device=device).manual_seed(11)
    start = z[torch.randperm(200, device=device, generator=torch.Generator(device=device).manual_seed(11))[:4]]
    got = fastvae.kmeans(z, 4, iters=5, generator=g, backend=backend)
    torch.testing.assert_close(got.double(), _lloyd(z.double(), start.double(), 5), rtol=1e-5, atol=1e-5)
    # Lloyd's steps never raise the objective (a start with two centres in one cluster stays a local minimum)
    inertia = lambda c: torch.cdist(z, c).min(1).values.pow(2).sum()  # noqa: E731
    assert inertia(got) <= inertia(start) + 1e-4


def test_kmeans_with_fewer_tokens_than_codes(device):
    z = torch.randn(3, 2, device=device)
    got = fastvae.kmeans(z, 8, iters=2)
    assert got.shape == (8, 2) and all((row == z).all(1).any() for row in got)
    with pytest.raises(ValueError, match="num_codes"):
        fastvae.kmeans(z, 0)
    with pytest.raises(ValueError, match="token"):
        fastvae.kmeans(torch.randn(0, 2), 2)


def test_search_memory_is_linear_in_tokens_and_codes(backend, device):
    """Search, losses and backward hold O(N D + K D) above the inputs on the kernels (one [64, 64] tile of
    distances at a time, on a GPU in registers) and O(4096 K) on the eager path (its token chunks); taming's
    VectorQuantizer2 and diffusers' copy hold the N x K distances, and vector-quantize-pytorch a one-hot too."""
    from _memory import cpu_peak_bytes

    if device.type != "cpu":
        pytest.skip("CPU allocator events")
    n, k, d = 2048, 1024, 4
    z = torch.randn(n, d, requires_grad=True)
    e = torch.randn(k, d, requires_grad=True)

    def ours():
        out = fastvae.vector_quantize(z, e, backend=backend)
        (out.loss + out.quantized.sum()).backward()

    def taming():
        zq, loss = _taming(z, e, 0.25, True)
        (loss + zq.sum()).backward()

    nk = n * k * 4  # one fp32 N x K buffer: 8 MiB here
    peak = cpu_peak_bytes(ours)
    assert cpu_peak_bytes(taming) >= nk
    if backend == "triton":
        assert peak < 40 * n * d * 4 + 8 * k * d * 4, peak  # a few (N, D) terms and their gradients
    else:
        assert peak < 3 * min(n, 4096) * k * 4 + 40 * n * d * 4, peak  # a chunk's scores and temporaries


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_no_host_reads(metric, backend, device, no_host_reads):
    """A training step's VQ, residual VQ and EMA update, forward and backward: nothing read on the host (a
    sync per step on a GPU), and the codebook's gradient bitwise the same on a second run (its per-code sums
    run in a fixed order)."""
    z = torch.randn(3, 8, 5, 4, device=device, requires_grad=True)
    e = torch.randn(40, 8, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        out = fastvae.vector_quantize(z, e, dim=1, metric=metric, estimator="rotation", backend=backend)
        grads.append(torch.autograd.grad(out.loss + out.quantized.square().sum(), [z, e]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    if metric == "euclidean":
        rvq = fastvae.residual_vector_quantize(z, torch.stack([e, e / 2]), dim=1, backend=backend)
        torch.autograd.grad(rvq.loss + rvq.quantized.sum(), [z, e])
        fastvae.codebook_ema_update(z, out.indices, torch.ones(40, device=device), e.detach().clone(), dim=1)


@pytest.mark.skipif(BACKEND != "triton", reason="the custom op's registrations")
@pytest.mark.parametrize("layout", ["channels_first", "strided"])
def test_custom_op_registrations(layout, device):
    """Schema, fake implementation (the real op's output strides: z's layout when z is dense, contiguous when
    it is a strided slice) and autograd registration of the fused op, every estimator mode."""
    from fastvae._triton import vq as vq_triton

    x = torch.randn(4, 6, 3, 5, device=device)
    x = x[::2] if layout == "strided" else x
    z3 = _token_view(x.movedim(1, -1), 6).requires_grad_()
    e = torch.randn(1, 9, 6, device=device, requires_grad=True)
    for cosine, estimator in ((False, 0), (True, 1), (False, 2)):
        torch.library.opcheck(vq_triton._vq_quantize_op, (z3, e, cosine, estimator),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_rotation_stays_bounded_where_the_token_opposes_its_code(metric, backend, device):
    """A token within a hair of -z_q: u + q is rounding noise, and |z . w| <= |z| must hold of the w built from
    it (the expanded |u + q|^2 cancels to 0 there and made the output and gradient ~1e12). The output's norm
    is at most 5 |z_q| and the gradient's 5 |z_q| / |z| |g| (s (I - 2 w w^T + 2 q u^T) with unit u, q, w)."""
    e = torch.tensor([[0.3, -0.7, 0.2, 0.5]], device=device)
    z = torch.stack([-3 * e[0] + torch.tensor([1e-4, 0, 0, 0], device=device),
                     -1.7 * e[0] + torch.tensor([0, 3e-4, 0, 0], device=device)]).requires_grad_()
    out = fastvae.vector_quantize(z, e, metric=metric, estimator="rotation", commitment_weight=0.0,
                                  codebook_weight=0.0, backend=backend)
    g = torch.randn_like(out.quantized)
    (gz,) = torch.autograd.grad((out.quantized * g).sum(), z)
    zq = F.normalize(e, dim=-1) if metric == "cosine" else e
    assert torch.isfinite(out.quantized).all() and torch.isfinite(gz).all()
    assert (out.quantized.norm(dim=-1) <= 5 * zq.norm() * (1 + 1e-5)).all()
    scale = zq.norm() / (F.normalize(z, dim=-1) if metric == "cosine" else z).norm(dim=-1)
    # cosine: F.normalize's Jacobian (1 / |z|) follows the rotation's
    jac = 1 / z.norm(dim=-1) if metric == "cosine" else 1.0
    assert (gz.norm(dim=-1) <= 5 * scale * jac * g.norm(dim=-1) * (1 + 1e-4)).all()
