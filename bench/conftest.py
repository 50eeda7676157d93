"""Benchmark harness: the size grid of the device, the session's copy bandwidth, and one timing helper.

Run ``pytest bench/ --benchmark-only`` (add ``--benchmark-json FILE`` and ``python bench/report.py FILE`` for
the table and the plot). The device is CUDA when there is one; ``FASTVAE_BENCH_DEVICE=cpu|cuda`` overrides it.
``FASTVAE_BENCH_QUICK=1`` (and ``--benchmark-disable``, the CI smoke run) selects a tiny grid;
``FASTVAE_BENCH_GRID=headline`` the few sizes of the headline numbers (2^26 elements on CUDA, fp32 and bf16),
timed or not: ``ci/gpu.sh`` runs them once untimed in parallel to fill the compile caches, then timed.

Every test is parametrized shape -> dtype -> mode -> impl, impl varying fastest, so the implementations of
one case run back to back on the same input sets. The references are the torch function a fastvae op replaces
("eager", and "compile": torch.compile of it) and, where that function does more than its formula (the
Gaussian NLL's ``var * ones_like(input)`` and its host-syncing check of a tensor variance), the formula as a
careful user writes it by hand ("formula", "formula-compile"); ``speedup_vs_best`` is over the fastest of them.

A timed call is the op alone (inputs made beforehand, gradients returned by ``torch.autograd.grad`` rather than
accumulated), run in rounds of many back-to-back calls with no synchronization between them, as a training
loop runs: the time of a call (``median_s``) is the device time of a round over its calls, from CUDA events
recorded before its first and after its last call (wall time on a CPU). The host's own time per call (Python,
dispatch, launches: ``host_s``) is the CPU time of issuing the first calls of a round, before anything waits on
the device, and ``host_syncs`` counts the synchronizing CUDA calls of one call. Where ``host_s`` is close to
``median_s`` the device waits on the host: dispatch and launch counts, not memory traffic, set the time.
pytest-benchmark's own statistics are the wall time per call of a round, its closing synchronization included.
Input sets smaller than ``ROTATE_BYTES`` are replicated and cycled so that no call finds its inputs in cache.
"""

from __future__ import annotations

import datetime
import functools
import gc
import itertools
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch._inductor.config as inductor_config
from report import REFERENCES, case_key, speedups
from torch import Tensor

GIB = 2**30
MIB = 2**20
MODES = ("fwd", "fwdbwd")
# references first (speedups need them): the torch function and torch.compile of it, then, for the tests marked
# ``by_hand``, the formula written by hand, eager and compiled
REF_IMPLS = ("eager", "compile")
FORMULA_IMPLS = ("formula", "formula-compile")
assert REF_IMPLS + FORMULA_IMPLS == REFERENCES  # report.py's, which computes the speedups over them
OP_IMPLS = (*REF_IMPLS, "fastvae-torch", "fastvae-triton")
TRAIN_IMPLS = (*REFERENCES, "fastvae")
SMALL_EXPS = (16, 18, 20)  # 2^16 - 2^20 elements: dispatch and launch counts, not bytes, set the time
ROTATE_BYTES = 100 * MIB  # more than the L2 of any GPU and the LLC of most CPUs
MAX_SETS = 128
FILL_BYTES = 8 * GIB  # CUDA grid: the largest op reads about this much (in fp32)
TRAIN_MEMORY_CAP = 70 * 10**9  # CUDA end-to-end: the largest batch that fits in 70 GB is recorded

# torch.compile specializes on every shape (a fixed-batch training loop); never fall back to eager silently
for _name, _value in (
    ("recompile_limit", 4096),
    ("accumulated_recompile_limit", 65536),
    ("fail_on_recompile_limit_hit", True),
):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, _value)


# --------------------------------------------------------------------------------------------------------
# device and grid
# --------------------------------------------------------------------------------------------------------


def bench_device() -> torch.device:
    name = os.environ.get("FASTVAE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


if bench_device().type == "cpu":
    # compile in this process: a pool of compile workers would compete with the timed threads for the cores
    inductor_config.compile_threads = 1
if os.environ.get("FASTVAE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FASTVAE_BENCH_THREADS"]))


