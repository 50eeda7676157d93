"""bench/sass_report.py's analysis: opcode classes, access widths, the hot path through slow-path branches and
loops, spill detection, the TTIR byte count, and one real compile for sm_90 on this machine (skipped where
triton cannot compile for a GPU target, or under the interpreter)."""

from __future__ import annotations

import os
import sys
import textwrap

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
