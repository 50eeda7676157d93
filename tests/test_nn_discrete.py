"""fastvae.nn's discrete latents against float64 transcriptions of the peers' forwards: vector-quantize-pytorch's
VectorQuantize (learnable codebook, straight-through; its EMA codebook over steps), ResidualVQ, LFQ and FSQ,
taming-transformers' GumbelQuantize with the same noise; k-means initialization once; state_dict round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _oracle import peers_fsq
from conftest import BACKEND

import fastvae
from fastvae import nn as fnn

DTYPES = [torch.float32] + ([torch.float64] if BACKEND == "torch" else [])
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10)}
# (leading shape, accept_image_fmap, heads, separate_codebook_per_head)
VQ_CASES = [((3, 7), False, 1, False), ((2, 3, 3), True, 1, False), ((2, 5), False, 2, True),
            ((2, 5), False, 2, False)]


def _nearest(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """vector-quantize-pytorch's search: argmax of -cdist (ties to the first), float64."""
    return (-torch.cdist(z.double(), e.double())).argmax(-1)


def _lucidrains_vq(x, embed, heads, separate, cw):
    """vector-quantize-pytorch VectorQuantize.forward in training mode with learnable_codebook=True,
    ema_update=False, rotation_trick=False (straight-through), float64, on features-last x: (quantize,
    indices, loss)."""
    lead, d = x.shape[:-1], x.shape[-1]
    dh = d // heads
    xh = x.reshape(-1, heads, dh)
    codes = []
    for h in range(heads):
        e = embed[h] if separate else embed[0]
        codes.append(_nearest(xh[:, h], e))
    ind = torch.stack(codes, -1)  # (N, heads)
    q = torch.stack([(embed[h] if separate else embed[0])[ind[:, h]] for h in range(heads)], 1).reshape(x.shape)
    loss = cw * F.mse_loss(q, x)  # commit_quantize not detached: learnable codebook
    q = x + (q - x).detach()
    ind = ind.reshape(*lead, heads) if heads > 1 else ind.reshape(lead)
    return q, ind, loss


