"""Public functions: validate, then dispatch to the fused Triton kernels or to the eager reference, one module
per op family.

Names, argument order and ``reduction=`` semantics mirror torch; ``reduction="batchmean"`` is sum / size of
dim 0 (the per-example loss of most VAE code) and ``"per_sample"`` the sum over every dim but the first,
shape ``(B,)``. ``backend=None`` runs Triton on CUDA tensors when it is installed and the eager reference
elsewhere; ``"torch"`` and ``"triton"`` force a path. Inputs of different floating dtypes promote as in
torch; under autocast the losses come out in fp32, as torch's do.
"""

from .._checks import ShapeError
from .gaussian import (
    gaussian_kl,
    gaussian_nll_loss,
    gaussian_nll_loss_logvar,
    reparameterize,
    reparameterize_kl,
)
from .iwae import estimate_log_likelihood, iwae_bound, sample_log_weights
from .latent import TCDecomposition, mmd, tc_decomposition
from .likelihoods import binary_cross_entropy_with_logits, negative_binomial_nll, poisson_nll_loss, zinb_nll

__all__ = [
    "ShapeError",
    "gaussian_kl",
    "gaussian_nll_loss",
    "gaussian_nll_loss_logvar",
    "reparameterize",
    "reparameterize_kl",
]
__all__ += ["binary_cross_entropy_with_logits", "negative_binomial_nll", "poisson_nll_loss", "zinb_nll"]
__all__ += ["estimate_log_likelihood", "iwae_bound", "sample_log_weights"]
from .discretized import (  # noqa: E402
    bits_per_dim,
    discretized_gaussian_nll,
    discretized_logistic_nll,
    discretized_mix_logistic_nll,
    sample_discretized_mix_logistic,
)

__all__ += ["bits_per_dim", "discretized_gaussian_nll", "discretized_logistic_nll",
            "discretized_mix_logistic_nll", "sample_discretized_mix_logistic"]
__all__ += ["TCDecomposition", "mmd", "tc_decomposition"]
from .vq import (  # noqa: E402
    VQ_PRESETS,
    CodebookEMA,
    CodebookUsage,
    VQOutput,
    codebook_ema_update,
    codebook_usage,
    kmeans,
    residual_vector_quantize,
    vector_quantize,
)

__all__ += ["CodebookEMA", "CodebookUsage", "VQ_PRESETS", "VQOutput", "codebook_ema_update", "codebook_usage",
            "kmeans", "residual_vector_quantize", "vector_quantize"]
from .lfq import LFQOutput, lookup_free_quantize  # noqa: E402

__all__ += ["LFQOutput", "lookup_free_quantize"]
from .fsq import FSQOutput, finite_scalar_quantize  # noqa: E402

__all__ += ["FSQOutput", "finite_scalar_quantize"]
from .gumbel import gumbel_softmax, gumbel_softmax_kl  # noqa: E402

__all__ += ["gumbel_softmax", "gumbel_softmax_kl"]
from .soft_assign import SoftAssignOutput, soft_assign  # noqa: E402

__all__ += ["SoftAssignOutput", "soft_assign"]
