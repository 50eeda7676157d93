"""ci/gpu.py's pure parts: the budget split between phases, the check of what the device tool brings back,
the summary's numbers from a benchmark JSON, and the fit-batch search of bench/test_e2e.py. (CI runs the whole
script end to end with --dry-run.)"""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "ci"))
import gpu  # noqa: E402


def test_headline_is_in_the_first_five_minutes_and_the_plan_fits_the_default_budget():
    done, at = {}, 0.0
    for p in gpu.PHASES:
        at += p.estimate_s
        done[p.name] = at
    assert done["headline"] <= 300
    assert done[gpu.PHASES[-1].name] <= 480
    # every phase before the headline leaves it the time it keeps for itself
    assert next(p for p in gpu.PHASES if p.name == "headline").reserve_s >= 100


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
    monkeypatch.setattr(gpu, "start_warm_compile", lambda run: None)
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
