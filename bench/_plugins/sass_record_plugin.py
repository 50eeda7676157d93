"""``-p sass_record_plugin``: the launch recorder of ``bench/_sass_record.py`` as a pytest plugin, from a folder
that holds no conftest.py (bench/'s own would shadow the tests' ``conftest`` if bench/ were on the path that
pytest-xdist hands its workers)."""

from __future__ import annotations

import importlib.util
import os
import sys

if "_sass_record" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "_sass_record", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_sass_record.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["_sass_record"] = _mod
    _spec.loader.exec_module(_mod)

from _sass_record import pytest_configure, pytest_unconfigure  # noqa: E402

__all__ = ["pytest_configure", "pytest_unconfigure"]
