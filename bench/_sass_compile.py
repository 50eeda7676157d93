"""Compile recorded kernel specializations for a GPU target on a machine without one (triton only, no torch).

Each specialization goes through the installed triton's own JIT binder (``create_function_from_signature``
and ``JITFunction._pack_args``, the code ``kernel[grid](...)`` runs on a GPU), fed stand-in arguments:

- tensors: a ``MockTensor`` of the recorded dtype, whose address 0 gets the 16-byte alignment hint
  (``tt.divisibility = 16``) as every fresh CUDA allocation does;
- integers: 1 where the recorded value was 1 (the JIT makes it a constexpr); otherwise a value of the
  recorded width that is a multiple of 16 under ``ints="div16"`` (the JIT's hint for sizes that are multiples
  of 16, the common case for the large tensors these kernels are for), or one that is not under
  ``ints="odd"`` (no hint: what the JIT compiles for every other size); an argument that carries a
  ``value`` (a spec built for one launch shape, ``_sass_tiles``) gets that value;
- floats, bools, None and constexprs as recorded.

Kernel modules are imported from their files under stub parent packages, so ``kernels/`` (which imports only
triton) loads without ``fastvae/__init__`` and torch; relative imports between kernel files still work.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import types
import warnings
from typing import Any

import triton
import triton.language as tl

# triton 3.9 warns on every compile that its fp-fusion default will change; the JIT's default is what we want
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

# the recording's signature spellings that tl.dtype spells differently
_TL_NAMES = {"i1": "int1", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8"}
INT_VALUES = {
    "div16": {"i32": 16, "i64": 2**32, "u64": 2**63},
    "odd": {"i32": 17, "i64": 2**32 + 1, "u64": 2**63 + 1},
}


def load_module(root: str, module: str, file: str) -> types.ModuleType:
    """Import ``module`` from ``file`` (relative to ``root``) with its parent packages as stubs: the
    innermost parent runs its own ``__init__.py`` when there is one, the outer ones run nothing."""
    if module in sys.modules:
        return sys.modules[module]
    path = file if os.path.isabs(file) else os.path.join(root, file)
    parts = module.split(".")
    pkg_dir = os.path.dirname(path)
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if name in sys.modules:
            continue
        init = os.path.join(pkg_dir, "__init__.py")
        if i == len(parts) - 1 and os.path.exists(init):
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[pkg_dir])
            pkg = importlib.util.module_from_spec(spec)
            sys.modules[name] = pkg
            spec.loader.exec_module(pkg)
        else:
            pkg = types.ModuleType(name)
            pkg.__path__ = [pkg_dir] if i == len(parts) - 1 else []
            sys.modules[name] = pkg
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


def jit_function(root: str, spec: dict[str, Any]) -> Any:
    obj = load_module(root, spec["module"], spec["file"])
    for part in spec["kernel"].split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, triton.runtime.jit.JITFunction):  # autotune / heuristics wrappers
        obj = obj.fn
    return obj


def _stand_in(arg: dict[str, Any], ints: str) -> Any:
    from triton.runtime.jit import MockTensor

    kind = arg["kind"]
    if kind == "constexpr":
        value = arg["value"]
        return tl.dtype(value["tl_dtype"]) if isinstance(value, dict) else value
    if kind == "tensor":
        return MockTensor(tl.dtype(_TL_NAMES.get(arg["dtype"], arg["dtype"])))
    if kind == "int":
        # a recording keeps no values (a launch's specialization does not depend on them); a spec built for
        # one shape gives each its value, so the divisibility hints are that launch's (D = 8 or 14 has none)
        if "value" in arg:
            return arg["value"]
        return 1 if arg["one"] else INT_VALUES[ints][arg["type"]]
    if kind == "float":
        return 0.5
    if kind == "bool":
        return True
    if kind == "none":
        return None
    raise ValueError(f"unknown argument kind {kind}")


def build_source(fn: Any, spec: dict[str, Any], arch: int, ints: str) -> tuple[Any, Any, dict[str, Any]]:
    """(ASTSource, GPUTarget, options) exactly as the JIT would build them for this launch on ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    args = []
    for p in fn.params:
        if p.name in spec["args"]:
            args.append(_stand_in(spec["args"][p.name], ints))
        elif p.has_default:  # a parameter added since the recording, left at its default
            args.append(p.default)
        else:
            raise KeyError(f"{spec['kernel']}: argument {p.name} is not in the recording (re-record)")
    options = dict(spec["options"])
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, _ = binder(*args, **options)
    _, signature, constexprs, attrs = fn._pack_args(backend, options, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def jit_options(options: dict[str, Any]) -> dict[str, Any]:
    """The launch options as ``JITFunction.run`` hands them to the compiler: it adds ``debug`` and the
    instrumentation mode before parsing them, and both are part of the compiled kernel's cache key."""
    from triton import knobs

    out = dict(options)
    out.setdefault("debug", bool(knobs.runtime.debug))
    compilation = getattr(knobs, "compilation", None)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # the ones run() adds (3.6: the first)
        if hasattr(compilation, name):
            out.setdefault(name, getattr(compilation, name))
    return out


def cache_key(root: str, spec: dict[str, Any], arch: int, ints: str) -> str:
    """The key under which a GPU launch of this specialization finds its kernel in the Triton cache."""
    from triton.compiler.compiler import get_cache_invalidating_env_vars, make_backend
    from triton.runtime.cache import get_cache_key

    src, target, options = build_source(jit_function(root, spec), spec, arch, ints)
    backend = make_backend(target)
    return get_cache_key(src, backend, backend.parse_options(jit_options(options)),
                         get_cache_invalidating_env_vars())


def compile_hash(root: str, spec: dict[str, Any], arch: int, ints: str) -> str:
    """The hash ``triton.compile`` names this specialization's kernel by (its Triton cache directory), without
    compiling: sha256 of ``cache_key``, which covers the triton build (its version and the hash of its
    compiler, backends, language and libtriton), the kernel's source with every jit function it calls and the
    constexpr globals they read, the signature's dtypes, the constexpr values, the specialization attributes
    (divisibility by 16, ints equal to 1), the options (num_warps, num_stages, ...), the target arch with the
    ptxas version, and the cache-invalidating environment variables."""
    import hashlib

    return hashlib.sha256(cache_key(root, spec, arch, ints).encode("utf-8")).hexdigest()


def warm(root: str, spec: dict[str, Any], arch: int, ints: str) -> None:
    """Compile one specialization into the Triton cache (``TRITON_CACHE_DIR``) under the key a GPU launch of
    it looks up, so that the launch loads the cubin instead of compiling: no disassembly, no ptxas log."""
    src, target, options = build_source(jit_function(root, spec), spec, arch, ints)
    triton.compile(src, target=target, options=jit_options(options))


def _tool(name: str) -> str:
    """Path of a CUDA tool shipped in the triton wheel (``nvdisasm``, ``ptxas-blackwell``, ...)."""
    from triton import knobs

    with contextlib.suppress(Exception):
        return getattr(knobs.nvidia, name.replace("-", "_")).path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes, sass: bool = True) -> tuple[str | None, str]:
    """(``nvdisasm -c -gi`` listing with source lines or None, ``cuobjdump -res-usage`` output) of a cubin.
    nvdisasm is the slow part (about 0.5 s of CPU for a large kernel); the resource usage is instant."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
        listing = subprocess.run([_tool("nvdisasm"), "-c", "-gi", f.name], check=True, capture_output=True,
                                 text=True).stdout if sass else None
    return listing, res


def ptxas_path(arch: int) -> str:
    """The ptxas this triton runs for ``arch`` (3.9 uses its CUDA 13 ``ptxas-blackwell`` from sm_90 on, 3.6
    its CUDA 12 ``ptxas`` below sm_100): register allocation can differ between the two."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def ptxas_log(ptx: str, arch: int) -> str:
    """``ptxas -v`` of a PTX module (for a cached kernel, whose compile printed nothing)."""
    import re

    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f, tempfile.NamedTemporaryFile(suffix=".o") as o:
        f.write(ptx)
        f.flush()
        return subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", f.name, "-o", o.name],
                              check=True, capture_output=True, text=True).stderr


