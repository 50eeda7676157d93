"""Thin ``torch.nn`` modules over ``fastvae.functional``.

Every module's ``backend`` is the functions' own: None (the default) follows the global setting
(``fastvae.set_backend`` / ``use_backend`` / FASTVAE_BACKEND) at each call, "torch" or "triton" pins the module.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as torch_F
from torch import Tensor

from . import functional as F
from ._checks import _check_backend, check_reduction

__all__ = [
    "GaussianNLLLoss",
    "GaussianKL",
    "Reparameterize",
    "ELBOLoss",
    "ELBOOutput",
    "BCEWithLogitsLoss",
    "PoissonNLLLoss",
    "NegativeBinomialNLLLoss",
    "ZINBNLLLoss",
]

LIKELIHOODS = ("mse", "gaussian", "gaussian-learned-var", "bernoulli", "poisson", "nb", "zinb", "dmol")


class GaussianNLLLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.GaussianNLLLoss``: ``forward(input, target, var)``."""

    def __init__(self, *, full: bool = False, eps: float = 1e-6, reduction: str = "mean", backend=None):
        super().__init__()
        self.full, self.eps, self.reduction = full, eps, check_reduction(reduction)
        self.backend = _check_backend(backend)

    def forward(self, input: Tensor, target: Tensor, var: Tensor | float) -> Tensor:
        return F.gaussian_nll_loss(input, target, var, self.full, self.eps, self.reduction, backend=self.backend)


class BCEWithLogitsLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.BCEWithLogitsLoss``: ``forward(input, target)``; weight and pos_weight are
    buffers (they move with the module and are saved in its state_dict), as in torch."""

    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Tensor | None = None, *, backend=None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction, self.backend = check_reduction(reduction), _check_backend(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                  pos_weight=self.pos_weight, backend=self.backend)


class PoissonNLLLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.PoissonNLLLoss``: ``forward(log_input, target)``."""

    def __init__(self, log_input: bool = True, full: bool = False, size_average=None, eps: float = 1e-8,
                 reduce=None, reduction: str = "mean", *, backend=None):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        self.log_input, self.full, self.eps = log_input, full, eps
        self.reduction, self.backend = check_reduction(reduction), _check_backend(backend)

    def forward(self, log_input: Tensor, target: Tensor) -> Tensor:
        return F.poisson_nll_loss(log_input, target, log_input=self.log_input, full=self.full, eps=self.eps,
                                  reduction=self.reduction, backend=self.backend)


class NegativeBinomialNLLLoss(torch.nn.Module):
    """-log NB(x; mu, theta) (scvi-tools' log_nb_positive): ``forward(x, mu, theta)``."""

    def __init__(self, eps: float = 1e-8, reduction: str = "sum", *, backend=None):
        super().__init__()
        self.eps, self.reduction, self.backend = eps, check_reduction(reduction), _check_backend(backend)

    def forward(self, x: Tensor, mu: Tensor, theta: Tensor) -> Tensor:
        return F.negative_binomial_nll(x, mu, theta, self.eps, self.reduction, backend=self.backend)


class ZINBNLLLoss(torch.nn.Module):
    """-log ZINB(x; mu, theta, pi_logits) (scvi-tools' log_zinb_positive): ``forward(x, mu, theta, pi_logits)``."""

    def __init__(self, eps: float = 1e-8, reduction: str = "sum", *, backend=None):
        super().__init__()
        self.eps, self.reduction, self.backend = eps, check_reduction(reduction), _check_backend(backend)

    def forward(self, x: Tensor, mu: Tensor, theta: Tensor, pi_logits: Tensor) -> Tensor:
        return F.zinb_nll(x, mu, theta, pi_logits, self.eps, self.reduction, backend=self.backend)


class GaussianKL(torch.nn.Module):
    """KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)), prior N(0, I) by default."""

    def __init__(self, reduction: str = "sum", backend=None):
        super().__init__()
        self.reduction, self.backend = check_reduction(reduction), _check_backend(backend)

    def forward(self, mu: Tensor, logvar: Tensor, mu_p: Tensor | None = None, logvar_p: Tensor | None = None):
        return F.gaussian_kl(mu, logvar, mu_p, logvar_p, reduction=self.reduction, backend=self.backend)


