"""Argument checks and backend dispatch, run before any compute.

Every check here raises ``TypeError``/``ValueError`` naming the argument and the shapes involved, so that a
bad call never reaches a kernel.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .reference.common import REDUCTIONS

BACKENDS = (None, "torch", "triton")


class ShapeError(ValueError, RuntimeError):
    """Shapes that cannot broadcast. A ``ValueError`` like every other argument error here, and also a
    ``RuntimeError`` because that is what torch raises for the same call (drop-in compatibility)."""


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def check_same_device(**tensors: Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one device"
            )


def check_same_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name}: got {name} {tuple(t.shape)} and {ref_name} {tuple(ref.shape)}"
        )


def check_broadcastable_to(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` must broadcast to ``ref``'s shape without growing it (what torch accepts in ``ref - t``)."""
    ok = t.dim() <= ref.dim() and all(s in (1, r) for s, r in zip(reversed(t.shape), reversed(ref.shape)))
    if not ok:
        raise ShapeError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to {ref_name} of shape {tuple(ref.shape)}"
        )


def broadcast_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> torch.Size:
    """torch.broadcast_shapes with torch's own elementwise-op message, and the argument names."""
    for i, (x, y) in enumerate(zip(reversed(a.shape), reversed(b.shape))):
        if x != y and x != 1 and y != 1:
            dim = max(a.dim(), b.dim()) - 1 - i
            raise ShapeError(
                f"{name_b} of shape {tuple(b.shape)} does not broadcast with {name_a} of shape {tuple(a.shape)}: "
                f"The size of tensor a ({x}) must match the size of tensor b ({y}) at non-singleton dimension {dim}"
            )
    return torch.broadcast_shapes(a.shape, b.shape)


def check_reduction(reduction: object, allowed: Sequence[str] = REDUCTIONS, shape: Sequence[int] | None = None) -> str:
    """``reduction`` among ``allowed``; with the loss's ``shape``, also that "per_sample" has a dim 0."""
    if reduction not in allowed:
        # same words as torch.nn.functional.gaussian_nll_loss
        raise ValueError(f"{reduction} is not valid (reduction must be one of {', '.join(allowed)})")
    if reduction == "per_sample" and shape is not None and len(shape) == 0:
        raise ValueError("reduction='per_sample' sums over every dim but the first: the loss has no dims")
    return reduction  # type: ignore[return-value]


def check_num_samples(num_samples: object) -> int | None:
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be None or an int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return num_samples


def check_generator(generator: object, device: torch.device) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type:
        raise ValueError(f"generator is on {generator.device} but the inputs are on {device}")
    return generator


TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: object, *tensors: Tensor) -> bool:
    """Pick the path: "torch" is the eager reference; None means triton for CUDA tensors when it is there.

    float64 always takes the reference path: the kernels compute in fp32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return False
    t = tensors[0]
    runnable = TRITON_AVAILABLE and (t.is_cuda or (t.device.type == "cpu" and interpreting()))
    if backend == "triton" and not runnable:
        raise ValueError(
            "backend='triton' needs the triton package and CUDA tensors "
            f"(or TRITON_INTERPRET=1 for CPU tensors); got tensors on {t.device}"
        )
    if backend is None and not (t.is_cuda and TRITON_AVAILABLE):
        return False
    return all(x.dtype != torch.float64 for x in tensors)
