"""Machine-code report of every Triton kernel specialization the public ops launch, compiled for a GPU target
on a machine without a GPU.

    python bench/sass_report.py --out DIR [--arch 90] [--arch 80]         # record, compile, report
    python bench/sass_report.py --record FILE                             # record only (needs torch)
    python bench/sass_report.py --record FILE --strict -- PYTEST_ARGS     # a test pass, recorded
    python bench/sass_report.py --specs FILE --out DIR --check            # compile a recording (triton only)
    python bench/sass_report.py --specs FILE --warm-cache DIR --arch 90   # fill a Triton cache ahead of a GPU run
    python bench/sass_report.py --specs FILE --out DIR --check-only --compile-record [RECORD] [--update-record]
                                                # check only what the compile record has no clean result for
    python bench/sass_report.py --tiles --out DIR [--specs FILE]          # the tile kernels' report (tiles.md)

Recording runs the test suite under ``TRITON_INTERPRET=1`` with every kernel launch recorded (see
``_sass_record``): whatever kernels and constexpr modes the public API reaches are covered, with no list
to maintain. Compiling goes through the installed triton's JIT binder with the alignment hints a GPU launch
gets (see ``_sass_compile``). The report (``DIR/sass.md``, ``DIR/sass.json``) gives per specialization the
registers, spills, shared memory, the width of each global access, the SASS instructions per element of the
hot path by class, and a *predicted* H100/H200 bound: issue-limited time against the DRAM time of the op's
minimal bytes (see ``_sass_parse``), at a measured copy bandwidth (``--copy-bandwidth``) or a nominal one.
Nothing else in it is measured on a GPU. ``--check`` exits non-zero when a specialization fails to compile or
spills.

``--tiles`` writes ``DIR/tiles.md`` and ``DIR/tiles.json`` instead: the codebook kernels (VQ search and fused
forward, LFQ entropy, soft assignment) compiled at the headline launch shapes, their SASS read per iteration
of the loop over code tiles (instructions, MMAs and their shape, MUFU, by class and source line), and a
*predicted* bound against the tensor cores, the issue rate or a pipe (not DRAM), beside
``torch.mm(z, codebook.T)`` at the same shape (see ``_sass_tiles``). The workloads are built on recorded
specializations of those kernels (``--specs``, or by default a recording of ``TILE_TEST_FILES`` made first).

The compile record (``--compile-record``, default ``bench/results/sass/compile_record.json``) keeps each
checked specialization's result under the hash ``triton.compile`` gives it, computed without compiling (see
``_sass_compile.compile_hash``): a check compiles only the specializations whose hash the record holds no
clean result for, so a changed kernel, a new constexpr mode or another triton compiles, and nothing else does.
"""

from __future__ import annotations

import argparse
import collections
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
# the tests whose launches reach the tile kernels --tiles reports (a test file missing here is left out)
TILE_TEST_FILES = ["tests/test_vq.py", "tests/test_lfq.py", "tests/test_gumbel.py", "tests/test_fsq.py",
                   "tests/test_soft_assign.py"]
TILE_PYTEST_ARGS = ["-qq", "--tb=no", "-rN", "-p", "no:cacheprovider"]


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


Job = tuple[str, dict[str, Any], int, str, bool, dict[str, Any]]  # root, spec, arch, ints, sass, model


def _work(job: Job) -> dict[str, Any]:
    import _sass_compile
    import _sass_parse

    root, spec, arch, ints, sass, model = job
    t0 = time.time()
    c = _sass_compile.compile_spec(root, spec, arch, ints, sass)
    out: dict[str, Any] = {"ok": c["ok"], "seconds": 0.0}
    if c["ok"]:
        res = _sass_parse.resources(c["res"], c["ptxas"])
        out.update(_sass_parse.analyze(c["ttir"], c["llir"], c["sass"], res, c["num_warps"], model) if sass
                   else res)
        out["num_warps"] = c["num_warps"]
        out["shared_bytes"] = c["shared"]
        out["sass"] = c["sass"]
        out["hash"] = c["hash"]
    else:
        out["error"] = c["error"]
    out["seconds"] = round(time.time() - t0, 2)
    return out


