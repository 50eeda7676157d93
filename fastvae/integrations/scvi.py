"""scvi-tools on fastvae: ``apply()`` makes scvi's VAE modules sample their posterior and compute its KL
through ``fastvae.distributions.Normal`` (the Encoder of ``scvi.nn`` builds ``Normal(q_m, q_v.sqrt())``:
its rsample is the fused sampler on that scale, and ``kl_divergence`` against scvi's prior, a subclass of
torch's Normal, the fused KL), and scores counts with the fused NB and ZINB kernels (scvi's
``NegativeBinomial`` and ``ZeroInflatedNegativeBinomial`` ``log_prob`` call ``log_nb_positive`` and
``log_zinb_positive``, which become ``-fastvae.negative_binomial_nll`` and ``-fastvae.zinb_nll``, term for
term scvi's formulas; a call with another ``log_fn`` or ``lgamma_fn``, such as MPS's lgamma, keeps scvi's own).
The patched functions broadcast as scvi's formulas do (the result has the broadcast shape of every argument:
a posterior-predictive ``mu`` of shape (S, B, G) against counts (B, G), a 1-D theta against 1-D counts made
(1, G) by log_zinb_positive's own reshape) and return scvi's dtypes (log_zinb_positive's fp32 masks promote
a half result to fp32). ``revert()`` restores scvi's names.

    import fastvae.integrations.scvi
    fastvae.integrations.scvi.apply()
    model = scvi.model.SCVI(adata); model.train()
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributions import Normal
from ..functional import negative_binomial_nll, zinb_nll
from . import Patches, require

__all__ = ["apply", "revert", "SUPPORTED"]

SUPPORTED = ">= 1.4.1"  # pyproject's extra; tested at its lowest and the newest (ci/integrations.sh)
_ENCODERS = "scvi.nn._base_components"
_NB = "scvi.distributions._negative_binomial"
_patches = Patches("scvi-tools", SUPPORTED)


def _posterior_class(backend: str | None) -> type:
    if backend is None:
        return Normal
    return type("Normal", (Normal,), {"backend": backend, "__module__": Normal.__module__})


def _log_nb_positive(original, backend):
    def log_nb_positive(x: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8, log_fn=torch.log,
                        lgamma_fn=torch.lgamma) -> Tensor:
        """scvi's log_nb_positive on fastvae's NB kernel: -negative_binomial_nll(reduction="none")."""
        if log_fn is not torch.log or lgamma_fn is not torch.lgamma or not isinstance(x, Tensor):
            return original(x, mu, theta, eps=eps, log_fn=log_fn, lgamma_fn=lgamma_fn)
        return -negative_binomial_nll(x, mu, theta, eps, reduction="none", backend=backend)

    return log_nb_positive


def _log_zinb_positive(original, backend):
    def log_zinb_positive(x: Tensor, mu: Tensor, theta: Tensor, pi: Tensor, eps: float = 1e-8, log_fn=torch.log,
                          lgamma_fn=torch.lgamma) -> Tensor:
        """scvi's log_zinb_positive on fastvae's ZINB kernel: -zinb_nll(reduction="none")."""
        if log_fn is not torch.log or lgamma_fn is not torch.lgamma or not isinstance(x, Tensor):
            return original(x, mu, theta, pi, eps=eps, log_fn=log_fn, lgamma_fn=lgamma_fn)
        if theta.dim() == 1:  # one dispersion per gene, shared by every cell (scvi's own reshape)
            theta = theta.view(1, theta.size(0))
        out = -zinb_nll(x, mu, theta, pi, eps, reduction="none", backend=backend)
        # scvi multiplies each case by (x < eps).type(torch.float32): a half result comes out in fp32
        return out.to(torch.promote_types(out.dtype, torch.float32))

    return log_zinb_positive


def apply(backend: str | None = None) -> None:
    """Put scvi's Encoders on fastvae's Normal and its NB/ZINB log-likelihoods on the fused kernels.
    ``backend`` as fastvae's functions take it (None: the kernels on CUDA)."""
    require("scvi", "scvi-tools", "scvi")
    revert()
    encoders, torch_normal = _patches.lookup(_ENCODERS, "Normal")
    nb, nb_fn = _patches.lookup(_NB, "log_nb_positive")
    _, zinb_fn = _patches.lookup(_NB, "log_zinb_positive")
    if not (isinstance(torch_normal, type) and issubclass(torch_normal, torch.distributions.Normal)):
        raise _patches._moved(f"{_ENCODERS}.Normal as torch.distributions.Normal")
    _patches.set(encoders, "Normal", _posterior_class(backend))
    _patches.set(nb, "log_nb_positive", _log_nb_positive(nb_fn, backend))
    _patches.set(nb, "log_zinb_positive", _log_zinb_positive(zinb_fn, backend))


def revert() -> None:
    """Put scvi's own names back."""
    _patches.revert()
