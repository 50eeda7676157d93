"""Launches of the Triton kernels, wrapped as ``torch.library`` custom ops with autograd, one module per op
family (``common`` holds what they share).

Custom ops (rather than bare ``autograd.Function``s) make every launch opaque to ``torch.compile``: a
training step that calls fastvae compiles with ``fullgraph=True`` and the kernels run as they are. They also
run under ``TRITON_INTERPRET=1`` on CPU tensors, which is how CI tests the kernels.

Nothing here reads a device value on the host: the RNG seed is drawn into a one-element device tensor, the
reductions are finished on the device, and grad_output is read by the kernels themselves.
"""

from . import common
from .gaussian_nll import gaussian_nll, nll_supported
from .latent import mmd, tc_log_densities
from .likelihoods import bce_supported, bce_with_logits, nb_nll, nb_supported, poisson_nll
from .sampling import sample_kl, sample_log_weights

__all__ = ["common", "gaussian_nll", "nll_supported", "sample_kl"]
__all__ += ["bce_supported", "bce_with_logits", "nb_nll", "nb_supported", "poisson_nll"]
__all__ += ["sample_log_weights"]
from . import discretized  # noqa: E402
from .discretized import discretized_nll, dmol_nll, sample_dmol  # noqa: E402

__all__ += ["discretized", "discretized_nll", "dmol_nll", "sample_dmol"]
__all__ += ["mmd", "tc_log_densities"]
from .vq import vq_search  # noqa: E402

__all__ += ["vq_search"]
from .lfq import lfq_codebook_entropy  # noqa: E402

__all__ += ["lfq_codebook_entropy"]
from .fsq import fsq  # noqa: E402

__all__ += ["fsq"]
from .gumbel import gumbel_softmax  # noqa: E402

__all__ += ["gumbel_softmax"]
from .soft_assign import codebook_soft_assign  # noqa: E402

__all__ += ["codebook_soft_assign"]
