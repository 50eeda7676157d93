"""bench/sass_report.py's analysis: opcode classes, access widths, the hot path through slow-path branches and
loops, spill detection, the TTIR byte count, the tile kernels' loop and MMA counts (a SASS snippet and a real tl.dot
kernel), and one real compile for sm_90 on this machine (skipped where
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
import _sass_tiles as st  # noqa: E402

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
def tile_dot_kernel(z_ptr, e_ptr, out_ptr, K, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # the codebook kernels' shape: a loop over code tiles around a loop over feature chunks with tl.dot
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            z = tl.load(z_ptr + rows[:, None] * D + ds[None, :])
            e = tl.load(e_ptr + ks[:, None] * D + ds[None, :])
            acc = tl.dot(z, tl.trans(e), acc)
        best = tl.minimum(best, tl.min(acc, axis=1))
    tl.store(out_ptr + rows, best)


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


# a codebook kernel's shape: a loop over code tiles (.L_x_0) around a pipelined feature-chunk loop (.L_x_1) with
# a zero-trip guard that skips it, an epilogue per code tile, and code after the loop once per program
TILE_SASS = textwrap.dedent("""\
    tile:
    \t//## File "/r/kernels/vq.py", line 90
            /*0000*/                   S2R R0, SR_CTAID.X ;
            /*0010*/              @!P0 BRA `(.L_x_3) ;
    .L_x_0:
    \t//## File "/r/kernels/tiles.py", line 44 inlined at "/r/kernels/vq.py", line 62
            /*0020*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R2.64] ;
            /*0030*/                   LDGDEPBAR ;
            /*0040*/               @P6 BRA `(.L_x_2) ;
    .L_x_1:
    \t//## File "/r/kernels/tiles.py", line 53 inlined at "/r/kernels/vq.py", line 62
            /*0050*/                   DEPBAR.LE SB0, 0x1 ;
            /*0060*/                   WARPGROUP.ARRIVE ;
            /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
            /*0080*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
            /*0090*/                   IADD3 R5, R5, 0x1, RZ ;
            /*00a0*/               @P6 BRA `(.L_x_1) ;
    .L_x_2:
    \t//## File "/r/kernels/vq.py", line 71
            /*00b0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
            /*00c0*/                   FMNMX R6, R24, R25, PT ;
            /*00d0*/                   FSETP.GEU.AND P1, PT, R6, R7, PT ;
            /*00e0*/                   MUFU.EX2 R8, R6 ;
            /*00f0*/               @!P2 BRA `(.L_x_0) ;
    .L_x_3:
    \t//## File "/r/kernels/vq.py", line 95
            /*0100*/                   STG.E desc[UR4][R2.64], R6 ;
            /*0110*/                   EXIT ;
    .L_x_4:
            /*0120*/                   BRA `(.L_x_4) ;
    """)


def test_mma_opcodes():
    h = st.mma("HGMMA.64x64x16.F32.BF16")
    assert (h.m, h.n, h.k, h.dtype, h.warps) == (64, 64, 16, "bf16", 4)
    assert h.flops_per_warp == 2 * 64 * 64 * 16 / 4  # a warpgroup's product, a quarter per warp
    assert st.mma("HGMMA.64x128x8.F32.TF32").dtype == "tf32"
    m = st.mma("HMMA.16816.F32.BF16")
    assert (m.m, m.n, m.k, m.warps) == (16, 8, 16, 1) and m.flops_per_warp == 4096
    assert st.mma("HMMA.1684.F32.TF32").k == 4
    assert st.mma("FFMA") is None and st.mma("HADD2.F32") is None


def test_tile_loop_iteration():
    instrs = sp.parse_sass(TILE_SASS)
    # the wgmma shape survives parsing (lower case in the modifiers)
    assert instrs[7].opcode == "HGMMA.64x64x16.F32.BF16" and instrs[7].operands.startswith("R24")
    tile, chunk, how = st.tile_loops(instrs, chunked=True)
    assert (instrs[tile.head].addr, instrs[tile.latch].addr) == (0x20, 0xF0)
    assert (instrs[chunk.head].addr, instrs[chunk.latch].addr) == (0x50, 0xA0) and how == "mma"
    it, _ = st.iteration(instrs, chunked=True, chunks=4)
    # the guard that skips the chunk loop is not taken: 3 before, 6 x 4 in the chunk loop, 5 after
    assert len(it.opcodes) == 3 + 6 * 4 + 5
    c = it.counts()
    assert c["mma"] == 8 and c["mma_opcodes"] == {"HGMMA.64x64x16.F32.BF16": 8} and c["mufu"] == 1
    assert c["other_than_mma"] == c["classes"]["other"] - 8
    assert it.rest == ["S2R", "BRA", "STG.E", "EXIT"] and it.static == 14 and it.chunk_body == 6
    assert it.lines["kernels/tiles.py:53"] == 24 and it.lines["kernels/vq.py:71"] == 5
    # without a chunk loop the MMA loop is the tile loop
    it1, _ = st.iteration(instrs, chunked=False, chunks=1)
    assert len(it1.opcodes) == 6
    # no MMA: the innermost hot loop stands in (an ieee dot runs as FFMAs)
    ffma = sp.parse_sass(TILE_SASS.replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "FFMA R24, R1, R2, R24")
                         .replace("LDGSTS.E.BYPASS.128 [R4]", "LDG.E.128 R4"))
    assert st.tile_loops(ffma, chunked=False)[2] == "hot"


def _toy(**kw):
    base = dict(name="toy", kernel="kernels/toy.py:toy_kernel", dtype="bf16", n=64 * 264, k=64 * 10, d=32,
                programs=264, trips=10, chunked=True, chunks=1, work={"bf16": 64 * 264 * 64 * 10 * 32})
    return st.Workload(**{**base, **kw})


def test_tile_prediction_model():
    model = sp.H100
    # per tile iteration per warp: 1 HGMMA 64x64x16 (for 4 warps: one 64x64x16 product) and 99 ALU instructions
    it = st.Iteration(["HGMMA.64x64x16.F32.BF16"] + ["LOP3.LUT"] * 99, [], 100,
                      mmas=[st.mma("HGMMA.64x64x16.F32.BF16")])
    p = st.predict(_toy(), it, warps=4, model=model)
    assert p["waves"] == 2 and p["sms_used"] == 132
    iters = 264 * 10
    assert p["issue_s"] == pytest.approx(4 * iters * 100 / (132 * 4 * 1.98e9))
    assert p["pipe_s"]["alu"] == pytest.approx(4 * iters * 99 / (132 * 2 * 1.98e9))
    assert p["tensor_s"] == pytest.approx(iters * 2 * 64 * 64 * 16 / 989.4e12)
    assert p["bound"] == "pipe:alu" and p["mma_flops_over_useful"] == pytest.approx(0.5)
    # 33 programs: one each on 33 SMs, the rest idle, every floor 4x the full GPU's per program
    p33 = st.predict(_toy(programs=33), it, warps=4, model=model)
    assert p33["sms_used"] == 33
    assert p33["issue_s"] / (33 * 10) == pytest.approx(p["issue_s"] / iters * 4)
    # the reference matmul: bf16 FLOPs on the tensor cores or its N x K write, whichever is longer
    ref = p["mm"]
    assert ref["compute_s"] == pytest.approx(2 * 64 * 264 * 640 * 32 / 989.4e12)
    assert ref["write_s"] == pytest.approx(64 * 264 * 640 * 2 / model["dram_bytes_per_s"])
    assert ref["seconds"] == max(ref["compute_s"], ref["write_s"])
    assert st.fp32_peak(model) == pytest.approx(66.9e12, rel=0.01)


def test_tile_workload_spec():
    recorded = [{"file": "kernels/vq.py", "kernel": "vq_argmin_kernel", "module": "fastvae.kernels.vq",
                 "options": {"num_warps": 4}, "args": {
                     "z_ptr": {"kind": "tensor", "dtype": "fp32"}, "e_ptr": {"kind": "tensor", "dtype": "fp32"},
                     "N": {"kind": "int", "one": False, "type": "i32"},
                     "S": {"kind": "int", "one": True, "type": "i32"},
                     "extra": {"kind": "int", "one": False, "type": "i32"},
                     "DOT_FP32": {"kind": "constexpr", "value": True}, "BLOCK_D": {"kind": "constexpr", "value": 16}}}]
    w = st.Workload(name="t", kernel="kernels/vq.py:vq_argmin_kernel", dtype="bf16", n=8, k=1, d=1, programs=1,
                    trips=1, chunked=True, chunks=1, work={"bf16": 1},
                    tensors={"z_ptr": "bf16", "e_ptr": "bf16"}, constexprs={"DOT_FP32": False, "BLOCK_D": 64},
                    ints={"N": 8, "S": 1})
    spec = st.build_spec(w, recorded)
    a = spec["args"]
    assert a["z_ptr"]["dtype"] == "bf16" and a["DOT_FP32"]["value"] is False and a["BLOCK_D"]["value"] == 64
    assert a["N"] == {"kind": "int", "one": False, "type": "i32", "value": 8} and a["S"]["one"]
    assert spec["assumed_ints"] == ["extra"] and recorded[0]["args"]["BLOCK_D"]["value"] == 16  # a copy
    with pytest.raises(KeyError, match="no constexpr argument COSINE"):
        st.build_spec(st.Workload(**{**vars(w), "constexprs": {"COSINE": True}}), recorded)
    with pytest.raises(KeyError, match="no recorded specialization"):
        st.build_spec(st.Workload(**{**vars(w), "kernel": "kernels/vq.py:vq_fwd_kernel"}), recorded)


def test_tile_kernel_compiled_for_sm90(compiler):
    """A real tl.dot kernel: its loop over code tiles is found around the chunk loop, with the wgmma of a
    64x64 tile (4 warps) per BLOCK_D chunk; a feature size without a multiple of 16 gets no hint."""
    t = {"kind": "tensor", "dtype": "bf16"}
    spec = _spec("tile_dot_kernel", {
        "z_ptr": t, "e_ptr": t, "out_ptr": {"kind": "tensor", "dtype": "fp32"},
        "K": {"kind": "int", "one": False, "type": "i32", "value": 1024},
        "D": {"kind": "int", "one": False, "type": "i32", "value": 256},
        "BLOCK_N": {"kind": "constexpr", "value": 64}, "BLOCK_K": {"kind": "constexpr", "value": 64},
        "BLOCK_D": {"kind": "constexpr", "value": 64}}, {"num_warps": 4})
    r = compiler(spec)
    it, how = st.iteration(sp.parse_sass(r["sass"]), chunked=True, chunks=4)
    c = it.counts()
    assert how == "mma" and c["mma"] > 0
    flops = sum(m.flops_per_warp for m in it.mmas) * 4  # 4 warps
    assert flops == 2 * 64 * 64 * 64 * 4  # the 64 x 64 tile over 4 chunks of 64 features
    assert c["instructions"] > c["mma"]


# soft assignment's shape: two chunk loops in the tile loop (.L_x_1, .L_x_2), and a sweep loop around it that
# ends in `@P EXIT; BRA head` (no unconditional EXIT)
TWO_CHUNK_SASS = textwrap.dedent("""\
    two:
            /*0000*/                   S2R R0, SR_CTAID.X ;
    .L_x_9:
            /*0010*/                   MOV R1, RZ ;
    .L_x_0:
            /*0020*/                   LDGSTS.E.BYPASS.128 [R4], desc[UR4][R2.64] ;
    .L_x_1:
            /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
            /*0040*/               @P6 BRA `(.L_x_1) ;
            /*0050*/                   FMUL R6, R24, R25 ;
    .L_x_2:
            /*0060*/                   HGMMA.64x64x8.F32.TF32 R40, R8, gdesc[UR8], R40 ;
            /*0070*/                   IADD3 R5, R5, 0x1, RZ ;
            /*0080*/               @P5 BRA `(.L_x_2) ;
            /*0090*/                   MUFU.EX2 R8, R6 ;
            /*00a0*/              @!P2 BRA `(.L_x_0) ;
            /*00b0*/                   STG.E desc[UR4][R2.64], R6 ;
            /*00c0*/               @P3 EXIT ;
            /*00d0*/                   BRA `(.L_x_9) ;
    .L_x_4:
            /*00e0*/                   BRA `(.L_x_4) ;
    """)


def test_tile_loop_with_two_chunk_loops():
    instrs = sp.parse_sass(TWO_CHUNK_SASS)
    tile, chunk, _ = st.tile_loops(instrs, chunked=True)
    assert (instrs[tile.head].addr, instrs[tile.latch].addr) == (0x20, 0xA0)
    it, _ = st.iteration(instrs, chunked=True, chunks=3)
    # LDGSTS, 2 x 3 of the first chunk loop, FMUL, 3 x 3 of the second, MUFU and the latch
    assert len(it.opcodes) == 1 + 2 * 3 + 1 + 3 * 3 + 2 and it.chunk_body == 5
    assert it.counts()["mma_opcodes"] == {"HGMMA.64x64x16.F32.BF16": 3, "HGMMA.64x64x8.F32.TF32": 3}
    # the rest of the program ends at its last (conditional) EXIT
    assert it.rest == ["S2R", "MOV", "STG.E", "EXIT"]


def test_tiles_report_end_to_end(compiler, tmp_path, monkeypatch):
    """--tiles on one workload of a throwaway tl.dot kernel: tiles.md and tiles.json written, the row's loop
    read and its bound predicted; a workload naming an argument the kernel lacks is a failed row."""
    import json

    import sass_report

    t = {"kind": "tensor", "dtype": "fp32"}
    i32 = {"kind": "int", "one": False, "type": "i32"}
    recorded = _spec("tile_dot_kernel", {
        "z_ptr": t, "e_ptr": t, "out_ptr": t, "K": i32, "D": i32,
        "BLOCK_N": {"kind": "constexpr", "value": 16}, "BLOCK_K": {"kind": "constexpr", "value": 16},
        "BLOCK_D": {"kind": "constexpr", "value": 16}}, {"num_warps": 4})
    recorded.update(launches=1, max_programs=1)
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"format": 1, "specializations": [recorded]}))
    good = st.Workload(name="toy dot", kernel="sasskernels/mod.py:tile_dot_kernel", dtype="bf16", n=64 * 132,
                       k=1024, d=256, programs=132, trips=16, chunked=True, chunks=4,
                       work={"bf16": 64 * 132 * 1024 * 256},
                       tensors={"z_ptr": "bf16", "e_ptr": "bf16"}, ints={"K": 1024, "D": 256},
                       constexprs={"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 64})
    bad = st.Workload(**{**vars(good), "name": "changed", "constexprs": {"COSINE": False}})
    monkeypatch.setattr(st, "WORKLOADS", [good, bad])
    out = tmp_path / "out"
    rc = sass_report.main(["--tiles", "--specs", str(rec), "--out", str(out), "--root", str(tmp_path), "--jobs", "1",
                           "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0  # no --check
    rows = json.loads((out / "tiles.json").read_text())["results"]
    assert rows[0]["ok"] and rows[0]["iteration"]["mma"] > 0 and rows[0]["predicted"]["bound"]
    assert rows[0]["predicted"]["mma_flops_over_useful"] == pytest.approx(1.0)
    assert not rows[1]["ok"] and "COSINE" in rows[1]["error"]
    md = (out / "tiles.md").read_text()
    assert "| toy dot | `tile_dot_kernel` | bf16 |" in md and "FAILED" in md
