"""What every op's launches share: the custom-op decorator (the inputs' device guard), launch configs, output
buffers, the reductions' plans and finishing kernels, the backward that scales a forward-written gradient, the
differentiable backward of ``create_graph=True``, and the RNG seed.

No module defining a custom op here uses ``from __future__ import annotations``: torch's schema inference
reads the annotations as objects (older torch rejects them as strings).
"""

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch
import triton
from torch import Tensor

from ..kernels import reduce as reduce_k
from ..reference.common import reduction_scale

GO_SCALAR, GO_ELEMENTWISE, GO_ROWS = 0, 1, 2


def _fix_interpreter_index() -> None:
    """Under TRITON_INTERPRET=1 with triton 3.3 to 3.8, a kernel's int argument is a 1-element array that the
    interpreter turns into a Python int with int(array), which numpy >= 2.4 refuses: every ``range(0, n,
    BLOCK)`` over a runtime ``n`` fails there (triton 3.9 squeezes first). Convert through ``.item()`` instead,
    in the interpreter's own tensor patch, so the kernels keep their ``for`` loops (a ``while`` loop is not
    software-pipelined on the GPU, where these loops carry ``tl.dot``s)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    if version >= (3, 9):
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "fastvae_index_fix", False):
        return

    def index(self) -> int:
        return int(self.handle.data.item())

    @functools.wraps(original)
    def patched(tensor, *args):
        original(tensor, *args)
        if args:  # triton >= 3.5 passes a scope that restores the patched attributes after the call
            args[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patched.fastvae_index_fix = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_index()


def _fix_interpreter_bf16_rounding() -> None:
    """Under TRITON_INTERPRET=1 triton's interpreter converts fp32 to bf16 (an explicit ``.to`` and the cast of
    a store) by dropping the low 16 bits, truncation, where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest
    even: every bf16 output of a kernel tested on the CPU was up to a whole ulp off the GPU's, half of them
    toward zero; and it widens a subnormal bf16 to 0. Round to nearest even here (NaN stays a quiet NaN) and
    widen by the bits, so the interpreter's bf16 is the GPU's."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "fastvae_rtne", False):
        return

    @functools.wraps(original)
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = (bits & 0x7FFFFFFF) > 0x7F800000
            rounded = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
            return interpreter.TensorHandle(rounded, dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:  # exact: the bits, shifted
            widened = (np.ascontiguousarray(src.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(widened, dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.fastvae_rtne = True
    builder.cast_impl = cast_impl


_fix_interpreter_bf16_rounding()


def device_guard(device: Optional[torch.device]):
    """The guard every launch runs under: the inputs' CUDA device made current, so Triton launches there (on
    that device's current stream), not on whichever device happens to be current (model parallelism,
    ``model.to("cuda:1")``). Nothing for CPU tensors (the interpreter)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _first_device(args: Sequence[object]) -> Optional[torch.device]:
    for a in args:
        if isinstance(a, Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, Tensor):
                    return t.device
    return None


def custom_op(name: str, *, mutates_args: "tuple[str, ...]" = ()) -> Callable:
    """``torch.library.custom_op`` whose implementation runs under ``device_guard`` of its first tensor
    argument: the one place a launch's device is set, for every op and its backward ops alike.

    The schema is inferred from the wrapped function's signature (``functools.wraps`` keeps it); string
    annotations are evaluated in this module, which imports what they name (Tensor, Optional, torch).
    """

    def wrap(fn: Callable) -> object:
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            # looked up at call time, so a test can replace device_guard and see every entry
            with device_guard(_first_device(args)):
                return fn(*args, **kwargs)

        return torch.library.custom_op(name, mutates_args=mutates_args)(guarded)

    return wrap


def differentiable_backward(
    formula: Callable[..., object], inputs: Sequence[object], needs: Sequence[bool], grad_outputs: Sequence[object]
) -> "tuple[Optional[Tensor], ...]":
    """The backward of ``create_graph=True`` (a gradient penalty, a Hessian-vector product): the op's eager
    formula recomputed on the saved inputs and differentiated by autograd with the graph kept, so the
    gradient is itself differentiable to any order with torch's numbers. The kernels' one-pass backward
    writes plain values, which would silently drop every second-order term.

    ``formula(*inputs)`` returns the op's differentiable outputs (a tensor or a tuple); ``grad_outputs``
    pairs with them (None: that output took no gradient); ``needs[i]`` says whether input i wants one. A
    backward calls this when ``torch.is_grad_enabled()``: autograd runs backward in grad mode only under
    ``create_graph=True``.
    """
    outs = formula(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [x for x, need in zip(inputs, needs) if need]
    if not pairs or not wanted:
        return tuple(None for _ in inputs)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True
        )
    it = iter(grads)
    out = []
    for x, need in zip(inputs, needs):
        if not need:
            out.append(None)
            continue
        g = next(it)
        out.append(torch.zeros_like(x) if g is None else g)
    return tuple(out)


def launch_config(n: int, per_thread: int = 8) -> "tuple[int, int]":
    """(BLOCK, num_warps): 8 elements a thread keeps enough bytes in flight to saturate HBM with few
    programs; small tensors get one small block. Kernels with long per-element math (lgamma/digamma, the
    per-row scan) take 4, where sm_90 compiles them without spilling registers (bench/sass_report.py)."""
    block = min(256 * per_thread, max(128, triton.next_power_of_2(max(n, 1))))
    return block, max(1, min(8, block // (32 * per_thread)))


def alloc(like: Tensor, shape, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Every buffer a kernel writes comes from here (the tests poison them to prove full coverage)."""
    return like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)


def dense(t: Tensor) -> bool:
    """Non-overlapping and dense: t's elements fill numel() consecutive slots of its storage, in some order
    of its dims (contiguous, channels_last, any permutation of a contiguous tensor)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def same_dense_layout(*ts: Optional[Tensor]) -> bool:
    """True when every tensor given (None skipped) is non-overlapping and dense with the same shape and
    strides: an elementwise kernel then walks them all in memory order (contiguous, channels_last, any dense
    permutation) with no copy, and ``alloc_like`` gives outputs in that same layout."""
    ts = [t for t in ts if t is not None]
    first = ts[0]
    if not dense(first):
        return False
    return all(t.shape == first.shape and (t.numel() <= 1 or t.stride() == first.stride()) for t in ts[1:])


def rows_outermost(t: Tensor) -> bool:
    """Whether dim 0 is the outermost in memory (its stride the largest): rows of a per-sample reduction are
    then contiguous runs of t's memory order, as in channels_last (NHWC keeps N outside)."""
    return t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) == max(t.stride())


def flat(t: Tensor) -> Tensor:
    """A non-overlapping dense tensor's elements in memory order, as a 1-D view (no copy)."""
    return t.as_strided((t.numel(),), (1,))


def alloc_like(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A buffer with ``like``'s shape and strides (``like`` dense): a gradient comes back in its input's
    memory format (channels_last stays channels_last, so the conv backward reads it without a copy). Written
    through ``flat`` in memory order; taken from ``alloc``, so the tests' poisoning covers it."""
    buf = alloc(like, (like.numel(),), dtype)
    return buf.as_strided(like.shape, like.stride()) if like.numel() else buf.reshape(like.shape)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient written in the forward is kept in until grad_output arrives. fp16 keeps fp32: the
    reduction's scale (1/N is below fp16's smallest subnormal past 2^24 elements) and a loss scale not yet
    applied would otherwise underflow or round it away. bf16 has fp32's exponent range and keeps bf16."""
    return torch.float32 if dtype == torch.float16 else dtype


class Reduction(NamedTuple):
    """How a loss kernel reduces N elements of a tensor of ``shape``: per element ("none"), to one value
    (sum / mean / batchmean), or to one value per row of ``row_len`` elements ("per_sample", rows = dim 0)."""

    reduction: str
    n: int
    rows: int
    row_len: int
    scale: float
    out_shape: "tuple[int, ...]"

    @staticmethod
    def plan(reduction: str, shape: "tuple[int, ...]") -> "Reduction":
        n = math.prod(shape)
        if reduction == "per_sample":
            rows = shape[0]
            row_len = n // rows if rows else 0
            if row_len == 1:  # one element a row is the elementwise loss, shaped (B,) as reference.reduce
                return Reduction("none", n, n, 1, 1.0, (rows,))
            return Reduction("per_sample", n, rows, row_len, 1.0, (rows,))
        if reduction == "none":
            return Reduction("none", n, n, 1, 1.0, tuple(shape))
        return Reduction(reduction, n, 1, n, reduction_scale(reduction, n, shape), ())

    @property
    def reduced(self) -> bool:
        return self.reduction != "none"

    @property
    def go_mode(self) -> int:
        """How backward's grad_output broadcasts over the elements."""
        return {"none": GO_ELEMENTWISE, "per_sample": GO_ROWS}.get(self.reduction, GO_SCALAR)

    def constexprs(self, block: int) -> dict:
        """The kernels' reduction switches: REDUCE (partials, not per-element values), PER_ROW, LONG_ROWS."""
        return {"REDUCE": self.reduced, "PER_ROW": self.reduction == "per_sample",
                "LONG_ROWS": self.row_len >= block}

    def buffer(self, like: Tensor, grid: int, dtype: torch.dtype) -> Tensor:
        """What the kernel writes: per-element losses in ``dtype``, or fp32 partials (one per program, or one
        per (program, row) segment: grid + rows slots)."""
        if not self.reduced:
            return alloc(like, self.out_shape, dtype)
        return alloc(like, (grid + (self.rows if self.reduction == "per_sample" else 0),), torch.float32)

    def finish(self, buf: Tensor, block: int, dtype: torch.dtype) -> Tensor:
        """The reduced loss from the kernel's partials, in a fixed order, scaled, in ``dtype``."""
        if not self.reduced:
            return buf
        out = alloc(buf, self.out_shape, dtype)
        if self.reduction != "per_sample":  # with no partials: 0, or nan for the mean of nothing
            reduce_k.sum_partials_kernel[(1,)](buf, out, buf.numel(), self.scale, BLOCK=1024)
            return out
        if self.n == 0:
            return out.zero_()
        return finish_rows(buf, out, self.rows, self.row_len, block, self.scale)


def finish_rows(buf: Tensor, out: Tensor, rows: int, row_len: int, block: int, scale: float, sets: int = 1,
                set_stride: int = 0) -> Tensor:
    """out (``sets`` x ``rows`` values) = scale * the row sums of per-row partials written by
    ``store_partials`` with tiles of ``block`` elements; set s's slots start at s * set_stride."""
    rows_per_prog, segments = 64, 8
    max_segments = (row_len + block - 2) // block + 1
    reduce_k.sum_row_partials_kernel[(triton.cdiv(sets * rows, rows_per_prog),)](
        buf, out, sets * rows, row_len, block, max_segments, scale, rows, set_stride,
        ROWS=rows_per_prog, SEGMENTS=segments,
    )
    return out


def finish_sum(partials: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """scale * the sum of fp32 partials, in a fixed order."""
    out = alloc(partials, (), dtype)
    reduce_k.sum_partials_kernel[(1,)](partials, out, partials.numel(), scale, BLOCK=1024)
    return out


def _scale_grad_launch(grad: Tensor, out: Tensor, grad_output: Tensor, row_len: int, in_place: bool) -> None:
    n = grad.numel()
    if n == 0:
        return
    go_mode = GO_SCALAR if grad_output.numel() == 1 and n != 1 else (
        GO_ELEMENTWISE if grad_output.numel() == n else GO_ROWS)
    block, warps = launch_config(n)
    reduce_k.scale_grad_kernel[(triton.cdiv(n, block),)](
        grad, out, grad_output.contiguous(), n, row_len,
        GO_MODE=go_mode, IN_PLACE=in_place, BLOCK=block, LONG_ROWS=row_len >= block, num_warps=warps,
    )


@custom_op("fastvae::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_output: Tensor, row_len: int) -> None:
    """grad *= grad_output in place (grad_output: one value, one per element, or one per row of row_len
    elements); a no-op on the device when grad_output is a scalar 1.0."""
    _scale_grad_launch(grad, grad, grad_output, row_len, True)


@_scale_grad_op.register_fake
def _(grad, grad_output, row_len):
    return None


@custom_op("fastvae::scaled_grad")
def _scaled_grad_op(grad: Tensor, grad_output: Tensor, row_len: int, dtype: torch.dtype) -> Tensor:
    """grad * grad_output in a new tensor of ``dtype`` (a gradient kept in fp32 for a 16-bit input)."""
    out = alloc(grad, grad.shape, dtype)
    _scale_grad_launch(grad, out, grad_output, row_len, False)
    return out


@_scaled_grad_op.register_fake
def _(grad, grad_output, row_len, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


def apply_grad_output(grad: Tensor, grad_output: Tensor, red: Reduction, dtype: torch.dtype) -> Tensor:
    """The gradient of an input of ``dtype`` from one the forward wrote (already scaled by the reduction):
    scaled in place when it is kept in that dtype, else into a new tensor of that dtype."""
    if grad.dtype == dtype:
        _scale_grad_op(grad, grad_output, red.row_len)
        return grad
    return _scaled_grad_op(grad, grad_output, red.row_len, dtype)


_LIB = torch.library.Library("fastvae", "IMPL")  # lives as long as the module: registrations stay


def register_autocast_fp32(op, out_dtype_index: int) -> None:
    """Under autocast the op behaves as torch's losses do there: its results come out in fp32 (the argument
    at ``out_dtype_index`` is raised from a half type to fp32), while the inputs go to the kernel in their own
    dtypes. torch.library.register_autocast would instead cast every input to fp32 first: a copy of each
    16-bit tensor at twice its bytes, which the kernels, which load any dtype and compute in fp32, never need.
    """
    name = op._name if hasattr(op, "_name") else op.__name__
    overload = getattr(torch.ops.fastvae, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _excluded=excluded):
            args = list(args)
            if args[out_dtype_index] in (torch.float16, torch.bfloat16):
                args[out_dtype_index] = torch.float32
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return overload(*args)

        _LIB.impl(name, kernel, key, with_keyset=True)


def new_seed(device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """A Philox key drawn by torch's generator into device memory: no host sync, advances torch's RNG
    state (consecutive calls differ), follows torch.manual_seed, and is re-drawn on each CUDA-graph replay.

    All 64 bits of the key are random (the kernels split it into Philox's two 32-bit key words): with 31 a
    repeat was likely after ~55k draws (the birthday bound), which a hierarchical VAE reaches in hours; with
    64 it is ~4e9 draws away. randint's upper bound is exclusive, so the key 2^63 - 1 is never drawn.
    """
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