def compile_env(cache_dir: str | None) -> None:
    """The environment every compile (and every key computed for one) runs in."""
    # a fresh cache by default: line numbers in cached artifacts go stale when a kernel file moves code
    os.environ["TRITON_CACHE_DIR"] = cache_dir or tempfile.mkdtemp(prefix="sass-report-cache-")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # spills as ptxas counts them (printed, captured per compile)


def compile_work(work: list[Job], jobs: int) -> list[dict[str, Any]]:
    """One row per job, compiled in ``jobs`` processes (forked: they share the parent's kernel modules, so
    what they compile is the source the parent computed keys from)."""
    if not work:
        return []
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        results = list(pool.map(_work, work, chunksize=1))
    return [{"name": spec_name(spec), "arch": arch, "ints": int_mode, "spec": spec, **res}
            for (_, spec, arch, int_mode, _, _), res in zip(work, results)]


def compile_all(specs: list[dict[str, Any]], root: str, archs: list[int], ints: list[str], jobs: int,
                cache_dir: str | None, sass: bool = True, model: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """One result per (specialization, arch, int assumption), compiled in ``jobs`` processes."""
    from _sass_parse import H100

    compile_env(cache_dir)
    return compile_work([(root, s, a, i, sass, model or H100) for s in specs for a in archs for i in ints], jobs)


# --------------------------------------------------------------------------------------------------------
# the compile record: check results keyed by Triton's compile hash, so that a check compiles only what changed
# --------------------------------------------------------------------------------------------------------

RECORD_FORMAT = 1  # bump when what an entry means changes: every key compiles again
DEFAULT_RECORD = os.path.join(ROOT, "bench", "results", "sass", "compile_record.json")
# what an entry keeps of a check result
RECORD_FIELDS = ("ok", "regs", "spills", "spill_bytes", "local_bytes", "stack_bytes", "shared_bytes", "num_warps")


def checker_hash() -> str:
    """Hash of the code that turns a compile into an entry's verdict (the compile itself, the ptxas log and
    resource parsing, what counts as clean): none of it is in Triton's key, so a record written by other
    code is not trusted."""
    import hashlib
    import inspect

    import _sass_compile
    import _sass_parse

    funcs = (_sass_compile.compile_spec, _sass_compile.jit_options, _sass_compile.ptxas_log, _sass_parse.resources,
             _sass_parse.parse_ptxas_log, _sass_parse.parse_resource_usage, _work, clean)
    return hashlib.sha256("".join(inspect.getsource(f) for f in funcs).encode("utf-8")).hexdigest()[:16]


def load_record(path: str) -> dict[str, dict[str, Any]]:
    """Key -> entry of a compile record; an absent file, one of another format or one written by another
    checker is an empty record (everything compiles)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != RECORD_FORMAT or data.get("checker") != checker_hash():
        print(f"compile record {path}: written by another checker (format {data.get('format')}, checker "
              f"{data.get('checker')}; this one: {RECORD_FORMAT}, {checker_hash()}): ignored", file=sys.stderr)
        return {}
    return {e["key"]: e for e in data["entries"]}


def write_record(path: str, entries: dict[str, dict[str, Any]]) -> None:
    from _sass_record import dumps_rows

    rows = sorted(entries.values(), key=lambda e: (e["triton"], e["arch"], e["ints"], e["name"], e["key"]))
    head = {"format": RECORD_FORMAT, "checker": checker_hash(),
            "about": "check results of kernel specializations keyed by triton.compile's hash (see "
                     "bench/results/sass/README.md); written by bash ci/compile_check.sh --update-record"}
    with open(path, "w") as f:
        f.write(dumps_rows(head, "entries", rows))


def record_entry(row: dict[str, Any], key: str, triton_version: str) -> dict[str, Any]:
    entry = {"key": key, "name": row["name"], "file": row["spec"]["file"], "arch": row["arch"],
             "ints": row["ints"], "triton": triton_version}
    entry.update({k: row[k] for k in RECORD_FIELDS if k in row})
    if not row["ok"]:
        entry["error"] = row["error"].splitlines()[0][:500]
    return entry


def clean(entry: dict[str, Any]) -> bool:
    """Whether a result passes the check: compiled, no spill."""
    return bool(entry["ok"]) and not entry.get("spills")


def job_keys(work: list[Job]) -> list[str | None]:
    """``triton.compile``'s hash of each job, computed without compiling (None where it cannot be: that job
    is compiled, and fails there if it is broken)."""
    import _sass_compile

    keys: list[str | None] = []
    for root, spec, arch, ints, _, _ in work:
        try:
            keys.append(_sass_compile.compile_hash(root, spec, arch, ints))
        except Exception:  # a kernel that does not import or bind: the compile reports why
            keys.append(None)
    return keys


def plan(keys: list[str | None], record: dict[str, dict[str, Any]]) -> tuple[list[int], list[int]]:
    """(indices to compile, indices whose clean result the record holds). A key not in the record, no key, or
    a recorded failure or spill is compiled: the record only ever saves the compile of a known-clean kernel."""
    todo, seen = [], []
    for i, key in enumerate(keys):
        (seen if key is not None and key in record and clean(record[key]) else todo).append(i)
    return todo, seen


def check_with_record(work: list[Job], record_path: str, jobs: int, update: bool = False,
                      compile_fn: Any = compile_work) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check ``work`` against the compile record: compile only the jobs whose key the record holds no clean
    result for; with ``update``, write what was compiled into the record and drop the entries of this triton,
    arch and int assumption that no job has any more (kernels since changed). Returns every job's row (those
    skipped from the record, marked ``recorded``) and counts for the summary line.

    A recorded failure fails the check: it is compiled again for its current error, and if that compile comes
    out clean the row still fails, saying the record is stale (``--update-record`` refreshes it)."""
    import triton

    t0 = time.time()
    record = load_record(record_path)
    keys = job_keys(work)
    key_seconds = time.time() - t0
    todo, seen = plan(keys, record)
    t1 = time.time()
    compiled = compile_fn([work[i] for i in todo], jobs)
    compile_seconds = time.time() - t1
    rows: list[dict[str, Any]] = [{}] * len(work)
    mismatched: set[int] = set()
    for i, row in zip(todo, compiled):
        row["key"] = keys[i]
        if row["ok"] and keys[i] is not None and row.get("hash") != keys[i]:
            mismatched.add(i)  # the key computed is not the compiled kernel's: never record under it
        old = record.get(keys[i]) if keys[i] is not None else None
        if old is not None and not clean(old) and clean(row) and not update:
            row.update(ok=False, error=f"recorded as failing ({old.get('error') or 'spills'}) but compiles clean "
                                       "now: the record is stale, refresh it (bash ci/compile_check.sh "
                                       "--update-record)")
        rows[i] = row
    for i in seen:
        entry = record[keys[i]]
        _, spec, arch, ints, _, _ = work[i]
        rows[i] = {"name": spec_name(spec), "arch": arch, "ints": ints, "spec": spec, "key": keys[i],
                   "recorded": True, **{k: entry[k] for k in RECORD_FIELDS if k in entry}}
    stats = {"record": record_path, "entries": len(record), "jobs": len(work), "found": len(seen),
             "compiled": len(todo), "unkeyed": sum(k is None for k in keys), "key_seconds": round(key_seconds, 1),
             "compile_seconds": round(compile_seconds, 1), "mismatched": [rows[i]["name"] for i in sorted(mismatched)],
             "compiled_files": dict(sorted(collections.Counter(work[i][1]["file"] for i in todo).items()))}
    if update:
        version = triton.__version__
        scope = {(version, arch, ints) for _, _, arch, ints, _, _ in work}
        live = {k for k in keys if k is not None}
        # entries of this triton, arch and int assumption that no job has any more: kernels since changed
        kept = {k: e for k, e in record.items() if (e["triton"], e["arch"], e["ints"]) not in scope or k in live}
        dropped = len(record) - len(kept)
        added = 0
        for i, row in zip(todo, compiled):
            if keys[i] is not None and i not in mismatched:
                added += keys[i] not in kept
                kept[keys[i]] = record_entry(row, keys[i], version)
        write_record(record_path, kept)
        stats.update(added=added, dropped=dropped, entries_after=len(kept))
    return rows, stats


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

