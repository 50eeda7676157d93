"""What installing fastvae asks of a machine, and what the README tells a user to run.

- fastvae's own requirements leave torch and triton to the user: a torch floor (which an installed torch of
  any build satisfies as it is) and numpy, no triton (a CUDA torch brings its own; the ``triton`` extra is for the
  interpreter on CPU), and ``import fastvae`` plus every op family's eager path work with triton absent;
- the README installs from a checkout (the name on the package index is another project's) after the torch
  build the user picked;
- the warning filters of the test passes hide only the Triton interpreter's expected numpy warnings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+ (the main pass's Python)")


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


# ---------------------------------------------------------------------------------------------------------
# the requirements

# distributions that come with a particular torch build: requiring one could replace the user's torch
TORCH_BUILD = {"torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "pytorch-triton-rocm"}


def test_dependencies_are_a_torch_floor_and_numpy():
    deps = _pyproject()["project"]["dependencies"]
    assert [_name(d) for d in deps] == ["torch", "numpy"], deps
    # a floor with no upper bound, pin or local build tag: pip keeps any installed torch at or above it
    assert re.fullmatch(r"torch\s*>=\s*\d+(\.\d+)*", deps[0]), deps[0]
    assert not any(_name(d).startswith("nvidia-") for d in deps)


def test_only_the_triton_extra_names_triton_and_no_extra_names_a_torch_build():
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra, reqs in extras.items():
        names = {_name(r) for r in reqs}
        allowed = {"triton"} if extra == "triton" else set()
        assert not (names & TORCH_BUILD) - allowed, (extra, reqs)
    assert {_name(r) for r in extras["triton"]} == {"triton"}
    # the floor of the triton extra is what torch's floor pins, which ci/compat.sh installs together
    assert any(re.match(r"triton\s*>=\s*3\.3\b", r) for r in extras["triton"]), extras["triton"]


def test_the_extras_the_docs_and_ci_install_exist():
    extras = set(_pyproject()["project"]["optional-dependencies"])
    texts = [ROOT / "README.md", *(ROOT / "ci").glob("*.sh")]
    used = set()
    for path in texts:
        for group in re.findall(r"""(?:\.|fastvae)\[([a-z0-9_,-]+)\]""", path.read_text()):  # not `.[NAME]`
            used |= set(group.split(","))
    assert used, "no extra found: the pattern is stale"
    assert used <= extras, used - extras
    assert "triton" in used  # the CI's interpreter pass installs it explicitly (ci/test.sh)


# the eager path of every op family, with triton hidden from the import system (as when it is not installed)
_NO_TRITON = r"""
import importlib.util, sys

class _Hidden:
    '''Wraps a meta-path finder: triton and its submodules are not found.'''
    def __init__(self, inner):
        self._inner = inner
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self._inner, attr)

sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]
assert importlib.util.find_spec("triton") is None
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("triton is still importable")

import torch
import fastvae, fastvae.nn, fastvae.distributions, fastvae.models
from fastvae import _checks

assert not _checks.TRITON_AVAILABLE
assert fastvae.active_path("cpu") == "torch"
t = lambda *s: torch.randn(*s, requires_grad=True)
u = lambda *s: (torch.rand(*s) + 0.5).requires_grad_()
counts = lambda *s: torch.randint(0, 5, s).float()
calls = {
    "reparameterize_kl": lambda: fastvae.reparameterize_kl(t(4, 3), t(4, 3), reduction="batchmean"),
    "gaussian_nll_loss": lambda: fastvae.gaussian_nll_loss(t(4, 3), torch.randn(4, 3), u(4, 1)),
    "binary_cross_entropy_with_logits": lambda: fastvae.binary_cross_entropy_with_logits(t(4, 3), torch.rand(4, 3)),
    "poisson_nll_loss": lambda: fastvae.poisson_nll_loss(t(4, 3), counts(4, 3)),
    "zinb_nll": lambda: fastvae.zinb_nll(counts(4, 3), u(4, 3), u(4, 3), t(4, 3)),
    "discretized_logistic_nll": lambda: fastvae.discretized_logistic_nll(torch.rand(2, 3, 4, 4), t(2, 3, 4, 4),
                                                                         t(2, 3, 4, 4)),
    "sample_log_weights": lambda: fastvae.sample_log_weights(t(4, 3), t(4, 3), num_samples=2),
    "tc_decomposition": lambda: fastvae.tc_decomposition(t(6, 3), t(6, 3), t(6, 3), dataset_size=60),
    "mmd": lambda: fastvae.mmd(t(6, 3)),
    "vector_quantize": lambda: fastvae.vector_quantize(t(2, 4, 3, 3), t(16, 4), dim=1),
    "lookup_free_quantize": lambda: fastvae.lookup_free_quantize(t(6, 5)),
    "finite_scalar_quantize": lambda: fastvae.finite_scalar_quantize(t(6, 3), [8, 5, 5]),
    "gumbel_softmax_kl": lambda: fastvae.gumbel_softmax_kl(t(4, 7)),
    "gumbel_softmax(codebook=)": lambda: fastvae.gumbel_softmax(t(2, 7, 3, 3), dim=1, codebook=t(7, 4)),
    "soft_assign": lambda: fastvae.soft_assign(t(2, 4, 3, 3), t(16, 4), dim=1, metric="euclidean"),
    "nn.ELBOLoss": lambda: fastvae.nn.ELBOLoss()(torch.rand(4, 3), torch.rand(4, 3), t(4, 2), t(4, 2)),
    "DiagonalGaussianDistribution": lambda: fastvae.distributions.DiagonalGaussianDistribution(t(2, 4, 3, 3)).kl(),
    "Normal.rsample": lambda: fastvae.distributions.Normal(t(4, 3), u(4, 3)).rsample(),
}
for name, call in calls.items():
    out = call()
    outs = out if isinstance(out, tuple) else (out,)
    total = sum(o.sum() for o in outs if torch.is_tensor(o) and o.requires_grad)
    total.backward()
    assert torch.isfinite(total), name
