"""The loss formulas in eager PyTorch, written once, one module per op family.

They are the CPU path (and any path the Triton kernels do not cover) and the oracle the kernels are tested
against. They take already-validated arguments; ``fastvae.functional`` checks and dispatches.
"""

from .common import HALF_LOG_2PI, REDUCTIONS, dtypes, reduce, reduction_scale
from .gaussian import (
    GaussianNLL,
    gaussian_kl,
    gaussian_nll_logvar,
    gaussian_nll_var,
    reparameterize,
)
from .iwae import iwae_bound, sample_log_weights
from .latent import mmd, tc_log_densities
from .likelihoods import bce_with_logits, negative_binomial_nll, poisson_nll, zinb_nll

__all__ = [
    "HALF_LOG_2PI",
    "REDUCTIONS",
    "GaussianNLL",
    "dtypes",
    "gaussian_kl",
    "gaussian_nll_logvar",
    "gaussian_nll_var",
    "reduce",
    "reduction_scale",
    "reparameterize",
]
__all__ += ["bce_with_logits", "negative_binomial_nll", "poisson_nll", "zinb_nll"]
__all__ += ["iwae_bound", "sample_log_weights"]
from .discretized import (  # noqa: E402
    discretized_gaussian_nll,
    discretized_logistic_nll,
    discretized_mix_logistic_nll,
    sample_discretized_mix_logistic,
)

__all__ += ["discretized_gaussian_nll", "discretized_logistic_nll", "discretized_mix_logistic_nll",
            "sample_discretized_mix_logistic"]
__all__ += ["mmd", "tc_log_densities"]
from .vq import (  # noqa: E402
    code_sums,
    codebook_usage,
    ema_codebook,
    gather_codes,
    rotation_trick,
    straight_through,
    vq_losses,
    vq_search,
)

__all__ += ["code_sums", "codebook_usage", "ema_codebook", "gather_codes", "rotation_trick", "straight_through",
            "vq_losses", "vq_search"]
from . import lfq  # noqa: E402

__all__ += ["lfq"]
from . import fsq  # noqa: E402

__all__ += ["fsq"]
from . import gumbel  # noqa: E402

__all__ += ["gumbel"]
from . import soft_assign  # noqa: E402

__all__ += ["soft_assign"]
