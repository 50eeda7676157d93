"""A pytest plugin for scvi-tools' own test suite (``-p fastvae_scvi_plugin``, ci/ on PYTHONPATH): with
FASTVAE_SCVI_PATCH=1 it applies ``fastvae.integrations.scvi`` when pytest loads it, before any test module
imports scvi's names (``from scvi.distributions._negative_binomial import log_zinb_positive`` then binds the
patched one), on the backend FASTVAE_SCVI_BACKEND names (unset: fastvae's default). Without it the suite runs
on scvi's own code: the baseline the patched run is compared with (ci/scvi_own_tests.py)."""

from __future__ import annotations

import os

# scvi's view_anndata_setup calls rich.pretty without importing it; rich's package no longer imports its
# submodules, so those tests fail with AttributeError on a fresh install, patched or not
import rich.pretty  # noqa: F401

if os.environ.get("FASTVAE_SCVI_PATCH") == "1":
    import fastvae.integrations.scvi as _fv_scvi

    _fv_scvi.apply(backend=os.environ.get("FASTVAE_SCVI_BACKEND") or None)
