"""The phases of ci/gpu.sh: one budgeted call on a lent GPU (see ci/gpu.sh for usage and the estimate).

Correctness comes first: the GPU-only tests and the op suite run before any benchmark, and nothing else uses
the GPU while they do (no compile warm-up, no fit search beside them). Each phase runs under its own timeout,
taken from what is left of the budget less what the later phases that must run keep for themselves; a phase
that fails or times out never stops the next. Everything a phase writes goes under a work folder, and after
every phase the results are packed again into the destination ($OUT when it is set), so a call cut short still
returns what it had. The last lines printed are a compact summary.

With --dry-run on a machine without CUDA, every phase runs end to end on the CPU: the CUDA-only tests skip
(saying so), the Triton warm-up compiles a few specializations, the tests run one small selection under the
Triton interpreter, and the benchmarks run at the quick sizes; the packing and its check are the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the op suite of the interpreter pass (ci/run_tests.sh), run on CUDA on its FASTVAE_TEST_SUBSET
with open(os.path.join(ROOT, "ci", "op_tests.txt")) as _f:
    OP_TESTS = [ln.strip() for ln in _f if ln.strip()]
# correctness only a GPU shows: > 2^31 elements, graph replay, no host sync in any public op, a second device
# (with two GPUs); inductor over the Triton ops
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_triton.py::test_compile_fullgraph_training_step"]
HEADLINE_FILES = ["bench/test_sampling.py", "bench/test_gaussian_nll.py", "bench/test_e2e.py"]
# the fit search (the largest batch each implementation fits) is no headline: it runs with the rest
HEADLINE_K = ("(test_sample_kl or test_nll_var_scalar or test_nll_var or test_nll_logvar or test_mlp_vae) "
              "and not fit_batch")
HEADLINE_OPS = ("sample_kl", "nll_var_scalar", "nll_var", "nll_logvar")
# the rest of the benchmarks, one pytest process (and JSON) per file: a file cut short loses only itself. The
# headline ops' files come first (their grids start with the small sizes, 2^16 - 2^20 elements), then every
# other benchmark file
REST_FIRST = ["bench/test_sampling.py", "bench/test_gaussian_nll.py", "bench/test_e2e.py", "bench/test_elbo.py"]
REST_FILES = REST_FIRST + sorted(
    f"bench/{f}" for f in os.listdir(os.path.join(ROOT, "bench"))
    if f.startswith("test_") and f.endswith(".py") and f"bench/{f}" not in REST_FIRST)
# phases whose timeout leaves the run sound on a GPU: the compile warm-up (the headline compiles what it left)
# and the rest of the benchmarks (they take what time there is)
AS_TIME_ALLOWS = ("warm-compile", "bench-rest")
# a lent GPU gives 15 minutes of device time, its starts (minutes each) and idle waits included: the default
# budget leaves a second start and a rerun inside it
DEVICE_TIME_S, MACHINE_START_S = 900, 120
DEFAULT_BUDGET_S = 300
# what the warm-up compiles: the test suite's recording and the headline benchmarks' own launches (their large
# tiles in modes no test launches at that size)
RECORDING = "bench/results/sass/specializations.json"
HEADLINE_RECORDING = "bench/results/sass/headline_specializations.json"
# what the device tool brings back from $OUT
OUT_MAX_FILES, OUT_MAX_BYTES, OUT_MAX_DEPTH = 8, 16 << 20, 2
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Result:
    status: str = "pass"  # pass | fail | timeout | skipped
    seconds: float = 0.0
    note: str = ""
    tail: list[str] = field(default_factory=list)


@dataclass
class Phase:
    name: str
    cap_s: float  # at most this much of the budget
    reserve_s: float  # kept for this phase by every phase before it (0: as time allows)
    estimate_s: float  # on an H200 (ci/gpu.sh's header says how each was derived)
    run: Callable[[Run, float], Result]


class Run:
    """State shared by the phases: options, folders, environment, the budget's clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry = args.dry_run
        self.install = args.install
        self.budget = float(args.budget)
        self.start = time.monotonic()
        self.py = os.environ.get("PYTHON", sys.executable)
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="fastvae-gpu."))
        os.makedirs(self.work, exist_ok=True)
        self.dest = args.dest
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        # one Triton and one inductor cache for every phase and process: the warm-ups fill them
        self.env["TRITON_CACHE_DIR"] = os.path.join(self.work, "cache", "triton")
        self.env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self.work, "cache", "inductor")
        self.env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        self.env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
        for var in ("TRITON_INTERPRET", "FASTVAE_TEST_BACKEND", "FASTVAE_TEST_SUBSET", "FASTVAE_BENCH_GRID"):
            self.env.pop(var, None)
        self.py_flags: list[str] = []  # "-P" when fastvae comes from the shim folder (not the tree)
        self.info: dict[str, Any] = {"dry_run": self.dry, "budget_s": self.budget}
        self.results: dict[str, Result] = {}
        self.cuda = False

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def pytest(self, *args: str) -> list[str]:
        return [self.py, *self.py_flags, "-m", "pytest", "-p", "no:cacheprovider", *args]

    def sh(self, name: str, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> Result:
        """Run ``cmd`` with its output in ``work/logs/<name>.log``; on timeout SIGINT (pytest then writes its
        JSON and reports), then SIGKILL of its process group 20 s later. (The scripts run without
        ``py_flags``: they import no fastvae, and -P would drop their own folder from the path.)"""
        log_path = os.path.join(self.work, "logs", f"{name}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        t0 = time.monotonic()
        with open(log_path, "a") as log:
            log.write(f"+ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            status = _wait(proc, timeout)
        return Result(status, time.monotonic() - t0, tail=_tail(log_path))


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    try:
        return "pass" if proc.wait(timeout=max(timeout, 1)) == 0 else "fail"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "timeout"


def _tail(path: str, n: int = 6) -> list[str]:
    with open(path, errors="replace") as f:
        lines = [ln.rstrip() for ln in f if ln.strip()]
    return [ln[:300] for ln in lines[-n:]]


def _pytest_counts(lines: list[str]) -> str:
    """pytest's closing counts ('3 failed, 210 passed, 4 skipped'), from the tail of its log."""
    for ln in reversed(lines):
        m = re.search(r"((?:\d+ \w+(?:, )?)+) in [\d.]+s", ln)
        if m:
            return m.group(1)
    return ""


# ------------------------------------------------------------------------------------------------------------
# phases
# ------------------------------------------------------------------------------------------------------------


def phase_env(run: Run, timeout: float) -> Result:
    """Device, driver, clocks, torch, triton, CUDA; fastvae installed without network on the image's torch."""
    info: dict[str, Any] = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = ("name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
             "temperature.gpu,utilization.gpu")
        out = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30)
        info["nvidia_smi"] = dict(zip(q.split(","), (v.strip() for v in out.stdout.split(",")))) \
            if out.returncode == 0 else f"nvidia-smi exit {out.returncode}: {(out.stderr or out.stdout)[-300:]}"
    else:
        info["nvidia_smi"] = "skipped: no nvidia-smi on this machine"
    # an editable install needs no network only if the build backend is already here; else a shim folder
    # that lays out the package as installed (kernels/ as fastvae.kernels), first on the path
    if run.install == "shim":
        pip = subprocess.CompletedProcess([], 1, "", "not tried (--install shim)")
    else:
        pip = subprocess.run([run.py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", "."], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if pip.returncode == 0:
        info["install"] = "pip install -e . (no network, no build isolation)"
    else:
        shim = os.path.join(run.work, "site")
        pkg = os.path.join(shim, "fastvae")
        shutil.rmtree(shim, ignore_errors=True)
        os.makedirs(pkg)
        for entry in os.listdir(os.path.join(ROOT, "fastvae")):
            if entry != "__pycache__":
                os.symlink(os.path.join(ROOT, "fastvae", entry), os.path.join(pkg, entry))
        os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkg, "kernels"))
        run.env["PYTHONPATH"] = shim + os.pathsep + run.env.get("PYTHONPATH", "")
        run.py_flags = ["-P"]  # the tree's own fastvae/ (no kernels/ inside) must not come first
        why = pip.stderr.strip().splitlines()[-1][:200] if pip.stderr.strip() else f"exit {pip.returncode}"
        info["install"] = f"shim folder on PYTHONPATH (pip: {why})"
    probe = subprocess.run(
        [run.py, *run.py_flags, "-c",
         "import json, torch, triton, fastvae, fastvae.kernels.sampling as k\n"
         "cuda = torch.cuda.is_available()\n"
         "d = {'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.version.cuda,\n"
         "     'fastvae': fastvae.__version__, 'fastvae_from': fastvae.__file__, 'kernels_from': k.__file__,\n"
         "     'device': torch.cuda.get_device_name(0) if cuda else 'cpu'}\n"
         "if cuda:\n"
         "    p = torch.cuda.get_device_properties(0)\n"
         "    d.update(capability=list(torch.cuda.get_device_capability(0)), sms=p.multi_processor_count,\n"
         "             memory_bytes=p.total_memory)\n"
         "print(json.dumps(d))"],
        cwd="/", env=run.env, capture_output=True, text=True, timeout=timeout)
    if probe.returncode != 0:
        return Result("fail", note="fastvae does not import", tail=probe.stderr.strip().splitlines()[-6:])
    info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
    run.cuda = "capability" in info
    if not run.cuda and not run.dry:
        return Result("fail", note="no CUDA device (use --dry-run on a CPU)")
    run.info["env"] = info
    with open(os.path.join(run.work, "env.json"), "w") as f:
        json.dump(info, f, indent=1)
    return Result(note=f"{info['device']}, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}; "
                       f"{info['install'][:40]}")


def phase_warm_triton(run: Run, timeout: float) -> Result:
    """Every recorded kernel specialization compiled into the shared Triton cache, on every core, so the tests
    and benchmarks load cubins instead of compiling at their first launch."""
    specs = os.environ.get("FASTVAE_SPECS") if os.path.exists(os.environ.get("FASTVAE_SPECS", "")) else None
    specs = specs or os.path.join(ROOT, RECORDING)
    arch = 90
    if run.cuda:
        major, minor = run.info["env"]["capability"]
        arch = 10 * major + minor
    cmd = [run.py, "bench/sass_report.py", "--specs", specs, os.path.join(ROOT, HEADLINE_RECORDING), "--warm-cache",
           run.env["TRITON_CACHE_DIR"], "--arch", str(arch), "--jobs", str(os.cpu_count() or 1),
           "--out", os.path.join(run.work, "warm")]
    # the dry run compiles a few (the CI's compile check compiles them all); a GPU run both integer hints
    cmd += ["--limit", "6", "--ints", "div16"] if run.dry else ["--ints", "both"]
    r = run.sh("warm-triton", cmd, timeout)
    warm = os.path.join(run.work, "warm", "warm.json")
    if os.path.exists(warm):
        with open(warm) as f:
            w = json.load(f)
        run.info["warm_triton"] = {k: w[k] for k in w if k != "results"}
        r.note = (f"{w['compiles'] - w['failed']}/{w['compiles']} kernels in {w['wall_seconds']} s wall, "
                  f"{w['per_compile_seconds']} s each on {w['jobs']} procs")
    run.info["triton_cache_entries_after_warm"] = _cache_entries(run.env["TRITON_CACHE_DIR"])
    return r


def _cache_entries(path: str) -> int:
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def headline_env(run: Run) -> dict[str, str]:
    env = dict(run.env, FASTVAE_BENCH_GRID="headline")
    if run.dry:
        env["FASTVAE_BENCH_QUICK"] = "1"
    return env


def _xdist(run: Run) -> bool:
    probe = subprocess.run([run.py, "-c", "import xdist"], capture_output=True)
    return probe.returncode == 0


# the dry run's headline: sample+KL, the scalar-variance NLL's forward against its formula by hand, and the MLP
# VAE step, without torch.compile rows: a loaded 2-core CPU compiles each graph for tens of seconds. The
# warm-up compiles one graph (the NLL formula's forward): the compile path of the benchmarks, run once
DRY_HEADLINE_K = ("(test_sample_kl and not fastvae-triton and not compile) or "
                  "(test_nll_var_scalar and not fwdbwd and (eager or formula or fastvae-torch) and not compile) or "
                  "(test_mlp_vae and not compile and not fit_batch)")
DRY_WARM_K = "test_nll_var_scalar and formula-compile and not fwdbwd"


def phase_warm_compile(run: Run, timeout: float) -> Result:
    """The headline benchmarks once, untimed, in parallel: each torch.compile variant compiles into the shared
    inductor cache (and each Triton launch into the Triton cache), so the timed phase only loads. It runs after
    the tests, never beside them: its steps hold tens of GB of the GPU."""
    k = DRY_WARM_K if run.dry else f"({HEADLINE_K}) and (compile or fastvae-triton)"
    cmd = run.pytest("-q", "--benchmark-disable", "--durations=0", "-k", k, *HEADLINE_FILES)
    if _xdist(run) and not run.dry:
        cmd += ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]
    r = run.sh("warm-compile", cmd, timeout, headline_env(run))
    r.note = _warmup_note(os.path.join(run.work, "logs", "warm-compile.log"), run)
    return r


def phase_tests_cuda(run: Run, timeout: float) -> Result:
    r = run.sh("tests-cuda", run.pytest("-q", "-rs", *CUDA_TESTS), timeout,
               dict(run.env, FASTVAE_TEST_BACKEND="triton", **({} if run.cuda else {"TRITON_INTERPRET": "1"})))
    r.note = _pytest_counts(r.tail) + ("" if run.cuda else " (CPU: the CUDA tests skip)")
    return r


def phase_tests_subset(run: Run, timeout: float) -> Result:
    """The op suite on the Triton backend, on the subset in which each parameter value appears once."""
    env = dict(run.env, FASTVAE_TEST_BACKEND="triton", FASTVAE_TEST_SUBSET="1")
    before = _cache_entries(run.env["TRITON_CACHE_DIR"])
    if run.cuda:
        args = ["-q", "-rs", "-m", "not torch_only", *OP_TESTS,
                "--deselect", "tests/test_triton.py::test_compile_fullgraph_training_step"]
        if _xdist(run):
            args += ["-n", "4"]
    else:  # the CI runs the whole suite under the interpreter; here one small file shows the phase works
        env["TRITON_INTERPRET"] = "1"
        args = ["-q", "-rs", "-m", "not torch_only", "tests/test_triton.py", "-k", "writes_every_element"]
    r = run.sh("tests-subset", run.pytest(*args), timeout, env)
    compiled = _cache_entries(run.env["TRITON_CACHE_DIR"]) - before
    run.info["triton_kernels_compiled_by_tests"] = compiled if run.cuda else None
    r.note = _pytest_counts(r.tail) + (f"; {compiled} kernels compiled at launch (not in the warm cache)"
                                       if run.cuda else "; interpreter: no Triton cache")
    return r


def phase_headline(run: Run, timeout: float) -> Result:
    """The copy bandwidth, sample+KL and the three Gaussian NLL forms at 2^26 elements (fp32, bf16; fwd,
    fwd+bwd; eager, torch.compile, fastvae), the MLP VAE step at its largest batch and the largest batch each
    implementation fits. Nothing else runs on the GPU while it times."""
    t0 = time.monotonic()
    out = os.path.join(run.work, "bench", "headline.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # fastvae-torch is the eager reference path (the CPU's only fastvae row); on CUDA the kernels are timed
    k = f"({HEADLINE_K}) and not fastvae-torch" if run.cuda else DRY_HEADLINE_K
    r = run.sh("headline", run.pytest("-q", "--benchmark-only", "--benchmark-json", out, "--durations=0", "-k",
                                      k, *HEADLINE_FILES), timeout - (time.monotonic() - t0), headline_env(run))
    r.seconds = time.monotonic() - t0
    if os.path.exists(out):
        run.info["headline"] = headline_numbers(out)
    timed = _compile_calls(os.path.join(run.work, "logs", "headline.log"))
    run.info["compile_timed_calls"] = timed
    warm = run.info.get("compile_warmups", {}).get("calls", {})
    hits = [(warm[t], timed[t]) for t in timed if t in warm]
    r.note = _pytest_counts(r.tail) + (
        f"; its {len(hits)} warmed compile cases: {sum(b for _, b in hits):.0f} s (warm-up took "
        f"{sum(a for a, _ in hits):.0f} s)" if hits else "")
    return r


def _compile_calls(log: str) -> dict[str, float]:
    """Seconds of each torch.compile case's call, from pytest's --durations in ``log``."""
    calls = {}
    with open(log, errors="replace") as f:
        for ln in f:
            m = re.match(r"\s*([\d.]+)s call\s+(\S+\[(.*)\])", ln)
            if m and re.search(r"(^|-)compile($|-)", m.group(3)):
                calls[m.group(2)] = float(m.group(1))
    return calls


def _warmup_note(log: str, run: Run) -> str:
    """Compile warm-ups and their seconds (pytest's durations of the untimed calls)."""
    calls = _compile_calls(log)
    run.info["compile_warmups"] = {"count": len(calls), "calls": calls,
                                   "proxy": None if run.cuda else "inductor on the CPU"}
    if not calls:
        return "no compile warm-up ran"
    secs = sorted(calls.values())
    return f"{len(secs)} torch.compile warm-ups, median {secs[len(secs) // 2]:.1f} s, max {secs[-1]:.1f} s"


def headline_numbers(path: str) -> dict[str, Any]:
    """Per headline op, dtype and mode: fastvae's fraction of the copy bandwidth, its host time per call, and
    its speedups over eager, torch.compile and the fastest reference (the hand-written formula where there is
    one): the fastvae-triton rows on CUDA, fastvae-torch where the kernels did not run. Times are the
    harness's device time per call (``extra_info.median_s``), else pytest-benchmark's median."""
    with open(path) as f:
        data = json.load(f)
    meta = data.get("fastvae_bench", {})
    rows = [b["extra_info"] | {"median_s": b["extra_info"].get("median_s") or b["stats"]["median"]}
            for b in data["benchmarks"] if "op" in b.get("extra_info", {})]
    keys = ("median_s", "host_s", "host_syncs", "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_best",
            "best_ref", "peak_mem_bytes")
    ops = []
    for r in rows:
        if r["op"] in HEADLINE_OPS and r["impl"] in ("fastvae-triton", "fastvae-torch"):
            ops.append({k: r.get(k) for k in ("op", "dtype", "mode", "impl", "shape", "frac_copy_bw", *keys)})
    if any(o["impl"] == "fastvae-triton" for o in ops):
        ops = [o for o in ops if o["impl"] == "fastvae-triton"]
    train = [{k: r.get(k) for k in ("impl", "shape", "items_per_s", *keys)} for r in rows if r["op"] == "mlp_vae"]
    return {"copy_gbps": meta.get("env", {}).get("copy_gbps"), "ops": ops, "mlp_vae": train,
            "fit_batch": meta.get("train_fit_batch", {}).get("mlp_vae", {}), "device": meta.get("env", {})}


def fit_batches(path: str) -> dict[str, int]:
    """The largest MLP VAE batch of each implementation, from a benchmark JSON of bench/test_e2e.py."""
    with open(path) as f:
        return json.load(f).get("fastvae_bench", {}).get("train_fit_batch", {}).get("mlp_vae", {})


def phase_report(run: Run, timeout: float) -> Result:
    jsons = sorted(os.path.join(run.work, "bench", f) for f in os.listdir(os.path.join(run.work, "bench"))
                   if f.endswith(".json")) if os.path.isdir(os.path.join(run.work, "bench")) else []
    if not jsons:
        return Result("skipped", note="no benchmark JSON")
    r = run.sh("report", [run.py, "bench/report.py", *jsons, "--out", run.work], timeout)
    r.note = f"table.md, plot.png from {len(jsons)} JSON file(s)"
    return r


def phase_bench_rest(run: Run, timeout: float) -> Result:
    """The whole benchmark grid, one file at a time, as time allows (its sizes include the headline's); then
    the report again, over every JSON, if there is time for it."""
    t0 = time.monotonic()
    if run.dry:  # each benchmark body once, untimed (CI's smoke run): one process, no JSON to keep apart
        r = run.sh("rest", run.pytest("-q", "--benchmark-disable", *REST_FILES), timeout,
                   dict(run.env, FASTVAE_BENCH_COMPILE="0"))
        r.note = f"{len(REST_FILES)} files untimed: {_pytest_counts(r.tail)}"
        return r
    done, statuses, timed = [], [], False
    for path in REST_FILES:
        left = timeout - (time.monotonic() - t0) - REPORT_AGAIN_S
        if left < 20:
            statuses.append("timeout")
            break
        name = os.path.splitext(os.path.basename(path))[0].removeprefix("test_")
        out = os.path.join(run.work, "bench", f"rest_{name}.json")
        r = run.sh(f"rest-{name}", run.pytest("-q", "--benchmark-only", "--benchmark-json", out, path), left)
        statuses.append(r.status)
        done.append(f"{name}:{r.status}")
        timed = timed or os.path.exists(out)
        if os.path.exists(out) and path == "bench/test_e2e.py":
            fit = fit_batches(out)
            if fit and "headline" in run.info:
                run.info["headline"]["fit_batch"] = fit
        if r.status == "timeout":
            break
    left = timeout - (time.monotonic() - t0)
    if timed and left >= 5:
        done.append(f"report:{phase_report(run, left).status}")
    status = "timeout" if "timeout" in statuses else ("fail" if "fail" in statuses else "pass")
    r = Result(status, time.monotonic() - t0, note=" ".join(done))
    if status != "pass":
        last = [s for s in done if not s.endswith(":pass")]
        log = os.path.join(run.work, "logs", f"rest-{last[-1].split(':')[0]}.log") if last else None
        r.tail = _tail(log) if log and os.path.exists(log) else []
    return r


PHASES = [
    # name, cap, reserve, H200 estimate (ci/gpu.sh's header derives each). Correctness first: the tests keep
    # their time from the warm-up before them; then the benchmarks, the headline keeping its time from the
    # compile warm-up; the rest (estimate 0) takes what is left
    Phase("env", 60, 20, 10, phase_env),
    Phase("warm-triton", 60, 0, 40, phase_warm_triton),
    Phase("tests-cuda", 120, 60, 55, phase_tests_cuda),
    Phase("tests-subset", 150, 60, 60, phase_tests_subset),
    Phase("warm-compile", 120, 0, 40, phase_warm_compile),
    Phase("headline", 200, 75, 75, phase_headline),
    Phase("report", 30, 10, 5, phase_report),
    Phase("bench-rest", 10**6, 0, 0, phase_bench_rest),
]
PACK_RESERVE_S = 10
REPORT_AGAIN_S = 15  # the rest phase keeps this much to redo the table with its own results


# ------------------------------------------------------------------------------------------------------------
# packing, summary
# ------------------------------------------------------------------------------------------------------------


def pack(run: Run) -> list[str]:
    """summary.txt, results.json and results.tar.gz (every log, JSON, the table and the plot) into the
    destination, then check them against what the device tool brings back. Returns the problems."""
    os.makedirs(run.dest, exist_ok=True)
    summary = summary_lines(run)
    with open(os.path.join(run.dest, "summary.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")
    with open(os.path.join(run.dest, "results.json"), "w") as f:
        json.dump({"phases": {n: vars(r) for n, r in run.results.items()}, **run.info}, f, indent=1,
                  default=str)
    tmp = os.path.join(run.dest, ".results.tar.gz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for sub in ("env.json", "table.md", "plot.png", "logs", "bench", "warm"):
            p = os.path.join(run.work, sub)
            if os.path.exists(p):
                tar.add(p, arcname=sub)
    os.replace(tmp, os.path.join(run.dest, "results.tar.gz"))
    return check_dest(run.dest)


def check_dest(dest: str) -> list[str]:
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(dest):
        depth = os.path.relpath(dirpath, dest).count(os.sep) + (dirpath != dest)
        for name in dirnames + filenames:
            if not SAFE_NAME.match(name):
                problems.append(f"name {name!r} is not letters, digits, '.', '_', '-'")
        if depth > OUT_MAX_DEPTH:
            problems.append(f"{dirpath} is more than {OUT_MAX_DEPTH} folders down")
        files += [os.path.join(dirpath, n) for n in filenames]
    if len(files) > OUT_MAX_FILES:
        problems.append(f"{len(files)} files (at most {OUT_MAX_FILES} come back)")
    for p in files:
        if os.path.getsize(p) > OUT_MAX_BYTES:
            problems.append(f"{p}: {os.path.getsize(p)} bytes (at most {OUT_MAX_BYTES})")
    return problems


def _x(v: float | None) -> str:
    return f"{v:.2f}x" if v else "-"


def _host(row: dict) -> str:
    """The host's share of a call's time (near 100%: dispatch-bound), and '!' when the call syncs the host."""
    host, median = row.get("host_s"), row.get("median_s")
    if host is None or not median:
        return "-"
    return f"{100 * host / median:.0f}%" + ("!" if row.get("host_syncs") else "")


def summary_lines(run: Run) -> list[str]:
    env = run.info.get("env", {})
    used = time.monotonic() - run.start
    lines = [f"== fastvae gpu.sh{' --dry-run' if run.dry else ''}: {env.get('device', '?')}, torch "
             f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA {env.get('cuda')}; budget "
             f"{run.budget:.0f} s, used {used:.0f} s",
             f"{'phase':<13} {'status':<8} {'s':>5}  note"]
    for name, r in run.results.items():
        lines.append(f"{name:<13} {r.status:<8} {r.seconds:5.0f}  {r.note}"[:200])
    h = run.info.get("headline")
    if h:
        gbps = h.get("copy_gbps")
        lines.append(f"copy bandwidth {gbps:.0f} GB/s" if gbps else "copy bandwidth -")
        lines.append(f"{'op':<15} {'dtype':<9} {'mode':<7} {'impl':<15} {'%copyBW':>7} {'host':>5} {'vs eager':>9} "
                     f"{'vs compile':>10} {'vs best ref':>11}")
        for o in h["ops"]:
            frac = f"{100 * o['frac_copy_bw']:.0f}%" if o.get("frac_copy_bw") else "-"
            lines.append(f"{o['op']:<15} {o['dtype']:<9} {o['mode']:<7} {o['impl']:<15} {frac:>7} {_host(o):>5} "
                         f"{_x(o.get('speedup_vs_eager')):>9} {_x(o.get('speedup_vs_compile')):>10} "
                         f"{_x(o.get('speedup_vs_best')):>11} {o.get('best_ref') or ''}")
        for t in h["mlp_vae"]:
            lines.append(f"mlp_vae step batch {t['shape'][0]}: {t['impl']:<15} {t.get('items_per_s') or 0:,.0f} "
                         f"items/s, {_x(t.get('speedup_vs_eager'))} eager, {_x(t.get('speedup_vs_compile'))} "
                         f"compile, {_x(t.get('speedup_vs_best'))} best ({t.get('best_ref') or '-'})")
        if h.get("fit_batch"):
            lines.append("mlp_vae largest batch in one memory: "
                         + ", ".join(f"{k} {v}" for k, v in h["fit_batch"].items()))
    failed = [(n, r) for n, r in run.results.items() if r.status in ("fail", "timeout") and r.tail]
    for name, r in failed:
        lines.append(f"-- {name} ({r.status}), last lines:")
        lines += [f"   {ln}" for ln in r.tail]
    return lines


def print_estimate(budget: float) -> None:
    """The per-phase plan: each phase's H200 estimate beside the budget it may take."""
    print(f"fastvae gpu.sh plan (budget {budget:.0f} s; estimates for an H200, see ci/gpu.sh):")
    at = 0.0
    for p in PHASES:
        at += p.estimate_s
        if p.name in AS_TIME_ALLOWS and not p.estimate_s:
            print(f"  {p.name:<13} as time allows (~{max(budget - at - PACK_RESERVE_S, 0):>4.0f} s left)")
            continue
        print(f"  {p.name:<13} ~{p.estimate_s:>4.0f} s (done by ~{at:>4.0f} s)  cap {min(p.cap_s, budget):>4.0f} s"
              + (f", {p.reserve_s:.0f} s kept for it" if p.reserve_s else ""))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fastvae's one GPU call, in budgeted phases")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for every phase together ({DEFAULT_BUDGET_S})")
    ap.add_argument("--dry-run", action="store_true", help="every phase on the CPU at small sizes")
    ap.add_argument("--install", choices=("auto", "shim"), default="auto",
                    help="auto: pip install -e . without network, else the shim folder; shim: the shim only")
    ap.add_argument("--work", help="folder for logs and results (default: a new temporary one)")
    ap.add_argument("--dest", help="where the packed results go (default: $OUT, else bench/results/<gpu>)")
    args = ap.parse_args(argv)
    args.dest = args.dest or os.environ.get("OUT")
    run = Run(args)
    print_estimate(run.budget)
    problems: list[str] = []
    for i, phase in enumerate(PHASES):
        later = sum(p.reserve_s for p in PHASES[i + 1:]) + PACK_RESERVE_S
        timeout = min(phase.cap_s, run.left() - later)
        if phase.name != "env" and "env" in run.results and run.results["env"].status != "pass":
            result = Result("skipped", note="environment phase failed")
        elif timeout < 5:
            result = Result("skipped", note=f"no budget left ({run.left():.0f} s, {later:.0f} s kept for later)")
        else:
            print(f"[{time.monotonic() - run.start:5.0f} s] {phase.name} (timeout {timeout:.0f} s)", flush=True)
            try:
                result = phase.run(run, timeout)
            except Exception as e:  # a phase's own bug is that phase's failure, not the run's
                result = Result("fail", note=f"{type(e).__name__}: {e}"[:200])
        run.results[phase.name] = result
        if phase.name == "env" and run.dest is None:
            slug = re.sub(r"[^A-Za-z0-9._-]", "-", run.info.get("env", {}).get("device", "unknown"))
            run.dest = os.path.join(ROOT, "bench", "results", slug) if not run.dry else \
                os.path.join(run.work, "out")
        if run.dest:
            problems = pack(run)
    problems = pack(run)
    print("\n".join(summary_lines(run)))
    if problems:
        print("results check FAILED: " + "; ".join(problems))
        return 2
    print(f"results in {run.dest} ({', '.join(sorted(os.listdir(run.dest)))}); work folder {run.work}")
    # a phase that broke, or timed out, fails the run; on a GPU the phases that take what time there is may
    # time out or find none left, in the dry run every phase must finish (the last is CI's smoke run of every
    # benchmark)
    broken = [n for n, r in run.results.items()
              if r.status != "pass" and (run.dry or r.status == "fail" or n not in AS_TIME_ALLOWS)]
    if broken:
        print(f"FAILED: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
