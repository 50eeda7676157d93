"""What every eager formula shares: torch's reductions (plus "batchmean" and "per_sample") and dtypes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


REDUCTIONS = ("none", "sum", "mean", "batchmean", "per_sample")


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction``: "none" | "sum" | "mean" | "batchmean" (sum / size of dim 0) | "per_sample" (the sum
    over every dim but the first, shape ``(B,)``)."""
    if reduction == "none":
        return loss
    if reduction == "per_sample":
        return loss if loss.dim() == 1 else loss.flatten(1).sum(1)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    # batchmean: a 0-d loss has one "batch"
    return loss.sum() / (loss.shape[0] if loss.dim() > 0 else 1)


def reduction_scale(reduction: str, n: int, shape: tuple[int, ...]) -> float:
    """The factor a reduction applies to the sum of each of its outputs (mean of nothing: nan)."""
    if reduction == "mean":
        return 1.0 / n if n else math.nan
    if reduction == "batchmean":
        return 1.0 / shape[0] if len(shape) else 1.0
    return 1.0


HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtypes(*ts: Tensor, loss: bool = True) -> tuple[torch.dtype, torch.dtype]:
    """(result dtype, compute dtype): torch's type promotion, with half types computed in fp32; a loss comes
    out in fp32 under autocast, as torch's losses do (a sample such as z keeps the promoted dtype)."""
    out = ts[0].dtype
    for t in ts[1:]:
        out = torch.promote_types(out, t.dtype)
    if loss and out in HALF_DTYPES and torch.is_autocast_enabled(ts[0].device.type):
        out = torch.float32
    return out, (torch.float32 if out in HALF_DTYPES else out)


def clamp_grad_at_bounds() -> bool:
    """Whether the installed torch's ``torch.clamp`` passes the gradient at its bounds (x == min or x == max):
    yes up to torch 2.13, no from 2.14 (the minimum-norm subgradient, an open interval). Probed, not read off
    the version, so the kernels' clamp follows whichever torch is installed."""
    with torch.enable_grad(), torch.inference_mode(False):
        x = torch.tensor([-1.0, 1.0], requires_grad=True)
        torch.clamp(x, -1.0, 1.0).sum().backward()
    return bool(x.grad.all())