def benchmark_disabled(config: pytest.Config) -> bool:
    """--benchmark-disable (and no --benchmark-enable): each test body runs once, untimed."""
    return bool(
        config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False)
    )


def is_quick(config: pytest.Config) -> bool:
    """The tiny grid: FASTVAE_BENCH_QUICK=1, or a --benchmark-disable run."""
    return benchmark_disabled(config) or os.environ.get("FASTVAE_BENCH_QUICK", "0") == "1"


def grid_name(config: pytest.Config) -> str:
    """"headline" (FASTVAE_BENCH_GRID=headline, timed or not), "quick" or "full"."""
    if os.environ.get("FASTVAE_BENCH_GRID", "") == "headline":
        return "headline"
    return "quick" if is_quick(config) else "full"


def _pow2_sizes(lo: int, hi: int, points: int) -> list[int]:
    """About ``points`` powers of two from 2^lo to 2^hi, evenly spaced in log scale."""
    exps = sorted({round(lo + (hi - lo) * i / max(points - 1, 1)) for i in range(points)})
    return [1 << e for e in exps]


def _fill_exp(row_bytes: int) -> int:
    """log2 of the largest power-of-two batch whose rows of ``row_bytes`` fit in FILL_BYTES."""
    return int(math.floor(math.log2(FILL_BYTES / row_bytes)))


@dataclass(frozen=True)
class Grid:
    latent: list[tuple[int, int]]  # (B, D) of mu and logvar
    recon: list[tuple[int, int]]  # (B, F) of the reconstruction
    elbo_batch: list[int]  # B of the ELBO step (latent 64, recon 784)
    mlp_batch: list[int]
    conv_batch: list[int]
    dtypes: list[torch.dtype]


HEADLINE_EXP = 26  # the headline numbers are taken at 2^26 elements


@functools.cache
def grid_for(device_type: str, name: str) -> Grid:
    if name == "headline":
        if device_type == "cuda":
            # (2^20, 64) latents and (2^16, 1024) reconstructions: 2^26 elements each; the MLP VAE at the
            # largest batch of the full grid
            latent, recon = [(1 << (HEADLINE_EXP - 6), 64)], [(1 << (HEADLINE_EXP - 10), 1024)]
            return Grid(latent, recon, [], [262144], [], [torch.float32, torch.bfloat16])
        # the dry run of ci/gpu.sh on a CPU: the same tests at the quick sizes, fp32
        return Grid([(256, 64)], [(64, 784)], [], [32], [], [torch.float32])
    if name == "quick":
        return Grid([(256, 64)], [(64, 784)], [64], [32], [4], [torch.float32])
    if device_type == "cuda":
        # the small sizes (2^16 - 2^20 elements) first, then up to what fills FILL_BYTES
        latent = [(1 << (e - 6), 64) for e in SMALL_EXPS]
        latent += [(b, d) for d in (64, 512) for b in _pow2_sizes(10, _fill_exp(2 * d * 4), 5)
                   if (b, d) not in latent]
        # the per-element-variance NLL reads three recon-sized tensors
        recon = [(1 << (e - 10), 1024) for e in SMALL_EXPS]
        recon += [
            (b, f) for f, n in ((784, 4), (3 * 64 * 64, 3)) for b in _pow2_sizes(10, _fill_exp(3 * f * 4), n)
        ]
        elbo = _pow2_sizes(10, _fill_exp(2 * 64 * 4 + 2 * 784 * 4), 4)
        batches = [4096, 16384, 65536, 262144]
        return Grid(latent, recon, elbo, batches, batches, [torch.float32, torch.bfloat16])
    # CPU: up to 2^22 elements, fp32; the whole --benchmark-only run takes a few minutes on 2 cores
    latent = [(1 << 10, 64), (1 << 13, 64), (1 << 16, 64)]
    recon = [(64, 784), (512, 784), (4096, 784), (256, 3 * 64 * 64)]
    return Grid(latent, recon, [512, 4096], [256, 1024], [16, 64], [torch.float32])


