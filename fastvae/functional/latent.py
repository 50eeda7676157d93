"""Batch-level latent terms: the β-TCVAE decomposition of the KL and the MMD of InfoVAE and WAE.

Both compare every sample of the batch with every other one. The Triton path streams tiles of rows i against
tiles of columns j with an online log-sum-exp (flash-attention's scheme) and recomputes them in backward from
per-row statistics, so nothing of size B x B is ever in memory; the CPU path is the eager reference chunked
over rows (and checkpointed), O(chunk * B * D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from .._checks import (
    ShapeError,
    check_generator,
    check_reduction,
    check_same_device,
    check_tensor,
    use_triton,
    validating,
)

__all__ = ["TCDecomposition", "tc_decomposition", "mmd"]

ESTIMATORS = ("mss", "mws")
TC_REDUCTIONS = ("none", "per_sample", "sum", "mean")
KERNELS = ("rbf", "imq")


class TCDecomposition(NamedTuple):
    """KL(q(z|x) || p(z)) averaged over the data = mutual_info + total_correlation + dimwise_kl.

    The per-sample log-densities are there with ``log_densities=True`` (else None)."""

    mutual_info: Tensor
    total_correlation: Tensor
    dimwise_kl: Tensor
    log_qz: Tensor | None = None
    log_prod_qzi: Tensor | None = None
    log_qzx: Tensor | None = None
    log_pz: Tensor | None = None

    @property
    def total(self) -> Tensor:
        """mutual_info + total_correlation + dimwise_kl: the KL term the three decompose."""
        return self.mutual_info + self.total_correlation + self.dimwise_kl


def _check_group(group: object) -> tuple[int, int]:
    """(rank in group, world size) of ``group`` (None: no distribution)."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group= needs torch.distributed initialized (init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _gather(t: Tensor, group: object, world: int) -> Tensor:
    """The rows of every rank, concatenated in rank order, with gradients (summed back over the ranks)."""
    if world == 1:
        return t
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated for a private replacement; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        # the collective's buffers are contiguous (a chunk of a wider tensor is copied here, once per rank)
        return torch.cat(all_gather(t.contiguous(), group=group), 0)


