"""Machine-code report of every Triton kernel specialization the public ops launch, compiled for a GPU target
on a machine without a GPU.

    python bench/sass_report.py --out DIR [--arch 90] [--arch 80]         # record, compile, report
    python bench/sass_report.py --record FILE                             # record only (needs torch)
    python bench/sass_report.py --record FILE --strict -- PYTEST_ARGS     # a test pass, recorded
    python bench/sass_report.py --specs FILE --out DIR --check            # compile a recording (triton only)
    python bench/sass_report.py --specs FILE --warm-cache DIR --arch 90   # fill a Triton cache ahead of a GPU run

Recording runs the test suite under ``TRITON_INTERPRET=1`` with every kernel launch recorded (see
``_sass_record``): whatever kernels and constexpr modes the public API reaches are covered, with no list
to maintain. Compiling goes through the installed triton's JIT binder with the alignment hints a GPU launch
gets (see ``_sass_compile``). The report (``DIR/sass.md``, ``DIR/sass.json``) gives per specialization the
registers, spills, shared memory, the width of each global access, the SASS instructions per element of the
hot path by class, and a *predicted* H100 bound: issue-limited time against the DRAM time of the op's
minimal bytes (see ``_sass_parse``). Nothing in it is measured on a GPU. ``--check`` exits non-zero when a
specialization fails to compile or spills.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the op tests under the interpreter: every test file but the training script, the example models, inductor
# and the GPU-only file, which launch no kernel specialization of their own; a new test file is included
DEFAULT_PYTEST_ARGS = ["-qq", "--tb=no", "-rN", "-p", "no:cacheprovider", "-m", "not torch_only", "tests",
                       "--ignore=tests/test_train.py", "--ignore=tests/test_models.py",
                       "--ignore=tests/test_compile.py", "--ignore=tests/test_cuda.py",
                       "--ignore=tests/test_ci_gpu.py"]
# launches of more programs than this are recorded and skipped: the suite's big tensors cost minutes in the
# interpreter, and a launch's specialization does not depend on its values
RUN_PROGRAMS = 16


# --------------------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------------------


def record(out: str, root: str, pytest_args: list[str], run_programs: int | None, strict: bool = False) -> int:
    """Run pytest in this process with launches recorded; returns pytest's exit code when ``strict`` (every
    launch runs: the recording of a real test pass, which fails as the pass does), else 0.

    The recorder is a pytest plugin (``_plugins/sass_record_plugin``) that every process of the run loads, so
    the pass may run on pytest-xdist's workers (``-n N`` in the arguments): each writes its own recording,
    merged here."""
    import tempfile

    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, by the hook or the tests
    os.environ.setdefault("FASTVAE_TEST_BACKEND", "triton")
    import _sass_record
    import pytest

    parts = tempfile.mkdtemp(prefix="sass-record-")
    os.environ.update({_sass_record.RECORD_DIR: parts, _sass_record.RECORD_ROOT: root,
                       _sass_record.RECORD_RUN_PROGRAMS: "" if run_programs is None else str(run_programs)})
    # bench/ holds a conftest.py too: keep it off sys.path so the tests import their own; the plugin comes from
    # a folder of its own, on the path that xdist hands its workers (the controller's sys.path)
    sys.path[:] = [os.path.join(HERE, "_plugins")] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    cwd = os.getcwd()
    os.chdir(root)
    t0 = time.time()
    try:
        # pytest inserts the ini's addopts into the list it is given
        rc = pytest.main(["-p", "sass_record_plugin", *pytest_args], plugins=[])
    finally:
        os.chdir(cwd)
    files = [os.path.join(parts, f) for f in sorted(os.listdir(parts))]
    specs, launches = _sass_record.merge(files)
    # failures are expected when launches are skipped (their outputs are never written); a broken session is not
    if rc not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or not specs:
        raise SystemExit(f"recording failed: pytest exit code {int(rc)}, {len(specs)} specializations")
    import triton

    with open(out, "w") as f:
        f.write(_sass_record.dumps_rows({"format": _sass_record.FORMAT, "triton": triton.__version__,
                                         "pytest_args": pytest_args, "run_programs": run_programs,
                                         "seconds": round(time.time() - t0, 1), "launches": launches,
                                         "processes": len(files)}, "specializations", specs))
    print(f"recorded {launches} launches in {len(files)} process(es), {len(specs)} specializations in "
          f"{time.time() - t0:.0f} s -> {out}", file=sys.stderr)
    return int(rc) if strict else 0


# --------------------------------------------------------------------------------------------------------
# compiling
# --------------------------------------------------------------------------------------------------------


def spec_name(spec: dict[str, Any]) -> str:
    """kernel[dtypes|constexprs|ints equal to 1|num_warps]: short, unique within a recording."""
    args = spec["args"]
    dtypes = "/".join(sorted({a["dtype"] for a in args.values() if a["kind"] == "tensor"}))
    consts = ",".join(f"{k}={_fmt(a['value'])}" for k, a in args.items() if a["kind"] == "constexpr")
    ones = ",".join(f"{k}=1" for k, a in args.items() if a["kind"] == "int" and a["one"])
    nones = ",".join(f"{k}=None" for k, a in args.items() if a["kind"] == "none")
    opts = ",".join(f"{k}={v}" for k, v in spec["options"].items())
    parts = [p for p in (dtypes, consts, ones, nones, opts) if p]
    return f"{spec['kernel']}[{'|'.join(parts)}]"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "T" if v else "F"
    if isinstance(v, dict):
        return str(v.get("tl_dtype", v))
    return str(v)


def _work(job: tuple[str, dict[str, Any], int, str, bool]) -> dict[str, Any]:
    import _sass_compile
    import _sass_parse

    root, spec, arch, ints, sass = job
    t0 = time.time()
    c = _sass_compile.compile_spec(root, spec, arch, ints, sass)
    out: dict[str, Any] = {"ok": c["ok"], "seconds": 0.0}
    if c["ok"]:
        res = _sass_parse.resources(c["res"], c["ptxas"])
        out.update(_sass_parse.analyze(c["ttir"], c["llir"], c["sass"], res, c["num_warps"]) if sass else res)
        out["num_warps"] = c["num_warps"]
        out["shared_bytes"] = c["shared"]
        out["sass"] = c["sass"]
    else:
        out["error"] = c["error"]
    out["seconds"] = round(time.time() - t0, 2)
    return out


def compile_all(specs: list[dict[str, Any]], root: str, archs: list[int], ints: list[str], jobs: int,
                cache_dir: str | None, sass: bool = True) -> list[dict[str, Any]]:
    """One result per (specialization, arch, int assumption), compiled in ``jobs`` processes."""
    # a fresh cache by default: line numbers in cached artifacts go stale when a kernel file moves code
    os.environ["TRITON_CACHE_DIR"] = cache_dir or tempfile.mkdtemp(prefix="sass-report-cache-")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # spills as ptxas counts them (printed, captured per compile)
    work = [(root, s, a, i, sass) for s in specs for a in archs for i in ints]
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        results = list(pool.map(_work, work, chunksize=1))
    rows = []
    for (_, spec, arch, int_mode, _), res in zip(work, results):
        rows.append({"name": spec_name(spec), "arch": arch, "ints": int_mode, "spec": spec, **res})
    return rows


def _warm_work(job: tuple[str, dict[str, Any], int, str]) -> dict[str, Any]:
    import _sass_compile

    root, spec, arch, ints = job
    t0 = time.time()
    try:
        _sass_compile.warm(root, spec, arch, ints)
        out: dict[str, Any] = {"ok": True}
    except Exception as e:  # one kernel that fails here is compiled (and fails) at its launch instead
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
    return {"name": spec_name(spec), "ints": ints, **out, "seconds": round(time.time() - t0, 3)}


def warm_cache(specs: list[dict[str, Any]], root: str, arch: int, ints: list[str], jobs: int,
               cache_dir: str) -> list[dict[str, Any]]:
    """Compile every specialization into ``cache_dir`` in ``jobs`` processes, as the JIT would at its first
    launch on a GPU of compute capability ``arch`` (see ``_sass_compile.warm``)."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    # neither may differ from the GPU run's environment: cache-invalidating variables are part of the key
    for var in ("TRITON_INTERPRET", "TRITON_DUMP_PTXAS_LOG"):
        os.environ.pop(var, None)
    work = [(root, s, arch, i) for s in specs for i in ints]
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        return list(pool.map(_warm_work, work, chunksize=1))


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------


