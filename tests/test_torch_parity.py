"""PyTorch's own OpInfo cases for gaussian_nll_loss (torch/testing/_internal), run through fastvae: every
sample must give torch's values and gradients, every error input torch's error type and message."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND
from torch.testing._internal.common_methods_invocations import (
    error_inputs_gaussian_nll_loss,
    sample_inputs_gaussian_nll_loss,
)

import fastvae

DTYPES = [torch.float32] + ([torch.float64] if BACKEND == "torch" else [])


def _leaves(sample):
    return [t.detach().clone().requires_grad_() for t in (sample.input, *sample.args)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_sample_inputs(dtype, backend, device):
    samples = list(sample_inputs_gaussian_nll_loss(None, device, dtype, requires_grad=True))
    assert len(samples) > 100
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-10, 1e-12)
    for sample in samples:
        ours, theirs = _leaves(sample), _leaves(sample)
        out = fastvae.gaussian_nll_loss(*ours, **sample.kwargs, backend=backend)
        ref = F.gaussian_nll_loss(*theirs, **sample.kwargs)
        assert out.shape == ref.shape, sample
        torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
        weight = torch.rand_like(ref) + 0.5
        (out * weight).sum().backward()
        (ref * weight).sum().backward()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


def test_torch_sample_inputs_second_order(backend, device):
    """A gradient penalty through every fourth OpInfo sample (create_graph=True): torch's second-order
    gradients, on the kernels too (fp32)."""
    samples = list(sample_inputs_gaussian_nll_loss(None, device, torch.float32, requires_grad=True))[::4]
    for sample in samples:
        results = []
        for ours in (True, False):
            leaves = _leaves(sample)
            if ours:
                loss = fastvae.gaussian_nll_loss(*leaves, **sample.kwargs, backend=backend).sum()
            else:
                loss = F.gaussian_nll_loss(*leaves, **sample.kwargs).sum()
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            penalty = sum(g.pow(2).sum() for g in grads if g.requires_grad)
            (loss + penalty).backward()
            results.append([t.grad for t in leaves])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, s=sample: f"{s}: {m}")


def test_torch_error_inputs(backend, device):
    errors = list(error_inputs_gaussian_nll_loss(None, device))
    assert errors
    for err in errors:
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            fastvae.gaussian_nll_loss(s.input, *s.args, **s.kwargs, backend=backend)
        # and torch itself agrees on the case
        with pytest.raises(err.error_type, match=re.compile(err.error_regex)):
            F.gaussian_nll_loss(s.input, *s.args, **s.kwargs)
