"""bench/sass_report.py's analysis: opcode classes, access widths, the hot path through slow-path branches and
loops, spill detection, the TTIR byte count, and one real compile for sm_90 on this machine (skipped where
triton cannot compile for a GPU target, or under the interpreter); the compile record's keys (computed without
compiling) and the incremental check on a throwaway kernel with the compile mocked; the model's bandwidth."""

from __future__ import annotations

import os
import sys
import textwrap
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import _sass_parse as sp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")


def test_opcode_classes():
    ops = ["IMAD.WIDE.U32", "IADD3", "LOP3.LUT", "SHF.R.U32.HI", "ISETP.GE.AND", "FFMA", "FMUL", "FADD.FTZ",
           "MUFU.EX2", "MUFU.LG2", "I2F.U32", "F2FP.BF16.F32.PACK_AB", "LDG.E.128", "STG.E", "BRA", "EXIT",
           "BSSY", "MOV", "S2R", "ULDC.64", "SHFL.BFLY"]
    assert sp.classify(ops) == {"int": 5, "fp32": 3, "mufu": 2, "conv": 2, "mem": 2, "ctrl": 3, "other": 4}
    assert sp.opcode_pipe("IMAD.SHL.U32") == "imad" and sp.opcode_pipe("MUFU.SIN") == "xu"
    assert sp.opcode_pipe("LOP3.LUT") == "alu" and sp.opcode_pipe("FFMA") == "fma"


@pytest.mark.parametrize("op, bits", [("LDG.E.128", 128), ("LDG.E.64.CONSTANT", 64), ("LDG.E", 32),
                                      ("STG.E.U16", 16), ("LDG.E.S8", 8), ("STG.E.128.STRONG.GPU", 128)])
def test_access_width(op, bits):
    assert sp.access_width(op) == bits


# a kernel body with a libdevice-style slow path (a forward branch skipping a cold loop) and a hot loop
SASS = textwrap.dedent("""\
    sample:
    \t//## File "/k/a.py", line 10
            /*0000*/                   S2R R0, SR_CTAID.X ;
            /*0010*/                   IMAD.WIDE R2, R0, 0x4, R2 ;
            /*0020*/                   ISETP.GE.AND P0, PT, R0, 0x10, PT ;
            /*0030*/              @!P0 BRA `(.L_x_1) ;
    .L_x_0:
    \t//## File "/k/lib.py", line 99 inlined at "/k/a.py", line 12
            /*0040*/                   LDG.E.CONSTANT R4, desc[UR4][R2.64] ;
            /*0050*/                   IADD3 R5, R5, 0x1, RZ ;
            /*0060*/               @P1 BRA `(.L_x_0) ;
    .L_x_1:
    \t//## File "/k/a.py", line 14
            /*0070*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
            /*0080*/                   FFMA R8, R8, R9, R10 ;
            /*0090*/                   MUFU.EX2 R8, R8 ;
            /*00a0*/                   STG.E.128 desc[UR4][R2.64], R8 ;
            /*00b0*/                   IADD3 R2, P2, R2, 0x10, RZ ;
            /*00c0*/               @P3 BRA `(.L_x_1) ;
            /*00d0*/               @P4 EXIT ;
            /*00e0*/                   STG.E desc[UR4][R6.64], R8 ;
            /*00f0*/                   EXIT ;
    .L_x_2:
            /*0100*/                   BRA `(.L_x_2) ;
            /*0110*/                   NOP ;
    """)


def test_sass_parse_and_hot_path():
    instrs = sp.parse_sass(SASS)
    assert len(instrs) == 18
    assert instrs[3].target == 0x70 and instrs[3].conditional
    assert instrs[4].loc == (("/k/lib.py", 99), ("/k/a.py", 12))
    loops = sp.find_loops(instrs)
    assert [(lp.head, lp.latch, lp.hot) for lp in loops] == [(4, 6, False), (7, 12, True)]
    hp = sp.hot_path(instrs)
    assert hp.mode == "loop"
    assert [i.addr for i in hp.instrs] == [0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0]
    # outside the loop: the cold loop is skipped, the conditional EXIT falls through, the trap is never reached
    assert [i.addr for i in hp.rest] == [0x0, 0x10, 0x20, 0x30, 0xD0, 0xE0, 0xF0]
    no_loop = sp.parse_sass(SASS.replace("@P3 BRA `(.L_x_1)", "NOP"))
    assert sp.hot_path(no_loop).mode == "body"


