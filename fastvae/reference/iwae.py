"""Importance-weighted bounds: K samples of q(z|x) and their log-weights against the standard-normal prior.

For z = mu + exp(0.5 logvar) * eps, eps ~ N(0, I), the log importance ratio of the prior to the posterior is

    log p(z) - log q(z|x) = sum_j 0.5 * (eps_j^2 - z_j^2 + logvar_j)        (the 2 pi terms cancel)

summed over every dim but the batch dim. With log p(x|z_k) the K-sample bound (Burda et al. 2016) is

    log p(x) >= log (1/K) sum_k exp(log p(x|z_k) + log p(z_k) - log q(z_k|x))

which is the ELBO at K = 1 and tends to log p(x) as K grows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import dtypes


def sample_log_weights(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(z, log_ratio) for eps of shape (K, *shape), shape that of mu and logvar broadcast together: z of eps's
    shape, log_ratio of shape (K, B). Plain out-of-place ops: differentiable to any order, and under torch.func."""
    z_dtype, dt = dtypes(mu, logvar, loss=False)
    lr_dtype = torch.promote_types(dtypes(mu, logvar)[0], torch.float32)
    mu, logvar, eps = mu.to(dt), logvar.to(dt), eps.to(dt)
    # the formula as written (multiply, then add), as reference.reparameterize: the same z bit for bit
    z = mu + torch.exp(0.5 * logvar) * eps
    terms = 0.5 * (eps * eps - z * z + logvar)
    log_ratio = terms if terms.dim() == 2 else terms.flatten(2).sum(2)
    return z.to(z_dtype), log_ratio.to(lr_dtype)


def iwae_bound(log_likelihood: Tensor, log_ratio: Tensor) -> Tensor:
    """log (1/K) sum_k exp(log_likelihood[k] + log_ratio[k]), per batch element: (K, B) -> (B,) (the two
    broadcast together)."""
    log_w = log_likelihood + log_ratio
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
