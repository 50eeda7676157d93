"""Explicit patches that put an outside library's own names on fastvae's kernels, one module per library,
imported only when used (neither library is a dependency: ``pip install -e '.[diffusers]'`` / ``'.[scvi]'`` from
a checkout):

    import fastvae.integrations.diffusers as fv_diffusers
    fv_diffusers.apply()      # diffusers' DiagonalGaussianDistribution is fastvae's, everywhere diffusers builds it,
                              # and its VectorQuantizer (VQModel's) runs fastvae.vector_quantize
    fv_diffusers.revert()     # and back

Each ``apply()`` swaps module attributes (what the library looks up at call time, as Liger-Kernel's
``apply_liger_kernel_to_*`` do), remembers the originals, and ``revert()`` puts them back. A name that an
installed version moved raises ``UnsupportedVersionError`` naming it and the supported versions.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

__all__ = ["UnsupportedVersionError", "Patches"]


class UnsupportedVersionError(ImportError):
    """The installed library lacks a name fastvae patches (moved or renamed in that version)."""


def require(module: str, dist: str, extra: str) -> ModuleType:
    """``import module``, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"fastvae.integrations.{extra} needs {dist}: pip install {dist} (in a fastvae checkout: "
                          f"pip install -e '.[{extra}]') ({e})") from e


def installed_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


class Patches:
    """The attributes one integration swapped: (module, name, original), restored in reverse order."""

    def __init__(self, dist: str, supported: str):
        self.dist, self.supported = dist, supported
        self._saved: list[tuple[object, str, object]] = []

    def lookup(self, module: str, name: str) -> tuple[ModuleType, object]:
        """(the module, its attribute ``name``), or UnsupportedVersionError naming both and the versions."""
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise self._moved(f"{module}", e) from e
        if not hasattr(mod, name):
            raise self._moved(f"{module}.{name}")
        return mod, getattr(mod, name)

    def _moved(self, what: str, cause: object = None) -> UnsupportedVersionError:
        return UnsupportedVersionError(
            f"{self.dist} {installed_version(self.dist)} has no {what}, which fastvae patches: supported are "
            f"{self.dist} {self.supported}" + (f" ({cause})" if cause else ""))

    def set(self, owner: object, name: str, value: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def revert(self) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)
