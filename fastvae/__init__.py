"""fastvae: fused Triton kernels for the VAE loss.

    z    = mu + exp(0.5 logvar) * eps                       reparameterize / reparameterize_kl
    KL   = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar)       gaussian_kl / reparameterize_kl
    NLL  = 0.5 * (log var + (x - x_hat)^2 / var)            gaussian_nll_loss (torch drop-in)
    NLL  = 0.5 * (logvar + (x - x_hat)^2 exp(-logvar))      gaussian_nll_loss_logvar
"""

from . import distributions, nn
from ._checks import (
    DeviceError,
    active_path,
    get_backend,
    get_default_validate_args,
    set_backend,
    set_default_validate_args,
    use_backend,
)
from .functional import (
    VQ_PRESETS,
    CodebookEMA,
    CodebookUsage,
    ShapeError,
    TCDecomposition,
    VQOutput,
    binary_cross_entropy_with_logits,
    bits_per_dim,
    codebook_ema_update,
    codebook_usage,
    discretized_gaussian_nll,
    discretized_logistic_nll,
    discretized_mix_logistic_nll,
    estimate_log_likelihood,
    gaussian_kl,
    gaussian_nll_loss,
    gaussian_nll_loss_logvar,
    iwae_bound,
    kmeans,
    mmd,
    negative_binomial_nll,
    poisson_nll_loss,
    reparameterize,
    reparameterize_kl,
    residual_vector_quantize,
    sample_discretized_mix_logistic,
    sample_log_weights,
    tc_decomposition,
    vector_quantize,
    zinb_nll,
)

__version__ = "0.1.0"

__all__ = [
    "active_path",
    "DeviceError",
    "get_backend",
    "get_default_validate_args",
    "set_backend",
    "set_default_validate_args",
    "use_backend",
    "binary_cross_entropy_with_logits",
    "codebook_ema_update",
    "codebook_usage",
    "CodebookEMA",
    "CodebookUsage",
    "bits_per_dim",
    "discretized_gaussian_nll",
    "discretized_logistic_nll",
    "discretized_mix_logistic_nll",
    "distributions",
    "estimate_log_likelihood",
    "gaussian_kl",
    "gaussian_nll_loss",
    "gaussian_nll_loss_logvar",
    "iwae_bound",
    "kmeans",
    "mmd",
    "negative_binomial_nll",
    "nn",
    "poisson_nll_loss",
    "reparameterize",
    "reparameterize_kl",
    "residual_vector_quantize",
    "sample_discretized_mix_logistic",
    "sample_log_weights",
    "ShapeError",
    "tc_decomposition",
    "TCDecomposition",
    "vector_quantize",
    "VQ_PRESETS",
    "VQOutput",
    "zinb_nll",
]