def _widths(row: dict[str, Any], op: str) -> str:
    """Bits per thread of each access, in source order: tile accesses bare, scalar and indexed ones in
    brackets, e.g. '128 128 [32]'; '-' where the access produced no instruction of its own."""
    parts = []
    for a in row["accesses"]:
        if a["op"] != op:
            continue
        w = "/".join(sorted(a["widths"], key=int, reverse=True)) or "-"
        parts.append(w if a["kind"] == "tile" else f"[{w}]")
    return " ".join(parts) or "-"


def _dtypes(spec: dict[str, Any]) -> str:
    return "/".join(sorted({a["dtype"] for a in spec["args"].values() if a["kind"] == "tensor"}))


def _modes(spec: dict[str, Any]) -> str:
    """The constexprs other than BLOCK, the ints specialized to 1 and the None arguments."""
    args = spec["args"]
    parts = [f"{k}={_fmt(a['value'])}" for k, a in args.items() if a["kind"] == "constexpr" and k != "BLOCK"]
    parts += [f"{k}=1" for k, a in args.items() if a["kind"] == "int" and a["one"]]
    parts += [f"{k}=None" for k, a in args.items() if a["kind"] == "none"]
    return " ".join(parts)


def _config(spec: dict[str, Any]) -> str:
    block = spec["args"].get("BLOCK", {}).get("value", "-")
    opts = " ".join(f"{k}={v}" for k, v in spec["options"].items() if k != "num_warps")
    return f"{block}/{spec['options'].get('num_warps', 4)}" + (f" {opts}" if opts else "")


