"""Tile machinery shared by the kernels that score tokens against a codebook (the VQ search, the soft
assignment): a tile of BLOCK_N tokens read in place through their strides, and its [BLOCK_N, BLOCK_K] block of
dot products with a tile of codes, accumulated over the features in chunks of BLOCK_D through ``tl.dot``.

    acc_nk = sum_d z_nd e_kd

Token addressing: token n is (b, s) = (n // S, n % S) at b * stride_b + s * stride_s, feature d at
d * stride_d (+ head * D * stride_d for head ``head`` of D features): channels-last (..., D) tokens and
channels-first (B, D, H, W) maps are both read where they lie. Codes are rows of a (heads, K, D) codebook with
a unit feature stride.

Precision: one 16-bit dtype on both sides goes to the tensor cores as it is (the products are exact in fp32,
the accumulation is fp32); anything else is multiplied in fp32 as tf32x3 (fp32 accuracy on the tensor cores),
or, with IEEE, as plain fp32 FMAs. Bytes: a token tile is read once per code tile from L1/L2 (BLOCK_N D per
BLOCK_N BLOCK_K dot products), a code tile once per token tile.
"""

import triton
import triton.language as tl


@triton.jit
def token_split(rows, S):
    """(b, s) = (n // S, n % S) of token indices: one int64 division (a subroutine call on the GPU), its
    remainder by a multiply, shared by every tensor a kernel addresses by token."""
    b = rows // S
    return b, rows - b * S


@triton.jit
def token_base(b, s, head, D, stride_b, stride_s, stride_d):
    """Element offsets of feature 0 of head ``head`` of the tokens (b, s) in a tensor of these strides."""
    return b * stride_b + s * stride_s + head.to(tl.int64) * D * stride_d


@triton.jit
def token_rows(pid, N, S, head, D, stride_b, stride_s, stride_d, BLOCK_N: tl.constexpr):
    """Token indices of tile ``pid``, their mask and their element offsets (int64: N * stride passes 2^31
    long before N does, e.g. a 256-channel latent of 8M tokens)."""
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    b, s = token_split(rows, S)
    return rows, rows < N, token_base(b, s, head, D, stride_b, stride_s, stride_d)


@triton.jit
def token_chunk(z_ptr, z_base, row_ok, d0, D, stride_d, BLOCK_D: tl.constexpr):
    """Features [d0, d0 + BLOCK_D) of the token tile, [BLOCK_N, BLOCK_D] in z's dtype (0 past D or N)."""
    ds = d0 + tl.arange(0, BLOCK_D)
    return tl.load(z_ptr + z_base[:, None] + ds[None, :].to(tl.int64) * stride_d,
                   mask=row_ok[:, None] & (ds < D)[None, :], other=0.0)


@triton.jit
def code_chunk(e_base, ks, k_ok, d0, D, stride_ek, BLOCK_D: tl.constexpr):
    """Features [d0, d0 + BLOCK_D) of the codes ``ks``, [BLOCK_K, BLOCK_D] in the codebook's dtype."""
    ds = d0 + tl.arange(0, BLOCK_D)
    return tl.load(e_base + ks[:, None].to(tl.int64) * stride_ek + ds[None, :],
                   mask=k_ok[:, None] & (ds < D)[None, :], other=0.0)


@triton.jit
def dot_acc(zt, et, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """acc + zt @ et^T in fp32 at the precision the module docstring gives."""
    if IEEE:
        return tl.dot(zt.to(tl.float32), tl.trans(et.to(tl.float32)), acc, input_precision="ieee")
    elif DOT_FP32:
        return tl.dot(zt.to(tl.float32), tl.trans(et.to(tl.float32)), acc, input_precision="tf32x3")
    else:  # one 16-bit dtype: exact products, fp32 accumulation
        return tl.dot(zt, tl.trans(et), acc)


@triton.jit
def token_code_dot(
    z_ptr, z_base, row_ok, e_base, ks, k_ok, D, stride_d, stride_ek,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_K] fp32 = z . e of the token tile (offsets ``z_base``) and the codes ``ks`` (rows
    of ``e_base`` with stride ``stride_ek``); padded tokens, codes and features contribute 0. A caller whose
    D fits one chunk loads the token tile once, before its loop over code tiles, and calls ``dot_acc``."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        acc = dot_acc(token_chunk(z_ptr, z_base, row_ok, d0, D, stride_d, BLOCK_D),
                      code_chunk(e_base, ks, k_ok, d0, D, stride_ek, BLOCK_D), acc, DOT_FP32, IEEE)
    return acc
