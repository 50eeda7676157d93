"""Count the Triton kernel launches a call makes: a test that a case runs on the kernels (not a silent eager
fallback) asserts the launches it expects."""

from __future__ import annotations

import collections
import contextlib
import importlib
import pkgutil

import fastvae.kernels
import triton
from triton.runtime.interpreter import InterpretedFunction

# what @triton.jit returns: a JITFunction, or under TRITON_INTERPRET=1 an InterpretedFunction, which is a
# KernelInterface only from triton 3.4 on
_KERNEL_TYPES = (triton.runtime.KernelInterface, InterpretedFunction)


class _Counting:
    """Stands in for a @triton.jit function: counts ``kernel[grid](...)`` launches, then launches."""

    def __init__(self, name: str, fn, counts: collections.Counter):
        self._name, self._fn, self._counts = name, fn, counts

    def __getitem__(self, grid):
        launch = self._fn[grid]

        def run(*args, **kwargs):
            self._counts[self._name] += 1
            return launch(*args, **kwargs)

        return run

    def __getattr__(self, attr):
        return getattr(self._fn, attr)


def _kernels():
    for info in pkgutil.iter_modules(fastvae.kernels.__path__):
        module = importlib.import_module(f"fastvae.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, _KERNEL_TYPES) and name.endswith("_kernel"):
                yield module, name, obj


@contextlib.contextmanager
def count_launches(*names: str):
    """``with count_launches() as counts:`` counts[kernel name] = launches inside the block, of every kernel
    or of the kernels ``names`` only."""
    counts: collections.Counter = collections.Counter()
    patched = []
    for module, name, fn in _kernels():
        if names and name not in names:
            continue
        setattr(module, name, _Counting(name, fn, counts))
        patched.append((module, name, fn))
    try:
        yield counts
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)


@contextlib.contextmanager
def guarded_launches(inside_guard):
    """``with guarded_launches(pred) as (inside, outside):`` every kernel launch in the block is listed by name
    in ``inside`` when ``pred()`` held at its launch, else in ``outside``."""
    inside: list[str] = []
    outside: list[str] = []

    class _Checking(_Counting):
        def __getitem__(self, grid):
            launch = self._fn[grid]

            def run(*args, **kwargs):
                (inside if inside_guard() else outside).append(self._name)
                return launch(*args, **kwargs)

            return run

    patched = []
    for module, name, fn in _kernels():
        setattr(module, name, _Checking(name, fn, collections.Counter()))
        patched.append((module, name, fn))
    try:
        yield inside, outside
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)