# asking for the kernels says what is missing, as a ValueError
try:
    fastvae.gaussian_kl(torch.randn(2), torch.randn(2), backend="triton")
except ValueError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("backend='triton' without triton did not raise")
loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))
assert not loaded, loaded
print("ok", len(calls))
"""


def test_import_and_every_op_family_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVAE_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout


def test_the_interpreter_smoke_has_a_case_for_every_kernel_file():
    """ci/interpreter_smoke.py (ci/compat.sh's check of the triton floor with the newest numpy) names each case
    after its kernel file: a new kernel family needs a case there."""
    smoke = (ROOT / "ci" / "interpreter_smoke.py").read_text()
    families = {p.stem for p in (ROOT / "kernels").glob("*.py")} - {"__init__"}
    assert families, "no kernel file found"
    missing = sorted(f for f in families if not re.search(rf'^    "{f}[: ]', smoke, re.M))
    assert not missing, missing


# ---------------------------------------------------------------------------------------------------------
# the README's install instructions

# `pip install fastvae`, `pip install "fastvae[x]"`, `pip install -U fastvae`: the package index's fastvae
_FROM_INDEX = re.compile(r"""pip3?\s+install\s+(?:-[-\w]+\s+)*['"]?fastvae\b(?![-./\w])""")


@pytest.mark.parametrize("text", ["pip install fastvae", "pip install 'fastvae[diffusers]'",
                                  'pip3 install -U "fastvae[scvi]"', "python -m pip install fastvae==0.1.0"])
def test_the_index_pattern_catches_the_forms(text):
    assert _FROM_INDEX.search(text)


@pytest.mark.parametrize("text", ["pip install -e .", "pip install -e '.[diffusers]'",
                                  "pip install dist/fastvae-0.1.0-py3-none-any.whl",
                                  "pip install fastvae-0.1.0.tar.gz"])
def test_the_index_pattern_spares_a_checkout(text):
    assert not _FROM_INDEX.search(text)


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "fastvae").rglob("*.py"))]


def test_no_doc_installs_fastvae_from_the_index():
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _docs() for m in _FROM_INDEX.finditer(p.read_text())]
    assert not found, found


def test_readme_installs_torch_first_then_fastvae_from_a_checkout():
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    torch_at = install.find("--index-url https://download.pytorch.org/whl/cpu")
    checkout_at = install.find("pip install -e .")
    assert 0 <= torch_at < checkout_at, "the torch build first, then fastvae from the checkout"
    assert "pip install dist/fastvae-" in install  # a built wheel


# ---------------------------------------------------------------------------------------------------------
# the test passes' warning filters


def _filters() -> list[str]:
    return _pyproject()["tool"]["pytest"]["ini_options"]["filterwarnings"]


def _shown(message: str, category: type[Warning], module: str) -> bool:
    from _pytest.config import parse_warning_filter

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        for entry in _filters():  # applied in order, as pytest does: a later one takes precedence
            warnings.filterwarnings(*parse_warning_filter(entry, escape=False))
        warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1,
                               module=module)
    return bool(caught)


@pytest.mark.parametrize("message", ["divide by zero encountered in divide", "invalid value encountered in multiply",
                                     "overflow encountered in exp", "divide by zero encountered in log",
                                     "underflow encountered in cast", "All-NaN slice encountered"])
def test_the_interpreters_numpy_warnings_are_hidden(message):
    assert not _shown(message, RuntimeWarning, "triton.runtime.interpreter")


@pytest.mark.parametrize("message, category, module", [
    ("divide by zero encountered in divide", RuntimeWarning, "fastvae.functional.gaussian"),  # our own code
    ("divide by zero encountered in divide", RuntimeWarning, "numpy.core._methods"),
    ("some other trouble", RuntimeWarning, "triton.runtime.interpreter"),
    ("divide by zero encountered in divide", UserWarning, "triton.runtime.interpreter"),
    ("size_average and reduce args will be deprecated", UserWarning, "fastvae.functional.likelihoods"),
])
def test_any_other_warning_still_shows(message, category, module):
    assert _shown(message, category, module)