NOMINAL_COPY_GBPS = 3000.0  # _sass_parse.NOMINAL_DRAM_BYTES_PER_S, in GB/s


def find_copy_gbps(data: Any) -> float | None:
    """The first positive ``copy_gbps`` in a GPU run's JSON, wherever it sits (ci/gpu.sh's results.json
    holds it under the headline, a benchmark JSON under ``fastvae_bench.env``)."""
    if isinstance(data, dict):
        value = data.get("copy_gbps")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        items = data.values()
    elif isinstance(data, list):
        items = data
    else:
        return None
    for item in items:
        found = find_copy_gbps(item)
        if found is not None:
            return found
    return None


def dram_model(copy_bandwidth: str | None) -> dict[str, Any]:
    """The cost model with its DRAM bandwidth: a measured copy bandwidth (GB/s, or a GPU run's JSON holding
    one) when given, else the nominal default; ``dram_source`` says which, for the report."""
    from _sass_parse import H100

    if copy_bandwidth is None:
        return {**H100, "dram_source": f"nominal default {H100['dram_bytes_per_s'] / 1e9:.0f} GB/s, not measured"}
    try:
        gbps: float | None = float(copy_bandwidth)
        where = "given"
    except ValueError:
        with open(copy_bandwidth) as f:
            gbps = find_copy_gbps(json.load(f))
        where = f"from {os.path.basename(copy_bandwidth)}"
        if gbps is None:
            raise SystemExit(f"--copy-bandwidth {copy_bandwidth}: no positive copy_gbps in it") from None
    if not gbps > 0:
        raise SystemExit(f"--copy-bandwidth {copy_bandwidth}: not a positive bandwidth")
    return {**H100, "dram_bytes_per_s": gbps * 1e9, "dram_source": f"measured copy bandwidth {gbps:.0f} GB/s ({where})"}


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

    m = {**H100, "dram_bytes_per_s": meta.get("dram_bytes_per_s", H100["dram_bytes_per_s"]),
         "dram_source": meta.get("dram_source", H100["dram_source"])}
    ptxas = ", ".join(f"sm_{a}: {v}" for a, v in meta["ptxas"].items())
    lines = [
        "# Machine-code report of the Triton kernels: predicted, not measured",
        "",
        f"Every kernel specialization the public ops launched in the test suite ({meta['specializations']} from "
        f"{meta['launches']} launches, recorded under the Triton interpreter), compiled for "
        f"{', '.join('sm_' + str(a) for a in meta['archs'])} on a machine without a GPU with triton "
        f"{meta['triton']} ({ptxas}). Made by `python bench/sass_report.py --out DIR`; the numbers below come "
        "from the machine code and a simple model of an H100/H200, and no GPU ran any of it.",
        "",
        "**Assumptions.** Tensors are 16-byte aligned (`tt.divisibility = 16`, true of every fresh CUDA "
        "allocation). Integer arguments equal to 1 are constexprs, as the JIT makes them; every other integer "
        + ("is a multiple of 16, which is the JIT's hint for such sizes (sizes that are not get scalar accesses "
           "where a mask depends on them: `--ints odd` compiles that case)" if meta["ints"] == ["div16"] else
           "is compiled both as a multiple of 16 (`div16`, the JIT's hint) and as not one (`odd`, no hint)")
        + ". Masks are taken as all-true.",
        "",
        f"**Model.** An H100/H200 SXM: {m['sms']} SMs at {m['clock_hz'] / 1e9:.2f} GHz, each issuing "
        f"{m['issue_per_sm_clk']:.0f} warp-instructions per clock, and {m['dram_bytes_per_s'] / 1e12:.2f} TB/s "
        f"of DRAM bandwidth: **{m['dram_source']}** (`--copy-bandwidth` takes a GPU run's measured copy "
        "bandwidth). *issue*: the time to issue the hot "
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
    ap.add_argument("--dump-sass", action="store_true",
                    help="also write each SASS listing under DIR/sass/ (with --tiles: DIR/tiles_sass/)")
    ap.add_argument("--compile-record", metavar="FILE", nargs="?", const=DEFAULT_RECORD,
                    help="with --check-only: skip the specializations whose triton.compile hash this record "
                         "holds a clean result for, compile the rest (default FILE: %(const)s)")
    ap.add_argument("--update-record", action="store_true",
                    help="with --check-only: write what was compiled into the compile record, drop the entries "
                         "no specialization has any more (implies --compile-record)")
    ap.add_argument("--copy-bandwidth", metavar="GBPS|FILE",
                    help="the DRAM bandwidth of the model: a measured copy bandwidth in GB/s, or a GPU run's "
                         "JSON holding copy_gbps (ci/gpu.sh's results.json, a benchmark JSON); default: the "
                         f"nominal {NOMINAL_COPY_GBPS:.0f} GB/s")
    ap.add_argument("--tiles", action="store_true",
                    help="write DIR/tiles.md and tiles.json: the codebook kernels at their headline shapes against "
                         "the tensor cores and the issue rate (--specs: recordings holding them; default: record "
                         "the codebook tests first)")
    args = ap.parse_args(argv)
    if args.update_record and not args.compile_record:
        args.compile_record = DEFAULT_RECORD
    if args.compile_record and not args.check_only:
        ap.error("--compile-record and --update-record need --check-only")
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
    if args.tiles:
        return tiles_report(args, root)
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

    model = dram_model(args.copy_bandwidth)
    t0 = time.time()
    stats = None
    if args.compile_record:
        compile_env(args.cache_dir)
        work = [(root, s, a, i, False, model) for s in specs for a in archs for i in ints]
        rows, stats = check_with_record(work, os.path.abspath(args.compile_record), args.jobs, args.update_record)
    else:
        rows = compile_all(specs, root, archs, ints, args.jobs, args.cache_dir, sass=not args.check_only,
                           model=model)
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
        "dram_bytes_per_s": model["dram_bytes_per_s"],
        "dram_source": model["dram_source"],
        "note": "predicted from SASS with a simple H100/H200 model, not measured",
    }
    if stats is not None:
        meta["compile_record"] = stats
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
    if stats is not None:
        # on stdout: the line a CI log is read for
        print(record_summary(stats, failed, spilled, seconds))
    print(f"triton {triton.__version__}: {len(rows) - len(failed)}/{len(rows)} "
          f"{'ok (compiled or recorded clean)' if stats else 'compiled'} "
          f"({len(specs)} specializations x {len(archs)} arch x {len(ints)}), {len(spilled)} spill, "
          f"{seconds:.0f} s -> {args.out}", file=sys.stderr)
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['name']}:\n{r['error']}", file=sys.stderr)
    for r in spilled:
        print(f"SPILLS sm_{r['arch']} {r['name']}: {r['spill_bytes']} bytes spilled (stores + loads), "
              f"{r['regs']} registers", file=sys.stderr)
    return 1 if (args.check or args.check_only) and (failed or spilled) else 0


