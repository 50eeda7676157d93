"""Vector quantization's nearest-code search: launches of ``kernels/vq.py`` as a custom op.

The op returns indices only (no gradient flows through an argmin); z_q, the losses and the estimators are
O(N D) gathers and elementwise terms on the indices, in ``fastvae.functional.vq``.
"""

import torch
import triton
from torch import Tensor

from .._checks import interpreting
from ..kernels import vq as vq_k
from . import common

BLOCK_N, BLOCK_K = 64, 64


def _block_d(d: int) -> int:
    """The feature chunk of one ``tl.dot``: tl.dot needs at least 16, and 64 keeps the two operand tiles and
    the [BLOCK_N, BLOCK_K] accumulator in registers; longer codes loop over chunks."""
    return min(64, max(16, triton.next_power_of_2(d)))


@common.custom_op("fastvae::vq_search")
def _vq_search_op(z: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """Indices (B * S, H) of the nearest code; z a (B, S, H * Dh) view read in place through its strides
    (channels-last tokens, or channels-first feature maps as (B, H * W, D) with a feature stride of H * W),
    codebook (H, K, Dh)."""
    b, s, d_all = z.shape
    heads, k, dh = codebook.shape
    n = b * s
    idx = common.alloc(z, (n, heads), torch.int64)
    if n == 0:
        return idx
    e = codebook.contiguous()  # a parameter already is: no copy
    ef = e.float()
    # per-code terms, K * H floats: the squared norms (euclidean) or inverse norms (cosine, F.normalize's floor)
    bias = ef.square().sum(-1)
    scale = torch.linalg.vector_norm(ef, dim=-1).clamp_min(1e-12).reciprocal() if cosine else bias
    # one 16-bit dtype goes to the tensor cores as it is; the interpreter's tl.dot multiplies bf16's raw
    # uint16 storage, so there bf16 takes the fp32 dot, the same math (bf16 products are exact in fp32)
    dot_fp32 = not (z.dtype == e.dtype and z.dtype in (torch.float16, torch.bfloat16)) or (
        z.dtype == torch.bfloat16 and interpreting())
    vq_k.vq_argmin_kernel[(triton.cdiv(n, BLOCK_N), heads)](
        z, e, bias, scale, idx,
        n, s, k, dh,
        z.stride(0), z.stride(1), z.stride(2), e.stride(0), e.stride(1),
        COSINE=cosine, DOT_FP32=dot_fp32,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=_block_d(dh), num_warps=4,
    )
    return idx


@_vq_search_op.register_fake
def _(z, codebook, cosine):
    return z.new_empty((z.shape[0] * z.shape[1], codebook.shape[0]), dtype=torch.int64)


def vq_search(z3: Tensor, codebook: Tensor, cosine: bool) -> Tensor:
    """Validated arguments in: z3 a (B, S, H * Dh) view of the tokens, codebook (H, K, Dh); indices (B S, H)."""
    return _vq_search_op(z3.detach(), codebook.detach(), cosine)
