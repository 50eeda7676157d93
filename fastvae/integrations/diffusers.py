"""diffusers on fastvae: ``apply()`` makes every diffusers module that builds ``DiagonalGaussianDistribution``
(AutoencoderKL and its temporal, video, asymmetric and consistency-decoder variants: each imports the name from
``diffusers.models.autoencoders.vae``) build fastvae's, whose sample(), kl(), nll() and mode() run on the fused
kernels with diffusers' numbers and shapes. ``revert()`` restores diffusers' class.

    import fastvae.integrations.diffusers
    fastvae.integrations.diffusers.apply()
    posterior = vae.encode(x).latent_dist          # fastvae.distributions.DiagonalGaussianDistribution
"""

from __future__ import annotations

import sys

from .._checks import _check_backend
from ..distributions import DiagonalGaussianDistribution
from . import Patches, require

__all__ = ["apply", "revert", "SUPPORTED"]

SUPPORTED = ">= 0.27"  # pyproject's extra; tested at its lowest and the newest (ci/integrations.sh)
_MODULE, _NAME = "diffusers.models.autoencoders.vae", "DiagonalGaussianDistribution"
_patches = Patches("diffusers", SUPPORTED)


def _with_backend(backend: str | None) -> type:
    if backend is None:
        return DiagonalGaussianDistribution

    class Posterior(DiagonalGaussianDistribution):
        def __init__(self, parameters, deterministic: bool = False):
            super().__init__(parameters, deterministic, backend=backend)

    Posterior.__name__ = Posterior.__qualname__ = DiagonalGaussianDistribution.__name__
    return Posterior


def apply(backend: str | None = None) -> list[str]:
    """Swap diffusers' DiagonalGaussianDistribution for fastvae's in every diffusers module that holds it;
    returns those modules' names. ``backend`` as fastvae's functions take it: None (the default) installs
    fastvae's class itself, whose calls follow ``fastvae.set_backend`` (by default the kernels on CUDA);
    "torch" or "triton" a subclass pinned to it. The class keeps diffusers' shapes, broadcasting (a prior or a
    sample of another batch shape) and dtype promotion; see ``fastvae.distributions``."""
    _check_backend(backend)  # before anything is patched
    require("diffusers", "diffusers", "diffusers")
    revert()
    _, original = _patches.lookup(_MODULE, _NAME)
    require("diffusers.models.autoencoders", "diffusers", "diffusers")  # imports every autoencoder module
    replacement = _with_backend(backend)
    patched = []
    for name, module in list(sys.modules.items()):
        if (name == "diffusers" or name.startswith("diffusers.")) and module is not None \
                and vars(module).get(_NAME) is original:
            _patches.set(module, _NAME, replacement)
            patched.append(name)
    return sorted(patched)


def revert() -> None:
    """Put diffusers' own class back wherever apply() replaced it."""
    _patches.revert()
