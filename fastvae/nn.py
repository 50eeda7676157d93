"""Thin ``torch.nn`` modules over ``fastvae.functional``.

Every module's ``backend`` is the functions' own: None (the default) follows the global setting
(``fastvae.set_backend`` / ``use_backend`` / FASTVAE_BACKEND) at each call, "torch" or "triton" pins the module.
"""

from __future__ import annotations

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
