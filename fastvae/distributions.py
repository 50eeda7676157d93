"""The distribution objects VAE code already uses, on the fused kernels.

``DiagonalGaussianDistribution``: ldm's and diffusers' posterior of latent-diffusion autoencoders, with their API,
numbers and output shapes. ``parameters`` (B, 2C, ...) is read in place (mean and logvar are its halves along
dim 1, the logvar clamped to [-30, 20] inside the kernel), ``sample()`` draws its noise in the kernel and draws
it again in backward, and a ``kl()`` after a ``sample()`` of a 4-D posterior is the one computed in the sampling
pass.

``Normal``: a ``torch.distributions.Normal`` whose ``rsample`` is the fused sampler on the scale as given
(z = loc + scale * eps, eps never stored) and whose KL against a Normal (fastvae's or torch's, inside
``Independent`` too) is the fused KL:

    KL(N(m, s) || N(m_p, s_p)) = log(s_p / s) + (s^2 + (m - m_p)^2) / (2 s_p^2) - 1/2

Both follow ``backend`` as the functions do: None follows the global setting (``fastvae.set_backend``; by
default the kernels on CUDA tensors), the eager formulas (torch's own for ``Normal``, diffusers' written out for
``DiagonalGaussianDistribution``) elsewhere. Shapes broadcast as the originals' (a prior or a sample of another
batch shape, torch's ``Normal(loc, scale)`` of two shapes), dtypes promote as theirs, tensors on two devices
raise ``fastvae.DeviceError`` (a ``RuntimeError``, as torch's). Gradients of any order: the eager path is plain
torch ops, the kernels' backward is differentiable under ``create_graph=True``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.distributions import Normal as _TorchNormal
from torch.distributions import register_kl
from torch.distributions.kl import _kl_normal_normal

from . import reference
from ._checks import BACKENDS, broadcast_pair, broadcast_shapes, check_same_device, check_tensor, use_triton

__all__ = ["DiagonalGaussianDistribution", "Normal"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # ldm's clamp of the posterior's log-variance
_EMPTY = torch.Size()


def _check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")


def _randn(shape, generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """diffusers' ``randn_tensor``: noise from ``generator`` (one, or a list: one per batch element), drawn on
    the generator's device when that is the CPU, then moved."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        gen_device = generator[0].device
        draw = torch.device("cpu") if gen_device.type == "cpu" else device
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=draw, dtype=dtype) for g in generator])
        return noise.to(device)
    draw = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {generator.device.type}.")
        draw = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw, dtype=dtype).to(device)


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) with ``mean, logvar = parameters.chunk(2, dim=1)``: ldm's / diffusers' class.

        sample() = mean + exp(0.5 logvar) * eps
        kl()     = 0.5 * sum_{1,2,3}(mean^2 + exp(logvar) - 1 - logvar)
        kl(o)    = 0.5 * sum_{1,2,3}((mean - o.mean)^2 / o.var + var / o.var - 1 - logvar + o.logvar)
        nll(x)   = 0.5 * sum_dims(log 2 pi + logvar + (x - mean)^2 / var)

    ``mean`` is a view of ``parameters``; ``logvar``, ``std`` and ``var`` are made when read. With
    ``deterministic=True`` std and var are zero, ``sample()`` is the mean and ``kl()``/``nll()`` are
    ``torch.Tensor([0.0])``, as diffusers has them.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False, *, backend: str | None = None):
        check_tensor("parameters", parameters)
        if parameters.dim() < 2:
            raise ValueError(f"parameters must have a dim 1 to split into mean and logvar, got shape "
                             f"{tuple(parameters.shape)}")
        _check_backend(backend)
        self.parameters = parameters
        self.mean = parameters.chunk(2, dim=1)[0]
        self.deterministic = deterministic
        self.backend = backend
        self._fused_kl: Tensor | None = None  # the KL of the last sample(), for the kl() after it

    # the halves as chunk has them: an odd dim 1 gives the mean one more channel, and no in-place read
    def _splittable(self) -> bool:
        return self.parameters.shape[1] % 2 == 0

    @functools.cached_property
    def logvar(self) -> Tensor:
        return torch.clamp(self.parameters.chunk(2, dim=1)[1], LOGVAR_MIN, LOGVAR_MAX)

    @functools.cached_property
    def std(self) -> Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    @functools.cached_property
    def var(self) -> Tensor:
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(self.logvar)

    def _kernels(self, *others: Tensor) -> bool:
        return (not self.deterministic and self._splittable()
                and use_triton(self.backend, self.parameters, *others))

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * eps, in parameters' dtype. The eager path draws eps as diffusers does (same generator,
        same numbers); the kernels draw it from a seed that ``generator`` gives (a list of generators, one per
        image, takes the eager path)."""
        self._fused_kl = None
        if isinstance(generator, (list, tuple)) or not self._kernels():
            eps = _randn(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
            return self.mean + self.std * eps
        from . import _triton

        # the KL comes from this pass when a kl() may follow (grad mode, a 4-D posterior: one value per image)
        fuse = self.parameters.dim() == 4 and torch.is_grad_enabled() and self.parameters.requires_grad
        z, kl = _triton.sample_kl(self.parameters, None, None, None, sample=True, num_samples=None,
                                  generator=generator, reduction="per_sample" if fuse else None,
                                  out_dtype=reference.dtypes(self.parameters)[0], form=_triton.sampling.FORM_CLAMPED)
        self._fused_kl = kl
        return z

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other), other = N(0, I) by default, summed over dims 1, 2 and 3. ``other`` broadcasts
        against self as in diffusers' formula (e.g. one shared prior for the batch)."""
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None and self._fused_kl is not None:
            kl, self._fused_kl = self._fused_kl, None  # once: a later kl() builds its own graph
            return kl
        if other is None:
            if self._kernels():
                return self._kernel_kl(None, None)
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        check_same_device(parameters=self.parameters, other=other.parameters)
        shape = broadcast_pair("self.mean", self.mean, "other.mean", other.mean)
        # the split kernel reads self's halves in place and expands the prior: it takes a prior that broadcasts
        # to self's shape; a prior of a larger shape (self broadcast up) takes diffusers' formula
        if shape == self.mean.shape and not other.deterministic and self._kernels(other.parameters):
            return self._kernel_kl(other.mean, other.logvar)
        return 0.5 * torch.sum(torch.pow(self.mean - other.mean, 2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def _kernel_kl(self, mean_p: Tensor | None, logvar_p: Tensor | None) -> Tensor:
        from . import _triton

        priors = [t for t in (mean_p, logvar_p) if t is not None]
        four_d = self.parameters.dim() == 4  # the kernel's per-sample sum is diffusers' sum over dims 1-3
        _, kl = _triton.sample_kl(self.parameters, None, mean_p, logvar_p, sample=False, num_samples=None,
                                  generator=None, reduction="per_sample" if four_d else "none",
                                  out_dtype=reference.dtypes(self.parameters, *priors)[0],
                                  form=_triton.sampling.FORM_CLAMPED)
        return kl if four_d else torch.sum(kl, dim=[1, 2, 3])

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """The negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``; ``sample``
        broadcasts against the mean as in diffusers' formula."""
        if self.deterministic:
            return torch.Tensor([0.0])
        check_tensor("sample", sample, integer_ok=True)
        check_same_device(parameters=self.parameters, sample=sample)
        dims = list(dims)
        if sample.shape == self.mean.shape and sample.is_floating_point() and use_triton(
                self.backend, sample, self.parameters):
            from .functional import gaussian_nll_loss_logvar

            per_sample = sorted(d % sample.dim() for d in dims) == list(range(1, sample.dim()))
            nll = gaussian_nll_loss_logvar(sample, self.mean, self.logvar, full=True,
                                           reduction="per_sample" if per_sample else "none", backend=self.backend)
            return nll if per_sample else torch.sum(nll, dim=dims)
        logtwopi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=dims)

    def mode(self) -> Tensor:
        return self.mean


class Normal(_TorchNormal):
    """``torch.distributions.Normal(loc, scale)``, every method its own, with ``rsample`` (and ``sample``) on the
    fused sampler and the KL registered for fastvae's and torch's Normals on the fused KL, both taking the
    scale as it is. ``backend``: as the functions' (None: the kernels for CUDA tensors)."""

    backend: str | None = None

    def __init__(self, loc, scale, validate_args: bool | None = None, *, backend: str | None = None):
        super().__init__(loc, scale, validate_args=validate_args)
        if backend is not None:
            _check_backend(backend)
            self.backend = backend

    def expand(self, batch_shape, _instance=None):
        new = _instance if _instance is not None else type(self).__new__(type(self))
        new = super().expand(batch_shape, _instance=new)
        if "backend" in self.__dict__:
            new.backend = self.backend
        return new

    def _kernels(self) -> bool:
        return use_triton(self.backend, self.loc, self.scale)

    def rsample(self, sample_shape: torch.Size | Sequence[int] = _EMPTY) -> Tensor:
        """loc + scale * eps of shape ``sample_shape + batch_shape``; on the kernels eps is drawn in the kernel
        and drawn again in backward."""
        sample_shape = torch.Size(sample_shape)
        k = math.prod(sample_shape)
        if k == 0 or self.loc.numel() == 0 or not self._kernels():
            return super().rsample(sample_shape)
        from . import _triton

        z, _ = _triton.sample_kl(self.loc, self.scale, None, None, sample=True,
                                 num_samples=k if sample_shape else None, generator=None, reduction=None,
                                 out_dtype=self.loc.dtype, form=_triton.sampling.FORM_SCALE)
        return z.reshape(self._extended_shape(sample_shape))

    def sample(self, sample_shape: torch.Size | Sequence[int] = _EMPTY) -> Tensor:
        if not self._kernels():
            return super().sample(sample_shape)
        with torch.no_grad():
            return self.rsample(sample_shape)


def _kl_fused(p: _TorchNormal, q: _TorchNormal) -> Tensor:
    """KL(p || q) elementwise, over the broadcast batch shape, in one pass on the kernels."""
    backend = p.backend if isinstance(p, Normal) else q.backend
    tensors = (p.loc, p.scale, q.loc, q.scale)
    check_same_device(p_loc=p.loc, q_loc=q.loc)
    shape = broadcast_shapes(p.batch_shape, q.batch_shape)
    if math.prod(shape) == 0 or not use_triton(backend, *tensors):
        return _kl_normal_normal(p, q)
    from . import _triton

    _, kl = _triton.sample_kl(p.loc.expand(shape), p.scale.expand(shape), q.loc, q.scale, sample=False,
                              num_samples=None, generator=None, reduction="none",
                              out_dtype=reference.dtypes(*tensors)[0], form=_triton.sampling.FORM_SCALE)
    return kl


# fastvae's Normal against either; torch's own pair stays torch's. Independent's KL (torch's) calls these on the
# base distributions, then sums the reinterpreted dims.
register_kl(Normal, Normal)(_kl_fused)
register_kl(Normal, _TorchNormal)(_kl_fused)
register_kl(_TorchNormal, Normal)(_kl_fused)