def compile_spec(root: str, spec: dict[str, Any], arch: int, ints: str, sass: bool = True) -> dict[str, Any]:
    """Compile one specialization: {'ok', 'error', 'ttir', 'sass', 'res', 'ptxas', 'num_warps', 'shared',
    'hash'}."""
    try:
        fn = jit_function(root, spec)
        src, target, options = build_source(fn, spec, arch, ints)
        log = io.StringIO()
        # the JIT's options (debug, instrumentation mode added): the kernel compiled is the one compile_hash names
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=jit_options(options))
        ptxas = log.getvalue()
        if "spill stores" not in ptxas:
            ptxas = ptxas_log(kernel.asm["ptx"], arch)
        listing, res = disassemble(kernel.asm["cubin"], sass)
    except Exception as e:  # a compile error is a result here, reported per specialization
        msg = f"{type(e).__name__}: {e}" + (f"\n{e.stderr}" if isinstance(e, subprocess.CalledProcessError) else "")
        cause = e.__cause__ or e.__context__  # a CompilationError's own text ends at the call site
        while cause is not None:
            msg += f"\ncaused by {type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
        return {"ok": False, "error": msg[-4000:]}
    return {
        "ok": True,
        "ttir": kernel.asm["ttir"],
        "llir": kernel.asm["llir"],
        "sass": listing,
        "res": res,
        "ptxas": ptxas,
        "num_warps": kernel.metadata.num_warps,
        "shared": kernel.metadata.shared,
        "hash": kernel.hash,
    }