class Reparameterize(torch.nn.Module):
    """z = mu + exp(0.5 logvar) * eps; ``num_samples=K`` stacks K samples in a new dim 0."""

    def __init__(self, num_samples: int | None = None, backend=None):
        super().__init__()
        self.num_samples, self.backend = num_samples, _check_backend(backend)

    def forward(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return F.reparameterize(mu, logvar, num_samples=self.num_samples, generator=generator,
                                backend=self.backend)


class ELBOOutput(NamedTuple):
    loss: Tensor  # recon + beta * kl, what to call backward() on
    recon: Tensor  # -E_q[log p(x|z)], one-sample estimate, at the scale of ``recon_reduction``
    kl: Tensor  # KL(q(z|x) || N(0, I)) (before free bits)
    beta: float


RECON_REDUCTIONS = ("mean", "batchmean", "sum")


class ELBOLoss(torch.nn.Module):
    """Negative ELBO = recon + beta * KL, used as torch's losses are::

        criterion = ELBOLoss(likelihood="mse", beta=kld_weight)
        loss = criterion(x_hat, x, mu, logvar)        # a 0-d tensor
        loss.backward()
        criterion.last.recon, criterion.last.kl       # the terms of that call, detached, for logging

    ``forward(..., return_terms=True)`` returns ``ELBOOutput(loss, recon, kl, beta)`` with the terms still in
    the graph instead.

    The KL is summed over the latent dims of each sample, then averaged over the batch (``reduction=
    "batchmean"``, PyTorch-VAE's ``torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1),
    dim=0)``) or summed over it (``"sum"``). The reconstruction term's scale is ``recon_reduction``:

    - ``"batchmean"``: -log p(x|z) summed over the elements of each sample, mean over the batch (D times the
      element mean for D = C * H * W elements a sample; the ELBO in nats per sample);
    - ``"sum"``: summed over the batch too;
    - ``"mean"``: the mean over every element (what ``F.mse_loss`` and torch's other losses give by default).

    Its default (None) is ``"mean"`` for ``likelihood="mse"`` and the module's ``reduction`` for every other
    likelihood. The balance against ``beta`` depends on it: a "mean" reconstruction is 1/D of a "batchmean" one.

    Likelihoods (the reconstruction term per element, before ``recon_reduction``):

    - ``"mse"``: (x_hat - x)^2, exactly ``F.mse_loss`` (torch's own op on every backend: one elementwise op and
      a reduction, nothing to fuse). Up to a constant it is the Gaussian NLL with variance 1/2.
    - ``"gaussian"``: 0.5 (log var + (x - x_hat)^2 / var) (+ 0.5 log 2 pi with ``full``), N(x_hat, ``var``),
      a fixed variance (float or tensor, torch's var forms).
    - ``"gaussian-learned-var"``: N(x_hat, exp(logvar_x)), logvar_x passed to forward.
    - ``"bernoulli"``: x_hat are logits, x in [0, 1] (binary cross-entropy with logits).
    - ``"poisson"``: x_hat is the log-rate of counts x (``full`` adds Stirling's log x!).
    - ``"nb"``: x_hat is the NB mean of counts x, ``theta`` (inverse dispersion, e.g. one per feature) passed to
      forward. ``"zinb"``: also ``pi_logits``, the dropout logits.
    - ``"dmol"``: x_hat are the params (B, 3 or 10 ``num_mixtures``, H, W) of a discretized mixture of logistics
      over 8-bit images x in [0, 1] (rounded to 8 bits and mapped to [-1, 1]; channels first); per pixel.

    ``free_bits=lambda``: each latent dim's batch-mean KL counts as at least lambda nats (Kingma et al. 2016),
    so the encoder is not pushed to collapse unused dims. ``beta_schedule(step) -> beta`` is called with the
    count of ``step()`` calls (e.g. a KL warm-up); without it ``beta`` is constant. The step count is part of
    ``state_dict()``. Under ``torch.compile`` compile the model, not this module: a schedule's beta is a new
    Python float every step.

    ``forward(..., kl=kl)`` takes the KL that ``fastvae.reparameterize_kl`` already computed in the sampling
    pass (with this module's reduction) instead of reading mu and logvar again; free bits need the KL per
    latent dim, so with ``free_bits > 0`` it is recomputed from mu and logvar. ``backend``: as the functions'
    (None follows ``fastvae.set_backend`` at each call).
    """

    last: NamedTuple | None  # ELBOOutput here, the subclasses' own outputs there

    def __init__(
        self,
        *,
        likelihood: str = "gaussian",
        var: float | Tensor = 1.0,
        beta: float = 1.0,
        free_bits: float = 0.0,
        beta_schedule: Callable[[int], float] | None = None,
        full: bool = False,
        reduction: str = "batchmean",
        recon_reduction: str | None = None,
        backend=None,
        num_mixtures: int = 10,
    ):
        super().__init__()
        self.num_mixtures = num_mixtures
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, got {likelihood!r}")
        if free_bits < 0:
            raise ValueError(f"free_bits must be >= 0, got {free_bits}")
        self.likelihood, self.var, self.full = likelihood, var, full
        self.beta, self.free_bits, self.beta_schedule = beta, free_bits, beta_schedule
        self.reduction = check_reduction(reduction, ("batchmean", "sum"))
        if recon_reduction is None:
            recon_reduction = "mean" if likelihood == "mse" else self.reduction
        self.recon_reduction = check_reduction(recon_reduction, RECON_REDUCTIONS)
        self.backend = _check_backend(backend)
        self.steps = 0
        self.last = None

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def step(self) -> None:
        """Advance the beta schedule by one (call once per optimizer step)."""
        self.steps += 1

    def current_beta(self) -> float:
        return float(self.beta_schedule(self.steps)) if self.beta_schedule is not None else self.beta

    def _remember(self, out: NamedTuple, return_terms: bool):
        """Keep the call's terms (detached: logging must not hold the graph) and return what was asked for."""
        self.last = type(out)(*(t.detach() if isinstance(t, Tensor) else t for t in out))
        return out if return_terms else out.loss

    def forward(
        self,
        x_hat: Tensor,
        x: Tensor,
        mu: Tensor,
        logvar: Tensor,
        logvar_x: Tensor | None = None,
        kl: Tensor | None = None,
        *,
        theta: Tensor | None = None,
        pi_logits: Tensor | None = None,
        return_terms: bool = False,
    ) -> Tensor | ELBOOutput:
        """The loss, a 0-d tensor (``return_terms=True``: ``ELBOOutput(loss, recon, kl, beta)``); the terms of
        the call are also at ``self.last``."""
        recon = self.recon(x_hat, x, logvar_x, theta, pi_logits, reduction=self.recon_reduction)
        if self.free_bits > 0:
            per_dim = F.gaussian_kl(mu, logvar, reduction="none", backend=self.backend).flatten(1)
            batch = mu.shape[0]
            kl = per_dim.sum() / batch if self.reduction == "batchmean" else per_dim.sum()
            per_dim_mean = per_dim.mean(0)
            kl_term = per_dim_mean.clamp(min=self.free_bits).sum()
            if self.reduction == "sum":
                kl_term = kl_term * batch
        else:
            if kl is None:
                kl = F.gaussian_kl(mu, logvar, reduction=self.reduction, backend=self.backend)
            elif kl.dim() != 0:
                raise ValueError(f"kl must be the reduced KL (a 0-d tensor), got shape {tuple(kl.shape)}")
            kl_term = kl
        beta = self.current_beta()
        return self._remember(ELBOOutput(recon + beta * kl_term, recon, kl, beta), return_terms)

    def recon(self, x_hat: Tensor, x: Tensor, logvar_x: Tensor | None = None, theta: Tensor | None = None,
              pi_logits: Tensor | None = None, *, reduction: str | None = None) -> Tensor:
        """-log p(x|z) of this module's likelihood (for "mse" the squared error), reduced by ``reduction``
        (default: ``recon_reduction``); with ``reduction="per_sample"`` one sum per row of x_hat, as the IWAE
        bound takes them."""
        lik, red, backend = self.likelihood, reduction or self.recon_reduction, self.backend
        if lik == "mse":
            if red in ("mean", "sum", "none"):
                return torch_F.mse_loss(x_hat, x, reduction=red)  # torch's own numbers, bit for bit
            per = torch_F.mse_loss(x_hat, x, reduction="none")
            return per.flatten(1).sum(1) if red == "per_sample" else per.sum() / per.shape[0]
        if lik == "gaussian":
            return F.gaussian_nll_loss(x_hat, x, self.var, self.full, reduction=red, backend=backend)
        if lik == "gaussian-learned-var":
            if logvar_x is None:
                raise ValueError("likelihood='gaussian-learned-var' needs logvar_x")
            return F.gaussian_nll_loss_logvar(x_hat, x, logvar_x, self.full, reduction=red, backend=backend)
        if lik == "bernoulli":
            return F.binary_cross_entropy_with_logits(x_hat, x, reduction=red, backend=backend)
        if lik == "dmol":
            x8 = torch.round(x * 255.0) / 127.5 - 1.0  # 8-bit levels in [-1, 1]
            return F.discretized_mix_logistic_nll(x8, x_hat, num_mixtures=self.num_mixtures, layout="channels_first",
                                                  reduction=red, backend=backend)
        if lik == "poisson":
            return F.poisson_nll_loss(x_hat, x, log_input=True, full=self.full, reduction=red, backend=backend)
        if theta is None:
            raise ValueError(f"likelihood={lik!r} needs theta")
        if lik == "nb":
            return F.negative_binomial_nll(x, x_hat, theta, reduction=red, backend=backend)
        if pi_logits is None:
            raise ValueError("likelihood='zinb' needs pi_logits")
        return F.zinb_nll(x, x_hat, theta, pi_logits, reduction=red, backend=backend)


class DiscretizedMixLogisticNLLLoss(torch.nn.Module):
    """-log of the discretized mixture of logistics (``fastvae.discretized_mix_logistic_nll``):
    ``forward(x, params)``."""

    def __init__(self, num_mixtures: int, *, bits: int = 8, layout: str = "channels_last",
                 reduction: str = "per_sample", backend=None):
        super().__init__()
        self.num_mixtures, self.bits, self.layout = num_mixtures, bits, layout
        self.reduction, self.backend = check_reduction(reduction), _check_backend(backend)

    def forward(self, x: Tensor, params: Tensor) -> Tensor:
        return F.discretized_mix_logistic_nll(x, params, num_mixtures=self.num_mixtures, bits=self.bits,
                                              layout=self.layout, reduction=self.reduction, backend=self.backend)


__all__ += ["DiscretizedMixLogisticNLLLoss"]
__all__ += ["BetaTCVAELoss", "TCVAEOutput", "MMDVAELoss", "MMDOutput"]


class TCVAEOutput(NamedTuple):
    loss: Tensor  # recon + mi_weight * MI + tc_beta * TC + dw_weight * dimension-wise KL
    recon: Tensor
    mutual_info: Tensor
    total_correlation: Tensor
    dimwise_kl: Tensor


class BetaTCVAELoss(ELBOLoss):
    """β-TCVAE (Chen et al. 2018): recon + mi_weight * MI + tc_beta * TC + dw_weight * dimension-wise KL, the
    KL split by ``fastvae.tc_decomposition`` (``estimator``, over a dataset of ``dataset_size``). At weights
    1, 1, 1 it is the negative ELBO up to the estimator's error. The likelihood arguments are ELBOLoss's
    (beta, free bits and its schedule are not used). ``group=``: the decomposition over the global batch of a
    torch.distributed group; ``forward`` then scales the rank's share by the world size, so that DDP's mean of
    the ranks' gradients is the gradient of the global-batch objective."""

    def __init__(self, *, dataset_size: int, tc_beta: float = 6.0, mi_weight: float = 1.0,
                 dw_weight: float = 1.0, estimator: str = "mss", group=None, **elbo_kwargs):
        super().__init__(**elbo_kwargs)
        self.dataset_size, self.estimator, self.group = dataset_size, estimator, group
        self.tc_beta, self.mi_weight, self.dw_weight = tc_beta, mi_weight, dw_weight

    def forward(self, x_hat: Tensor, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor,  # type: ignore[override]
                logvar_x: Tensor | None = None, *, theta: Tensor | None = None,
                pi_logits: Tensor | None = None, return_terms: bool = False) -> Tensor | TCVAEOutput:
        """The loss, a 0-d tensor (``return_terms=True``: the ``TCVAEOutput``; the terms also at ``self.last``)."""
        recon = self.recon(x_hat, x, logvar_x, theta, pi_logits)
        terms = F.tc_decomposition(z, mu, logvar, dataset_size=self.dataset_size, estimator=self.estimator,
                                   reduction="mean" if self.reduction == "batchmean" else "sum", group=self.group,
                                   backend=self.backend)
        world = torch.distributed.get_world_size(self.group) if self.group is not None else 1
        reg = self.mi_weight * terms.mutual_info + self.tc_beta * terms.total_correlation
        reg = reg + self.dw_weight * terms.dimwise_kl
        return self._remember(TCVAEOutput(recon + world * reg, recon, *terms[:3]), return_terms)


class MMDOutput(NamedTuple):
    loss: Tensor  # recon + beta * KL + mmd_weight * MMD^2
    recon: Tensor
    kl: Tensor
    mmd: Tensor


class MMDVAELoss(ELBOLoss):
    """InfoVAE / MMD-VAE (Zhao et al. 2019): recon + beta * KL + mmd_weight * MMD^2(z, prior samples), the
    MMD from ``fastvae.mmd`` (``kernel``, ``scale``, ``unbiased``); beta = 0 is WAE-MMD (Tolstikhin et al.
    2018). The likelihood and KL arguments are ELBOLoss's; with ``reduction="sum"`` the MMD counts B times."""

    def __init__(self, *, mmd_weight: float = 10.0, kernel: str = "imq", scale=None, unbiased: bool | str = True,
                 **elbo_kwargs):
        super().__init__(**elbo_kwargs)
        self.mmd_weight, self.kernel, self.scale, self.unbiased = mmd_weight, kernel, scale, unbiased

    def forward(self, x_hat: Tensor, x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor,  # type: ignore[override]
                logvar_x: Tensor | None = None, kl: Tensor | None = None, *,
                generator: torch.Generator | None = None, theta: Tensor | None = None,
                pi_logits: Tensor | None = None, return_terms: bool = False) -> Tensor | MMDOutput:
        """The loss, a 0-d tensor (``return_terms=True``: the ``MMDOutput``; the terms also at ``self.last``)."""
        elbo = super().forward(x_hat, x, mu, logvar, logvar_x, kl, theta=theta, pi_logits=pi_logits,
                               return_terms=True)
        mmd = F.mmd(z, kernel=self.kernel, scale=self.scale, unbiased=self.unbiased, generator=generator,
                    backend=self.backend)
        reg = mmd * (z.shape[0] if self.reduction == "sum" else 1)
        return self._remember(MMDOutput(elbo.loss + self.mmd_weight * reg, elbo.recon, elbo.kl, mmd), return_terms)


# ------------------------------------------------------------------------------------------ discrete latents

__all__ += ["VectorQuantize", "ResidualVQ", "LFQ", "FSQ", "GumbelQuantize"]


def _default_group(sync_codebook: bool | None, group: object) -> object:
    """The process group the codebook statistics are all-reduced over: ``group`` if given; else, as
    vector-quantize-pytorch's ``sync_codebook`` (None: when torch.distributed runs with more than one process),
    the default group; else None."""
    if group is not None:
        return group
    dist = torch.distributed
    running = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if sync_codebook is None:
        sync_codebook = running
    return dist.group.WORLD if sync_codebook and running else None


def _broadcast_from_first(t: Tensor, group: object) -> None:
    """Rank 0's ``t`` (of ``group``) on every rank: one k-means initialization for all."""
    if group is None:
        return
    dist = torch.distributed
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)


