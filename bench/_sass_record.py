"""Record the specializations of every Triton kernel launch while the public API runs under the interpreter.

A launch is reduced to what decides its compiled code on a GPU: the kernel (module and name), each runtime
argument's kind (tensor dtype, int, float, bool, None), the constexpr values and the launch options
(num_warps, ...). Integers keep the two facts the JIT specializes on besides their width: equal to 1 (it
becomes a constexpr) or not. Divisibility by 16 is decided later, by the compile step's stated assumption,
not by whatever sizes the tests happened to use.

The hook patches ``InterpretedFunction.run``, the one entry every ``kernel[grid](...)`` launch (plain, under
``triton.autotune`` or ``triton.heuristics``) goes through when ``TRITON_INTERPRET=1``, so a new kernel or
a new constexpr mode is picked up by whatever exercises it, without a list to maintain. With ``dry=True``
launches are recorded and not run: the suite then runs in seconds, its value checks fail (the outputs are
never written), and the launches, which depend on shapes, dtypes and flags and not on values, are the same.

The output is plain JSON, so the compile step can run in an environment with triton only (no torch).
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

FORMAT = 1

# torch dtype name -> triton's pointee type spelling in a kernel signature
_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
}


def _is_constexpr(param: inspect.Parameter) -> bool:
    # the test triton's JIT uses: the annotation names tl.constexpr (also as a string, under
    # `from __future__ import annotations`)
    return param.annotation is not inspect.Parameter.empty and "constexpr" in str(param.annotation)


def _constexpr_value(value: Any) -> Any:
    value = getattr(value, "value", value) if type(value).__name__ == "constexpr" else value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ == "dtype" and type(value).__module__.startswith("triton"):
        return {"tl_dtype": str(value)}
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} cannot be recorded")


def arg_kind(value: Any) -> dict[str, Any]:
    """The kind of a runtime (non-constexpr) argument: what the JIT keys its specialization on."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool):
        return {"kind": "bool"}
    if isinstance(value, int):
        width = "i32" if -(2**31) <= value < 2**31 else ("i64" if -(2**63) <= value < 2**63 else "u64")
        return {"kind": "int", "type": width, "one": value == 1}
    if isinstance(value, float):
        return {"kind": "float"}
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        name = str(value.dtype).rsplit(".", 1)[-1]
        if name not in _TORCH_TO_TRITON:
            raise TypeError(f"tensor dtype {value.dtype} has no triton spelling here")
        return {"kind": "tensor", "dtype": _TORCH_TO_TRITON[name]}
    raise TypeError(f"kernel argument of type {type(value).__name__} cannot be recorded")


class Recorder:
    """Deduplicated launch specializations, keyed by everything that changes the compiled code."""

    def __init__(self, root: str, only: str | None = None) -> None:
        self.root = os.path.realpath(root)
        # record the kernels defined under this directory only (the shipped ones: a test's own kernel is
        # neither shipped nor importable without the test's imports)
        self.only = os.path.realpath(only) + os.sep if only else None
        self.specs: dict[str, dict[str, Any]] = {}
        self.launches = 0

    def record(self, fn: Any, args: tuple, kwargs: dict[str, Any], grid: Any) -> int:
        """Record one launch; returns its number of programs (0 for a kernel outside ``only``)."""
        path = os.path.realpath(inspect.getsourcefile(fn))
        if self.only and not path.startswith(self.only):
            return 0
        params = inspect.signature(fn).parameters
        names = list(params)
        bound = dict(zip(names, args))
        options = {}
        for key, value in kwargs.items():
            if key in params:
                bound[key] = value
            else:
                options[key] = value
        spec_args = {}
        for name, param in params.items():
            value = bound.get(name, param.default)
            if value is inspect.Parameter.empty:
                raise TypeError(f"{fn.__qualname__}: argument {name} missing")
            if _is_constexpr(param):
                spec_args[name] = {"kind": "constexpr", "value": _constexpr_value(value)}
            else:
                spec_args[name] = arg_kind(value)
        spec = {
            "module": fn.__module__,
            "kernel": fn.__qualname__,
            "file": os.path.relpath(path, self.root) if path.startswith(self.root + os.sep) else path,
            "args": spec_args,
            "options": {k: _constexpr_value(v) for k, v in sorted(options.items())},
        }
        key = json.dumps(spec, sort_keys=True)
        entry = self.specs.setdefault(key, {**spec, "launches": 0, "max_programs": 0})
        entry["launches"] += 1
        programs = _programs(grid, bound)
        entry["max_programs"] = max(entry["max_programs"], programs)
        self.launches += 1
        return programs

    def dump(self, path: str, meta: dict[str, Any]) -> None:
        specs = sorted(self.specs.values(), key=lambda s: (s["module"], s["kernel"], json.dumps(s["args"])))
        with open(path, "w") as f:
            f.write(dumps_rows({"format": FORMAT, **meta, "launches": self.launches}, "specializations", specs))


