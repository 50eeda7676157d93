"""diffusers on fastvae: ``apply()`` makes every diffusers module that builds ``DiagonalGaussianDistribution``
(AutoencoderKL and its temporal, video, asymmetric and consistency-decoder variants: each imports the name from
``diffusers.models.autoencoders.vae``) build fastvae's, whose sample(), kl(), nll() and mode() run on the fused
kernels with diffusers' numbers and shapes; and every module that builds ``VectorQuantizer`` (VQModel's
quantizer) a subclass of diffusers' whose forward runs ``fastvae.vector_quantize`` (the streamed nearest-code
search: no N x K ``torch.cdist`` matrix). ``revert()`` restores diffusers' classes.

    import fastvae.integrations.diffusers
    fastvae.integrations.diffusers.apply()
    posterior = vae.encode(x).latent_dist          # fastvae.distributions.DiagonalGaussianDistribution
    out = vq_model(x)                              # VQModel: the quantizer on fastvae.vector_quantize
"""

from __future__ import annotations

import sys

from torch import Tensor

from .._checks import _check_backend
from ..distributions import DiagonalGaussianDistribution
from ..functional.vq import vector_quantize
from . import Patches, require

__all__ = ["apply", "revert", "SUPPORTED"]

SUPPORTED = ">= 0.27"  # pyproject's extra; tested at its lowest and the newest (ci/integrations.sh)
_MODULE, _NAME = "diffusers.models.autoencoders.vae", "DiagonalGaussianDistribution"
_VQ_NAME = "VectorQuantizer"
_patches = Patches("diffusers", SUPPORTED)


def _with_backend(backend: str | None) -> type:
    if backend is None:
        return DiagonalGaussianDistribution

    class Posterior(DiagonalGaussianDistribution):
        def __init__(self, parameters, deterministic: bool = False):
            super().__init__(parameters, deterministic, backend=backend)

    Posterior.__name__ = Posterior.__qualname__ = DiagonalGaussianDistribution.__name__
    return Posterior


def _vector_quantizer(original: type, backend: str | None) -> type:
    """A subclass of diffusers' VectorQuantizer (its __init__, embedding, remap and get_codebook_entry, its
    state_dict keys) whose forward is ``fastvae.vector_quantize`` with diffusers' semantics."""

    class VectorQuantizer(original):  # type: ignore[misc, valid-type]
        """diffusers' ``VectorQuantizer`` on ``fastvae.vector_quantize``: z (B, C, H, W) read in place, each
        pixel's C features to the nearest of the ``n_e`` codes (ties to the lowest index, as diffusers'
        ``torch.argmin(torch.cdist(...))``), z_q = z + sg(e - z) (straight-through) in z's layout, and diffusers'
        loss: ``legacy=True`` (its default) mean((sg(e) - z)^2) + beta mean((e - sg(z))^2), ``legacy=False`` beta
        on the commitment term instead. Returns diffusers' (z_q, loss, (None, None, indices)): indices (B H W,)
        flattened, (B H W, 1) after ``remap``, (B, H, W) with ``sane_index_shape``."""

        def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple]:
            cw, bw = (1.0, float(self.beta)) if self.legacy else (float(self.beta), 1.0)
            out = vector_quantize(z, self.embedding.weight, dim=1, commitment_weight=cw, codebook_weight=bw,
                                  backend=backend)
            z_q = out.quantized
            indices = out.indices.reshape(-1)
            if self.remap is not None:
                indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
            if self.sane_index_shape:
                indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
            return z_q, out.loss, (None, None, indices)

    VectorQuantizer.__module__ = __name__
    return VectorQuantizer


def apply(backend: str | None = None) -> list[str]:
    """Swap diffusers' DiagonalGaussianDistribution for fastvae's, and its VectorQuantizer for a subclass on
    ``fastvae.vector_quantize``, in every diffusers module that holds them; returns those modules' names (a
    module holding both counts once). ``backend`` as fastvae's functions take it: None (the default) installs
    fastvae's class itself, whose calls follow ``fastvae.set_backend`` (by default the kernels on CUDA);
    "torch" or "triton" a subclass pinned to it. The classes keep diffusers' shapes, broadcasting (a prior or a
    sample of another batch shape) and dtype promotion; see ``fastvae.distributions``."""
    _check_backend(backend)  # before anything is patched
    require("diffusers", "diffusers", "diffusers")
    revert()
    _, original = _patches.lookup(_MODULE, _NAME)
    _, original_vq = _patches.lookup(_MODULE, _VQ_NAME)
    require("diffusers.models.autoencoders", "diffusers", "diffusers")  # imports every autoencoder module
    # VQModel's module (diffusers.models.vq_model before 0.28, lazily imported): imported before the swap, so
    # that it is patched and reverted like the rest
    getattr(sys.modules["diffusers"], "VQModel", None)
    swaps = ((_NAME, original, _with_backend(backend)),
             (_VQ_NAME, original_vq, _vector_quantizer(original_vq, backend)))
    patched = set()
    for name, module in list(sys.modules.items()):
        if not (name == "diffusers" or name.startswith("diffusers.")) or module is None:
            continue
        for attr, old, new in swaps:
            if vars(module).get(attr) is old:
                _patches.set(module, attr, new)
                patched.add(name)
    return sorted(patched)


def revert() -> None:
    """Put diffusers' own class back wherever apply() replaced it."""
    _patches.revert()