def _dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _size_id(v: int | tuple[int, ...]) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize by fixture name, outermost first: size, dtype, mode, impl."""
    device = bench_device()
    # FASTVAE_BENCH_GRID_DEVICE=cuda: the CUDA grid's shapes on another device (to record its kernel launches)
    grid = grid_for(os.environ.get("FASTVAE_BENCH_GRID_DEVICE") or device.type, grid_name(metafunc.config))
    names = metafunc.fixturenames
    for name in ("latent", "recon", "elbo_batch", "mlp_batch", "conv_batch"):
        if name in names:
            sizes = getattr(grid, name)
            metafunc.parametrize(name, sizes, ids=[_size_id(s) for s in sizes])
    if "dtype" in names:
        metafunc.parametrize("dtype", grid.dtypes, ids=[_dtype_id(d) for d in grid.dtypes])
    if "mode" in names:
        metafunc.parametrize("mode", MODES)
    if "impl" in names:
        skip = pytest.mark.skip(
            reason="the Triton kernels are timed on CUDA only (on CPU they need the interpreter)"
        )
        # under TRITON_INTERPRET=1 the kernels run on the CPU too: bench/sass_report.py records their launches
        kernels = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        # the marker's name is no impl's: -k "formula" selects the formula rows, not every row of a marked test
        formula = metafunc.definition.get_closest_marker("by_hand") is not None
        impl_names = (*REFERENCES, *OP_IMPLS[len(REF_IMPLS):]) if formula else OP_IMPLS
        impls = [pytest.param(i, marks=skip) if i == "fastvae-triton" and not kernels else i for i in impl_names]
        metafunc.parametrize("impl", [_without_compile(i) for i in impls])
    if "train_impl" in names:
        metafunc.parametrize("train_impl", [_without_compile(i) for i in TRAIN_IMPLS])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "by_hand: the op has a hand-written formula baseline beside the torch function it replaces"
    )


def _without_compile(impl: Any) -> Any:
    """FASTVAE_BENCH_COMPILE=0 leaves torch.compile out: on a CPU its compiles are most of a smoke run's time,
    and they test inductor rather than this harness (ci/gpu.sh's dry run compiles its headline cases)."""
    if isinstance(impl, str) and impl.endswith("compile") and os.environ.get("FASTVAE_BENCH_COMPILE", "1") == "0":
        return pytest.param(impl, marks=pytest.mark.skip(reason="torch.compile left out (FASTVAE_BENCH_COMPILE=0)"))
    return impl


# --------------------------------------------------------------------------------------------------------
# session state: copy bandwidth, end-to-end batch limits; written into the JSON
# --------------------------------------------------------------------------------------------------------

SESSION: dict[str, Any] = {
    "copy_gbps": None,
    "train_max_batch": {},
    "train_oom_batch": {},
    "train_fit_batch": {},
    "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def copy_bandwidth(device: torch.device, pytestconfig: pytest.Config) -> float:
    """GB/s of ``dst.copy_(src)`` of a large buffer (1 GiB on CUDA, 256 MiB on CPU), counting 2 x its size."""
    nbytes = 16 * MIB if is_quick(pytestconfig) else (GIB if device.type == "cuda" else 256 * MIB)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20 if device.type == "cuda" else 10):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    gbps = 2 * nbytes / statistics.median(times) / 1e9
    SESSION.update(copy_gbps=gbps, copy_bytes=nbytes)
    return gbps


# --------------------------------------------------------------------------------------------------------
# the timing helper
# --------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One input set: the op's arguments and, for forward+backward, one gradient per output (None: a
    scalar output, whose gradient is 1)."""

    args: tuple[Any, ...]
    grad_outputs: tuple[Tensor | None, ...] = ()

    def tensors(self) -> list[Tensor]:
        return [t for t in (*self.args, *self.grad_outputs) if isinstance(t, Tensor)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clear_grads(self) -> None:
        for t in self.tensors():
            if t.requires_grad:
                t.grad = None


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    impl: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def op_step(fn: Callable[..., Any], mode: str) -> Callable[[Batch], None]:
    """``fn`` forward only, or forward then backward through all its outputs. The gradients are returned by
    ``torch.autograd.grad`` and dropped: none accumulates into ``.grad``, so back-to-back calls need no clearing
    between them (and none pays for an accumulation)."""

    def fwd(b: Batch) -> None:
        fn(*b.args)

    def fwdbwd(b: Batch) -> None:
        out = fn(*b.args)
        out = out if isinstance(out, tuple) else (out,)
        inputs = [t for t in b.args if isinstance(t, Tensor) and t.requires_grad]
        torch.autograd.grad(out, inputs, list(b.grad_outputs) if b.grad_outputs else None, allow_unused=True)

    return fwd if mode == "fwd" else fwdbwd


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _cpu_peak_bytes(call: Callable[[], None]) -> int:
    """Peak of the bytes the CPU allocator holds during ``call`` above what it held before, from the
    allocation events torch's profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