def _prediction(r: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """(B/elem, issue ps, pipe ps, DRAM ps, issue/DRAM) cells."""
    p = r["predicted"]
    if r["single_program"]:
        return f"{r['bytes_per_element']:.1f}", "-", "-", "-", "single program"
    if p is None or not r["bytes_per_element"]:
        return f"{r['bytes_per_element']:.1f}", "-", "-", "-", "-"
    pipe = p["pipe_ps_per_element"][p["busiest_pipe"]]
    return (f"{r['bytes_per_element']:.1f}", f"{p['issue_ps_per_element']:.2f}",
            f"{pipe:.2f} {p['busiest_pipe']}", f"{p['dram_ps_per_element']:.2f}", f"**{p['issue_over_dram']:.2f}**")


def _classes(r: dict[str, Any]) -> str:
    pe = r["hot_path"]["per_element"]
    total = sum(pe.values())
    loop = " loop" if r["hot_path"]["mode"] == "loop" else ""
    return f"{total:.1f}{loop} | " + " ".join(f"{pe[c]:.1f}" for c in ("int", "fp32", "mufu", "conv", "mem", "ctrl",
                                                                       "other"))


def _kernel_key(r: dict[str, Any]) -> tuple[str, str]:
    return os.path.basename(r["spec"]["file"]), r["spec"]["kernel"]


def _summary(sel: list[dict[str, Any]]) -> list[str]:
    """Per kernel and dtype set, the launch config of the largest tensors (largest BLOCK recorded) over all
    its modes: the rows a large training step runs."""
    lines = [
        "| kernel | dtypes | BLOCK/warps | modes | regs | spills | tile load bits | tile store bits | "
        "instr/elem | issue/DRAM |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in sel:
        groups.setdefault((*_kernel_key(r), _dtypes(r["spec"])), []).append(r)
    for (_, kernel, dtypes), rs in sorted(groups.items()):
        block = max(r["spec"]["args"].get("BLOCK", {}).get("value", 0) for r in rs)
        big = [r for r in rs if r["spec"]["args"].get("BLOCK", {}).get("value", 0) == block]
        loads = sorted({int(w) for r in big for a in r["accesses"] if a["kind"] == "tile" and a["op"] == "load"
                        for w in a["widths"]})
        stores = sorted({int(w) for r in big for a in r["accesses"] if a["kind"] == "tile" and a["op"] == "store"
                         for w in a["widths"]})
        instr = [sum(r["hot_path"]["per_element"].values()) for r in big]
        ratios = [r["predicted"]["issue_over_dram"] for r in big
                  if r["predicted"] and r["predicted"]["issue_over_dram"] is not None and not r["single_program"]]
        ratio = (f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}") if ratios \
            else "-"
        lines.append(
            f"| `{kernel}` | {dtypes} | {_config(big[0]['spec'])} | {len(big)} | "
            f"{max(r['regs'] for r in big)} | {sum(r['spill_bytes'] for r in big)} | "
            f"{' '.join(map(str, loads)) or '-'} | {' '.join(map(str, stores)) or '-'} | "
            f"{min(instr):.0f}-{max(instr):.0f} | {ratio} |"
        )
    return lines


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from _sass_parse import H100

    m = H100
    ptxas = ", ".join(f"sm_{a}: {v}" for a, v in meta["ptxas"].items())
    lines = [
        "# Machine-code report of the Triton kernels: predicted, not measured",
        "",
        f"Every kernel specialization the public ops launched in the test suite ({meta['specializations']} from "
        f"{meta['launches']} launches, recorded under the Triton interpreter), compiled for "
        f"{', '.join('sm_' + str(a) for a in meta['archs'])} on a machine without a GPU with triton "
        f"{meta['triton']} ({ptxas}). Made by `python bench/sass_report.py --out DIR`; the numbers below come "
        "from the machine code and a simple model of an H100, and no GPU ran any of it.",
        "",
        "**Assumptions.** Tensors are 16-byte aligned (`tt.divisibility = 16`, true of every fresh CUDA "
        "allocation). Integer arguments equal to 1 are constexprs, as the JIT makes them; every other integer "
        + ("is a multiple of 16, which is the JIT's hint for such sizes (sizes that are not get scalar accesses "
           "where a mask depends on them: `--ints odd` compiles that case)" if meta["ints"] == ["div16"] else
           "is compiled both as a multiple of 16 (`div16`, the JIT's hint) and as not one (`odd`, no hint)")
        + ". Masks are taken as all-true.",
        "",
        f"**Model.** An H100 SXM: {m['sms']} SMs at {m['clock_hz'] / 1e9:.2f} GHz, each issuing "
        f"{m['issue_per_sm_clk']:.0f} warp-instructions per clock, and {m['dram_bytes_per_s'] / 1e12:.1f} TB/s "
        "of DRAM bandwidth (a device-to-device copy measured on one). *issue*: the time to issue the hot "
        "path's instructions for one element on the whole GPU; *pipe*: the busiest execution pipe's time "
        "(lanes per SM per clock: FMA 128, IMAD 64, ALU 64, MUFU and conversions 16; approximate); *DRAM*: the "
        "time of the element's minimal bytes (tile-shaped loads and stores; scalar and indexed accesses left "
        "out). issue/DRAM above 1 means the kernel cannot reach DRAM bandwidth; near 1 it is at risk, as "
        "latency and dependencies keep the issue rate below its peak.",
        "",
        "**Hot path.** One iteration of the kernel's loops when it has any (marked *loop*; the rest of the "
        "program is amortized over the trip count), else the whole body, along the shortest path through its "
        "forward branches, so libdevice's slow paths (sinf's huge-argument reduction and the like) are skipped. "
        "instr/elem: SASS instructions per element and thread, then by class: integer, FP32, MUFU, "
        "conversion, memory, control, other (moves, uniform datapath, shuffles). elem/thr = BLOCK / (32 "
        "num_warps). Load and store bits: per thread per instruction of each access in source order, from the "
        "LLVM IR's source lines; scalar and indexed accesses in brackets.",
        "",
    ]
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r["spills"]]
    lines += [f"**Compile: {len(rows) - len(failed)}/{len(rows)} ok, {len(spilled)} with spills.**", ""]
    for r in failed:
        lines.append(f"- FAILED sm_{r['arch']} `{r['name']}`: `{r['error'].splitlines()[0][:300]}`")
    for r in spilled:
        lines.append(f"- SPILLS sm_{r['arch']} `{r['name']}`: {r['spill_bytes']} bytes")
    if failed or spilled:
        lines.append("")
    for arch in meta["archs"]:
        for ints in meta["ints"]:
            sel = [r for r in rows if r["ok"] and r["arch"] == arch and r["ints"] == ints]
            if not sel:
                continue
            suffix = f", integers {ints}" if len(meta["ints"]) > 1 else ""
            lines += [f"## sm_{arch}{suffix}: summary", ""]
            lines += _summary(sel)
            lines += ["", "modes: the constexpr modes compiled at that config; instr/elem and issue/DRAM: their range.",
                      ""]
            lines += [f"## sm_{arch}{suffix}: every specialization", ""]
            by_kernel: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in sel:
                by_kernel.setdefault(_kernel_key(r), []).append(r)
            for (file, kernel), rs in sorted(by_kernel.items()):
                lines += [
                    f"### `{kernel}` ({file})",
                    "",
                    "| dtypes | modes | BLOCK/warps | regs | spill B | smem B | elem/thr | load bits | store bits | "
                    "instr/elem | int fp32 mufu conv mem ctrl other | B/elem | issue ps | pipe ps | DRAM ps | "
                    "issue/DRAM |",
                    "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | "
                    "---: | ---: |",
                ]
                key = lambda r: (_dtypes(r["spec"]), _modes(r["spec"]),
                                 r["spec"]["args"].get("BLOCK", {}).get("value", 0))
                for r in sorted(rs, key=key):
                    lines.append(
                        f"| {_dtypes(r['spec'])} | {_modes(r['spec'])} | {_config(r['spec'])} | {r['regs']} | "
                        f"{r['spill_bytes']} | {r['shared_bytes']} | {r['elements_per_thread']:g} | "
                        f"{_widths(r, 'load')} | {_widths(r, 'store')} | {_classes(r)} | "
                        + " | ".join(_prediction(r)) + " |"
                    )
                lines.append("")
    return "\n".join(lines) + "\n"


def _ptxas_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "?"


def _load_specs(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The specializations of one or more recordings, merged (each once), and the first recording's header
    with the launches of all."""
    import _sass_record

    with open(paths[0]) as f:
        head = {k: v for k, v in json.load(f).items() if k != "specializations"}
    specs, launches = _sass_record.merge(paths)
    return specs, {**head, "launches": launches, "recordings": [os.path.basename(p) for p in paths]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = None
    if "--" in argv:
        k = argv.index("--")
        argv, pytest_args = argv[:k], argv[k + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for sass.md, sass.json and the recording")
    ap.add_argument("--arch", type=int, action="append", help="compute capability, repeatable (default 90)")
    ap.add_argument("--record", metavar="FILE", help="only record the specializations into FILE")
    ap.add_argument("--specs", metavar="FILE", nargs="+",
                    help="compile these recordings (merged) instead of recording")
    ap.add_argument("--ints", choices=("div16", "odd", "both"), default="div16",
                    help="integer arguments other than 1: multiples of 16 (default), not, or both")
    ap.add_argument("--check", action="store_true", help="exit 1 on any compile failure or spill")
    ap.add_argument("--check-only", action="store_true",
                    help="compile and check resources without disassembling (fast, no sass.md); implies --check")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--root", default=ROOT, help="repository root (where the tests and kernels are)")
    ap.add_argument("--run-programs", type=int, default=RUN_PROGRAMS,
                    help="launches of more programs are recorded but not run (-1: run all)")
    ap.add_argument("--strict", action="store_true",
                    help="with --record: run every launch and exit with pytest's code (a recorded test pass)")
    ap.add_argument("--cache-dir", help="triton cache to reuse (default: a fresh one)")
    ap.add_argument("--warm-cache", metavar="DIR",
                    help="with --specs: only compile into the Triton cache DIR (per-kernel seconds to --out)")
    ap.add_argument("--limit", type=int, help="with --warm-cache: the first N specializations only")
    ap.add_argument("--dump-sass", action="store_true", help="also write each SASS listing under DIR/sass/")
    args = ap.parse_args(argv)
    root = os.path.abspath(args.root)
    pytest_args = pytest_args or DEFAULT_PYTEST_ARGS
    run_programs = None if args.run_programs < 0 else args.run_programs

    if args.record:
        return record(os.path.abspath(args.record), root, pytest_args, None if args.strict else run_programs,
                      args.strict)
    if args.warm_cache:
        if not args.specs:
            ap.error("--warm-cache needs --specs")
        specs = _load_specs(args.specs)[0][: args.limit]
        ints = ["div16", "odd"] if args.ints == "both" else [args.ints]
        t0 = time.time()
        rows = warm_cache(specs, root, (args.arch or [90])[0], ints, args.jobs, os.path.abspath(args.warm_cache))
        seconds = time.time() - t0
        failed = [r for r in rows if not r["ok"]]
        cpu = sum(r["seconds"] for r in rows)
        import triton

        summary = {"triton": triton.__version__, "arch": (args.arch or [90])[0], "ints": ints, "jobs": args.jobs,
                   "compiles": len(rows), "failed": len(failed), "wall_seconds": round(seconds, 1),
                   "compile_seconds": round(cpu, 1), "per_compile_seconds": round(cpu / max(len(rows), 1), 3)}
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            from _sass_record import dumps_rows

            with open(os.path.join(args.out, "warm.json"), "w") as f:
                f.write(dumps_rows(summary, "results", rows))
        print(f"triton {triton.__version__}: warmed {len(rows) - len(failed)}/{len(rows)} kernels for sm_"
              f"{summary['arch']} in {seconds:.0f} s ({cpu:.0f} s of compiles on {args.jobs} processes, "
              f"{summary['per_compile_seconds']:.2f} s each) -> {args.warm_cache}", file=sys.stderr)
        for r in failed[:5]:
            print(f"not warmed {r['name']} ({r['ints']}): {r['error'].splitlines()[0][:300]}", file=sys.stderr)
        return 0
    if not args.out:
        ap.error("--out is required unless --record is given")
    os.makedirs(args.out, exist_ok=True)
    specs_files = args.specs
    if specs_files is None:
        specs_files = [os.path.join(args.out, "specializations.json")]
        # a separate process: the interpreter must be on while recording and off while compiling
        cmd = [sys.executable, os.path.abspath(__file__), "--record", specs_files[0], "--root", root,
               "--run-programs", str(args.run_programs), "--", *pytest_args]
        subprocess.run(cmd, check=True)
    specs, recording = _load_specs(specs_files)
    archs = args.arch or [90]
    ints = ["div16", "odd"] if args.ints == "both" else [args.ints]

    import triton

    t0 = time.time()
    rows = compile_all(specs, root, archs, ints, args.jobs, args.cache_dir, sass=not args.check_only)
    seconds = time.time() - t0
    from _sass_compile import ptxas_path

    meta = {
        "triton": triton.__version__,
        "ptxas": {a: _ptxas_version(ptxas_path(a)) for a in archs},
        "python": platform.python_version(),
        "archs": archs,
        "ints": ints,
        "specializations": len(specs),
        "launches": recording.get("launches"),
        "pytest_args": recording.get("pytest_args", []),
        "compile_seconds": round(seconds, 1),
        "note": "predicted from SASS with a simple H100 model, not measured",
    }
    if args.dump_sass:
        os.makedirs(os.path.join(args.out, "sass"), exist_ok=True)
        for i, r in enumerate(rows):
            if r["ok"]:
                with open(os.path.join(args.out, "sass", f"{i:03d}_sm{r['arch']}_{r['spec']['kernel']}.sass"),
                          "w") as f:
                    f.write(f"// {r['name']}\n" + r["sass"])
    for r in rows:
        r.pop("sass", None)
    from _sass_record import dumps_rows

    with open(os.path.join(args.out, "check.json" if args.check_only else "sass.json"), "w") as f:
        f.write(dumps_rows({"meta": meta}, "results", rows))
    if not args.check_only:
        with open(os.path.join(args.out, "sass.md"), "w") as f:
            f.write(markdown(rows, meta))
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r["spills"]]
    print(f"triton {triton.__version__}: {len(rows) - len(failed)}/{len(rows)} compiled "
          f"({len(specs)} specializations x {len(archs)} arch x {len(ints)}), {len(spilled)} spill, "
          f"{seconds:.0f} s -> {args.out}", file=sys.stderr)
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['name']}:\n{r['error']}", file=sys.stderr)
    for r in spilled:
        print(f"SPILLS sm_{r['arch']} {r['name']}: {r['spill_bytes']} bytes spilled (stores + loads), "
              f"{r['regs']} registers", file=sys.stderr)
    return 1 if (args.check or args.check_only) and (failed or spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
