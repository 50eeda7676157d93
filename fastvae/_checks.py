"""Argument checks and backend dispatch, run before any compute.

Every check here raises ``TypeError``/``ValueError`` naming the argument and the shapes involved, so that a
bad call never reaches a kernel.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .reference.common import REDUCTIONS

BACKENDS = (None, "torch", "triton")


class ShapeError(ValueError, RuntimeError):
    """Shapes that cannot broadcast. A ``ValueError`` like every other argument error here, and also a
    ``RuntimeError`` because that is what torch raises for the same call (drop-in compatibility)."""


class DeviceError(ValueError, RuntimeError):
    """Tensors on different devices: a ``RuntimeError`` as torch raises for the same call (``except
    RuntimeError`` around torch code keeps working), and a ``ValueError`` like every argument error here."""


def check_tensor(name: str, t: object, integer_ok: bool = False) -> Tensor:
    """A tensor of a floating dtype; with ``integer_ok`` also an integer or bool one (a target or an
    observation, which torch's losses promote with the floating input, e.g. uint8 pixels)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point() and not (integer_ok and not t.is_complex()):
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def check_dim(name: str, t: Tensor, dim: object) -> int:
    """``dim`` a dim of ``t`` (negative counts from the end, as torch's), for argument ``name``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or t.dim() == 0 or not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim must be in [{-t.dim()}, {t.dim() - 1}] for {name} of shape {tuple(t.shape)}, "
                         f"got {dim!r}")
    return dim


def check_positive(name: str, value: object) -> float:
    """A finite Python number > 0 (a temperature, a scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_same_device(**tensors: Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise DeviceError(
                f"Expected all tensors to be on the same device: {name} is on {t.device} but {first_name} is on "
                f"{first.device}"
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


def broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """torch.broadcast_shapes for shapes known to broadcast, in plain Python: torch's own imports sympy on
    its first call (seconds in a fresh process), which an argument check must not cost."""
    # plain loops: torch.compile traces this (no generator into max())
    out: list[int] = []
    for shape in shapes:
        shape = list(shape)
        if len(shape) > len(out):
            out = [1] * (len(shape) - len(out)) + out
        offset = len(out) - len(shape)
        for i, size in enumerate(shape):
            if size != 1:
                out[offset + i] = size
    return torch.Size(out)


def broadcast_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> torch.Size:
    """torch.broadcast_shapes with torch's own elementwise-op message, and the argument names."""
    for i, (x, y) in enumerate(zip(reversed(a.shape), reversed(b.shape))):
        if x != y and x != 1 and y != 1:
            dim = max(a.dim(), b.dim()) - 1 - i
            raise ShapeError(
                f"{name_b} of shape {tuple(b.shape)} does not broadcast with {name_a} of shape {tuple(a.shape)}: "
                f"The size of tensor a ({x}) must match the size of tensor b ({y}) at non-singleton dimension {dim}"
            )
    return broadcast_shapes(a.shape, b.shape)


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


# ---------------------------------------------------------------------------------------------------------
# The global backend: one setting every call honours (a per-call ``backend=`` overrides it), in the style of
# torch.backends' flags. FASTVAE_BACKEND sets it at import; set_backend / the use_backend() context manager later.


def _backend_from_env() -> str | None:
    value = os.environ.get("FASTVAE_BACKEND", "").strip().lower()
    if value in ("", "auto", "none"):
        return None
    if value not in ("torch", "triton"):
        raise ValueError(f"FASTVAE_BACKEND must be 'auto', 'torch' or 'triton', got {value!r}")
    return value


_BACKEND: str | None = _backend_from_env()


def _check_backend(backend: object) -> str | None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    return backend  # type: ignore[return-value]


def get_backend() -> str | None:
    """The global backend: None (the kernels for CUDA tensors, the eager path otherwise), "torch" (the eager
    path everywhere) or "triton" (the kernels everywhere: CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1)."""
    return _BACKEND


def set_backend(backend: str | None) -> None:
    """Set the global backend (see ``get_backend``); a call's own ``backend=`` still wins."""
    global _BACKEND
    _BACKEND = _check_backend(backend)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """``with fastvae.use_backend("triton"): ...`` runs every call inside on that backend, then restores."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def functorch_active() -> bool:
    """True inside torch.func transforms (grad, vmap, jacrev...): they run on the eager path, whose formulas
    functorch can differentiate and batch (a Triton custom op has no functorch rules)."""
    return torch._C._are_functorch_transforms_active()


def use_triton(backend: object, *tensors: Tensor) -> bool:
    """Pick the path: "torch" is the eager reference; None means triton for CUDA tensors when it is there.

    ``backend`` is the call's own; None there defers to the global setting (``set_backend``). float64 always
    takes the reference path (the kernels compute in fp32), and so does every call under torch.func.
    """
    backend = _check_backend(backend)
    if backend is None:
        backend = _BACKEND
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
    if functorch_active():
        return False
    return all(x.dtype != torch.float64 for x in tensors)


def active_path(device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str | None = None) -> str:
    """The path a call on tensors of ``device`` and ``dtype`` takes now, in words: "triton",
    "triton (interpreter)" or "torch" (what a log should print, not what was asked for)."""
    device = torch.device(device)
    probe = _DeviceProbe(device, dtype)  # the decision reads only a tensor's device and dtype
    if not use_triton(backend, probe):  # type: ignore[arg-type]
        return "torch"
    return "triton (interpreter)" if device.type == "cpu" else "triton"


class _DeviceProbe:
    """What use_triton reads of a tensor (device and dtype), for a device that may not be this process's."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.is_cuda = device.type == "cuda"


# ---------------------------------------------------------------------------------------------------------
# Input validation. No kernel asserts on the device (a device-side assert poisons the CUDA context: the run
# dies at a later, unrelated sync, and under DDP the other ranks hang): an invalid element gives NaN in the
# loss and its gradient. Eager checks that raise ValueError, the same on every backend, run when the setting
# says so; the default (None) checks exactly where torch itself checks in eager mode.

_VALIDATE: bool | None = None


def set_default_validate_args(value: bool | None) -> None:
    """True: every op checks its inputs' values and raises ``ValueError`` on an invalid one (one host sync
    per check: a reduction to a bool read on the host). False: never; invalid elements give NaN. None (the
    default): check only where torch's own twin checks in eager mode (``F.gaussian_nll_loss``'s negative
    var). Under torch.compile tracing or CUDA-graph capture the checks give way to the NaN path."""
    global _VALIDATE
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"value must be a bool or None, got {type(value).__name__}")
    _VALIDATE = value


def get_default_validate_args() -> bool | None:
    return _VALIDATE


def validating(torch_checks: bool, *tensors: Tensor) -> bool:
    """Whether an op whose torch twin does (``torch_checks``) or does not check runs its value checks now."""
    want = torch_checks if _VALIDATE is None else _VALIDATE
    if not want or torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return not functorch_active()


def check_values(invalid: Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` when any element of the bool tensor ``invalid`` is set (a host sync)."""
    if bool(invalid.any()):
        raise ValueError(message)