class RoundTimer:
    """Rounds of ``calls`` back-to-back calls: the device time of a round over its calls (CUDA events recorded
    before its first call and after its last; wall time on a CPU) and the host's time per call, from the wall
    time of issuing its first ``host_calls`` calls. A round starts after the previous one's synchronization, so
    those first calls never wait on a full launch queue: their time is Python, dispatch and launches alone."""

    HOST_CALLS = 4  # few enough that their kernels fit the launch queue however many each call launches

    def __init__(self, device: torch.device, calls: int) -> None:
        self.cuda = device.type == "cuda"
        self.calls = calls
        self.host_calls = min(self.HOST_CALLS, calls)
        self.device_s: list[float] = []
        self.host_s: list[float] = []
        self._i = 0
        self._t0 = 0.0
        self._start: Any = None

    def __call__(self, call: Callable[[], None]) -> None:
        k = self._i % self.calls
        self._i += 1
        if k == 0:
            if self.cuda:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record()
            self._t0 = time.perf_counter()
        call()
        if k == self.host_calls - 1:
            self.host_s.append((time.perf_counter() - self._t0) / self.host_calls)
        if k == self.calls - 1:
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                self.device_s.append(self._start.elapsed_time(end) / 1e3 / self.calls)
            else:
                self.device_s.append((time.perf_counter() - self._t0) / self.calls)


