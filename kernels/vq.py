"""Nearest-code search of vector quantization, streamed: a tile of BLOCK_N tokens against the codebook in tiles
of BLOCK_K codes through ``tl.dot``, with an online argmin (flash attention's scheme with min in place of
log-sum-exp), so no N x K distance exists anywhere, not even per program beyond one [BLOCK_N, BLOCK_K] tile.

    score_nk = bias_k - 2 z_n . e_k       euclidean: bias_k = ||e_k||^2 (||z_n||^2 is the same for every k)
    score_nk = -z_n . e_k / ||e_k||        cosine: bias 0, each code scaled by its inverse norm (||z_n|| > 0
                                           scales a row and does not move its argmin)
    index_n  = argmin_k score_nk, the lowest k on ties (strict < across tiles, ``tl.argmin`` within one)

A NaN score wins, as ``torch.argmin`` lets a NaN win (it is mapped to -inf, below every real score).

Precision: 16-bit tokens and codes go to the tensor cores as they are; their products are exact in fp32 and
the dot accumulates in fp32, so the search is a fp32 search of the same values up to the order of summation
(the fp32 rounding of the expanded form). fp32 inputs use tf32x3 (three tf32 products: fp32 accuracy on the
tensor cores; the interpreter computes in fp32). Mixed input dtypes are computed in fp32.

Work: 2 N K D FLOPs on the tensor cores; bytes: the N tokens once, the K x D codebook once per token tile
(from L2: K D bytes per BLOCK_N tokens), N indices written. At K D >> BLOCK_N D the codebook stream through
L2 and the tensor-core rate bound it, not DRAM.

Token addressing: token n is (b, s) = (n // S, n % S) at b * stride_b + s * stride_s, element d at
d * stride_d (+ head * D * stride_d): channels-last (..., D) and channels-first (B, D, H, W) read in place.
"""

import triton
import triton.language as tl

from .tiles import token_code_dot, token_rows


@triton.jit
def _argmin_tiles(
    z_ptr, z_base, row_ok, e_base, bias_ptr, scale_ptr, head, K, D, stride_d, stride_ek,
    COSINE: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(best score, its index) of each token of the tile over all K codes: the online argmin."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        acc = token_code_dot(z_ptr, z_base, row_ok, e_base, ks, k_ok, D, stride_d, stride_ek,
                             DOT_FP32, False, BLOCK_N, BLOCK_K, BLOCK_D)
        if COSINE:
            score = -acc * tl.load(scale_ptr + head * K + ks, mask=k_ok, other=0.0)[None, :]
        else:
            score = tl.load(bias_ptr + head * K + ks, mask=k_ok, other=0.0)[None, :] - 2.0 * acc
        score = tl.where(score != score, float("-inf"), score)
        score = tl.where(k_ok[None, :], score, float("inf"))
        tile_min = tl.min(score, axis=1)
        tile_arg = tl.argmin(score, axis=1, tie_break_left=True)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg.to(tl.int64) + k0, best_idx)
    return best, best_idx


@triton.jit
def vq_argmin_kernel(
    z_ptr, e_ptr, bias_ptr, scale_ptr, idx_ptr,
    N, S, K, D,
    stride_b, stride_s, stride_d, stride_eh, stride_ek,
    COSINE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(1)
    rows, row_ok, z_base = token_rows(tl.program_id(0), N, S, head, D, stride_b, stride_s, stride_d, BLOCK_N)
    _, best_idx = _argmin_tiles(z_ptr, z_base, row_ok, e_ptr + head.to(tl.int64) * stride_eh, bias_ptr, scale_ptr,
                                head, K, D, stride_d, stride_ek, COSINE, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
    tl.store(idx_ptr + rows * tl.num_programs(1) + head, best_idx, mask=row_ok)
