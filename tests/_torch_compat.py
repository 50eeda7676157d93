"""torch as the oracle, on every torch fastvae supports.

``torch.nn.functional.gaussian_nll_loss`` has changed what it accepts across the supported torch versions:

    var as a Python float                           torch >= 2.6 (before: AttributeError, no 'size')
    var of input's shape with a dim other than the  torch >= 2.10 (before: "var is of incorrect size")
    last one of size 1, (4, 1, 5, 6) for (4, 3, 5, 6)

fastvae keeps one semantics on every torch, the newest: a var of input's shape, of input's shape without its
last dim, of input's shape with exactly one dim of size 1 (any dim), or a non-negative Python number. Tests
compare against torch's function where the installed torch takes the case, and against fastvae's reference
formula with those var forms otherwise, so that no test fails only because the installed torch is older.

What the installed torch takes is probed, not read off a table of versions: a point release that back-ports
a case is followed without an edit here.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F

from fastvae import reference

__all__ = ["TORCH_VERSION", "gaussian_nll_loss", "torch_at_least", "torch_takes_var"]

TORCH_VERSION: tuple[int, int] = tuple(int(v) for v in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the installed torch is major.minor or newer (for ``pytest.mark.skipif``)."""
    return TORCH_VERSION >= (major, minor)


def _is_number(var: object) -> bool:
    return isinstance(var, (int, float)) and not isinstance(var, bool)


@functools.cache
def _probe(input_shape: tuple[int, ...], var_shape: tuple[int, ...] | None, var_type: type) -> bool:
    x = torch.zeros(input_shape)
    var = var_type(1) if var_shape is None else torch.ones(var_shape)
    try:
        F.gaussian_nll_loss(x, x, var)
    except (ValueError, TypeError, AttributeError, RuntimeError):
        return False
    return True


def torch_takes_var(input_shape, var) -> bool:
    """Whether the installed ``F.gaussian_nll_loss`` accepts ``var`` (a tensor or a number) for an input of
    ``input_shape``; probed once per shape on small CPU tensors."""
    if _is_number(var):
        return _probe(tuple(input_shape), None, type(var))
    return _probe(tuple(input_shape), tuple(var.shape), torch.Tensor)


def _shape_var(input: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """fastvae's var forms (torch >= 2.10's), written out here rather than taken from fastvae."""
    if var.shape == input.shape:
        return var
    if var.shape == input.shape[:-1]:
        return var.unsqueeze(-1)
    # torch's test: the sizes var has where it differs from input add up to 1 (one dim of size 1)
    if var.dim() == input.dim() and sum(v for i, v in zip(input.shape, var.shape) if i != v) == 1:
        return var
    raise ValueError(f"var of shape {tuple(var.shape)} is no var form for input of shape {tuple(input.shape)}")


def gaussian_nll_loss(input, target, var, full: bool = False, eps: float = 1e-6, reduction: str = "mean"):
    """The value ``fastvae.gaussian_nll_loss`` must give: ``F.gaussian_nll_loss`` where the installed torch takes
    ``var`` and ``reduction``, else fastvae's reference formula on the documented var forms (same formula as
    torch: var clamped at eps without stopping its gradient, 0.5 log 2 pi added when ``full``)."""
    if reduction in ("none", "sum", "mean") and torch_takes_var(input.shape, var):
        return F.gaussian_nll_loss(input, target, var, full=full, eps=eps, reduction=reduction)
    if _is_number(var):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        var = torch.full((), float(var), dtype=input.dtype, device=input.device)
    else:
        var = _shape_var(input, var)
    return reference.gaussian_nll_var(input, target, var, full, eps, reduction)