@pytest.mark.parametrize("lead, fmap, heads, separate", VQ_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_quantize_matches_vector_quantize_pytorch(dtype, lead, fmap, heads, separate, backend, device):
    d = 6
    vq = fnn.VectorQuantize(d, 11, heads=heads, separate_codebook_per_head=separate, ema_update=False,
                            rotation_trick=False, accept_image_fmap=fmap, commitment_weight=0.7,
                            backend=backend).to(device, dtype)
    assert isinstance(vq._codebook.embed, torch.nn.Parameter)
    x = (torch.randn(lead[0], d, *lead[1:]) if fmap else torch.randn(*lead, d)).to(device, dtype)
    x.requires_grad_(True)
    quantized, indices, loss = vq(x)

    xr = x.detach().double().requires_grad_(True)
    er = vq._codebook.embed.detach().double().requires_grad_(True)
    xs = xr.permute(0, 2, 3, 1).reshape(lead[0], -1, d) if fmap else xr
    q_ref, ind_ref, loss_ref = _lucidrains_vq(xs, er, heads, separate, 0.7)
    if fmap:
        q_ref = q_ref.reshape(lead[0], *lead[1:], d).permute(0, 3, 1, 2)
        ind_ref = ind_ref.reshape(lead[0], *lead[1:])
    assert indices.dtype == torch.int64 and quantized.shape == x.shape and loss.shape == ()
    assert torch.equal(indices, ind_ref)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(quantized.double(), q_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=rtol, atol=atol)
    w = torch.randn(x.shape, dtype=torch.float64, device=device)
    gx, ge = torch.autograd.grad((quantized.double() * w).sum() + loss, (x, vq._codebook.embed))
    gxr, ger = torch.autograd.grad((q_ref * w).sum() + loss_ref, (xr, er))
    torch.testing.assert_close(gx.double(), gxr, rtol=rtol, atol=atol)
    torch.testing.assert_close(ge.double(), ger, rtol=rtol, atol=atol)


def _lucidrains_ema_step(x, state, decay, eps, cw):
    """One training forward of vector-quantize-pytorch's EuclideanCodebook with ema_update=True, float64:
    quantize with the codebook before the step, then the EMA of the counts and sums, then the smoothed
    codebook. state = (embed, cluster_size, embed_avg)."""
    embed, cluster_size, embed_avg = state
    x = x.double().reshape(-1, embed.shape[-1])
    ind = _nearest(x, embed)
    q = embed[ind]
    loss = cw * F.mse_loss(q, x)  # commit_quantize detached: the gradient goes to x only
    onehot = F.one_hot(ind, embed.shape[0]).double()
    cluster_size = cluster_size * decay + onehot.sum(0) * (1 - decay)
    embed_avg = embed_avg * decay + onehot.t() @ x * (1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.numel() * eps) * total
    return (embed_avg / smoothed[:, None], cluster_size, embed_avg), ind, q, loss


@pytest.mark.parametrize("decay", [0.8, 0.99])
def test_ema_codebook_over_three_steps_matches_vector_quantize_pytorch(decay, backend, device):
    vq = fnn.VectorQuantize(5, 9, decay=decay, rotation_trick=False, commitment_weight=0.5,
                            backend=backend).to(device)
    assert not isinstance(vq._codebook.embed, torch.nn.Parameter)
    cb = vq._codebook
    state = (cb.embed[0].double().clone(), cb.cluster_size[0].double().clone(), cb.embed_avg[0].double().clone())
    for _ in range(3):
        x = torch.randn(4, 16, 5, device=device, requires_grad=True)
        quantized, indices, loss = vq(x)
        state, ind, q, loss_ref = _lucidrains_ema_step(x.detach(), state, decay, 1e-5, 0.5)
        assert torch.equal(indices.reshape(-1), ind)
        torch.testing.assert_close(quantized.detach().double().reshape(-1, 5), q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
        for ours, ref in zip((cb.embed[0], cb.cluster_size[0], cb.embed_avg[0]), state):
            torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
        (gx,) = torch.autograd.grad(loss, x)
        torch.testing.assert_close(gx.double(), 0.5 * 2 * (x.detach().double() - q.reshape(x.shape)) / x.numel(),
                                   rtol=1e-5, atol=1e-7)
    # eval: a loss, but the codebook stays
    before = cb.embed.clone()
    vq.eval()
    vq(torch.randn(4, 16, 5, device=device))
    assert torch.equal(cb.embed, before)


def test_kmeans_init_runs_once_and_survives_a_state_dict(monkeypatch, backend, device):
    calls = []
    real = fastvae.functional.kmeans

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastvae.functional, "kmeans", counting)
    vq = fnn.VectorQuantize(4, 8, kmeans_init=True, kmeans_iters=3, backend=backend).to(device)
    assert vq._codebook.initted.item() == 0 and (vq._codebook.embed == 0).all()
    vq.eval()
    vq(torch.randn(2, 10, 4, device=device))
    assert not calls  # eval mode never initializes
    vq.train()
    x = torch.randn(2, 40, 4, device=device)
    vq(x)
    assert len(calls) == 1 and vq._codebook.initted.item() == 1
    # the centres are k-means centres of the first batch, the counts their tokens (before the EMA step)
    for _ in range(2):
        vq(torch.randn(2, 40, 4, device=device))
    assert len(calls) == 1
    assert vq._codebook.cluster_size.sum() > 0
    fresh = fnn.VectorQuantize(4, 8, kmeans_init=True, backend=backend).to(device)
    fresh.load_state_dict(vq.state_dict())
    vq.eval(), fresh.eval()
    y = torch.randn(3, 6, 4, device=device)
    for a, b in zip(vq(y), fresh(y)):
        assert torch.equal(a, b)
    fresh.train()
    fresh(torch.randn(2, 10, 4, device=device))
    assert len(calls) == 1  # the loaded flag holds


def test_kmeans_init_is_the_first_batch_kmeans(backend, device):
    gen = torch.Generator(device).manual_seed(3)
    vq = fnn.VectorQuantize(3, 5, kmeans_init=True, kmeans_iters=4, generator=gen, decay=1.0,
                            backend=backend).to(device)
    x = torch.randn(60, 3, device=device)
    vq(x)
    expected = fastvae.kmeans(x, 5, iters=4, generator=torch.Generator(device).manual_seed(3), backend=backend)
    counts = torch.bincount(fastvae.vector_quantize(x, expected, backend=backend).indices, minlength=5).float()
    # decay 1: the EMA step leaves the statistics as initialized; the codebook is their (smoothed) ratio
    torch.testing.assert_close(vq._codebook.cluster_size[0], counts)
    torch.testing.assert_close(vq._codebook.embed_avg[0], expected * counts[:, None])


@pytest.mark.parametrize("kind", ["vq_learnable", "vq_ema", "rvq", "lfq", "fsq", "gumbel"])
def test_state_dict_round_trip(kind, backend, device):
    build = {
        "vq_learnable": lambda: fnn.VectorQuantize(6, 10, codebook_dim=4, ema_update=False, backend=backend),
        "vq_ema": lambda: fnn.VectorQuantize(6, 10, heads=2, separate_codebook_per_head=True, backend=backend),
        "rvq": lambda: fnn.ResidualVQ(dim=6, num_quantizers=3, codebook_size=10, backend=backend),
        "lfq": lambda: fnn.LFQ(dim=6, codebook_size=16, backend=backend),
        "fsq": lambda: fnn.FSQ([5, 4, 3], dim=6, backend=backend),
        "gumbel": lambda: fnn.GumbelQuantize(6, 3, 10, backend=backend),
    }[kind]
    a = build().to(device)
    x = torch.randn(2, 6, 3, 3, device=device) if kind == "gumbel" else torch.randn(2, 5, 6, device=device)
    a(x)  # one training step: EMA statistics move
    b = build().to(device)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    a.eval(), b.eval()
    y = torch.randn_like(x)
    gen = (lambda: {"generator": torch.Generator(device).manual_seed(0)}) if kind == "gumbel" else dict
    outs_a, outs_b = a(y, **gen()), b(y, **gen())
    for oa, ob in zip(outs_a, outs_b):
        if isinstance(oa, torch.Tensor):
            assert torch.equal(oa, ob)


def test_lucidrains_state_dict_keys():
    """The codebook state under vector-quantize-pytorch's keys and shapes (its checkpoints load)."""
    vq = fnn.VectorQuantize(8, 16)
    assert {k: tuple(v.shape) for k, v in vq.state_dict().items()} == {
        "_codebook.embed": (1, 16, 8), "_codebook.cluster_size": (1, 16), "_codebook.embed_avg": (1, 16, 8),
        "_codebook.initted": (1,)}


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_vq_matches_the_greedy_residual_search(dtype, stages, backend, device):
    rvq = fnn.ResidualVQ(dim=4, num_quantizers=stages, codebook_size=7, ema_update=False, rotation_trick=False,
                         backend=backend).to(device, dtype)
    x = torch.randn(3, 5, 4, device=device, dtype=dtype, requires_grad=True)
    quantized, indices, loss = rvq(x)
    assert indices.shape == (3, 5, stages) and loss.shape == ()
    e = rvq.codebooks.detach().double().requires_grad_(True)
    r = x.detach().double().reshape(-1, 4)
    total, loss_ref = 0, 0
    for s in range(stages):
        ind = _nearest(r, e[s])
        assert torch.equal(indices.reshape(-1, stages)[:, s], ind)
        q = e[s][ind]
        loss_ref = loss_ref + F.mse_loss(q, r)  # learnable: the gradient to both sides, per stage
        total = total + q
        r = r - q.detach()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(quantized.double().reshape(-1, 4), total, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=rtol, atol=atol)
    (ge,) = torch.autograd.grad(loss, rvq.codebooks)
    (ger,) = torch.autograd.grad(loss_ref, e)
    torch.testing.assert_close(ge.double(), ger, rtol=rtol, atol=atol)
    (gx,) = torch.autograd.grad(quantized.sum(), x)
    assert torch.equal(gx, torch.ones_like(x))  # straight-through once over the stack


def test_residual_vq_ema_trains_each_stage_on_its_residuals(backend, device):
    rvq = fnn.ResidualVQ(dim=3, num_quantizers=2, codebook_size=5, decay=0.5, backend=backend).to(device)
    e0 = rvq.codebooks.detach().double().clone()
    size, avg = rvq._codebook.cluster_size.double().clone(), rvq._codebook.embed_avg.double().clone()
    x = torch.randn(30, 3, device=device)
    rvq(x)
    r = x.double()
    for s in range(2):
        ind = _nearest(r, e0[s])
        (embed, _, _), _, q, _ = _lucidrains_ema_step(r, (e0[s], size[s], avg[s]), 0.5, 1e-5, 1.0)
        torch.testing.assert_close(rvq.codebooks[s].double(), embed, rtol=1e-5, atol=1e-5)
        r = r - e0[s][ind]


def _lucidrains_lfq(x, num_codebooks, entropy_w, commit_w, gamma, tau, msb):
    """vector-quantize-pytorch LFQ.forward in training mode, float64, its entropy by enumerating the codes
    without the 1e-5 clamp: (quantized, indices, aux_loss)."""
    x = x.double()
    lead = x.shape[:-1]
    x = x.reshape(*lead, num_codebooks, -1)
    d = x.shape[-1]
    q = torch.where(x > 0, 1.0, -1.0).double()
    weights = 2 ** (torch.arange(d - 1, -1, -1) if msb else torch.arange(d))
    indices = ((x > 0).long() * weights.to(x.device)).sum(-1)
    bits = ((torch.arange(2**d)[:, None] >> torch.arange(d - 1, -1, -1)) & 1).to(x.device)
    codebook = bits.double() * 2 - 1
    logits = 2 * tau * x.reshape(-1, d) @ codebook.t()
    prob = logits.softmax(-1)
    per_sample = -(prob * prob.clamp_min(1e-300).log()).sum(-1).mean()
    avg = prob.mean(0)
    codebook_entropy = -(avg * avg.clamp_min(1e-300).log()).sum()
    commit = F.mse_loss(x, q.detach())
    aux = (per_sample - gamma * codebook_entropy) * entropy_w + commit * commit_w
    quantized = x + (q - x).detach()
    return quantized.reshape(*lead, -1), indices, aux


@pytest.mark.parametrize("num_codebooks, msb", [(1, False), (1, True), (2, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lfq_matches_vector_quantize_pytorch(dtype, num_codebooks, msb, backend, device):
    lfq = fnn.LFQ(codebook_size=16, num_codebooks=num_codebooks, entropy_loss_weight=0.3, diversity_gamma=0.7,
                  inv_temperature=2.0, index_order="msb" if msb else "lsb", backend=backend)
    x = torch.randn(3, 5, 4 * num_codebooks, device=device, dtype=dtype, requires_grad=True)
    quantized, indices, aux = lfq(x)
    xr = x.detach().double().requires_grad_(True)
    q_ref, ind_ref, aux_ref = _lucidrains_lfq(xr, num_codebooks, 0.3, 0.25, 0.7, 2.0, msb)
    if num_codebooks == 1:
        ind_ref = ind_ref[..., 0]
    assert torch.equal(indices, ind_ref)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(quantized.double(), q_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(aux.double(), aux_ref, rtol=rtol, atol=atol)
    (g,) = torch.autograd.grad(aux, x)
    (gr,) = torch.autograd.grad(aux_ref, xr)
    torch.testing.assert_close(g.double(), gr, rtol=max(rtol, 1e-4), atol=max(atol, 1e-6))
    assert lfq.last.codebook_entropy.shape == ()


def test_lfq_channel_first_images(backend, device):
    lfq = fnn.LFQ(codebook_size=8, backend=backend)
    x = torch.randn(2, 3, 4, 4, device=device)
    quantized, indices, _ = lfq(x)
    flat = fnn.LFQ(codebook_size=8, channel_first=False, backend=backend)(x.movedim(1, -1))
    assert quantized.shape == x.shape and indices.shape == (2, 4, 4)
    assert torch.equal(quantized, flat[0].movedim(-1, 1)) and torch.equal(indices, flat[1])


@pytest.mark.parametrize("image", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fsq_matches_vector_quantize_pytorch(dtype, image, backend, device):
    levels = [8, 5, 5, 3]
    fsq = fnn.FSQ(levels, backend=backend)
    x = (torch.randn(2, 4, 3, 3) if image else torch.randn(3, 5, 4)).mul(2).to(device, dtype).requires_grad_(True)
    quantized, indices = fsq(x)
    xr = x.detach().double().requires_grad_(True)
    codes, ind_ref = peers_fsq(xr.movedim(1, -1) if image else xr, levels)
    if image:
        codes = codes.movedim(-1, 1)
    assert torch.equal(indices, ind_ref)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(quantized.double(), codes, rtol=rtol, atol=atol)
    w = torch.randn(x.shape, dtype=torch.float64, device=device)
    (g,) = torch.autograd.grad((quantized.double() * w).sum(), x)
    (gr,) = torch.autograd.grad((codes * w).sum(), xr)
    torch.testing.assert_close(g.double(), gr, rtol=rtol, atol=atol)


def _taming_gumbel(module, z, temp, hard):
    """taming-transformers' GumbelQuantize.forward (use_vqinterface), its formula, the global generator."""
    logits = module.proj(z)
    soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=hard)
    z_q = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, module.embed.weight)
    qy = F.softmax(logits, dim=1)
    diff = module.kl_weight * torch.sum(qy * torch.log(qy * module.n_embed + 1e-10), dim=1).mean()
    return z_q, diff, (None, None, soft_one_hot.argmax(dim=1))


@pytest.mark.torch_only
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gumbel_quantize_matches_taming(dtype, training, device):
    """Eager path, the same seed: taming's noise, so taming's numbers (its 1e-10 inside the log aside)."""
    gq = fnn.GumbelQuantize(5, 3, 12, kl_weight=0.3, temp_init=0.7, backend="torch").to(device, dtype)
    gq.train(training)
    z = torch.randn(2, 5, 3, 4, device=device, dtype=dtype, requires_grad=True)
    torch.manual_seed(11)
    z_q, diff, (_, _, ind) = gq(z)
    torch.manual_seed(11)
    z_q_ref, diff_ref, (_, _, ind_ref) = _taming_gumbel(gq, z, 0.7, True)
    assert torch.equal(ind, ind_ref) and ind.shape == (2, 3, 4)
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (1e-12, 1e-9)  # the 1e-10 in taming's log
    torch.testing.assert_close(z_q, z_q_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(diff, diff_ref, rtol=rtol, atol=atol)
    w = torch.randn_like(z_q)
    params = (z, gq.proj.weight, gq.embed.weight)
    grads = torch.autograd.grad((z_q * w).sum() + diff, params)
    grads_ref = torch.autograd.grad((z_q_ref * w).sum() + diff_ref, params)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=rtol, atol=atol)


def test_gumbel_quantize_soft_and_interfaces(backend, device):
    gq = fnn.GumbelQuantize(4, 2, 6, straight_through=False, use_vqinterface=False, backend=backend).to(device)
    z = torch.randn(2, 4, 3, 3, device=device)
    gen = torch.Generator(device).manual_seed(0)
    z_q, diff, ind = gq(z, generator=gen)
    logits = gq.proj(z)
    y, kl = fastvae.gumbel_softmax_kl(logits, dim=1, reduction="mean",
                                      generator=torch.Generator(device).manual_seed(0), backend=backend)
    assert not ((y == 0) | (y == 1)).all()  # soft in training without straight_through
    torch.testing.assert_close(z_q, torch.einsum("bnhw,nd->bdhw", y, gq.embed.weight))
    torch.testing.assert_close(diff, gq.kl_weight * kl)
    assert torch.equal(ind, y.argmax(1))
    # taming's diff is the mean over positions: "batchmean" is H W times it
    _, kl_bm = fastvae.gumbel_softmax_kl(logits, dim=1, reduction="batchmean", backend=backend)
    torch.testing.assert_close(kl_bm, kl * 9)
    gq.use_vqinterface = True
    out = gq(z, return_logits=True)
    assert len(out) == 4 and out[2][:2] == (None, None) and torch.equal(out[3], logits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exclude each other"):
        fnn.VectorQuantize(4, 8, ema_update=True, learnable_codebook=True)
    with pytest.raises(ValueError, match="power of 2"):
        fnn.LFQ(codebook_size=12)
    with pytest.raises(ValueError, match="index_order"):
        fnn.LFQ(codebook_size=8, index_order="big")
    with pytest.raises(ValueError, match="backend must be"):
        fnn.FSQ([3, 3], backend="cuda")
    assert math.prod(fnn.FSQ([8, 5, 5, 5]).levels) == fnn.FSQ([8, 5, 5, 5]).codebook_size == 1000


def test_rotation_trick_is_the_default_and_the_functions(backend, device):
    """The default estimator is the rotation trick (vector-quantize-pytorch's): the module's output and
    gradient are ``fastvae.vector_quantize(estimator="rotation")``'s on the same codebook."""
    vq = fnn.VectorQuantize(4, 9, ema_update=False, backend=backend).to(device)
    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    quantized, indices, _ = vq(x)
    ref = fastvae.vector_quantize(x, vq.codebook, estimator="rotation", backend=backend)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(quantized, ref.quantized)
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((quantized * w).sum(), x)
    (gr,) = torch.autograd.grad((ref.quantized * w).sum(), x)
    torch.testing.assert_close(g, gr)
    assert not torch.allclose(g, w)  # rotated, not copied


def test_cosine_ema_codebook_stays_on_the_sphere(backend, device):
    """use_cosine_sim: vector-quantize-pytorch's CosineSimCodebook EMA, the smoothed mean of the unit tokens
    l2-normalized."""
    vq = fnn.VectorQuantize(3, 6, use_cosine_sim=True, decay=0.5, rotation_trick=False, backend=backend).to(device)
    cb = vq._codebook
    torch.testing.assert_close(cb.embed.norm(dim=-1), torch.ones(1, 6, device=device))
    state = (cb.embed[0].double().clone(), cb.cluster_size[0].double().clone(), cb.embed_avg[0].double().clone())
    x = torch.randn(40, 3, device=device)
    quantized, indices, _ = vq(x)
    u = F.normalize(x.double(), dim=-1)
    ind = (u @ state[0].t()).argmax(-1)
    assert torch.equal(indices, ind)
    torch.testing.assert_close(quantized.double(), state[0][ind], rtol=1e-5, atol=1e-5)  # unit codes
    (embed, _, _), _, _, _ = _lucidrains_ema_step(u, (state[0], state[1], state[2]), 0.5, 1e-5, 1.0)
    torch.testing.assert_close(cb.embed[0].double(), F.normalize(embed, dim=-1), rtol=1e-5, atol=1e-5)


def test_dead_codes_take_batch_tokens(backend, device):
    vq = fnn.VectorQuantize(2, 5, decay=0.0, threshold_ema_dead_code=1.0, rotation_trick=False,
                            generator=torch.Generator(device).manual_seed(0), backend=backend).to(device)
    x = torch.randn(30, 2, device=device) + 10.0  # far from every initial code: one code takes every token
    vq(x)
    codes = vq._codebook.embed[0]
    # four dead codes replaced by tokens of the batch, their counts reset to the threshold
    is_token = (codes[:, None, :] == x[None]).all(-1).any(-1)
    assert is_token.sum() >= 4
    assert (vq._codebook.cluster_size[0] >= 1.0).all()


@pytest.mark.slow  # two processes to start: seconds of imports
@pytest.mark.torch_only  # the eager path by construction: once is enough
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_codebook_is_synced_over_processes(tmp_path):
    """Two gloo processes with different batches: the k-means initialization is rank 0's, the EMA statistics
    are all-reduced, so both ranks hold the same codebook, and it is the one a single process gets from the
    two batches together."""
    import torch.multiprocessing as mp
    from _vq_dist import ddp_worker

    mp.spawn(ddp_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # the same two steps in one process, the ranks' batches side by side, from rank 0's k-means start
    torch.manual_seed(0)
    vq = fnn.VectorQuantize(3, 7, decay=0.7, kmeans_init=True, kmeans_iters=2, rotation_trick=False,
                            generator=torch.Generator().manual_seed(0), backend="torch")
    first = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    embed = fastvae.kmeans(first, 7, iters=2, generator=torch.Generator().manual_seed(0))
    both = [torch.cat([torch.randn(20, 3, generator=torch.Generator().manual_seed(100 * s + r)) for r in range(2)])
            for s in range(2)]
    counts = torch.bincount(fastvae.vector_quantize(both[0], embed).indices, minlength=7).float()
    vq._codebook.set_initialized(embed[None], counts[None])
    for batch in both:
        vq(batch)
    torch.testing.assert_close(r0["_codebook.embed"], vq._codebook.embed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["_codebook.cluster_size"], vq._codebook.cluster_size, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vq", "vq_heads_fmap", "vq_shared_heads_project", "rvq", "lfq", "lfq_msb_image",
                                  "fsq", "fsq_image_codebooks"])
def test_codes_from_indices_are_forwards_output(kind, backend, device):
    """get_output_from_indices / indices_to_codes (vector-quantize-pytorch's names) give back what forward
    returned for those indices: the decoding side of a prior over the codes."""
    build, shape = {
        "vq": (lambda: fnn.VectorQuantize(4, 9, backend=backend), (2, 5, 4)),
        "vq_heads_fmap": (lambda: fnn.VectorQuantize(4, 9, heads=2, separate_codebook_per_head=True,
                                                     accept_image_fmap=True, backend=backend), (2, 4, 3, 3)),
        "vq_shared_heads_project": (lambda: fnn.VectorQuantize(6, 9, heads=2, codebook_dim=2, backend=backend),
                                    (2, 5, 6)),
        "rvq": (lambda: fnn.ResidualVQ(dim=4, num_quantizers=3, codebook_size=9, backend=backend), (2, 5, 4)),
        "lfq": (lambda: fnn.LFQ(codebook_size=16, backend=backend), (2, 5, 4)),
        "lfq_msb_image": (lambda: fnn.LFQ(codebook_size=8, index_order="msb", num_codebooks=2, backend=backend),
                          (2, 6, 3, 3)),
        "fsq": (lambda: fnn.FSQ([8, 5, 3], backend=backend), (2, 5, 3)),
        "fsq_image_codebooks": (lambda: fnn.FSQ([4, 3], num_codebooks=2, backend=backend), (2, 4, 3, 3)),
    }[kind]
    module = build().to(device).eval()
    x = torch.randn(shape, device=device) * 2
    quantized, indices = module(x)[:2]
    decode = module.get_output_from_indices if hasattr(module, "get_output_from_indices") else \
        module.indices_to_codes
    torch.testing.assert_close(decode(indices), quantized, rtol=1e-5, atol=1e-5)
