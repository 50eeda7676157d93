"""Every kernel family once on CPU tensors under the Triton interpreter, against the eager path.

    TRITON_INTERPRET=1 python ci/interpreter_smoke.py

Checks that the installed triton's interpreter (with the installed numpy) runs fastvae's kernels, not the
kernels' numerics at scale (the op suite does that): the reduction kernels of ``fastvae.kernels.reduce`` are
launched directly with loops of several iterations (their loop bounds are runtime integers, which the
interpreter of triton 3.3 to 3.6 at least turns into Python ints through ``int()`` of a 1-element array, an
error from numpy 2.4 on), then one public op of each kernel family runs forward and backward on both backends at tiny
shapes. ci/compat.sh runs it under the declared triton floor with the newest numpy, a pair the floor's own
Python (3.9, numpy < 2.1) cannot install; tests/test_packaging.py runs it in the main pass. Each case reports
on its own line; the exit status is the number of failed cases. Needs torch, triton and numpy only.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Callable

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 (before triton is imported)")
# numpy's warnings about the masked-off lanes the interpreter evaluates too (see pyproject's filterwarnings)
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")

import numpy  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from fastvae.kernels import reduce as reduce_k  # noqa: E402

import fastvae  # noqa: E402


def check_reduce_kernels() -> None:
    """sum_partials / sum_row_partials / scale_grad with loops of several iterations, against torch."""
    g = torch.Generator().manual_seed(0)
    # sum_partials_kernel: 37 partials in blocks of 16, three passes of its loop
    p = torch.randn(37, generator=g)
    out = torch.empty((), dtype=torch.float32)
    reduce_k.sum_partials_kernel[(1,)](p, out, p.numel(), 0.5, BLOCK=16)
    torch.testing.assert_close(out, 0.5 * p.sum())
    # sum_row_partials_kernel: R rows of L elements on tiles of T, the partial of element e at slot
    # e // T + e // L (store_partials' layout); rows of up to 11 segments, read 4 at a time
    rows, row_len, tile = 5, 40, 4
    x = torch.randn(rows * row_len, generator=g)
    e = torch.arange(rows * row_len)
    buf = torch.zeros(rows * row_len // tile + rows).index_add_(0, e // tile + e // row_len, x)
    max_segments = (row_len + tile - 2) // tile + 1
    out = torch.empty(rows)
    reduce_k.sum_row_partials_kernel[(1,)](buf, out, rows, row_len, tile, max_segments, 2.0, rows, 0,
                                           ROWS=8, SEGMENTS=4)
    torch.testing.assert_close(out, 2.0 * x.view(rows, row_len).sum(1))
    # scale_grad_kernel, per-row grad_output, rows shorter than a tile
    grad, go = torch.randn(rows * row_len, generator=g), torch.randn(rows, generator=g)
    out = torch.empty_like(grad)
    reduce_k.scale_grad_kernel[(triton.cdiv(grad.numel(), 64),)](
        grad, out, go, grad.numel(), row_len, GO_MODE=reduce_k.GO_ROWS, IN_PLACE=False, BLOCK=64,
        LONG_ROWS=False)
    torch.testing.assert_close(out, (grad.view(rows, row_len) * go[:, None]).flatten())


def _inputs(*shapes: tuple[int, ...], positive: tuple[int, ...] = ()) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(s, generator=g) for s in shapes]
    for i in positive:
        ts[i] = ts[i].abs() + 0.5
    return [t.requires_grad_() for t in ts]


def _compare(op: Callable[..., object], inputs: list[torch.Tensor], sampled: bool = False) -> None:
    """op(*inputs, backend) on the kernels (fp32) and on the eager path in float64: the outputs and the input
    gradients (of the outputs' sum) agree to fp32 rounding; for a sampled op only the noise-free outputs are
    compared (the first output is the sample). float64, not the eager fp32 path, is the oracle: the eager
    fp32 formula can be the less accurate of the two (a difference of sigmoids, say)."""
    results = []
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
        xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
        torch.manual_seed(2)
        outs = op(*xs, backend)
        outs = tuple(o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None)
        kept = outs[1:] if sampled else outs
        total = sum(o.float().sum() for o in kept if o.requires_grad)
        grads = torch.autograd.grad(total, xs, allow_unused=True) if torch.is_tensor(total) else ()
        assert all(torch.isfinite(o).all() for o in outs), f"{backend}: a non-finite output"
        results.append((kept, grads))
    (ref, ref_grads), (got, got_grads) = results
    for a, b in zip(got, ref):
        if b.is_floating_point():
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
        else:  # indices, counts
            torch.testing.assert_close(a, b)
    for a, b in zip(got_grads, ref_grads):
        if b is not None:
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def _counts(*shape: int) -> torch.Tensor:
    return torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(3)).float()


# one public op of each kernel file (kernels/<family>.py), with a full and a per-row reduction between them
CASES: dict[str, Callable[[], None]] = {
    "reduce (the kernels themselves)": check_reduce_kernels,
    "sampling: reparameterize_kl, K=2, per_sample": lambda: _compare(
        lambda mu, lv, b: fastvae.reparameterize_kl(mu, lv, reduction="per_sample", num_samples=2, backend=b),
        _inputs((3, 5), (3, 5)), sampled=True),
    "sampling: gaussian_kl, sum": lambda: _compare(
        lambda mu, lv, b: fastvae.gaussian_kl(mu, lv, reduction="sum", backend=b), _inputs((3, 5), (3, 5))),
    "gaussian_nll: gaussian_nll_loss, mean": lambda: _compare(
        lambda x_hat, x, var, b: fastvae.gaussian_nll_loss(x_hat, x, var, reduction="mean", backend=b),
        _inputs((4, 6), (4, 6), (4, 1), positive=(2,))),
    "bernoulli: binary_cross_entropy_with_logits, sum": lambda: _compare(
        lambda logits, b: fastvae.binary_cross_entropy_with_logits(
            logits, torch.rand(4, 6, generator=torch.Generator().manual_seed(4)).to(logits.dtype), reduction="sum",
            backend=b),
        _inputs((4, 6))),
    "poisson: poisson_nll_loss, mean": lambda: _compare(
        lambda log_rate, b: fastvae.poisson_nll_loss(log_rate, _counts(4, 6).to(log_rate.dtype), reduction="mean",
                                                     backend=b),
        _inputs((4, 6))),
    "negative_binomial: zinb_nll, per_sample": lambda: _compare(
        lambda mu, theta, pi, b: fastvae.zinb_nll(_counts(4, 6).to(mu.dtype), mu, theta, pi, reduction="per_sample",
                                                 backend=b),
        _inputs((4, 6), (4, 6), (4, 6), positive=(0, 1))),
    "discretized: discretized_logistic_nll, per_sample": lambda: _compare(
        lambda mean, log_scale, b: fastvae.discretized_logistic_nll(
            torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)).to(mean.dtype), mean, log_scale,
            reduction="per_sample", backend=b),
        _inputs((2, 3, 4, 4), (2, 3, 4, 4))),
    "latent: tc_decomposition": lambda: _compare(
        lambda z, mu, lv, b: fastvae.tc_decomposition(z, mu, lv, dataset_size=60, backend=b),
        _inputs((6, 3), (6, 3), (6, 3))),
    "latent: mmd": lambda: _compare(lambda x, y, b: fastvae.mmd(x, y, backend=b), _inputs((6, 3), (5, 3))),
    "vq: vector_quantize, channels first": lambda: _compare(
        lambda z, codebook, b: fastvae.vector_quantize(z, codebook, dim=1, backend=b),
        _inputs((2, 4, 3, 3), (40, 4))),
    "lfq: lookup_free_quantize": lambda: _compare(
        lambda z, b: fastvae.lookup_free_quantize(z, backend=b), _inputs((6, 5))),
    "gumbel: gumbel_softmax_kl, sum": lambda: _compare(
        lambda logits, b: fastvae.gumbel_softmax_kl(logits, reduction="sum", backend=b), _inputs((4, 7)),
        sampled=True),
    "fsq: finite_scalar_quantize": lambda: _compare(
        lambda z, b: fastvae.finite_scalar_quantize(z, [8, 5, 5], backend=b), _inputs((6, 3))),
    "soft_assign: soft_assign, euclidean, channels first": lambda: _compare(
        lambda z, codebook, b: fastvae.soft_assign(z, codebook, metric="euclidean", dim=1, backend=b),
        _inputs((2, 4, 3, 3), (40, 4))),
    "tiles: token_rows and token_code_dot, through soft_assign's dot logits over two code tiles": lambda: _compare(
        lambda z, codebook, b: fastvae.soft_assign(z, codebook, temperature=2.0, backend=b),
        _inputs((5, 20), (70, 20))),
}


def main() -> int:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
          f"numpy {numpy.__version__}")
    failed = 0
    for name, case in CASES.items():
        try:
            case()
            print(f"  ok    {name}")
        except Exception:  # every case reports, the first failure does not hide the others
            failed += 1
            print(f"  FAIL  {name}\n" + "".join("        " + line for line in
                                                 traceback.format_exc().splitlines(keepends=True)[-6:]))
    print(f"interpreter smoke: {len(CASES) - failed} of {len(CASES)} cases ok")
    return failed


if __name__ == "__main__":
    sys.exit(main())
