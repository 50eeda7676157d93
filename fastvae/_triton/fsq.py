"""Finite scalar quantization: launches of ``kernels/fsq.py`` as custom ops with autograd."""

import functools

import torch
import triton
from torch import Tensor

from ..kernels import fsq as fsq_k
from ..reference import fsq as fsq_ref
from . import common

BLOCK_N = 128


@functools.lru_cache(maxsize=64)
def constants(levels: "tuple[int, ...]", device: torch.device) -> "tuple[Tensor, Tensor]":
    """(half_l, shift, width, offset as a (4, d) fp32 tensor, basis (d,) int64) on ``device``: copied there
    once per (levels, device), not per call (a per-call copy from the host would sync the stream and is
    illegal under CUDA-graph capture)."""
    half_l, offset, shift, width, basis = fsq_ref.fsq_constants(list(levels))
    consts = torch.tensor([half_l, shift, width, offset], dtype=torch.float32).to(device)
    return consts, torch.tensor(basis, dtype=torch.int64).to(device)


def _launch_args(z: Tensor) -> "tuple[int, int, int, int, int, int]":
    b, s, d = z.shape
    return b * s, s, d, z.stride(0), z.stride(1), z.stride(2)


@common.custom_op("fastvae::fsq")
def _fsq_op(z: Tensor, consts: Tensor, basis: Tensor, codebook_size: int) -> "tuple[Tensor, Tensor, Tensor]":
    """(q (N, d) in z's dtype, indices (N,) int64, counts (codebook_size,) int64 or (0,) when 0); z a (B, S, d)
    view read through its strides."""
    n, s, d, sb, ss, sd = _launch_args(z)
    q = common.alloc(z, (n, d), z.dtype)
    idx = common.alloc(z, (n,), torch.int64)
    counts = torch.zeros(max(codebook_size, 1), dtype=torch.int32, device=z.device)
    if n:
        fsq_k.fsq_fwd_kernel[(triton.cdiv(n, BLOCK_N),)](
            z, consts, basis, q, idx, counts, n, s, d, sb, ss, sd,
            HIST=codebook_size > 0, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
        )
    return q, idx, counts[:codebook_size].to(torch.int64)


@_fsq_op.register_fake
def _(z, consts, basis, codebook_size):
    n = z.shape[0] * z.shape[1]
    return (z.new_empty((n, z.shape[2])), z.new_empty((n,), dtype=torch.int64),
            z.new_empty((codebook_size,), dtype=torch.int64))


@common.custom_op("fastvae::fsq_backward")
def _fsq_bwd_op(z: Tensor, consts: Tensor, grad: Tensor) -> Tensor:
    n, s, d, sb, ss, sd = _launch_args(z)
    dz = common.alloc(z, (n, d), z.dtype)
    if n:
        fsq_k.fsq_bwd_kernel[(triton.cdiv(n, BLOCK_N),)](
            z, consts, grad.contiguous(), dz, n, s, d, sb, ss, sd,
            BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
        )
    return dz


@_fsq_bwd_op.register_fake
def _(z, consts, grad):
    return z.new_empty((z.shape[0] * z.shape[1], z.shape[2]))


def _setup(ctx, inputs, output):
    z, consts, _, _ = inputs
    ctx.save_for_backward(z, consts)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_q, _gi, _gc):
    z, consts = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: the straight-through formula, differentiable again
        def formula(z):
            half_l, shift, width = consts[0], consts[1], consts[2]
            return torch.tanh(z.float() + shift) * (half_l / width)  # dq/dz's antiderivative, up to a constant

        grads = common.differentiable_backward(formula, (z,), ctx.needs_input_grad[:1],
                                               (grad_q.reshape(z.shape),))
        return grads[0], None, None, None
    return _fsq_bwd_op(z, consts, grad_q).reshape(z.shape), None, None, None


_fsq_op.register_autograd(_backward, setup_context=_setup)


def fsq(z3: Tensor, levels: "tuple[int, ...]", codebook_size: int) -> "tuple[Tensor, Tensor, Tensor]":
    """Validated arguments in: z3 a (B, S, d) view of the tokens; (q (N, d), indices (N,), counts)."""
    consts, basis = constants(tuple(levels), z3.device)
    return _fsq_op(z3, consts, basis, codebook_size)