def count_host_syncs(call: Callable[[], None]) -> int:
    """Synchronizing CUDA calls (a device-to-host copy, a stream synchronization) of one ``call``, from torch's
    sync debug mode: each one stalls the host until the device drains, and breaks a CUDA graph capture."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchronizing" in str(w.message) for w in caught)


@dataclass
class Bench:
    device: torch.device
    copy_gbps: float
    quick: bool
    disabled: bool
    budget_s: float = field(init=False)  # timed seconds per case (the median of as many rounds as fit)
    round_s: float = field(init=False)  # seconds of back-to-back calls per round
    min_rounds: int = field(init=False)
    min_calls: int = field(init=False)
    max_rounds: int = 2000
    max_calls: int = 1000
    _sets_key: tuple | None = None
    _sets: list[Batch] = field(default_factory=list)
    _compiled: dict[tuple[Callable, bool], Callable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cuda = self.device.type == "cuda"
        # on CUDA a round is at least 5 ms of back-to-back calls, and at least two (the device never idles
        # between them, as in a training loop; the one launch gap at a round's start is amortized); on a CPU there
        # is no queue to keep full, and a large call is its own round
        self.budget_s, self.round_s, self.min_rounds, self.min_calls = (
            (0.2, 0.005, 10, 2) if cuda else (0.5, 0.02, 7, 1)
        )

    def compile(self, fn: Callable[..., Any], dynamic: bool = False) -> Callable[..., Any]:
        """torch.compile with default options, one graph specialized per shape (``dynamic=False``), compiled
        on first call."""
        if (fn, dynamic) not in self._compiled:
            self._compiled[(fn, dynamic)] = torch.compile(fn, dynamic=dynamic)
        return self._compiled[(fn, dynamic)]

    def impl(self, impl: str, eager: Callable[..., Any], fastvae: Callable[[str], Callable[..., Any]],
             formula: Callable[..., Any] | None = None, dynamic: bool = False) -> Callable[..., Any]:
        """The function ``impl`` names: the torch function ("eager"), the hand-written formula ("formula"),
        torch.compile of either ("compile", "formula-compile") or ``fastvae(backend)`` ("fastvae-<backend>")."""
        if impl.startswith("fastvae"):
            return fastvae(impl.replace("fastvae-", ""))
        fn = formula if impl.startswith("formula") else eager
        if fn is None:
            raise ValueError(f"{impl}: this op has no hand-written formula")
        return self.compile(fn, dynamic) if impl.endswith("compile") else fn

    def input_sets(self, key: tuple, make: Callable[[], Batch]) -> list[Batch]:
        """Input sets for one case, shared by its implementations: enough copies to fill ROTATE_BYTES."""
        if key != self._sets_key:
            self._sets, self._sets_key = [], None
            torch.manual_seed(0)
            first = make()
            n = (
                1
                if self.disabled
                else min(MAX_SETS, max(1, math.ceil(ROTATE_BYTES / max(first.nbytes(), 1))))
            )
            self._sets = [first] + [make() for _ in range(n - 1)]
            self._sets_key = key
        return self._sets

    def run_op(
        self,
        benchmark: Any,
        case: Case,
        eager: Callable[..., Any],
        fastvae: Callable[[str], Callable[..., Any]],
        make: Callable[[], Batch],
        *,
        formula: Callable[..., Any] | None = None,
        nbytes: int | None = None,
        items: int | None = None,
    ) -> float | None:
        """``run`` for one implementation of an op, named by ``case.impl`` (see ``impl``)."""
        fn = self.impl(case.impl, eager, fastvae, formula)
        return self.run(benchmark, case, op_step(fn, case.mode), make, nbytes=nbytes, items=items)

    def run(
        self,
        benchmark: Any,
        case: Case,
        step: Callable[[Batch], None],
        make: Callable[[], Batch],
        *,
        nbytes: int | None = None,
        items: int | None = None,
        key: tuple | None = None,
    ) -> float | None:
        """Time ``step`` on rotating input sets and fill ``benchmark.extra_info``; returns the median device
        seconds per call (None under --benchmark-disable, where the body runs once). ``nbytes``: the minimal
        bytes one call moves (GB/s); ``items``: examples one call processes (items/s)."""
        benchmark.group = f"{case.op} {case.mode} {_dtype_id(case.dtype)} {_size_id(case.shape)}"
        benchmark.extra_info.update(
            op=case.op,
            mode=case.mode,
            impl=case.impl,
            dtype=str(case.dtype).replace("torch.", ""),
            shape=list(case.shape),
            numel=case.numel,
            bytes=nbytes,
            device=self.device.type,
        )
        sets = self.input_sets(key or (case.op, case.mode, case.dtype, case.shape), make)
        counter = itertools.count()
        dev = self.device

        def call() -> None:
            step(sets[next(counter) % len(sets)])

        def synced() -> None:
            call()
            sync(dev)

        oom = False
        try:
            if self.disabled:
                benchmark.pedantic(synced, rounds=1)
                return None
            for _ in range(2):  # compile, caches, allocator
                synced()
            estimate = min(self._time(synced) for _ in range(3))  # launch and sync included
            calls = max(self.min_calls, min(self.max_calls, math.ceil(self.round_s / max(estimate, 1e-7))))
            timer = RoundTimer(dev, calls)
            # one untimed round sizes the rest: its wall time, not the estimate, so that a call slower in a
            # round than alone (a loaded machine, a full queue) cannot stretch a case past its budget many-fold
            round_wall = self._time(lambda: [timer(call) for _ in range(calls)])
            rounds = max(self.min_rounds, min(self.max_rounds, math.ceil(self.budget_s / max(round_wall, 1e-7))))
            # pytest-benchmark times each round of ``calls`` iterations (wall time, the round's closing
            # synchronization included) and divides by them; the timer keeps the device and host times
            benchmark.pedantic(lambda: timer(call), rounds=rounds, iterations=calls)
            syncs = count_host_syncs(call) if dev.type == "cuda" else None
            peak = self.peak_bytes(synced)
        except Exception as e:
            if not _is_oom(e):
                raise
            oom = True  # skipped below, once the traceback (and the tensors its frames hold) is gone
        finally:
            sync(dev)
            for b in sets:
                b.clear_grads()
        if oom:
            self._sets, self._sets_key = [], None
            gc.collect()
            torch.cuda.empty_cache()
            pytest.skip(f"out of memory: {case}")
        # the sizing round's times come first: only the timed rounds' count
        median = statistics.median(timer.device_s[-rounds:])
        host = statistics.median(timer.host_s[-rounds:]) if dev.type == "cuda" else None
        gbps = nbytes / median / 1e9 if nbytes else None
        benchmark.extra_info.update(
            median_s=median,
            time_method="cuda events around back-to-back calls" if dev.type == "cuda" else "wall time",
            wall_s=benchmark.stats.stats.median,
            host_s=host,
            host_frac=host / median if host is not None else None,
            host_syncs=syncs,
            rounds=rounds,
            calls_per_round=calls,
            gbps=gbps,
            copy_gbps=self.copy_gbps,
            frac_copy_bw=gbps / self.copy_gbps if gbps else None,
            items_per_s=items / median if items else None,
            peak_mem_bytes=peak,
            peak_mem_method="cuda.max_memory_allocated"
            if dev.type == "cuda"
            else "profiler allocation events",
        )
        return median

    def _time(self, call: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    def peak_bytes(self, call: Callable[[], None]) -> int:
        """Memory ``call`` allocates at its peak above what was held before (the inputs)."""
        if self.device.type != "cuda":
            return _cpu_peak_bytes(call)
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        call()
        return torch.cuda.max_memory_allocated(self.device) - base


@pytest.fixture(scope="session")
def _bench_session(device: torch.device, copy_bandwidth: float, pytestconfig: pytest.Config) -> Bench:
    return Bench(device, copy_bandwidth, is_quick(pytestconfig), benchmark_disabled(pytestconfig))


@pytest.fixture
def bench(_bench_session: Bench) -> Bench:
    return _bench_session


@pytest.fixture
def train_limits(device: torch.device):
    """End-to-end runs on CUDA: cap the process at TRAIN_MEMORY_CAP and free what compile keeps afterwards."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, TRAIN_MEMORY_CAP / total), device)
    yield SESSION
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# --------------------------------------------------------------------------------------------------------
# JSON: speedups against the references, the environment
# --------------------------------------------------------------------------------------------------------


