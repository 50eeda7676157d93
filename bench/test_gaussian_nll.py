"""Gaussian negative log-likelihood of a reconstruction (B, F): a fixed scalar variance, a per-element
variance, and a per-element log-variance, summed (the gradient flows to x_hat and to the (log-)variance);
and the mixed-precision case of AMP training: a bf16 decoder output against fp32 data, fixed variance.

"eager" is ``F.gaussian_nll_loss``, the function fastvae's drop-in replaces. Alone it flatters the speedups: a
scalar variance becomes ``var * ones_like(input)`` (a recon-sized tensor written, cloned and clamped), and a
tensor variance is checked with ``torch.any(var < 0)`` (a host sync, and a graph break under torch.compile).
So the variance forms are also timed against the formula as a careful user writes it by hand
(``0.5 * (log(var) + (x - x_hat)**2 / var)``, "formula" and "formula-compile"); it skips the drop-in's clamp of
the variance at eps, which makes it, if anything, the cheaper baseline.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import Batch, Bench, Case

import fastvae

VAR = 0.5  # the fixed variance of "nll_var_scalar"


def eager_nll_var_scalar(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.gaussian_nll_loss(x_hat, x, VAR, reduction="sum")


def eager_nll_var(x_hat: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return F.gaussian_nll_loss(x_hat, x, var, reduction="sum")


def eager_nll_logvar(x_hat: torch.Tensor, x: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.sum(0.5 * (logvar + (x - x_hat) ** 2 * torch.exp(-logvar)))


def formula_nll_var_scalar(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.sum(0.5 * (math.log(VAR) + (x - x_hat) ** 2 / VAR))


def formula_nll_var(x_hat: torch.Tensor, x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.sum(0.5 * (torch.log(var) + (x - x_hat) ** 2 / var))


EAGER = {"nll_var_scalar": eager_nll_var_scalar, "nll_var": eager_nll_var, "nll_logvar": eager_nll_logvar}
# the hand-written formulas of the forms whose torch function does more than the formula (nll_logvar's eager
# one is already the formula: torch has no log-variance form)
FORMULA = {"nll_var_scalar": formula_nll_var_scalar, "nll_var": formula_nll_var}


def fastvae_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    if op == "nll_var_scalar":
        return lambda x_hat, x: fastvae.gaussian_nll_loss(x_hat, x, VAR, reduction="sum", backend=backend)
    if op == "nll_var":
        return lambda x_hat, x, var: fastvae.gaussian_nll_loss(
            x_hat, x, var, reduction="sum", backend=backend
        )
    return lambda x_hat, x, lv: fastvae.gaussian_nll_loss_logvar(
        x_hat, x, lv, reduction="sum", backend=backend
    )


def min_bytes(op: str, mode: str, n: int, itemsize: int) -> int:
    """Bytes an ideal implementation moves for n elements: every tensor read once, every tensor produced
    written once, the loss (a scalar) not counted.

    fwd reads x_hat, x and the variance (when per element); fwdbwd also writes grad_x_hat and grad_var (when
    per element). The gradient of a sum needs no second read: it can be written in the forward pass.
    """
    per_element = op != "nll_var_scalar"
    reads = 2 + per_element
    writes = 1 + per_element
    return n * itemsize * (reads + (writes if mode == "fwdbwd" else 0))


def make_recon(shape: tuple[int, int], dtype: torch.dtype, mode: str, op: str, device: torch.device) -> Batch:
    grad = mode == "fwdbwd"
    x_hat = torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)
    x = torch.rand(shape, dtype=dtype, device=device)
    if op == "nll_var_scalar":
        return Batch((x_hat, x), (None,) if grad else ())
    if op == "nll_var":
        third = (torch.rand(shape, device=device) + 0.5).to(dtype)
    else:
        third = (0.5 * torch.randn(shape, device=device)).to(dtype)
    return Batch((x_hat, x, third.requires_grad_(grad)), (None,) if grad else ())


def run_nll(op: str, benchmark, bench: Bench, recon, dtype, mode, impl) -> None:
    case = Case(op, mode, impl, dtype, tuple(recon))
    itemsize = torch.empty((), dtype=dtype).element_size()
    bench.run_op(benchmark, case, EAGER[op], lambda backend: fastvae_fn(op, backend),
                 lambda: make_recon(recon, dtype, mode, op, bench.device), formula=FORMULA.get(op),
                 nbytes=min_bytes(op, mode, case.numel, itemsize))


@pytest.mark.by_hand
def test_nll_var_scalar(benchmark, bench, recon, dtype, mode, impl):
    run_nll("nll_var_scalar", benchmark, bench, recon, dtype, mode, impl)


@pytest.mark.by_hand
def test_nll_var(benchmark, bench, recon, dtype, mode, impl):
    run_nll("nll_var", benchmark, bench, recon, dtype, mode, impl)


def test_nll_logvar(benchmark, bench, recon, dtype, mode, impl):
    run_nll("nll_logvar", benchmark, bench, recon, dtype, mode, impl)


def make_amp(shape: tuple[int, int], mode: str, device: torch.device) -> Batch:
    x_hat = torch.randn(shape, device=device).to(torch.bfloat16).requires_grad_(mode == "fwdbwd")
    return Batch((x_hat, torch.rand(shape, device=device)), (None,) if mode == "fwdbwd" else ())


@pytest.mark.by_hand
def test_nll_amp_bf16_fp32(benchmark, bench, recon, mode, impl):
    """bf16 x_hat, fp32 x: ideally reads 2 + 4 bytes an element and writes the 2-byte gradient."""
    case = Case("nll_amp_bf16_fp32", mode, impl, torch.bfloat16, tuple(recon))
    bench.run_op(benchmark, case, EAGER["nll_var_scalar"], lambda backend: fastvae_fn("nll_var_scalar", backend),
                 lambda: make_amp(recon, mode, bench.device), formula=FORMULA["nll_var_scalar"],
                 nbytes=case.numel * (6 + (2 if mode == "fwdbwd" else 0)))