class _Codebook(torch.nn.Module):
    """The codebook state under vector-quantize-pytorch's names (its ``_codebook`` submodule): ``embed``
    (C, K, D) (a Parameter when learnable, else a buffer), ``cluster_size`` (C, K) and ``embed_avg`` (C, K, D),
    the EMA's running n and m, and ``initted`` (1,), 0. until the k-means initialization has run. The same keys
    as that library's state_dict: a checkpoint of either loads into the other where the shapes agree."""

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, *, learnable: bool, kmeans_init: bool,
                 cosine: bool):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:  # vector-quantize-pytorch's uniform_init: kaiming-uniform per codebook
            embed = torch.empty(num_codebooks, codebook_size, dim)
            for e in embed:
                torch.nn.init.kaiming_uniform_(e)
            if cosine:
                embed = torch_F.normalize(embed, dim=-1)
        if learnable:
            self.embed = torch.nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor([float(not kmeans_init)]))
        # the flag mirrored on the host, so that forward never reads the buffer (a device sync); refreshed
        # when a state_dict is loaded
        self.is_initted = not kmeans_init
        self.register_load_state_dict_post_hook(_Codebook._refresh)

    @staticmethod
    def _refresh(module: _Codebook, incompatible_keys) -> None:
        module.is_initted = bool(module.initted.detach().cpu().reshape(-1)[0] > 0)

    @torch.no_grad()
    def set_initialized(self, embed: Tensor, counts: Tensor) -> None:
        self.embed.copy_(embed)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(embed * counts.unsqueeze(-1))
        self.initted.fill_(1.0)
        self.is_initted = True