def _source_lines(root: str, keys: list[str]) -> dict[str, str]:
    """``file:line`` -> that line's text, stripped (for the report's per-line counts)."""
    out = {}
    for key in keys:
        path, _, line = key.rpartition(":")
        try:
            with open(os.path.join(root, path)) as f:
                out[key] = f.read().splitlines()[int(line) - 1].strip()[:100]
        except (OSError, ValueError, IndexError):
            continue
    return out


def tiles_report(args: argparse.Namespace, root: str) -> int:
    """--tiles: compile each ``_sass_tiles.WORKLOADS`` entry for its arch, read its tile loop, write tiles.md and
    tiles.json to ``args.out``; with ``--check``, non-zero when a workload fails to build, compile or match its
    tile loop, or spills (as the main report's check)."""
    import _sass_tiles
    import triton
    from _sass_compile import ptxas_path

    arch = (args.arch or [90])[0]
    specs_files = args.specs
    if specs_files is None:
        # a separate process: the interpreter must be on while recording and off while compiling
        specs_files = [os.path.join(tempfile.mkdtemp(prefix="sass-tiles-"), "specializations.json")]
        tests = [t for t in TILE_TEST_FILES if os.path.exists(os.path.join(root, t))]
        cmd = [sys.executable, os.path.abspath(__file__), "--record", specs_files[0], "--root", root,
               "--run-programs", str(args.run_programs), "--", *TILE_PYTEST_ARGS, *tests]
        subprocess.run(cmd, check=True)
    recorded, recording = _load_specs(specs_files)
    model = dram_model(args.copy_bandwidth)
    t0 = time.time()
    built: list[tuple[Any, dict[str, Any] | None, str]] = []
    for w in _sass_tiles.WORKLOADS:
        try:
            built.append((w, _sass_tiles.build_spec(w, recorded), ""))
        except KeyError as e:
            built.append((w, None, f"{e.args[0]}"))
    compile_env(args.cache_dir)
    todo = [(root, spec, arch, args.ints if args.ints != "both" else "div16", True, model)
            for _, spec, _ in built if spec is not None]
    compiled = iter(compile_work(todo, args.jobs))
    rows: list[dict[str, Any]] = []
    for w, spec, error in built:
        row: dict[str, Any] = {"workload": {**vars(w), "kernel_name": w.kernel_name}}
        if spec is None:
            rows.append({**row, "ok": False, "error": error})
            continue
        c = next(compiled)
        row.update({k: c[k] for k in ("name", "ok") if k in c}, assumed_ints=spec["assumed_ints"])
        if not c["ok"]:
            rows.append({**row, "error": c["error"]})
            continue
        row.update({k: c[k] for k in ("regs", "spill_bytes", "spills", "shared_bytes", "num_warps")})
        if args.dump_sass:  # the listings the counts come from, to check them by eye
            os.makedirs(os.path.join(args.out, "tiles_sass"), exist_ok=True)
            with open(os.path.join(args.out, "tiles_sass", f"{len(rows):02d}_{w.kernel_name}_{w.dtype}_d{w.d}.sass"),
                      "w") as f:
                f.write(f"// {c['name']}\n" + c["sass"])
        try:
            row.update(_sass_tiles.analyze(w, c["sass"], c["num_warps"], model))
            row["line_text"] = _source_lines(root, list(row["iteration"]["lines"])[:_sass_tiles.TOP_LINES])
        except ValueError as e:  # the SASS has no loop to match: the kernel changed shape
            row.update(ok=False, error=f"tile loop not found: {e}")
        rows.append(row)
    meta = {"triton": triton.__version__, "arch": arch, "ptxas": _ptxas_version(ptxas_path(arch)),
            "recordings": recording["recordings"], "ints": args.ints, "dram_bytes_per_s": model["dram_bytes_per_s"],
            "dram_source": model["dram_source"], "compile_seconds": round(time.time() - t0, 1),
            "note": "predicted from SASS with a simple H100/H200 model, not measured"}
    meta["findings"] = _sass_tiles.findings(rows)
    from _sass_record import dumps_rows

    with open(os.path.join(args.out, "tiles.json"), "w") as f:
        f.write(dumps_rows({"meta": meta}, "results", rows))
    with open(os.path.join(args.out, "tiles.md"), "w") as f:
        f.write(_sass_tiles.markdown(rows, meta))
    bad = [r for r in rows if not r["ok"] or r.get("spills")]
    print(f"triton {triton.__version__}: {len(rows) - len(bad)}/{len(rows)} tile workloads for sm_{arch}, "
          f"{time.time() - t0:.0f} s -> {os.path.join(args.out, 'tiles.md')}", file=sys.stderr)
    for r in bad:
        print(f"{'FAILED' if not r['ok'] else 'SPILLS'} {r['workload']['name']} {r['workload']['dtype']}: "
              f"{r.get('error', '').splitlines()[0][:300] if not r['ok'] else r['spill_bytes']}", file=sys.stderr)
    return 1 if args.check and bad else 0


