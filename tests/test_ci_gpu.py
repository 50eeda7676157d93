"""ci/gpu.py's pure parts: the order of the phases (correctness first, nothing beside the tests), the budget
split between them, the check of what the device tool brings back, the summary's numbers from a benchmark
JSON, the benchmark selections of the compile warm-up and the headline, and the fit-batch search of
bench/test_e2e.py. (CI runs the whole script end to end with --dry-run.)"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ci"))
import gpu  # noqa: E402


def _names() -> list[str]:
    return [p.name for p in gpu.PHASES]


def test_correctness_comes_first():
    names = _names()
    tests = [names.index("tests-cuda"), names.index("tests-subset")]
    benchmarks = [names.index(n) for n in ("warm-compile", "headline", "bench-rest")]
    assert max(tests) < min(benchmarks)
    # the only phases before the tests: the environment and the Triton cache (CPU compiles, the GPU idle)
    assert names[: min(tests)] == ["env", "warm-triton"]


def test_nothing_runs_beside_a_phase():
    """Every process gpu.py starts is waited for by the phase that starts it (Run.sh): no warm-up, fit search or
    benchmark runs in the background while the tests do."""
    src = inspect.getsource(gpu)
    assert src.count("Popen(") == 1 and "Popen(" in inspect.getsource(gpu.Run.sh)
    assert not hasattr(gpu.Run, "spawn")


def test_default_budget_leaves_a_rerun_inside_the_device_time():
    assert gpu.main.__code__ and gpu.DEFAULT_BUDGET_S <= 300
    one_call = gpu.MACHINE_START_S + gpu.DEFAULT_BUDGET_S
    assert 2 * one_call <= gpu.DEVICE_TIME_S
    # the must-run phases' estimates, and the packing, fit the default budget; the rest takes what is left
    must = [p for p in gpu.PHASES if p.name not in gpu.AS_TIME_ALLOWS or p.estimate_s]
    assert sum(p.estimate_s for p in must) + gpu.PACK_RESERVE_S <= gpu.DEFAULT_BUDGET_S
    assert next(p for p in gpu.PHASES if p.name == "bench-rest").estimate_s == 0


def test_every_must_run_phase_gets_its_estimate_under_the_default_budget(tmp_path, monkeypatch):
    """A simulated run (each phase takes its H200 estimate, or its timeout if that is shorter): no phase is cut
    short, the headline is done within the default budget, and the tests get more than their estimate."""
    clock = [0.0]
    given: dict[str, float] = {}

    def fake(phase):
        def run_phase(run, timeout):
            given[phase.name] = timeout
            clock[0] += min(phase.estimate_s, timeout)
            return gpu.Result(note=phase.name)
        return run_phase

    phases = [gpu.Phase(p.name, p.cap_s, p.reserve_s, p.estimate_s, fake(p)) for p in gpu.PHASES]
    monkeypatch.setattr(gpu, "PHASES", phases)
    monkeypatch.setattr(gpu.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(gpu, "pack", lambda run: [])
    monkeypatch.setattr(gpu, "print_estimate", lambda budget: None)
    (tmp_path / "o").mkdir()
    rc = gpu.main(["--dry-run", "--work", str(tmp_path / "w"), "--dest", str(tmp_path / "o")])
    assert rc == 0
    for p in phases:
        if p.name != "bench-rest":
            assert given[p.name] >= p.estimate_s, (p.name, given[p.name])
    assert given["tests-cuda"] > 55 and given["tests-subset"] > 60
    assert clock[0] + gpu.PACK_RESERVE_S <= gpu.DEFAULT_BUDGET_S


def test_the_tests_keep_their_time_from_the_warm_up_before_them(tmp_path, monkeypatch):
    """A Triton warm-up that takes all it may still leaves both test phases the time they keep."""
    clock = [0.0]
    given: dict[str, float] = {}

    def fake(phase):
        def run_phase(run, timeout):
            given[phase.name] = timeout
            clock[0] += timeout if phase.name == "warm-triton" else min(phase.estimate_s, timeout)
            return gpu.Result(note=phase.name)
        return run_phase

    phases = [gpu.Phase(p.name, p.cap_s, p.reserve_s, p.estimate_s, fake(p)) for p in gpu.PHASES]
    monkeypatch.setattr(gpu, "PHASES", phases)
    monkeypatch.setattr(gpu.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(gpu, "pack", lambda run: [])
    monkeypatch.setattr(gpu, "print_estimate", lambda budget: None)
    (tmp_path / "o").mkdir()
    gpu.main(["--dry-run", "--work", str(tmp_path / "w"), "--dest", str(tmp_path / "o")])
    keep = {p.name: p.reserve_s for p in gpu.PHASES}
    assert given["tests-cuda"] >= keep["tests-cuda"] and given["tests-subset"] >= keep["tests-subset"]
    assert given["headline"] >= keep["headline"]


def test_check_dest_enforces_the_device_tools_limits(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert gpu.check_dest(str(tmp_path)) == []
    for i in range(3, 9):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert any("9 files" in p for p in gpu.check_dest(str(tmp_path)))
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x").write_text("x")
    (tmp_path / "bad name").write_text("x")
    problems = gpu.check_dest(str(tmp_path))
    assert any("folders down" in p for p in problems) and any("bad name" in p for p in problems)


def test_headline_numbers_pick_the_kernel_rows(tmp_path):
    rows = []
    for impl, median in (("eager", 4.0), ("compile", 2.0), ("fastvae-torch", 4.0), ("fastvae-triton", 1.0)):
        info = {"op": "sample_kl", "mode": "fwd", "impl": impl, "dtype": "float32", "shape": [1024, 64],
                "frac_copy_bw": 0.9 if impl == "fastvae-triton" else 0.2,
                "speedup_vs_eager": 4.0 / median, "speedup_vs_compile": 2.0 / median}
        rows.append({"extra_info": info, "stats": {"median": median}})
    rows.append({"extra_info": {"fit_batch": 5}, "stats": {"median": 0.0}})  # a fit row: no op
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"benchmarks": rows, "fastvae_bench": {
        "env": {"copy_gbps": 4000.0}, "train_fit_batch": {"mlp_vae": {"eager": 3, "fastvae": 5}}}}))
    h = gpu.headline_numbers(str(path))
    assert [o["impl"] for o in h["ops"]] == ["fastvae-triton"]
    assert h["ops"][0]["speedup_vs_eager"] == 4.0 and h["ops"][0]["speedup_vs_compile"] == 2.0
    assert h["ops"][0]["median_s"] == 1.0  # no device time in extra_info: pytest-benchmark's median
    assert h["copy_gbps"] == 4000.0 and h["fit_batch"] == {"eager": 3, "fastvae": 5}


def test_a_phase_never_takes_the_time_later_phases_keep(tmp_path, monkeypatch):
    seen = {}

    def fake(name):
        def run_phase(run, timeout):
            seen[name] = timeout
            return gpu.Result(note=name)
        return run_phase

    phases = [gpu.Phase("env", 60, 0, 1, fake("env")), gpu.Phase("a", 1000, 0, 1, fake("a")),
              gpu.Phase("b", 100, 50, 1, fake("b"))]
    monkeypatch.setattr(gpu, "PHASES", phases)
    rc = gpu.main(["--budget", "120", "--dry-run", "--work", str(tmp_path / "w"), "--dest", str(tmp_path / "o")])
    assert rc == 0
    assert seen["a"] <= 120 - 50 - gpu.PACK_RESERVE_S + 1  # b keeps its 50 s, the packing its 10
    assert sorted(os.listdir(tmp_path / "o")) == ["results.json", "results.tar.gz", "summary.txt"]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["phases"]["b"]["status"] == "pass"


@pytest.mark.parametrize("largest", [63, 64, 100, 1000, 5000])
def test_fit_batch_search(largest):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from _fit import FIT_RESOLUTION, fit_batch

    tried = []

    def fits(b):
        tried.append(b)
        return b <= largest

    best, tries = fit_batch(fits, 64, 1 << 20)
    assert tries == len(tried)
    if largest < 64:
        assert best == 0
    else:
        assert best <= largest and largest - best <= max(1, best // FIT_RESOLUTION) + 1



def test_the_rest_phase_runs_every_benchmark_file():
    files = sorted(f"bench/{f}" for f in os.listdir(os.path.join(ROOT, "bench"))
                   if f.startswith("test_") and f.endswith(".py"))
    assert sorted(gpu.REST_FILES) == files
    # the headline ops' grids (their small sizes first) before the other files
    assert gpu.REST_FILES[:2] == ["bench/test_sampling.py", "bench/test_gaussian_nll.py"]


def test_headline_numbers_take_the_device_time_and_the_best_reference(tmp_path):
    rows = []
    for impl, device_s in (("eager", 8.0), ("compile", 4.0), ("formula", 6.0), ("formula-compile", 2.0),
                           ("fastvae-triton", 1.0)):
        info = {"op": "nll_var", "mode": "fwd", "impl": impl, "dtype": "float32", "shape": [1024, 64],
                "median_s": device_s, "host_s": 0.5 * device_s, "host_syncs": 1 if impl == "eager" else 0}
        # pytest-benchmark's own median (wall time, closing synchronization included) is not the one taken
        rows.append({"extra_info": info, "stats": {"median": 10 * device_s}})
    report = _bench_module("report")
    flat = [r["extra_info"] for r in rows]
    report.fill_speedups(flat)  # bench/conftest.py's add_speedups computes the same, with report.speedups
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"benchmarks": rows, "fastvae_bench": {"env": {}}}))
    (o,) = gpu.headline_numbers(str(path))["ops"]
    assert o["median_s"] == 1.0 and o["speedup_vs_eager"] == 8.0 and o["speedup_vs_compile"] == 4.0
    assert o["speedup_vs_best"] == 2.0 and o["best_ref"] == "formula-compile"
    assert gpu._host(o) == "50%"
    assert gpu._host({"median_s": 2.0, "host_s": 1.0, "host_syncs": 1}) == "50%!"


def _bench_module(name: str):
    """A torch-free module of bench/, imported by path (bench/conftest.py would shadow the tests' conftest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _collect(k: str, files: list[str]) -> list[str]:
    """The benchmark ids a ``-k`` selects from ``files`` on the CUDA headline grid (collection only)."""
    env = dict(os.environ, FASTVAE_BENCH_GRID="headline", FASTVAE_BENCH_GRID_DEVICE="cuda")
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-k", k,
                          *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [ln for ln in out.stdout.splitlines() if "::" in ln]


def test_warm_up_and_headline_select_the_reference_rows_and_no_fit_search():
    headline = _collect(f"({gpu.HEADLINE_K}) and not fastvae-torch", gpu.HEADLINE_FILES)
    warm = _collect(f"({gpu.HEADLINE_K}) and (compile or fastvae-triton)", gpu.HEADLINE_FILES)
    assert headline and warm and not any("fit_batch" in t for t in headline + warm)
    # the variance forms and the training step against the formula by hand, eager and compiled
    for test in ("test_nll_var_scalar[", "test_nll_var[", "test_mlp_vae["):
        impls = {t.rsplit("-", 1)[-1].rstrip("]") if not t.endswith("-compile]") else
                 ("formula-compile" if t.endswith("formula-compile]") else "compile")
                 for t in headline if test in t}
        assert {"eager", "compile", "formula", "formula-compile"} <= impls, (test, impls)
    # every compiled variant of the headline is warmed, and nothing the headline does not time
    assert {t for t in headline if t.endswith("compile]")} <= set(warm) <= set(headline)
    assert all(t.endswith(("compile]", "fastvae-triton]")) for t in warm)
    # 2^26 elements: the ops' cases of the headline (sample+KL and nll_logvar have no formula rows)
    assert sum("test_mlp_vae" not in t for t in headline) == 64


def test_the_gpu_suite_calls_every_public_op():
    """tests/test_cuda.py's no-host-sync and second-device tests have a call for every public op (checked here,
    on the CPU, so a new op without one fails before a GPU is lent)."""
    import test_cuda

    calls = {n.split("[")[0] for n in test_cuda.CALLS}
    assert test_cuda._public_ops() <= calls, sorted(test_cuda._public_ops() - calls)