def test_spills_from_ptxas_log():
    clean = ("ptxas info    : Function properties for k\n"
             "    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 40 registers, used 0 barriers\n")
    spilled = clean.replace("0 bytes spill stores, 0 bytes spill loads", "24 bytes spill stores, 24 bytes spill loads")
    res = "  REG:40 STACK:32 SHARED:0 LOCAL:0 CONSTANT[0]:560"
    assert sp.resources(res, clean) == {"regs": 40, "local_bytes": 0, "stack_bytes": 32, "spill_bytes": 0,
                                        "spills": False}
    assert sp.resources(res, spilled)["spills"]
    # no ptxas log (a cached kernel): any local memory counts
    assert sp.resources(res.replace("LOCAL:0", "LOCAL:16"), "")["spills"]


TTIR = textwrap.dedent("""\
    #loc = loc("/k/a.py":1:0)
    module {
      tt.func public @k(%x: !tt.ptr<f32>, %v: !tt.ptr<bf16>, %d: i32) {
        %pid = tt.get_program_id x : i32 loc(#loc1)
        %r = tt.make_range {end = 1024 : i32, start = 0 : i32} : tensor<1024xi32> loc(#loc1)
        %p = tt.splat %x : !tt.ptr<f32> -> tensor<1024x!tt.ptr<f32>> loc(#loc1)
        %q = tt.addptr %p, %r : tensor<1024x!tt.ptr<f32>>, tensor<1024xi32> loc(#loc1)
        %a = tt.load %q : tensor<1024x!tt.ptr<f32>> loc(#loc2)
        %ds = tt.splat %d : i32 -> tensor<1024xi32> loc(#loc1)
        %i = arith.remsi %r, %ds : tensor<1024xi32> loc(#loc3)
        %vs = tt.splat %v : !tt.ptr<bf16> -> tensor<1024x!tt.ptr<bf16>> loc(#loc3)
        %vp = tt.addptr %vs, %i : tensor<1024x!tt.ptr<bf16>>, tensor<1024xi32> loc(#loc3)
        %b = tt.load %vp : tensor<1024x!tt.ptr<bf16>> loc(#loc4)
        tt.store %q, %a : tensor<1024x!tt.ptr<f32>> loc(#loc5)
        tt.store %x, %c : !tt.ptr<f32> loc(#loc6)
        tt.return loc(#loc)
      } loc(#loc)
    } loc(#loc)
    #loc1 = loc("/k/a.py":2:0)
    #loc2 = loc("/k/a.py":3:0)
    #loc3 = loc("/k/a.py":4:0)
    #loc7 = loc("/k/helper.py":40:0)
    #loc4 = loc(callsite(#loc7 at #loc3))
    #loc5 = loc("x"(#loc8))
    #loc8 = loc("/k/a.py":6:0)
    #loc6 = loc("/k/a.py":7:0)
    """)


def test_ttir_accesses():
    t = sp.parse_ttir(TTIR)
    assert t.has_program_id and t.loops == 0
    got = [(a.op, a.elem, a.shape, a.loc[0], a.indexed) for a in t.accesses]
    assert got == [
        ("load", "f32", (1024,), ("/k/a.py", 3), False),
        ("load", "bf16", (1024,), ("/k/helper.py", 40), True),  # through a remainder: a broadcast operand
        ("store", "f32", (1024,), ("/k/a.py", 6), False),
        ("store", "f32", (), ("/k/a.py", 7), False),
    ]
    assert t.accesses[1].loc == (("/k/helper.py", 40), ("/k/a.py", 4))
    # minimal bytes: the f32 load and store (the indexed bf16 load and the scalar store left out)
    assert sum(a.tile_bytes for a in t.accesses if a.shape and not a.indexed) / 1024 == 8