class VectorQuantize(torch.nn.Module):
    """A VQ layer with vector-quantize-pytorch's ``VectorQuantize`` arguments and returns, on
    ``fastvae.vector_quantize`` (the streamed nearest-code search, no N x K distance matrix)::

        vq = VectorQuantize(dim=256, codebook_size=512)          # EMA codebook, decay 0.8, as that library
        quantized, indices, loss = vq(x)                          # x (B, N, 256); accept_image_fmap: (B, C, H, W)

    Codebook (``_codebook.embed``, (C, K, codebook_dim / heads), C = heads with ``separate_codebook_per_head``,
    else 1 shared by the heads):

    - ``ema_update=True`` (the default, as vector-quantize-pytorch): a buffer, moved in training by
      ``fastvae.codebook_ema_update`` under no_grad after each forward, n_k <- decay n_k + (1 - decay) count_k,
      m_k <- decay m_k + (1 - decay) sum_{index = k} z, e_k = m_k / n_k (Laplace-smoothed with ``eps``). ``decay``
      defaults to that library's 0.8 (VQ-VAE-2 and Sonnet use 0.99). ``threshold_ema_dead_code``: codes whose
      smoothed n falls below it take a token of the batch (``generator`` draws which). With ``sync_codebook``
      (None: when torch.distributed runs with several processes) or ``group=``, the counts and sums are
      all-reduced first (every rank computes the same codebook) and the k-means initialization is rank 0's.
    - ``ema_update=False``: ``learnable_codebook`` defaults to True: a Parameter trained by the loss. (That
      library keeps ``learnable_codebook=False`` and its codebook frozen unless told; pass it to freeze.)

    ``kmeans_init``: the codebook starts as ``fastvae.kmeans`` (``kmeans_iters`` Lloyd steps) of the first
    training batch's tokens, once (``initted`` in the state_dict says it ran); n starts at the tokens each
    centre takes, m at n times the centre.

    Loss (0-d): ``commitment_weight`` * mse(z, sg(z_q)) with the EMA or a frozen codebook (that library's);
    with a learnable codebook ``commitment_weight`` * mse(z, z_q), the gradient reaching z and the codebook
    alike (its ``learnable_codebook``; the value is that mse, not twice it). ``codebook_weight=b`` instead
    gives the VQ-VAE weighting ``commitment_weight`` * mse(z, sg(z_q)) + b * mse(sg(z), z_q). Unlike that
    library the loss is 0-d (not shape (1,)) and computed in eval mode too (it returns 0 there): a held-out
    loss, with no codebook update (the EMA and the k-means initialization run in training mode only).

    Gradient to z: ``rotation_trick=True`` (its current default, Fifty et al. 2024) or the straight-through
    copy (``rotation_trick=False``); in eval mode the codes themselves. ``use_cosine_sim``: tokens and codes
    l2-normalized, the search by cosine. ``codebook_dim`` != ``dim`` / ``heads``: linear projections in and out,
    as there. ``channel_last=False``: x is (B, D, N); ``accept_image_fmap``: x is (B, C, H, W), indices
    (B, H, W). Indices are int64, with a trailing heads dim for heads > 1.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        commitment_weight: float = 1.0,
        rotation_trick: bool = True,
        ema_update: bool = True,
        learnable_codebook: bool | None = None,
        sync_codebook: bool | None = None,
        *,
        codebook_weight: float | None = None,
        group: object = None,
        generator: torch.Generator | None = None,
        backend=None,
    ):
        super().__init__()
        if codebook_size < 1 or heads < 1:
            raise ValueError(f"codebook_size and heads must be >= 1, got {codebook_size} and {heads}")
        codebook_dim = dim // heads if codebook_dim is None else codebook_dim
        if learnable_codebook is None:
            learnable_codebook = not ema_update
        if ema_update and learnable_codebook:
            raise ValueError("ema_update and learnable_codebook exclude each other: the EMA owns the codebook")
        self.dim, self.codebook_size, self.heads = dim, codebook_size, heads
        self.codebook_dim, self.separate_codebook_per_head = codebook_dim, separate_codebook_per_head
        self.decay, self.eps, self.kmeans_iters = decay, eps, kmeans_iters
        self.use_cosine_sim, self.threshold_ema_dead_code = use_cosine_sim, threshold_ema_dead_code
        self.channel_last, self.accept_image_fmap = channel_last, accept_image_fmap
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.rotation_trick, self.ema_update, self.learnable_codebook = rotation_trick, ema_update, learnable_codebook
        self.sync_codebook, self.group, self.generator = sync_codebook, group, generator
        self.backend = _check_backend(backend)
        inner = codebook_dim * heads
        self.project_in = torch.nn.Linear(dim, inner) if inner != dim else torch.nn.Identity()
        self.project_out = torch.nn.Linear(inner, dim) if inner != dim else torch.nn.Identity()
        self._codebook = _Codebook(heads if separate_codebook_per_head else 1, codebook_size, codebook_dim,
                                   learnable=learnable_codebook, kmeans_init=kmeans_init, cosine=use_cosine_sim)

    @property
    def codebook(self) -> Tensor:
        """(K, D) for one codebook, (heads, K, D / heads) for one per head."""
        e = self._codebook.embed
        return e if self.separate_codebook_per_head else e[0]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """The codes of ``indices`` (forward's), features last: (..., heads * codebook_dim), before project_out."""
        e = self._codebook.embed
        idx = indices.unsqueeze(-1) if self.heads == 1 else indices
        heads = torch.arange(self.heads, device=idx.device)
        codes = e[heads if self.separate_codebook_per_head else 0, idx]  # (..., heads, codebook_dim)
        return codes.flatten(-2)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward returns as ``quantized`` for these indices (its value), in the input's layout."""
        out = self.project_out(self.get_codes_from_indices(indices))
        return out.movedim(-1, 1) if (self.accept_image_fmap or not self.channel_last) else out

    def _features_last(self, x: Tensor) -> Tensor:
        """x as (..., dim), a view: (B, C, H, W) maps and channel-first sequences moved, not copied."""
        return x.movedim(1, -1) if (self.accept_image_fmap or not self.channel_last) else x

    def _head_tokens(self, z: Tensor) -> Tensor:
        """(C, N', Dh): the tokens each codebook sees (a head's slice, or every head's for a shared codebook)."""
        zh = z.reshape(-1, self.heads, self.codebook_dim)
        if self.separate_codebook_per_head:
            return zh.transpose(0, 1)
        return zh.reshape(1, -1, self.codebook_dim)

    def _quantize(self, z: Tensor, estimator: str, cw: float, bw: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(quantized, indices (..., heads), commitment, codebook term) of z (..., heads * codebook_dim)."""
        metric = "cosine" if self.use_cosine_sim else "euclidean"
        if self.separate_codebook_per_head or self.heads == 1:
            out = F.vector_quantize(z, self._codebook.embed if self.heads > 1 else self._codebook.embed[0],
                                    metric=metric, estimator=estimator, commitment_weight=cw, codebook_weight=bw,
                                    backend=self.backend)
            idx = out.indices if self.heads > 1 else out.indices.unsqueeze(-1)
            return out.quantized, idx, out.commitment, out.codebook_loss
        zh = z.unflatten(-1, (self.heads, self.codebook_dim))  # heads as tokens of the shared codebook
        out = F.vector_quantize(zh, self._codebook.embed[0], metric=metric, estimator=estimator,
                                commitment_weight=cw, codebook_weight=bw, backend=self.backend)
        return out.quantized.flatten(-2), out.indices, out.commitment, out.codebook_loss

    def _kmeans_init(self, z: Tensor) -> None:
        group = _default_group(self.sync_codebook, self.group)
        metric = "cosine" if self.use_cosine_sim else "euclidean"
        tokens = self._head_tokens(z.detach())
        embeds, counts = [], []
        for t in tokens:
            e = F.kmeans(t, self.codebook_size, iters=self.kmeans_iters, metric=metric, generator=self.generator,
                         backend=self.backend).to(self._codebook.embed.dtype)
            _broadcast_from_first(e, group)
            idx = F.vector_quantize(t, e, metric=metric, backend=self.backend).indices
            n = F.codebook_usage(idx, self.codebook_size).counts.float()
            if group is not None:
                torch.distributed.all_reduce(n, group=group)
            embeds.append(e)
            counts.append(n)
        self._codebook.set_initialized(torch.stack(embeds), torch.stack(counts))

    @torch.no_grad()
    def _ema_step(self, z: Tensor, indices: Tensor) -> None:
        group = _default_group(self.sync_codebook, self.group)
        tokens = self._head_tokens(z.detach())
        if self.use_cosine_sim:
            tokens = torch_F.normalize(tokens, dim=-1)
        idx = indices.reshape(-1, self.heads)
        idx = idx.transpose(0, 1) if self.separate_codebook_per_head else idx.reshape(1, -1)
        cb = self._codebook
        for c in range(tokens.shape[0]):
            new = F.codebook_ema_update(tokens[c], idx[c], cb.cluster_size[c], cb.embed_avg[c], decay=self.decay,
                                        eps=self.eps, dead_threshold=float(self.threshold_ema_dead_code),
                                        generator=self.generator, group=group)
            embed = torch_F.normalize(new.codebook, dim=-1) if self.use_cosine_sim else new.codebook
            cb.embed[c].copy_(embed)
            cb.cluster_size[c].copy_(new.cluster_size)
            cb.embed_avg[c].copy_(new.embed_sum)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(quantized in x's shape, indices int64, loss 0-d)."""
        z = self.project_in(self._features_last(x))
        if self.training and not self._codebook.is_initted:
            self._kmeans_init(z)
        cw = float(self.commitment_weight)
        trains_codebook = self._codebook.embed.requires_grad
        bw = self.codebook_weight if self.codebook_weight is not None else (cw if trains_codebook else 0.0)
        estimator = "rotation" if self.rotation_trick else "straight_through"
        quantized, indices, commitment, codebook_term = self._quantize(z, estimator, cw, float(bw))
        if self.training and self.ema_update:
            self._ema_step(z, indices)
        if self.codebook_weight is None and trains_codebook:
            # cw * mse(z, z_q) with the gradient to both sides: the two terms have one value, so one is kept
            # in the value and both in the gradient
            loss = cw * (codebook_term + commitment - commitment.detach())
        else:
            loss = cw * commitment + float(bw) * codebook_term
        quantized = self.project_out(quantized)
        if self.accept_image_fmap or not self.channel_last:
            quantized = quantized.movedim(-1, 1)
        if self.heads == 1:
            indices = indices[..., 0]
        return quantized, indices, loss


class ResidualVQ(torch.nn.Module):
    """Residual VQ (SoundStream, EnCodec, DAC) with vector-quantize-pytorch's ``ResidualVQ`` arguments, on
    ``fastvae.residual_vector_quantize``: stage s quantizes r_s = z - sum_{j<s} sg(q_j) with its own codebook
    (``_codebook.embed`` (num_quantizers, K, codebook_dim)); returns (quantized, indices (..., num_quantizers),
    loss). The codebook options are ``VectorQuantize``'s (EMA per stage on that stage's residuals, k-means
    initialization stage by stage on the first training batch, learnable codebooks with ``ema_update=False``);
    euclidean only (a residual is not a direction).

    Deliberate differences from that library: the estimator (rotation trick or straight-through) is applied
    once to the whole stack, so the encoder gets the decoder's gradient once (there, each stage's
    straight-through adds it again: S times); the loss is the 0-d sum over the stages of each stage's
    ``VectorQuantize`` loss (there, a (1, num_quantizers) stack: sum it to compare).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        decay: float = 0.8,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        commitment_weight: float = 1.0,
        rotation_trick: bool = True,
        ema_update: bool = True,
        learnable_codebook: bool | None = None,
        sync_codebook: bool | None = None,
        codebook_weight: float | None = None,
        group: object = None,
        generator: torch.Generator | None = None,
        backend=None,
    ):
        super().__init__()
        if num_quantizers < 1 or codebook_size < 1:
            raise ValueError(f"num_quantizers and codebook_size must be >= 1, got {num_quantizers}, {codebook_size}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        if learnable_codebook is None:
            learnable_codebook = not ema_update
        if ema_update and learnable_codebook:
            raise ValueError("ema_update and learnable_codebook exclude each other: the EMA owns the codebook")
        self.dim, self.num_quantizers, self.codebook_size, self.codebook_dim = (dim, num_quantizers, codebook_size,
                                                                                codebook_dim)
        self.decay, self.eps, self.kmeans_iters = decay, eps, kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.channel_last, self.accept_image_fmap = channel_last, accept_image_fmap
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.rotation_trick, self.ema_update, self.learnable_codebook = rotation_trick, ema_update, learnable_codebook
        self.sync_codebook, self.group, self.generator = sync_codebook, group, generator
        self.backend = _check_backend(backend)
        self.project_in = torch.nn.Linear(dim, codebook_dim) if codebook_dim != dim else torch.nn.Identity()
        self.project_out = torch.nn.Linear(codebook_dim, dim) if codebook_dim != dim else torch.nn.Identity()
        self._codebook = _Codebook(num_quantizers, codebook_size, codebook_dim, learnable=learnable_codebook,
                                   kmeans_init=kmeans_init, cosine=False)

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, K, codebook_dim)."""
        return self._codebook.embed

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """(num_quantizers, ..., codebook_dim): each stage's codes of ``indices`` (..., num_quantizers)."""
        e = self._codebook.embed
        return torch.stack([e[s][indices[..., s]] for s in range(self.num_quantizers)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The sum of the stages' codes through project_out, in the input's layout (forward's value)."""
        out = self.project_out(self.get_codes_from_indices(indices).sum(0))
        return out.movedim(-1, 1) if (self.accept_image_fmap or not self.channel_last) else out

    def _residuals(self, tokens: Tensor, indices: Tensor) -> Tensor:
        """(S, N, D): r_s = z - sum_{j<s} e_j[index_j] of the tokens (N, D), detached."""
        e = self._codebook.embed.detach()
        codes = torch.stack([e[s][indices[:, s]] for s in range(self.num_quantizers)])  # (S, N, D)
        before = torch.cumsum(codes, 0) - codes
        return tokens.detach().float().unsqueeze(0) - before.float()

    def _kmeans_init(self, tokens: Tensor) -> None:
        group = _default_group(self.sync_codebook, self.group)
        residual = tokens.detach()
        embeds, counts = [], []
        for _ in range(self.num_quantizers):
            e = F.kmeans(residual, self.codebook_size, iters=self.kmeans_iters, generator=self.generator,
                         backend=self.backend).to(self._codebook.embed.dtype)
            _broadcast_from_first(e, group)
            idx = F.vector_quantize(residual, e, backend=self.backend).indices
            n = F.codebook_usage(idx, self.codebook_size).counts.float()
            if group is not None:
                torch.distributed.all_reduce(n, group=group)
            embeds.append(e)
            counts.append(n)
            residual = residual - e[idx].to(residual.dtype)
        self._codebook.set_initialized(torch.stack(embeds), torch.stack(counts))

    @torch.no_grad()
    def _ema_step(self, tokens: Tensor, indices: Tensor) -> None:
        group = _default_group(self.sync_codebook, self.group)
        residuals = self._residuals(tokens, indices)  # the residuals each stage quantized, before the update
        cb = self._codebook
        for s in range(self.num_quantizers):
            new = F.codebook_ema_update(residuals[s], indices[:, s], cb.cluster_size[s], cb.embed_avg[s],
                                        decay=self.decay, eps=self.eps,
                                        dead_threshold=float(self.threshold_ema_dead_code),
                                        generator=self.generator, group=group)
            cb.embed[s].copy_(new.codebook)
            cb.cluster_size[s].copy_(new.cluster_size)
            cb.embed_avg[s].copy_(new.embed_sum)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(quantized in x's shape, indices int64 (..., num_quantizers), loss 0-d)."""
        channels_first = self.accept_image_fmap or not self.channel_last
        z = self.project_in(x.movedim(1, -1) if channels_first else x)
        tokens = z.reshape(-1, self.codebook_dim)
        if self.training and not self._codebook.is_initted:
            self._kmeans_init(tokens)
        cw = float(self.commitment_weight)
        trains_codebook = self._codebook.embed.requires_grad
        bw = self.codebook_weight if self.codebook_weight is not None else (cw if trains_codebook else 0.0)
        out = F.residual_vector_quantize(z, self._codebook.embed,
                                         estimator="rotation" if self.rotation_trick else "straight_through",
                                         commitment_weight=cw, codebook_weight=float(bw), backend=self.backend)
        if self.training and self.ema_update:
            self._ema_step(tokens, out.indices.reshape(-1, self.num_quantizers))
        if self.codebook_weight is None and trains_codebook:  # cw * mse per stage, the gradient to both sides
            loss = cw * (out.codebook_loss + out.commitment - out.commitment.detach())
        else:
            loss = cw * out.commitment + float(bw) * out.codebook_loss
        quantized = self.project_out(out.quantized)
        return (quantized.movedim(-1, 1) if channels_first else quantized), out.indices, loss


class LFQ(torch.nn.Module):
    """Lookup-free quantization with vector-quantize-pytorch's ``LFQ`` arguments, on
    ``fastvae.lookup_free_quantize`` (the exact entropies in O(N d), not the N x 2^d enumeration)::

        lfq = LFQ(codebook_size=2**16, dim=16)
        quantized, indices, aux_loss = lfq(x)          # x (B, N, dim), or (B, dim, H, W) images

    ``dim`` (default log2(codebook_size) * num_codebooks) != the bits: linear projections in and out.
    ``num_codebooks`` = c splits each token's bits into c codes of log2(codebook_size) bits that share the
    implicit codebook (their tokens pooled for the codebook entropy, as there); indices then have a trailing
    dim of c (``keep_num_codebooks_dim``). aux_loss = ``entropy_loss_weight`` * (per-sample entropy -
    ``diversity_gamma`` * codebook entropy) + ``commitment_loss_weight`` * commitment, 0-d, in nats.
    ``channel_first`` (None: for inputs of 4 dims or more, as there) puts the bits in dim 1.

    Indices: ``index_order="lsb"`` (the default, ``fastvae.lookup_free_quantize``'s): bit i weighs 2^i;
    vector-quantize-pytorch's LFQ is MSB-first (bit 0 weighs 2^(d-1)): ``index_order="msb"`` gives its indices.
    Differences: its entropy clamps p at 1e-5 inside the log (here exact), and in eval mode it returns a zero
    loss (here the loss is computed in both modes). The last call's entropies are at ``self.last``
    (``fastvae.functional.lfq.LFQOutput``, detached).
    """

    def __init__(
        self,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        codebook_scale: float = 1.0,
        inv_temperature: float = 100.0,
        channel_first: bool | None = None,
        index_order: str = "lsb",
        backend=None,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size")
        if codebook_size is None:
            bits = dim // num_codebooks  # type: ignore[operator]
        else:
            bits = int(codebook_size).bit_length() - 1
            if codebook_size < 2 or 1 << bits != codebook_size:
                raise ValueError(f"codebook_size must be a power of 2 >= 2, got {codebook_size}")
        if index_order not in ("lsb", "msb"):
            raise ValueError(f"index_order must be 'lsb' or 'msb', got {index_order!r}")
        dim = bits * num_codebooks if dim is None else dim
        self.dim, self.codebook_dims, self.num_codebooks, self.codebook_size = dim, bits, num_codebooks, 2 ** bits
        self.keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        self.entropy_loss_weight, self.commitment_loss_weight = entropy_loss_weight, commitment_loss_weight
        self.diversity_gamma, self.codebook_scale = diversity_gamma, codebook_scale
        self.inv_temperature = inv_temperature
        self.channel_first, self.index_order = channel_first, index_order
        self.backend = _check_backend(backend)
        inner = bits * num_codebooks
        self.project_in = torch.nn.Linear(dim, inner) if inner != dim else torch.nn.Identity()
        self.project_out = torch.nn.Linear(inner, dim) if inner != dim else torch.nn.Identity()
        self.last = None

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """The codes (+-codebook_scale per bit) of ``indices`` in this module's ``index_order``, through
        project_out, the channels in dim 1 for images (as forward returns them)."""
        idx = indices if self.keep_num_codebooks_dim else indices.unsqueeze(-1)
        image = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        channel_first = image if self.channel_first is None else self.channel_first
        d = self.codebook_dims
        shifts = torch.arange(d, device=idx.device)
        if self.index_order == "msb":
            shifts = d - 1 - shifts
        bits = (idx.unsqueeze(-1) >> shifts) & 1
        codes = (bits.to(torch.get_default_dtype()) * 2 - 1) * self.codebook_scale
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        return codes.movedim(-1, 1) if channel_first else codes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(quantized in x's shape, indices int64, aux_loss 0-d)."""
        channel_first = x.dim() >= 4 if self.channel_first is None else self.channel_first
        z = self.project_in(x.movedim(1, -1) if channel_first else x)
        zc = z.unflatten(-1, (self.num_codebooks, self.codebook_dims))
        out = F.lookup_free_quantize(zc, inv_temperature=self.inv_temperature, codebook_scale=self.codebook_scale,
                                     entropy_weight=self.entropy_loss_weight,
                                     commitment_weight=self.commitment_loss_weight,
                                     diversity_gamma=self.diversity_gamma, backend=self.backend)
        self.last = type(out)(*(t.detach() for t in out))
        indices = out.indices
        if self.index_order == "msb":  # bit i of the LSB-first index moves to bit d - 1 - i
            bits = torch.arange(self.codebook_dims, device=indices.device)
            indices = (((indices.unsqueeze(-1) >> bits) & 1) << (self.codebook_dims - 1 - bits)).sum(-1)
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        quantized = self.project_out(out.quantized.flatten(-2))
        return (quantized.movedim(-1, 1) if channel_first else quantized), indices, out.loss


class FSQ(torch.nn.Module):
    """Finite scalar quantization with vector-quantize-pytorch's ``FSQ`` arguments, on
    ``fastvae.finite_scalar_quantize`` (the implicit codebook of prod(levels) codes never built)::

        fsq = FSQ(levels=[8, 5, 5, 5])
        quantized, indices = fsq(x)                    # x (B, N, 4), or (B, 4, H, W) images

    ``dim`` (default len(levels) * num_codebooks) != that: linear projections in and out; ``num_codebooks``
    codes a token, indices with a trailing dim of them (``keep_num_codebooks_dim``). Indices are LSB-first,
    sum_i (level index_i) prod_{j<i} L_j, as that library's ``codes_to_indices``. Inputs of 4 dims or more,
    or any with ``channel_first=True``, carry the channels in dim 1 (as there). No loss: the quantization is
    the straight-through rounding of a bounded z.
    """

    def __init__(
        self,
        levels: list[int],
        dim: int | None = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: bool | None = None,
        channel_first: bool = False,
        *,
        backend=None,
    ):
        super().__init__()
        self.levels = list(levels)
        self.codebook_dim = len(self.levels)
        inner = self.codebook_dim * num_codebooks
        self.dim = inner if dim is None else dim
        self.num_codebooks, self.channel_first = num_codebooks, channel_first
        self.keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        self.codebook_size = math.prod(self.levels)
        self.backend = _check_backend(backend)
        self.project_in = torch.nn.Linear(self.dim, inner) if inner != self.dim else torch.nn.Identity()
        self.project_out = torch.nn.Linear(inner, self.dim) if inner != self.dim else torch.nn.Identity()

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """The codes of ``indices`` (each channel's level, scaled to [-1, 1]) through project_out, the channels
        in dim 1 for images or with ``channel_first`` (as forward returns them)."""
        idx = indices if self.keep_num_codebooks_dim else indices.unsqueeze(-1)
        image = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        levels = torch.tensor(self.levels, device=idx.device)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)
        half = levels // 2
        digits = (idx.unsqueeze(-1) // basis) % levels
        codes = ((digits - half).to(torch.get_default_dtype()) / half).flatten(-2)
        codes = self.project_out(codes)
        return codes.movedim(-1, 1) if (image or self.channel_first) else codes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(quantized in x's shape, indices int64)."""
        channel_first = x.dim() >= 4 or self.channel_first
        z = self.project_in(x.movedim(1, -1) if channel_first else x)
        zc = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        out = F.finite_scalar_quantize(zc, self.levels, backend=self.backend)
        indices = out.indices if self.keep_num_codebooks_dim else out.indices.squeeze(-1)
        quantized = self.project_out(out.quantized.flatten(-2))
        return (quantized.movedim(-1, 1) if channel_first else quantized), indices


class GumbelQuantize(torch.nn.Module):
    """taming-transformers' ``GumbelQuantize`` (DALL-E's dVAE as VQGAN uses it), on
    ``fastvae.gumbel_softmax_kl`` (the relaxed sample and the KL from one read of the logits)::

        quantize = GumbelQuantize(num_hiddens=256, embedding_dim=64, n_embed=8192)
        z_q, diff, (_, _, ind) = quantize(h)           # h (B, num_hiddens, H, W)

    logits = ``proj`` (a 1x1 conv) of h, K = ``n_embed`` of them per position; the soft one-hot y =
    gumbel_softmax(logits, tau=temp, dim=1, hard=``straight_through`` in training, always hard in eval);
    z_q = sum_k y_k ``embed.weight``[k] (B, embedding_dim, H, W), formed with y in one pass
    (``gumbel_softmax(codebook=...)``: on the kernels y is never written); ind = argmax_k y;
    diff = ``kl_weight`` * KL(softmax(logits) || uniform), taming's
    ``sum(qy * log(qy * n_embed + 1e-10), dim=1).mean()``: the sum over the codes, the mean over the B H W
    positions, i.e. ``gumbel_softmax_kl(reduction="mean")`` (its "batchmean", the per-image KL of the ELBO,
    is H W times more). The KL here is exact (no 1e-10 inside the
    log: the two differ by under 1e-10 K nats). On the eager path the noise is torch's ``F.gumbel_softmax``
    draw from the same generator (taming's numbers for the same seed); ``generator`` may pin it.
    ``use_vqinterface=False`` returns (z_q, diff, ind); ``return_logits=True`` also the logits. taming's
    ``remap`` of the indices is not supported.
    """

    def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int, straight_through: bool = True,
                 kl_weight: float = 5e-4, temp_init: float = 1.0, use_vqinterface: bool = True, *, backend=None):
        super().__init__()
        self.embedding_dim, self.n_embed = embedding_dim, n_embed
        self.straight_through, self.temperature, self.kl_weight = straight_through, temp_init, kl_weight
        self.proj = torch.nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = torch.nn.Embedding(n_embed, embedding_dim)
        self.use_vqinterface = use_vqinterface
        self.backend = _check_backend(backend)

    def forward(self, z: Tensor, temp: float | None = None, return_logits: bool = False,
                generator: torch.Generator | None = None):
        hard = self.straight_through if self.training else True
        temp = self.temperature if temp is None else temp
        from .functional.gumbel import gumbel_quantize

        logits = self.proj(z)
        # z_q = y . E in the sampling pass (on the kernels the (B, n_embed, H, W) y is never written); the
        # codebook cast to the logits' dtype, which differs under autocast (16-bit conv output), where
        # taming's einsum casts both operands the same way
        z_q, kl, ind = gumbel_quantize(logits, self.embed.weight.to(logits.dtype), temp, hard, 1, "mean",
                                       generator, self.backend)
        diff = self.kl_weight * kl
        if self.use_vqinterface:
            out = (z_q, diff, (None, None, ind))
            return (*out, logits) if return_logits else out
        return z_q, diff, ind
