"""Value and gradient checks against a float64 oracle, shared by the op test files."""

import torch
from conftest import TOL


def check(actual, expected, dtype, grads=(), tol=None):
    """actual (of ``dtype``) and each gradient pair (a, e) close to the float64 oracle, atol relative to its
    largest magnitude."""
    rtol, atol = tol or TOL[dtype]
    assert actual.dtype == dtype
    expected = expected.detach()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol * scale)
    for a, e in grads:
        assert a.grad is not None and a.grad.dtype == a.dtype
        scale = max(1.0, e.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=rtol, atol=atol * scale)


def backward_both(out, ref):
    """The same random weighting of both outputs, backpropagated: gradients to compare."""
    weight = torch.rand_like(ref) + 0.5
    (out.double() * weight).sum().backward()
    (ref * weight).sum().backward()


def peers_fsq(z, levels):
    """vector-quantize-pytorch's FSQ in float64: bound, round (straight-through), codes_to_indices; returns the
    codes in [-1, 1] and the indices."""
    z = z.double()
    lv = torch.tensor(levels, dtype=torch.float64, device=z.device)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    shift = (offset / half_l).atanh()
    bounded = (z + shift).tanh() * half_l - offset
    rounded = bounded + (bounded.round() - bounded).detach()
    half_width = torch.div(lv, 2, rounding_mode="floor")
    codes = rounded / half_width
    basis = torch.cumprod(torch.tensor([1] + list(levels[:-1]), device=z.device), 0)
    indices = ((codes * half_width + half_width).round().long() * basis).sum(-1)
    return codes, indices