def _check_equal_rows(z: Tensor, group: object, world: int) -> None:
    """Every rank's row count the same: one all-reduce and a host read, so only when value checks are on
    (``fastvae.set_default_validate_args(True)``); torch's own all_gather does not compare sizes across
    ranks either. The gathered shapes never depend on it: each rank gathers world x its own rows."""
    if world == 1 or not validating(False, z):
        return
    import torch.distributed as dist

    rows = z.shape[0]
    sizes = torch.tensor([rows, -rows], device=z.device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    most, neg_least = sizes.tolist()  # the one host read
    if most != rows or -neg_least != rows:
        raise ValueError(f"group=: every rank must hold the same number of rows; this rank has {rows}, "
                         f"others between {-neg_least} and {most}")


def tc_decomposition(
    z: Tensor,
    mu: Tensor,
    logvar: Tensor,
    *,
    dataset_size: int,
    estimator: str = "mss",
    reduction: str = "mean",
    log_densities: bool = False,
    group: object = None,
    backend: str | None = None,
) -> TCDecomposition:
    """The β-TCVAE decomposition (Chen et al. 2018) of the KL term from one minibatch.

    z, mu, logvar: (B, D), z_i a sample of q(z|x_i) = N(mu_i, diag e^logvar_i); ``dataset_size`` N >= B.
    Per sample i, with log q(z_i) and log prod_d q(z_i^d) estimated from the batch (``estimator``):

        mutual_info       = log q(z_i|x_i) - log q(z_i)
        total_correlation = log q(z_i) - log prod_d q(z_i^d)
        dimwise_kl        = log prod_d q(z_i^d) - log p(z_i),     p = N(0, I)

    so the three add up to log q(z_i|x_i) - log p(z_i) whatever the estimator. With log w_ij the log importance
    weight of data point j for sample i,

        log q(z_i)          ~ logsumexp_j [log w_ij + sum_d log N(z_i^d; mu_j^d, e^logvar_j^d)]
        log prod q(z_i^d)   ~ sum_d logsumexp_j [log w_ij + log N(z_i^d; mu_j^d, e^logvar_j^d)]

    ``"mws"``: w_ij = 1/(B N). ``"mss"``, as the paper's appendix defines it (M = B - 1): w_ii = 1/N on the
    sample's own data point, (N - M)/(N M) on one other (j = (i + 1) mod B), 1/M on the remaining B - 2; a
    row's weights add up to 1.

    How the peers differ. rtqichen/beta-tcvae (vae_quant.py) writes the 1/N weight with
    ``W.view(-1)[::M+1]``, a stride of B: into column 0 of every row instead of the diagonal, and the
    stratum weight into column 1 (row B - 2 gets two). YannDubs/disentangling-vae and PyTorch-VAE's
    BetaTCVAE copy that matrix and also add it to every dimension before summing over d for the joint, so
    log q(z_i) gets D log w_ij; disentangling-vae's MWS leaves out the -log(B N) altogether. Their MI and TC
    are therefore not the paper's. On the example of ``tests/test_latent.py::test_mss_peers_differ``
    (B = 64, D = 10, N = 1000, mu ~ N(0, 1), logvar ~ N(-2, 0.5^2), one z from each posterior; means over
    the batch, nats) the paper's MSS gives MI 6.90, TC 4.16, dimension-wise KL -0.35; rtqichen's matrix
    MI 4.19, TC 6.17, dimension-wise KL 0.35 (it weights the sample's own data point 1/M, not 1/N, in all
    rows but the first two); disentangling-vae's MI 41.86, TC -31.50, dimension-wise KL 0.35.

    reduction: "none" or "per_sample" (each term per sample, shape (B,)), "sum", "mean" (over the batch).
    log_densities=True also returns log_qz, log_prod_qzi, log_qzx, log_pz per sample (fp32 at least).

    group: a torch.distributed process group (e.g. ``torch.distributed.group.WORLD``) whose ranks each hold B
    rows of one global batch (the same B on every rank): each rank's rows are compared with every rank's
    (mu and logvar gathered with their gradients, nothing B x B), B and the stratification are global, and
    "sum"/"mean" give this rank's share of the global sum/mean (the shares add up to the single-process
    value, and the gradients that flow back through the gather are the single-process ones; DDP's gradient
    averaging divides them by the world size). Equal B on every rank is checked (a collective and a host
    read) only with ``fastvae.set_default_validate_args(True)``; otherwise, as with torch.distributed's own
    all_gather, unequal sizes are the collective's undefined behaviour.

    z, mu and logvar are read where they lie (``mu, logvar = h.chunk(2, dim=1)`` costs no copy), may differ
    in floating dtype (the result takes torch's promoted dtype; fp16/bf16 compute in fp32) and must have one
    shape (no broadcasting: each row is a sample of its own posterior). A shape mismatch raises ``ShapeError``
    (a ``ValueError`` and, as in torch, a ``RuntimeError``). No host sync: ``torch.compile(fullgraph=True)``
    and CUDA graphs take the call whole; create_graph=True, double backward and torch.func.grad give the
    eager formula's derivatives.
    """
    for name, t in (("z", z), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t)
    check_same_device(z=z, mu=mu, logvar=logvar)
    if z.dim() != 2:
        raise ValueError(f"z must have shape (B, D): got {tuple(z.shape)}")
    if mu.shape != z.shape or logvar.shape != z.shape:
        raise ShapeError(f"z, mu and logvar must have one shape (B, D): got z {tuple(z.shape)}, "
                         f"mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)}")
    if z.shape[1] == 0:
        raise ValueError("z must have at least one latent dimension: got D = 0")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be 'mss' or 'mws', got {estimator!r}")
    check_reduction(reduction, TC_REDUCTIONS)
    if isinstance(dataset_size, bool) or not isinstance(dataset_size, int):
        raise TypeError(f"dataset_size must be an int, got {type(dataset_size).__name__}")
    rank, world = _check_group(group)
    _check_equal_rows(z, group, world)
    rows = z.shape[0]
    batch = rows * world
    if batch == 0:
        raise ValueError("z must hold at least one sample: got B = 0")
    if estimator == "mss" and batch < 2:
        raise ValueError(f"estimator='mss' needs a batch of at least 2 (B = {batch}): it stratifies over B - 1")
    if dataset_size < batch:
        raise ValueError(f"dataset_size must be at least the batch size {batch}: got {dataset_size}")
    out_dtype = reference.dtypes(z, mu, logvar)[0]
    mu_all, lv_all = _gather(mu, group, world), _gather(logvar, group, world)
    offset = rank * rows
    mss = estimator == "mss"
    if use_triton(backend, z, mu, logvar):
        from .. import _triton

        log_qz, log_prod, log_qzx, log_pz = _triton.tc_log_densities(
            z, mu_all, lv_all, dataset_size=dataset_size, mss=mss, row_offset=offset)
    else:
        log_qz, log_prod, log_qzx, log_pz = reference.tc_log_densities(
            z, mu_all, lv_all, dataset_size=dataset_size, mss=mss, row_offset=offset)
    terms = (log_qzx - log_qz, log_qz - log_prod, log_prod - log_pz)
    if reduction == "sum":
        terms = tuple(t.sum() for t in terms)
    elif reduction == "mean":
        terms = tuple(t.sum() / batch for t in terms)
    terms = tuple(t.to(out_dtype) for t in terms)
    if not log_densities:
        return TCDecomposition(*terms)
    dens_dtype = torch.promote_types(out_dtype, torch.float32)
    return TCDecomposition(*terms, *(t.to(dens_dtype) for t in (log_qz, log_prod, log_qzx, log_pz)))


def _check_scales(scale: object, dim: int) -> list[float]:
    """The scales as host floats. A tensor is refused (TypeError): reading it would be a host sync each call,
    and its gradient would be silently dropped (neither path differentiates in the scale)."""
    if scale is None:
        return [2.0 * dim]
    if isinstance(scale, Tensor):
        raise TypeError("scale must be a Python number or a sequence of them, not a tensor: the scales are "
                        "launch constants (pass float(scale) once, outside the training step)")
    values = list(scale) if isinstance(scale, Sequence) and not isinstance(scale, str) else [scale]
    if not values:
        raise ValueError("scale must be a positive number or a non-empty sequence of them: got an empty sequence")
    out = []
    for s in values:
        if isinstance(s, Tensor):
            raise TypeError("scale must be a Python number or a sequence of them, not a tensor: the scales are "
                            "launch constants (pass float(scale) once, outside the training step)")
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TypeError(f"scale must be a positive number or a sequence of them, got {type(s).__name__}")
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale must be positive and finite, got {s}")
        out.append(float(s))
    return out


def mmd(
    x: Tensor,
    y: Tensor | None = None,
    *,
    kernel: str = "rbf",
    scale: float | Sequence[float] | None = None,
    unbiased: bool | str = False,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """MMD^2 between the samples x (n, D) and y (m, D); y=None draws m = n samples of the standard-normal
    prior (from ``generator``), the InfoVAE / WAE regularizer. A 0-d tensor, differentiable in x and y.

        k(a, b) = sum_s exp(-|a - b|^2 / s)           kernel="rbf"
        k(a, b) = sum_s s / (s + |a - b|^2)           kernel="imq" (inverse multiquadric)

    over the scales s (``scale``: one number, or a sequence summed as WAE does; default 2 D, the WAE's
    C = 2 D sigma^2 for the unit-variance prior). Scales are Python numbers, hyperparameters fixed for the
    run: the kernels take them as launch arguments (no copy to the device, no host sync, nothing for a CUDA
    graph to capture); a tensor scale raises ``TypeError`` (reading it would sync, and MMD is not
    differentiated in the scale). Any number of scales: the forward sums 2 a launch, backward 8.

    x and y are read where they lie (any strides), may differ in floating dtype (torch's promotion gives the
    result's; fp16/bf16 compute in fp32); a D mismatch raises ``ShapeError`` (a ``ValueError`` and, as
    torch.cdist's, a ``RuntimeError``). No host sync: ``torch.compile(fullgraph=True)`` takes the call whole
    (y=None draws the prior through torch.randn, so compiled calls draw compiled RNG); create_graph=True,
    double backward and torch.func.grad give the eager formula's derivatives.

        unbiased=False      mean k(x, x') + mean k(y, y') - 2 mean k(x, y), every pair (the V-statistic)
        unbiased=True       the x-x and y-y means over distinct pairs only (Gretton et al. 2012, eq. 3)
        unbiased="paired"   n = m, all three means over i != j (their Lemma 6 U-statistic)

    The peers, with the arguments that reproduce them (``tests/test_latent.py`` checks each):

    - ShengjiaZhao/MMD-VAE ``compute_mmd(x, y)``: ``mmd(x, y, kernel="rbf", scale=D * D)`` (its kernel is
      exp(-mean_d (x - y)^2 / D)).
    - AntixK/PyTorch-VAE InfoVAE, ``kernel_type='rbf'``: ``mmd(z, prior, kernel="rbf", scale=2 * D * D *
      latent_var)``; ``'imq'`` (its default): ``B (B - 1) * mmd(z, prior, kernel="imq", scale=2 * D *
      latent_var, unbiased="paired")`` (its imq kernel sums the pairs i != j of all three blocks, and its
      loss divides by B (B - 1)), up to the 1e-7 it adds to the denominator.
    - PyTorch-VAE WAE_MMD: ``'rbf'`` is ``scale=D * D``; ``'imq'`` as the InfoVAE's.
    - WAE's own imq (Tolstikhin et al.): ``kernel="imq", scale=[c * 2 * D for c in (.1, .2, .5, 1, 2, 5, 10)],
      unbiased=True``.
    """
    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (n, D): got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x must have at least one dimension: got D = 0")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
    if unbiased not in (False, True, "paired"):
        raise ValueError(f"unbiased must be False, True or 'paired', got {unbiased!r}")
    mode = "paired" if unbiased == "paired" else ("unbiased" if unbiased else "biased")
    scales = _check_scales(scale, x.shape[1])
    generator = check_generator(generator, x.device)
    if y is None:
        _, dt = reference.dtypes(x)
        y = torch.randn(x.shape, dtype=dt, device=x.device, generator=generator).to(x.dtype)
    else:
        check_tensor("y", y)
        check_same_device(x=x, y=y)
        if y.dim() != 2 or y.shape[1] != x.shape[1]:
            raise ShapeError(f"y must have shape (m, D) with x's D = {x.shape[1]}: got {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    least = 1 if mode == "biased" else 2
    if n < least or m < least:
        raise ValueError(f"x and y need at least {least} samples each for unbiased={unbiased!r}: got n = {n}, m = {m}")
    if mode == "paired" and n != m:
        raise ValueError(f"unbiased='paired' pairs x_i with y_i: x and y need one size, got n = {n}, m = {m}")
    out_dtype = reference.dtypes(x, y)[0]
    if use_triton(backend, x, y):
        from .. import _triton

        return _triton.mmd(x, y, kernel=kernel, scales=scales, mode=mode, out_dtype=out_dtype)
    return reference.mmd(x, y, kernel=kernel, scales=scales, mode=mode).to(out_dtype)
