"""Importance-weighted bounds: K latent samples with their log-weights from one read of mu and logvar, the
IWAE bound, and a streaming log-likelihood estimator."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import reference
from .._checks import (
    ShapeError,
    broadcast_pair,
    check_generator,
    check_num_samples,
    check_same_device,
    check_tensor,
    use_triton,
)
from .gaussian import _check_posterior, _eps

__all__ = ["sample_log_weights", "iwae_bound", "estimate_log_likelihood"]

# estimate_log_likelihood's default chunk: about this many elements of z (and of the decoder's input) at once
CHUNK_ELEMENTS = 1 << 22


def sample_log_weights(
    mu: Tensor,
    logvar: Tensor,
    *,
    num_samples: int,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """K samples of q(z|x) = N(mu, diag e^logvar) and their log importance ratios against N(0, I):

        z[k]            = mu + exp(0.5 logvar) * eps[k],                  shape (K, *mu.shape)
        log_ratio[k, b] = log p(z[k, b]) - log q(z[k, b] | x_b)           shape (K, B)
                        = sum over all dims but the batch dim of 0.5 (eps^2 - z^2 + logvar)

    On the Triton path one kernel draws eps, writes z and reduces the log-ratio per row; backward regenerates
    eps. Differentiable in mu and logvar through both outputs (create_graph=True and torch.func.grad give the
    formula's higher derivatives). log_ratio is fp32 for 16-bit inputs. mu and logvar broadcast together as in
    the formula (a shared (1, D) logvar): z has their broadcast shape, B its dim 0; they may differ in
    floating dtype (z in the promoted one). No host sync.
    """
    shape = _check_posterior(mu, logvar)
    if len(shape) == 0:
        raise ValueError("mu must have a batch dim (dim 0): got a 0-d tensor")
    if num_samples is None:
        raise TypeError("num_samples must be an int >= 1, got None")
    num_samples = check_num_samples(num_samples)
    generator = check_generator(generator, mu.device)
    if use_triton(backend, mu, logvar):
        from .. import _triton

        out_dtype = reference.dtypes(mu, logvar)[0]
        # the op takes one shape: broadcast inputs as expanded views (autograd's expand backward sums back)
        mu = mu if mu.shape == shape else mu.expand(shape)
        logvar = logvar if logvar.shape == shape else logvar.expand(shape)
        return _triton.sample_log_weights(mu, logvar, num_samples=num_samples, generator=generator,
                                          out_dtype=out_dtype)
    return reference.sample_log_weights(mu, logvar, _eps(mu, shape, num_samples, generator))


def iwae_bound(log_likelihood: Tensor, log_ratio: Tensor) -> Tensor:
    """The K-sample importance-weighted bound per batch element, (K, B) -> (B,):

        log (1/K) sum_k exp(log p(x_b | z[k, b]) + log_ratio[k, b])

    ``log_likelihood`` is log p(x|z) (not its negation), e.g. ``-gaussian_nll_loss(..., reduction="per_sample")``
    reshaped to (K, B). A stable logsumexp; its gradient weights each sample by its normalized importance weight.
    The two broadcast as in ``log_likelihood + log_ratio`` (torch's promotion gives the dtype) to a (K, B)
    shape; shapes that do not broadcast raise ``ShapeError`` (a ValueError and torch's RuntimeError). Plain
    torch ops: any order of derivatives, torch.func, torch.compile.
    """
    check_tensor("log_likelihood", log_likelihood)
    check_tensor("log_ratio", log_ratio)
    check_same_device(log_likelihood=log_likelihood, log_ratio=log_ratio)
    shape = broadcast_pair("log_likelihood", log_likelihood, "log_ratio", log_ratio)
    if len(shape) != 2:
        raise ShapeError(
            "log_likelihood and log_ratio must broadcast to a shape (K, B): got log_likelihood "
            f"{tuple(log_likelihood.shape)} and log_ratio {tuple(log_ratio.shape)}"
        )
    if shape[0] == 0:
        raise ValueError("log_likelihood must hold at least one sample (K >= 1)")
    return reference.iwae_bound(log_likelihood, log_ratio)


def estimate_log_likelihood(
    encode: Callable[[Tensor], tuple[Tensor, Tensor]],
    log_likelihood: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """Importance-sampled estimate of log p(x) per batch element, shape (B,), in float64:

        log p(x) ~ log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z|x) = N(mu, diag e^logvar)

    ``encode(x) -> (mu, logvar)``; ``log_likelihood(z, x) -> (K', B)`` gives log p(x|z) for z of shape
    (K', B, ...). Runs without grad, K' = ``chunk_size`` samples at a time (default: about 2^22 latent
    elements a chunk), with a running logsumexp accumulated in float64: memory is bounded by one chunk
    whatever K is. The estimate is a lower bound in expectation that tightens as K grows (IWAE with K samples).
    """
    num_samples = check_num_samples(num_samples)
    if num_samples is None:
        raise TypeError("num_samples must be an int >= 1, got None")
    if chunk_size is not None:
        chunk_size = check_num_samples(chunk_size)
    check_tensor("x", x)
    with torch.no_grad():
        mu, logvar = encode(x)
        shape = _check_posterior(mu, logvar)
        if len(shape) == 0 or shape[0] != x.shape[0]:
            raise ValueError(f"encode(x) must give mu of shape (B, ...) with B = {x.shape[0]}: got {tuple(mu.shape)}")
        if chunk_size is None:
            chunk_size = max(1, min(num_samples, CHUNK_ELEMENTS // max(math.prod(shape), 1)))
        batch = shape[0]
        running_max = torch.full((batch,), -math.inf, dtype=torch.float64, device=mu.device)
        running_sum = torch.zeros(batch, dtype=torch.float64, device=mu.device)
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            z, log_ratio = sample_log_weights(mu, logvar, num_samples=k, generator=generator, backend=backend)
            ll = log_likelihood(z, x)
            if ll.shape != (k, batch):
                raise ValueError(f"log_likelihood(z, x) must have shape (K', B) = {(k, batch)}: got {tuple(ll.shape)}")
            log_w = ll.double() + log_ratio.double()
            new_max = torch.maximum(running_max, log_w.max(0).values)
            # exp(-inf - -inf) is nan: a row with no finite weight yet contributes nothing
            keep = torch.where(torch.isfinite(running_max), torch.exp(running_max - new_max), 0.0)
            running_sum = running_sum * keep + torch.exp(log_w - new_max).sum(0)
            running_max = new_max
        return running_max + torch.log(running_sum) - math.log(num_samples)