def test_bytes_count_one_branch_of_a_runtime_if():
    a = lambda branch: sp.Access("load", "f32", (1024,), (), False, False, branch)  # noqa: E731
    # a full-tile path with two loads and a tail path with one: one pass reads the heavier, 8 KiB
    accesses = [a(()), a(((1, 0),)), a(((1, 0),)), a(((1, 1),))]
    assert sp.region_bytes(accesses) == 3 * 4096


def test_llir_widths():
    llir = "\n".join([
        '%1 = tail call { i32, i32, i32, i32 } asm sideeffect "mov.u32 $0, $4;\\0A\\09@$9 ld.global.v4.b32 '
        '{ $0, $1, $2, $3 }, [ $8 + 0 ];", "=r"(ptr addrspace(1) %0) #1, !dbg !5',
        '%2 = tail call i64 asm sideeffect "mov.u64 $0, 0x0;\\0A\\09ld.global.b64 { $0 }, [ $1 + 0 ];", '
        '"=l,l"(ptr addrspace(1) %3) #1, !dbg !7',
        'tail call void asm sideeffect "@$3 st.global.v2.b32 [ $2 + 0 ], { $0, $1 };", "r,r,l,b"(i32 %4) #1, !dbg !7',
        "%5 = load i32, ptr addrspace(1) %6, align 4, !dbg !5",
        '!1 = !DIFile(filename: "a.py", directory: "/k")',
        '!4 = distinct !DISubprogram(name: "k", scope: !1, file: !1, line: 1)',
        "!5 = !DILocation(line: 3, column: 9, scope: !4)",
        "!6 = distinct !DILexicalBlockFile(scope: !4, file: !1, discriminator: 0)",
        "!7 = !DILocation(line: 8, column: 2, scope: !6, inlinedAt: !5)",
    ])
    got = sp.llir_access_widths(llir)
    assert got == [
        ("load", 128, (("/k/a.py", 3),)),
        ("load", 64, (("/k/a.py", 8), ("/k/a.py", 3))),
        ("store", 64, (("/k/a.py", 8), ("/k/a.py", 3))),
        ("load", 32, (("/k/a.py", 3),)),
    ]


def test_prediction_model():
    p = sp.predict(["FFMA"] * 64, elements_per_thread=8, bytes_per_element=12)
    # 8 thread instructions per element: 0.25 warp-instructions, at 4 per clock on 132 SMs at 1.98 GHz
    assert p["issue_ps_per_element"] == pytest.approx(0.25 / (132 * 4 * 1.98e9) * 1e12)
    assert p["dram_ps_per_element"] == pytest.approx(4.0)
    assert p["bound"] == "dram"


KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def axpy_kernel(x_ptr, y_ptr, n, a, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, a * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def wide_kernel(x_ptr, BLOCK: tl.constexpr):
    # BLOCK / 32 values per thread live across a reduction: far more than 32 registers hold
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(x_ptr + offs, x * tl.sum(x * x, axis=0) + x)
'''


def _spec(kernel: str, args: dict, options: dict) -> dict:
    return {"module": "sasskernels.mod", "kernel": kernel, "file": "sasskernels/mod.py", "args": args,
            "options": options}


@pytest.fixture
def compiler(tmp_path, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("GPU-target compiles need TRITON_INTERPRET unset before triton is imported")
    sc = pytest.importorskip("_sass_compile")
    (tmp_path / "sasskernels").mkdir()
    (tmp_path / "sasskernels" / "mod.py").write_text(KERNEL)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    for name in ("sasskernels", "sasskernels.mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    def compile_(spec: dict) -> dict:
        r = sc.compile_spec(str(tmp_path), spec, 90, "div16")
        if not r["ok"] and ("ptxas" in r["error"] or "No such file" in r["error"]):
            pytest.skip(f"no sm_90 compile here: {r['error'][:200]}")
        assert r["ok"], r["error"]
        return r

    return compile_


def test_real_compile_sm90(compiler):
    spec = _spec("axpy_kernel", {
        "x_ptr": {"kind": "tensor", "dtype": "fp32"}, "y_ptr": {"kind": "tensor", "dtype": "fp32"},
        "n": {"kind": "int", "type": "i32", "one": False}, "a": {"kind": "float"},
        "BLOCK": {"kind": "constexpr", "value": 1024}}, {"num_warps": 4})
    r = compiler(spec)
    a = sp.analyze(r["ttir"], r["llir"], r["sass"], sp.resources(r["res"], r["ptxas"]), r["num_warps"])
    assert not a["spills"] and a["regs"] > 0
    assert a["elements_per_thread"] == 8
    # aligned pointers and a size divisible by 16: two 128-bit accesses per thread for each tile access
    assert [(x["op"], x["widths"]) for x in a["accesses"]] == [("load", {"128": 2}), ("load", {"128": 2}),
                                                                ("store", {"128": 2})]
    assert a["bytes_per_element"] == 12 and a["hot_path"]["mode"] == "body"
    assert a["predicted"]["bound"] == "dram"


def test_spill_detected(compiler):
    spec = _spec("wide_kernel", {"x_ptr": {"kind": "tensor", "dtype": "fp32"},
                                 "BLOCK": {"kind": "constexpr", "value": 4096}}, {"num_warps": 1, "maxnreg": 32})
    r = compiler(spec)
    assert sp.resources(r["res"], r["ptxas"])["spills"]


def test_recorder_keys_on_what_the_jit_specializes():
    import _sass_record as rec
    import torch
    import triton.language as tl

    def kernel(x_ptr, y_ptr, n, k, scale, MODE: tl.constexpr, BLOCK: tl.constexpr = 128):
        pass

    kernel.__module__ = "fastvae.kernels.fake"
    r = rec.Recorder(os.getcwd())
    x = torch.zeros(4)
    r.record(kernel, (x, None, 1000, 1, 0.5), {"MODE": 2, "num_warps": 4}, (8,))
    r.record(kernel, (x, None, 4096, 1, 2.0), {"MODE": 2, "num_warps": 4}, (32,))  # same code: one entry
    r.record(kernel, (x.half(), None, 4096, 3, 2.0), {"MODE": 2, "num_warps": 4}, (32,))
    assert r.launches == 3 and len(r.specs) == 2
    shipped_only = rec.Recorder(os.getcwd(), only="kernels")  # this test's kernel is not under kernels/
    assert shipped_only.record(kernel, (x, None, 1000, 1, 0.5), {"MODE": 2}, (8,)) == 0
    assert shipped_only.launches == 0 and not shipped_only.specs
    first = next(iter(r.specs.values()))
    assert first["args"]["x_ptr"] == {"kind": "tensor", "dtype": "fp32"}
    assert first["args"]["y_ptr"] == {"kind": "none"}
    assert first["args"]["n"] == {"kind": "int", "type": "i32", "one": False}
    assert first["args"]["k"]["one"] and first["args"]["scale"] == {"kind": "float"}
    assert first["args"]["BLOCK"] == {"kind": "constexpr", "value": 128}
    assert first["options"] == {"num_warps": 4} and first["launches"] == 2 and first["max_programs"] == 32
    assert rec.arg_kind(2**40) == {"kind": "int", "type": "i64", "one": False}


def _jit_launch_key(jit, args, kwargs, arch=90):
    """The cache key ``JITFunction.run`` computes for a launch on a GPU of ``arch``, as its code does it
    (the binder on the real arguments, then ``_pack_args``), with the target given instead of asked of a
    driver."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, get_cache_invalidating_env_vars, make_backend
    from triton.runtime.cache import get_cache_key
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return get_cache_key(ASTSource(jit, signature, constexprs, attrs), backend, options,
                         get_cache_invalidating_env_vars())


@pytest.mark.parametrize("n", [4096, 4099])
def test_warm_cache_key_is_the_launch_key(monkeypatch, n):
    """ci/gpu.sh compiles the recorded specializations into the Triton cache before its tests: each must land
    under the key that the real launch (fastvae's own kernel object, real tensors) looks up, or the tests
    compile every kernel again."""
    import _sass_compile
    import _sass_record as rec
    import torch
    from triton.runtime.jit import JITFunction

    import fastvae._triton as ft

    launches = []

    def capture(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs)))
        raise RuntimeError("captured")

    monkeypatch.setattr(JITFunction, "run", capture)
    x, t = torch.randn(n), torch.randn(n)
    with pytest.raises(RuntimeError, match="captured"):
        ft.gaussian_nll(x, t, torch.rand(n) + 0.5, logvar_form=False, full=False, eps=1e-6, reduction="mean",
                        out_dtype=torch.float32)
    (jit, args, kwargs), = launches
    recorder = rec.Recorder(ROOT, only=os.path.join(ROOT, "kernels"))
    recorder.record(jit.fn, args, kwargs, (1,))
    spec = next(iter(recorder.specs.values()))
    ints = "div16" if n % 16 == 0 else "odd"
    assert _sass_compile.cache_key(ROOT, spec, 90, ints) == _jit_launch_key(jit, args, kwargs)
    other = "odd" if ints == "div16" else "div16"  # the key does see the divisibility of the size
    assert _sass_compile.cache_key(ROOT, spec, 90, other) != _jit_launch_key(jit, args, kwargs)


# ---- the compile record: keys computed without compiling, and a check that compiles only unseen keys ----

HELPERS = '''
import triton


@triton.jit
def shift(x):
    return x + 1.0
'''

TINY = '''
import triton
import triton.language as tl

from .helpers import shift


@triton.jit
def tiny_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, shift(x) * 2.0, mask=offs < n)
'''


def _tiny_spec(block: int = 128, num_warps: int = 4) -> dict:
    return {"module": "reckernels.tiny", "kernel": "tiny_kernel", "file": "reckernels/tiny.py",
            "args": {"x_ptr": {"kind": "tensor", "dtype": "fp32"}, "n": {"kind": "int", "type": "i32", "one": False},
                     "BLOCK": {"kind": "constexpr", "value": block}},
            "options": {"num_warps": num_warps}}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A throwaway kernel package under tmp_path; ``write(kernel=..., helpers=...)`` replaces its files and
    forgets the imported modules, so the next key sees the new source."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("GPU-target keys need TRITON_INTERPRET unset before triton is imported")
    sc = pytest.importorskip("_sass_compile")
    pkg = tmp_path / "reckernels"
    pkg.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))

    def write(kernel: str = TINY, helpers: str = HELPERS) -> None:
        (pkg / "tiny.py").write_text(kernel)
        (pkg / "helpers.py").write_text(helpers)
        for name in ("reckernels", "reckernels.tiny", "reckernels.helpers"):
            monkeypatch.delitem(sys.modules, name, raising=False)

    def key(spec: dict) -> str:
        return sc.compile_hash(str(tmp_path), spec, 90, "div16")

    write()
    return types.SimpleNamespace(root=str(tmp_path), write=write, key=key)


def test_record_key_is_stable_for_identical_specs(tiny):
    first = tiny.key(_tiny_spec())
    assert len(first) == 64 and tiny.key(_tiny_spec()) == first
    tiny.write()  # the same source imported again
    assert tiny.key(_tiny_spec()) == first


def test_record_key_changes_with_the_kernel_or_a_jit_function_it_calls(tiny):
    before = tiny.key(_tiny_spec())
    tiny.write(kernel=TINY.replace("* 2.0", "* 3.0"))
    kernel_changed = tiny.key(_tiny_spec())
    tiny.write(helpers=HELPERS.replace("x + 1.0", "x + 2.0"))  # only the called function changes
    helper_changed = tiny.key(_tiny_spec())
    assert len({before, kernel_changed, helper_changed}) == 3
    tiny.write()
    assert tiny.key(_tiny_spec()) == before


def test_record_key_changes_with_constexprs_and_options(tiny):
    keys = {tiny.key(_tiny_spec(128)), tiny.key(_tiny_spec(256)), tiny.key(_tiny_spec(128, num_warps=8))}
    assert len(keys) == 3


def test_record_key_is_the_compiled_kernels_hash(tiny, monkeypatch):
    """The key computed without compiling is the hash triton.compile gives the kernel: the record is looked up
    under what a compile would produce."""
    sc = sys.modules["_sass_compile"]
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    r = sc.compile_spec(tiny.root, _tiny_spec(), 90, "div16", sass=False)
    if not r["ok"] and ("ptxas" in r["error"] or "No such file" in r["error"]):
        pytest.skip(f"no sm_90 compile here: {r['error'][:200]}")
    assert r["ok"], r["error"]
    assert r["hash"] == tiny.key(_tiny_spec())


def _mock_compile(results: dict | None = None):
    """A compile_work stand-in: records the jobs it is given; each comes out clean with its real hash unless
    ``results`` maps its BLOCK to another outcome."""
    import _sass_compile
    import sass_report

    calls: list[list[int]] = []

    def compile_fn(work, jobs):
        calls.append([spec["args"]["BLOCK"]["value"] for _, spec, _, _, _, _ in work])
        rows = []
        for root, spec, arch, ints, _, _ in work:
            row = {"ok": True, "regs": 40, "spills": False, "spill_bytes": 0, "local_bytes": 0, "stack_bytes": 0,
                   "shared_bytes": 0, "num_warps": 4, "hash": _sass_compile.compile_hash(root, spec, arch, ints)}
            row.update((results or {}).get(spec["args"]["BLOCK"]["value"], {}))
            rows.append({"name": sass_report.spec_name(spec), "arch": arch, "ints": ints, "spec": spec, **row})
        return rows

    return compile_fn, calls


def test_check_compiles_unseen_keys_and_skips_seen_ones(tiny, tmp_path):
    import sass_report

    record = str(tmp_path / "record.json")
    work = [(tiny.root, _tiny_spec(b), 90, "div16", False, {}) for b in (128, 256)]
    compile_fn, calls = _mock_compile()
    rows, stats = sass_report.check_with_record(work, record, 1, update=True, compile_fn=compile_fn)
    assert calls == [[128, 256]] and stats["found"] == 0 and stats["added"] == 2
    assert all(r["ok"] for r in rows)

    # a warm record: nothing compiles, the rows come from the record
    rows, stats = sass_report.check_with_record(work, record, 1, compile_fn=compile_fn)
    assert calls[-1] == [] and stats["found"] == 2 and all(r["recorded"] for r in rows)

    # a new constexpr mode is unseen: only it compiles
    work.append((tiny.root, _tiny_spec(512), 90, "div16", False, {}))
    rows, stats = sass_report.check_with_record(work, record, 1, compile_fn=compile_fn)
    assert calls[-1] == [512] and stats["found"] == 2 and stats["compiled"] == 1

    # a changed kernel: every key is new and compiles, and its failure is not hidden by the record
    tiny.write(kernel=TINY.replace("* 2.0", "* 3.0"))
    compile_fn, calls = _mock_compile({256: {"ok": False, "error": "CompilationError: broken"}})
    rows, stats = sass_report.check_with_record(work, record, 1, compile_fn=compile_fn)
    assert calls == [[128, 256, 512]] and stats["found"] == 0
    assert [r["ok"] for r in rows] == [True, False, True]


def test_a_recorded_failure_still_fails(tiny, tmp_path):
    import sass_report

    record = str(tmp_path / "record.json")
    work = [(tiny.root, _tiny_spec(b), 90, "div16", False, {}) for b in (128, 256)]
    compile_fn, calls = _mock_compile({256: {"spills": True, "spill_bytes": 64}})
    sass_report.check_with_record(work, record, 1, update=True, compile_fn=compile_fn)
    entry = sass_report.load_record(record)[tiny.key(_tiny_spec(256))]
    assert entry["ok"] and entry["spills"]  # recorded: it compiled, and spilled

    # the spill is compiled again, not skipped, and fails whether or not the fresh compile reproduces it
    rows, stats = sass_report.check_with_record(work, record, 1, compile_fn=compile_fn)
    assert calls[-1] == [256] and stats["found"] == 1 and rows[1]["spills"]
    clean_now, calls = _mock_compile()
    rows, _ = sass_report.check_with_record(work, record, 1, compile_fn=clean_now)
    assert calls == [[256]] and not rows[1]["ok"] and "stale" in rows[1]["error"]

    # --update-record takes the fresh result; then the key is clean and skipped
    sass_report.check_with_record(work, record, 1, update=True, compile_fn=clean_now)
    _, stats = sass_report.check_with_record(work, record, 1, compile_fn=clean_now)
    assert calls[-1] == [] and stats["found"] == 2


def test_update_drops_entries_no_specialization_has(tiny, tmp_path):
    import sass_report

    record = str(tmp_path / "record.json")
    work = [(tiny.root, _tiny_spec(b), 90, "div16", False, {}) for b in (128, 256)]
    compile_fn, _ = _mock_compile()
    sass_report.check_with_record(work, record, 1, update=True, compile_fn=compile_fn)
    tiny.write(kernel=TINY.replace("* 2.0", "* 3.0"))
    _, stats = sass_report.check_with_record(work, record, 1, update=True, compile_fn=compile_fn)
    assert stats["added"] == 2 and stats["dropped"] == 2
    assert set(sass_report.load_record(record)) == {tiny.key(_tiny_spec(128)), tiny.key(_tiny_spec(256))}


def test_plan_compiles_what_has_no_clean_entry():
    import sass_report

    record = {"a": {"ok": True, "spills": False}, "b": {"ok": False}, "c": {"ok": True, "spills": True}}
    assert sass_report.plan(["a", "b", "c", "d", None], record) == ([1, 2, 3, 4], [0])


def test_a_kernel_without_a_key_is_compiled(tiny):
    import sass_report

    tiny.write(kernel=TINY + "\nsyntax error here\n")
    assert sass_report.job_keys([(tiny.root, _tiny_spec(), 90, "div16", False, {})]) == [None]


def test_dram_bandwidth_measured_or_nominal(tmp_path):
    import sass_report

    nominal = sass_report.dram_model(None)
    assert nominal["dram_bytes_per_s"] == 3.0e12 and "nominal" in nominal["dram_source"]
    given = sass_report.dram_model("4200")
    assert given["dram_bytes_per_s"] == 4.2e12 and "measured" in given["dram_source"]
    results = tmp_path / "results.json"
    results.write_text('{"env": {}, "info": {"headline": {"copy_gbps": 4410.5, "ops": []}}}')
    from_file = sass_report.dram_model(str(results))
    assert from_file["dram_bytes_per_s"] == pytest.approx(4.4105e12) and "results.json" in from_file["dram_source"]
    # the model's DRAM time follows the bandwidth given
    fast = sp.predict(["FFMA"] * 8, elements_per_thread=8, bytes_per_element=12, model=from_file)
    assert fast["dram_ps_per_element"] == pytest.approx(12 / 4.4105e12 * 1e12)
    results.write_text('{"headline": {"copy_gbps": null}}')
    with pytest.raises(SystemExit, match="copy_gbps"):
        sass_report.dram_model(str(results))


def test_a_record_from_other_checking_code_is_ignored(tiny, tmp_path):
    """Triton's key does not cover how a compile becomes a verdict (spill parsing and the like): a record
    written by other such code is not trusted, and everything compiles."""
    import json

    import sass_report

    record = tmp_path / "record.json"
    work = [(tiny.root, _tiny_spec(), 90, "div16", False, {})]
    compile_fn, calls = _mock_compile()
    sass_report.check_with_record(work, str(record), 1, update=True, compile_fn=compile_fn)
    data = json.loads(record.read_text())
    assert data["checker"] == sass_report.checker_hash() and len(data["entries"]) == 1
    record.write_text(record.read_text().replace(data["checker"], "0" * 16))
    _, stats = sass_report.check_with_record(work, str(record), 1, compile_fn=compile_fn)
    assert calls[-1] == [128] and stats["found"] == 0