def row_median(row: dict) -> float:
    """Seconds per call of a pytest-benchmark row: the harness's device time, else pytest-benchmark's median."""
    return row["extra_info"].get("median_s") or row["stats"]["median"]


def add_speedups(rows: Sequence[dict]) -> None:
    """extra_info speedup_vs_<reference> and speedup_vs_best for every timed row."""
    medians = {(case_key(r["extra_info"]), r["extra_info"].get("impl")): row_median(r) for r in rows}
    for r in rows:
        info = r["extra_info"]
        if "op" not in info:  # the fit-batch rows: no timing to compare
            continue
        info.update(speedups(medians, case_key(info), row_median(r)))


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": SESSION["copy_gbps"],
        "copy_bytes": SESSION.get("copy_bytes"),
        # 1/5/15-minute load averages: other processes on the machine make CPU timings noisy
        "loadavg_start": SESSION["loadavg_start"],
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_generate_json(config: pytest.Config, benchmarks: list, **kwargs: Any) -> Any:
    """Leave out a case interrupted before its first timed round (ci/gpu.sh ends a phase past its timeout with
    SIGINT): pytest-benchmark cannot summarize an empty case, and would write no JSON for the cases done."""
    benchmarks[:] = [b for b in benchmarks if b.stats.data]
    yield


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict) -> None:
    add_speedups(output_json["benchmarks"])
    output_json["fastvae_bench"] = {
        "env": environment(bench_device()),
        "train_max_batch": SESSION["train_max_batch"],
        "train_oom_batch": SESSION["train_oom_batch"],
        "train_fit_batch": SESSION["train_fit_batch"],
    }