def record_summary(stats: dict[str, Any], failed: list[dict[str, Any]], spilled: list[dict[str, Any]],
                   seconds: float) -> str:
    """The check's outcome in a few lines: specializations found in the record, compiled, failed, the time."""
    unkeyed = (f", {stats['unkeyed']} of them without a key (no import or bind: a recording older than the kernel?)"
               if stats["unkeyed"] else "")
    path = stats["record"]
    path = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    lines = [f"compile record {path} ({stats['entries']} entries): "
             f"{stats['jobs']} specializations, {stats['found']} found in the record, {stats['compiled']} compiled"
             f"{unkeyed}; {len(failed)} failed, {len(spilled)} spill; {seconds:.0f} s (keys "
             f"{stats['key_seconds']:.0f} s, compiles {stats['compile_seconds']:.0f} s)"]
    if stats["compiled"]:
        lines.append("  compiled, by kernel file: "
                     + ", ".join(f"{f} {n}" for f, n in stats["compiled_files"].items()))
    if stats["mismatched"]:
        lines.append(f"  {len(stats['mismatched'])} compiled under another hash than their key (not recorded): "
                     + ", ".join(stats["mismatched"][:5]))
    if "added" in stats:
        lines.append(f"  record updated: {stats['added']} added, {stats['dropped']} dropped (no longer launched "
                     f"or changed), {stats['entries_after']} entries")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