def dumps_rows(head: dict[str, Any], key: str, rows: list[Any]) -> str:
    """JSON of ``head`` plus ``key: rows``, one row a line: compact, and a diff shows which rows changed."""
    body = ",\n".join(json.dumps(r, sort_keys=True) for r in rows)
    return json.dumps(head, indent=1)[:-2] + f',\n "{key}": [\n{body}\n]}}\n'


def _programs(grid: Any, bound: dict[str, Any]) -> int:
    if callable(grid):
        grid = grid(bound)
    n = 1
    for g in tuple(grid) if isinstance(grid, (tuple, list)) else (grid,):
        n *= int(g)
    return n


def install(recorder: Recorder, run_programs: int | None = None) -> None:
    """Route every interpreted launch through ``recorder``; needs TRITON_INTERPRET=1 before triton loads.
    Launches of more than ``run_programs`` programs are recorded and skipped (None: every launch runs)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            programs = recorder.record(self.fn, args, kwargs, grid)
            if run_programs is not None and programs > run_programs:
                return None
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


# ---- as a pytest plugin (``-p _sass_record``), so that every process of a run records, xdist's workers too ----

RECORD_DIR = "FASTVAE_SASS_RECORD_DIR"  # where each process writes its recording (unset: the plugin is inert)
RECORD_RUN_PROGRAMS = "FASTVAE_SASS_RUN_PROGRAMS"  # launches of more programs are recorded, not run ("": all)
RECORD_ROOT = "FASTVAE_SASS_ROOT"


def pytest_configure(config: Any) -> None:
    out = os.environ.get(RECORD_DIR)
    if not out:
        return
    root = os.environ[RECORD_ROOT]
    recorder = Recorder(root, only=os.path.join(root, "kernels"))
    limit = os.environ.get(RECORD_RUN_PROGRAMS, "")
    install(recorder, int(limit) if limit else None)
    config._fastvae_recorder = recorder


def pytest_unconfigure(config: Any) -> None:
    recorder = getattr(config, "_fastvae_recorder", None)
    if recorder is None or not recorder.launches:
        return  # xdist's controller runs no test
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    recorder.dump(os.path.join(os.environ[RECORD_DIR], f"{worker}.json"), {})


def merge(paths: list[str]) -> tuple[list[dict[str, Any]], int]:
    """The specializations of several recordings (one per process), deduplicated, and their launch count."""
    merged: dict[str, dict[str, Any]] = {}
    launches = 0
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        launches += data.get("launches", 0)
        for spec in data["specializations"]:
            key = json.dumps({k: v for k, v in spec.items() if k not in ("launches", "max_programs")},
                             sort_keys=True)
            entry = merged.setdefault(key, {**spec, "launches": 0, "max_programs": 0})
            entry["launches"] += spec["launches"]
            entry["max_programs"] = max(entry["max_programs"], spec["max_programs"])
    specs = sorted(merged.values(), key=lambda s: (s["module"], s["kernel"], json.dumps(s["args"])))
    return specs, launches
