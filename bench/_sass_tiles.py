"""Tile kernels' machine code against the limits that bind them: the tensor cores, the issue rate or the MUFU
pipe, not DRAM. Predicted from SASS with a simple H100/H200 model, not measured.

The per-element model of ``_sass_parse`` fits streaming kernels; the codebook kernels (VQ search, LFQ entropy,
soft assignment) are loops over tiles of codes (or tokens) whose body holds a ``tl.dot``, and their work grows
with N K, not with the bytes they move. Here each is compiled at one launch shape (a ``Workload``: the kernel,
the constexprs and sizes its launcher passes at that shape) and its SASS is read per iteration of the *tile
loop*:

- MMA loop: the innermost loop holding a tensor-core instruction (HGMMA: wgmma, a warpgroup of 4 warps; HMMA:
  mma.sync, one warp). A kernel whose dot runs as FFMAs (LFQ's ieee dot) has none: its innermost hot loop
  (one with a global load) stands in.
- Tile loop: the MMA loop itself, or, when the dot is accumulated over feature chunks (``Workload.chunked``:
  ``tiles.token_code_dot``'s loop over D in BLOCK_D steps), the loop that encloses it.
- One tile iteration: the cheapest path from the tile loop's head to its latch (forward branches that skip a
  region are taken as skipping it, as in ``_sass_parse.hot_path``). When chunked, every loop directly inside
  the tile loop is a chunk loop (soft assignment's backward has two: the logits' and g_pE . e's): the path
  enters each, never its zero-trip guard, and counts its body ``chunks`` = ceil(D / BLOCK_D) times (Triton's
  pipeliner keeps the trip count: the prologue's loads sit before the loop, the loop's own loads past the end
  are predicated off). Per warp: every warp of a program runs the same instruction stream.
- Outside the tile loop: the cheapest path through the rest of the kernel once per program (a loop there,
  such as the fused epilogue's pass over D or soft assignment's sweeps over BLOCK_V, counted once; the
  sweeps are in ``Workload.trips``).

The model, per launch of ``programs`` programs of ``warps`` warps each running ``trips`` tile iterations:

    SMs in use  = programs / ceil(programs / 132)      (whole programs per SM; fewer than 132 programs leave
                                                        SMs idle, a partial last wave is spread evenly)
    issue       = warp-instructions / (SMs x 4 per clock x 1.98 GHz)
    pipe        = FP32 (FFMA/FMUL/FADD with IMAD: 4 warp-instructions per SM per clock), ALU (2), MUFU and
                  conversions (0.5: 16 lanes per SM per clock), as ``_sass_parse.H100``
    tensor      = MMA FLOPs issued / (peak x SMs / 132): dense bf16/fp16 989 TFLOP/s, tf32 494 TFLOP/s (a
                  tf32x3 dot issues three tf32 products: three times the MMAs), fp8 1979 TFLOP/s; an HGMMA
                  MxNxK is 2 M N K FLOPs for its warpgroup, a quarter per warp's instruction
    bound       = the largest of the three

against the op's useful work, 2 N K D FLOPs a dot (padding to BLOCK_D is issued, not useful), and the reference
``torch.mm(z, codebook.T)`` at the same shape in the input dtype as torch runs it by default (bf16/fp16 on the
tensor cores at 989 TFLOP/s; fp32 without TF32 on the FP32 pipe at 67 TFLOP/s), which also writes its N x K
product: the reference is the larger of its FLOP time and that write at the model's DRAM bandwidth.

Latency (the MMA's, an exponential's, a barrier's), occupancy, shared-memory and L2 bandwidth and clocks
under load are outside the model: each time is a floor, and the bound says which floor is highest.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import _sass_parse as sp

# dense tensor-core peaks of an H100 SXM / H200 (the datasheet's, without sparsity), FLOP/s
TENSOR_PEAK = {"bf16": 989.4e12, "f16": 989.4e12, "tf32": 494.7e12, "fp8": 1978.9e12}
_MMA_TYPES = {"BF16": "bf16", "F16": "f16", "TF32": "tf32", "E4M3": "fp8", "E5M2": "fp8"}
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.\w+\.(\w+)")
_HMMA = re.compile(r"^HMMA\.(16)(8)(\d+)\.\w+\.(\w+)")


def fp32_peak(model: dict[str, Any]) -> float:
    """FP32 FMA FLOP/s on the CUDA cores: 128 lanes per SM per clock, 2 FLOPs a lane (67 TFLOP/s)."""
    return model["sms"] * model["clock_hz"] * model["pipes"]["fma"] * 32 * 2


@dataclass(frozen=True)
class Mma:
    opcode: str
    m: int
    n: int
    k: int
    dtype: str  # a TENSOR_PEAK key, or the SASS type when the model has no peak for it
    warps: int  # warps sharing one instruction's product: 4 for wgmma (a warpgroup), 1 for mma.sync

    @property
    def flops_per_warp(self) -> float:
        return 2.0 * self.m * self.n * self.k / self.warps

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}x{self.k}"


def mma(opcode: str) -> Mma | None:
    """The tensor-core product of a SASS opcode: ``HGMMA.64x64x16.F32.BF16`` (wgmma, per warpgroup),
    ``HMMA.16816.F32.BF16`` (mma.sync m16n8k16, per warp), or None for any other instruction."""
    m = _HGMMA.match(opcode)
    if m:
        return Mma(opcode, int(m.group(1)), int(m.group(2)), int(m.group(3)),
                   _MMA_TYPES.get(m.group(4), m.group(4)), 4)
    m = _HMMA.match(opcode)
    if m:
        return Mma(opcode, int(m.group(1)), int(m.group(2)), int(m.group(3)),
                   _MMA_TYPES.get(m.group(4), m.group(4)), 1)
    return None


# --------------------------------------------------------------------------------------------------------
# SASS: the tile loop and one of its iterations
# --------------------------------------------------------------------------------------------------------


def _contains(outer: sp.Loop, inner: sp.Loop) -> bool:
    return outer is not inner and outer.head <= inner.head and inner.latch <= outer.latch \
        and (outer.head, outer.latch) != (inner.head, inner.latch)


def tile_loops(instrs: list[sp.Instr], chunked: bool) -> tuple[sp.Loop, sp.Loop | None, str]:
    """(tile loop, chunk loop or None, how the inner loop was found: 'mma' or 'hot'). Raises ValueError when
    the SASS has no loop to match (a kernel whose loops the compiler unrolled, or a changed kernel)."""
    loops = sp.find_loops(instrs)
    with_mma = [lp for lp in loops if any(mma(instrs[i].opcode) for i in range(lp.head, lp.latch + 1))]
    how = "mma" if with_mma else "hot"
    pool = with_mma or [lp for lp in loops if lp.hot]
    if not pool:
        raise ValueError("no loop with an MMA or a global load in the SASS")
    inner = min(pool, key=lambda lp: lp.latch - lp.head)
    if not chunked:
        return inner, None, how
    outer = [lp for lp in loops if _contains(lp, inner)]
    if not outer:
        raise ValueError("the MMA loop has no enclosing tile loop (was the chunk loop unrolled?)")
    return min(outer, key=lambda lp: lp.latch - lp.head), inner, how


@dataclass
class Iteration:
    """Instructions of one tile iteration (per warp) and of the rest of the program (once per program)."""
    opcodes: list[str]
    rest: list[str]
    static: int  # instructions in the tile loop's address range, every branch counted
    chunk_body: int = 0  # instructions of one iteration of the chunk loops, together (0: none)
    mmas: list[Mma] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # "file:line" -> instructions per tile iteration

    def counts(self) -> dict[str, Any]:
        classes = sp.classify(self.opcodes)
        mma_ops: dict[str, int] = {}
        for op in self.opcodes:
            if mma(op):
                mma_ops[op] = mma_ops.get(op, 0) + 1
        pipes = dict.fromkeys(("fma", "imad", "alu", "xu"), 0)
        for op in self.opcodes:
            p = sp.opcode_pipe(op)
            if p is not None:
                pipes[p] += 1
        return {
            "instructions": len(self.opcodes),
            "mma": sum(mma_ops.values()),
            "mma_opcodes": mma_ops,
            "mufu": sum(op.startswith("MUFU") for op in self.opcodes),
            "classes": classes,
            "pipes": pipes,
            # the MMAs are "other" to sp.classify: the rest of that class (moves, uniform datapath, shuffles)
            "other_than_mma": classes["other"] - sum(mma_ops.values()),
        }


def iteration(instrs: list[sp.Instr], chunked: bool, chunks: int) -> tuple[Iteration, str]:
    """One tile iteration's instructions with the chunk loop's body ``chunks`` times (see the module
    docstring), the rest of the program once; and how the inner loop was found."""
    tile, chunk, how = tile_loops(instrs, chunked)
    path = sp._shortest_path
    if chunk is None:
        body = path(instrs, tile.head, tile.latch, set())
        chunk_body: list[int] = []
        picked = list(body)
    else:
        # through each chunk loop, never around it: the guard that skips a zero-trip loop is not the hot path.
        # Every loop directly inside the tile loop is one (soft assignment's backward has two: the logits' and
        # g_pE . e's), each run ``chunks`` times
        children = [lp for lp in sp.find_loops(instrs) if _contains(tile, lp)]
        children = sorted((lp for lp in children if not any(_contains(o, lp) for o in children)),
                          key=lambda lp: lp.head)
        picked, cur, chunk_body = [], tile.head, []
        for lp in children:
            body = path(instrs, lp.head, lp.latch, set())
            picked += path(instrs, cur, lp.head, set())[:-1] + body * chunks
            chunk_body += body
            cur = lp.latch + 1
        picked += path(instrs, cur, tile.latch, set()) if cur <= tile.latch else []
    ops = [instrs[i].opcode for i in picked]
    lines: dict[str, int] = {}
    for i in picked:
        key = source_line(instrs[i])
        lines[key] = lines.get(key, 0) + 1
    in_tile = set(range(tile.head, tile.latch + 1))
    rest_path = path(instrs, 0, None, in_tile)
    exits = [i for i, ins in enumerate(instrs) if ins.base == "EXIT"]
    if not rest_path and exits:
        # no unconditional EXIT: a loop around the tile loop that ends in `@P EXIT; BRA head` (soft
        # assignment's sweeps over BLOCK_V); the program ends at its last EXIT
        rest_path = path(instrs, 0, exits[-1], in_tile)
    rest = [instrs[i].opcode for i in rest_path]
    mmas = [m for m in (mma(op) for op in ops) if m is not None]
    return Iteration(ops, rest, tile.latch - tile.head + 1, len(chunk_body), mmas,
                     dict(sorted(lines.items(), key=lambda kv: -kv[1]))), how


def source_line(ins: sp.Instr) -> str:
    """``file:line`` of the kernel source an instruction comes from: the innermost frame in a ``kernels/``
    file (a triton.language helper such as tl.argmin is charged to the line that calls it), else the innermost
    frame, else '?'."""
    for f, n in ins.loc:
        if "/kernels/" in f or f.startswith("kernels/"):
            return f"kernels/{f.rsplit('/kernels/', 1)[-1]}:{n}" if "/kernels/" in f else f"{f}:{n}"
    return f"{ins.loc[0][0].rsplit('/', 1)[-1]}:{ins.loc[0][1]}" if ins.loc else "?"


# --------------------------------------------------------------------------------------------------------
# workloads: a kernel at one launch shape
# --------------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One launch: ``kernel`` (``file:name``) with the arguments its launcher passes at this shape, applied
    over a recorded specialization of that kernel (``match``: constexpr values the recorded one must have,
    where the recording holds several modes)."""
    name: str  # what the row is: "vq search", "lfq entropy backward", ...
    kernel: str
    dtype: str  # the inputs' dtype, for the table and the torch.mm reference
    n: int
    k: int
    d: int
    programs: int
    trips: int  # tile iterations per program
    chunked: bool  # the dot accumulates over feature chunks (a loop inside the tile loop)
    chunks: int  # chunk iterations per tile iteration
    # the useful work: N x K x D products (2 N K D FLOPs each) the op needs, by how the kernel multiplies them:
    # "bf16"/"fp16" (tensor cores), "tf32x3" (three tf32 products each), "ieee" (FFMA on the CUDA cores)
    work: dict[str, int]
    tensors: dict[str, str] = field(default_factory=dict)  # pointer argument -> dtype
    constexprs: dict[str, Any] = field(default_factory=dict)
    ints: dict[str, int] = field(default_factory=dict)  # integer argument -> its value at this shape
    match: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def file(self) -> str:
        return self.kernel.split(":")[0]

    @property
    def kernel_name(self) -> str:
        return self.kernel.split(":")[1]

    @property
    def shape(self) -> str:
        return f"N={self.n} K={self.k} D={self.d}"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _half(dtype: str) -> bool:
    return dtype in ("bf16", "fp16")


# The launchers' configurations (fastvae/_triton/*.py), restated: a change there is a change here. Each helper
# gives the Workload of one kernel at one shape; a new family is one helper and one line in WORKLOADS.
VQ_BLOCK_N, VQ_BLOCK_K = 64, 64


def _vq_block_d(dtype: str, d: int) -> int:
    """``fastvae/_triton/vq.py``'s ``_block_d``."""
    if _half(dtype) and d <= 256:
        return max(16, _next_pow2(d))
    return min(32 if not _half(dtype) else 64, max(16, _next_pow2(d)))


def vq(kernel: str, dtype: str, n: int, k: int, d: int) -> Workload:
    """``fastvae/_triton/vq.py``: the search (``vq_argmin_kernel``) or the fused forward (``vq_fwd_kernel``,
    straight-through, euclidean) on channels-last tokens (a (N, 1, D) view: S = 1, unit feature stride), one
    head, one program per BLOCK_N tokens looping over K in BLOCK_K codes, D in BLOCK_D chunks."""
    block_d = _vq_block_d(dtype, d)
    ints = {"N": n, "S": 1, "K": k, "D": d, "stride_b": d, "stride_s": d, "stride_d": 1, "stride_eh": k * d,
            "stride_ek": d}
    if kernel == "vq_fwd_kernel":
        ints.update(qstride_b=d, qstride_s=d, qstride_d=1)
    return Workload(
        name={"vq_argmin_kernel": "vq search", "vq_fwd_kernel": "vq fused forward"}[kernel],
        kernel=f"kernels/vq.py:{kernel}", dtype=dtype, n=n, k=k, d=d,
        programs=_cdiv(n, VQ_BLOCK_N), trips=_cdiv(k, VQ_BLOCK_K), chunked=d > block_d, chunks=_cdiv(d, block_d),
        work={dtype if _half(dtype) else "tf32x3": n * k * d},
        tensors={"z_ptr": dtype, "e_ptr": dtype, **({"q_ptr": dtype} if kernel == "vq_fwd_kernel" else {})},
        constexprs={"DOT_FP32": not _half(dtype), "COSINE": False, "BLOCK_N": VQ_BLOCK_N, "BLOCK_K": VQ_BLOCK_K,
                    "BLOCK_D": block_d, "ONE_CHUNK": d <= block_d,
                    **({"ESTIMATOR": 0, "EPI_D": min(64, max(16, _next_pow2(d)))} if kernel == "vq_fwd_kernel"
                       else {})},
        ints=ints, options={"num_warps": 4},
        note="" if _half(dtype) else "fp32 inputs: tf32x3 (three tf32 MMAs per product)",
    )


LFQ_BLOCK_N, LFQ_BLOCK_K = 64, 128


def lfq(kernel: str, n: int, d: int) -> Workload:
    """``fastvae/_triton/lfq.py``: the entropy over K = 2^d codes, one group. Forward: one program per BLOCK_K
    codes looping over the tokens; backward: one per BLOCK_N tokens looping over the codes (two dots a tile).
    The dot is fp32 ieee: FFMAs, no tensor cores."""
    k = 1 << d
    fwd = kernel == "lfq_entropy_fwd_kernel"
    block_n, block_k = LFQ_BLOCK_N, LFQ_BLOCK_K
    return Workload(
        name="lfq entropy forward" if fwd else "lfq entropy backward",
        kernel=f"kernels/lfq.py:{kernel}", dtype="fp32", n=n, k=k, d=d,
        programs=_cdiv(k, block_k) if fwd else _cdiv(n, block_n),
        trips=_cdiv(n, block_n) if fwd else _cdiv(k, block_k), chunked=False, chunks=1,
        work={"ieee": n * k * d * (1 if fwd else 2)},
        constexprs={"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": max(16, _next_pow2(d))},
        ints={"N": n, "D": d, "K": k}, options={"num_warps": 8},
        note="ieee fp32 dot: FFMA on the CUDA cores",
    )


# fastvae/_triton/soft_assign.py's FWD_TILES, PBAR_TILES, DZ_TILES, DE_TILES (block_n, block_k, num_warps),
# BLOCK_D, BLOCK_V and NUM_STAGES
SA_TILES = {"soft_assign_fwd_kernel": (64, 32, 4), "soft_assign_pbar_kernel": (64, 64, 4),
            "soft_assign_bwd_dz_kernel": (32, 32, 4), "soft_assign_bwd_de_kernel": (16, 32, 2)}
SA_BLOCK_D, SA_BLOCK_V, SA_NUM_STAGES = 32, 64, 1
SA_TOKEN_TILES = ("soft_assign_fwd_kernel", "soft_assign_bwd_dz_kernel")  # one program per token tile


def soft_assign(kernel: str, dtype: str, n: int, k: int, d: int, metric: int = 0) -> Workload:
    """``fastvae/_triton/soft_assign.py``: a kernel of the soft assignment (``metric`` 0 dot, 1 sqeuclidean,
    2 euclidean) on channels-last tokens, one codebook; backward with g_pE given, g_pbar not. The token-tile
    kernels (forward, dz) loop over K per sweep of BLOCK_V output columns, the code-tile ones (pbar, de) over
    N; the logits (and backward's g_pE . e) accumulate over D in BLOCK_D chunks inside the tile loop, the
    second-stage dots (P E, W E, W^T Z, P^T g_pE) are tf32x3 whatever the inputs."""
    block_n, block_k, warps = SA_TILES[kernel]
    block_d, block_v = SA_BLOCK_D, SA_BLOCK_V
    pbar = kernel == "soft_assign_pbar_kernel"
    sweeps = 1 if pbar else _cdiv(d, block_v)  # the logits are recomputed once per sweep
    token = kernel in SA_TOKEN_TILES
    logits = dtype if _half(dtype) else "tf32x3"
    nkd = n * k * d
    # useful products per kernel: the logits once (backward: g_pE . e too), then the second-stage dots
    first, second = {"soft_assign_fwd_kernel": (1, 1), "soft_assign_pbar_kernel": (1, 0),
                     "soft_assign_bwd_dz_kernel": (2, 1), "soft_assign_bwd_de_kernel": (2, 2)}[kernel]
    work = {logits: first * nkd}
    if second:
        work["tf32x3"] = work.get("tf32x3", 0) + second * nkd
    strides = {"stride_b": d, "stride_s": d, "stride_d": 1, "stride_ek": d}
    out = {"soft_assign_fwd_kernel": ("pe_sb", "pe_ss", "pe_sd"), "soft_assign_bwd_dz_kernel":
           ("pe_sb", "pe_ss", "pe_sd", "g_sb", "g_ss", "g_sd", "dz_sb", "dz_ss", "dz_sd"),
           "soft_assign_bwd_de_kernel": ("g_sb", "g_ss", "g_sd")}.get(kernel, ())
    strides.update({name: 1 if name.endswith("sd") else d for name in out})
    tensors = {"z_ptr": dtype, "e_ptr": dtype}
    tensors.update({"soft_assign_fwd_kernel": {"pe_ptr": dtype},
                    "soft_assign_bwd_dz_kernel": {"gpe_ptr": dtype, "pe_ptr": dtype, "dz_ptr": dtype},
                    "soft_assign_bwd_de_kernel": {"gpe_ptr": dtype}}.get(kernel, {}))
    constexprs: dict[str, Any] = {"METRIC": metric, "DOT_FP32": not _half(dtype), "BLOCK_N": block_n,
                                  "BLOCK_K": block_k, "BLOCK_D": block_d}
    if not pbar:
        constexprs["BLOCK_V"] = block_v
    if kernel in ("soft_assign_bwd_dz_kernel", "soft_assign_bwd_de_kernel"):
        constexprs.update(DOT_FP32_G=not _half(dtype), HAS_GPBAR=False, HAS_GPE=True)
    return Workload(
        name={"soft_assign_fwd_kernel": "soft assign forward", "soft_assign_pbar_kernel": "soft assign pbar",
              "soft_assign_bwd_dz_kernel": "soft assign backward dz",
              "soft_assign_bwd_de_kernel": "soft assign backward de"}[kernel]
        + ("" if metric == 0 else f" ({('dot', 'sqeuclidean', 'euclidean')[metric]})"),
        kernel=f"kernels/soft_assign.py:{kernel}", dtype=dtype, n=n, k=k, d=d,
        programs=_cdiv(n, block_n) if token else _cdiv(k, block_k),
        trips=sweeps * (_cdiv(k, block_k) if token else _cdiv(n, block_n)),
        chunked=True, chunks=_cdiv(d, block_d), work=work, tensors=tensors, constexprs=constexprs,
        ints={"N": n, "S": 1, "K": k, "D": d, **strides},
        options={"num_warps": warps, "num_stages": SA_NUM_STAGES},
        note=(f"{sweeps} sweeps of BLOCK_V = {block_v} columns, the logits recomputed in each; " if sweeps > 1
              else "") + "second-stage dots tf32x3",
    )


# the headline shapes of bench/test_vq.py on CUDA: image tokenizers (N 65536, K 16384, D 256), an audio codec's
# stage (K 1024, D 8), LFQ at d = 14 and Open-MAGVIT2's d = 18 over 2048 tokens
WORKLOADS: list[Workload] = [
    vq("vq_argmin_kernel", "bf16", 65536, 16384, 256),
    vq("vq_argmin_kernel", "fp32", 65536, 16384, 256),
    vq("vq_fwd_kernel", "bf16", 65536, 16384, 256),
    vq("vq_fwd_kernel", "fp32", 65536, 16384, 256),
    vq("vq_argmin_kernel", "bf16", 65536, 1024, 8),
    vq("vq_argmin_kernel", "fp32", 65536, 1024, 8),
    vq("vq_fwd_kernel", "bf16", 65536, 1024, 8),
    vq("vq_fwd_kernel", "fp32", 65536, 1024, 8),
    lfq("lfq_entropy_fwd_kernel", 2048, 14),
    lfq("lfq_entropy_bwd_kernel", 2048, 14),
    lfq("lfq_entropy_fwd_kernel", 2048, 18),
    lfq("lfq_entropy_bwd_kernel", 2048, 18),
    # soft assignment (no benchmark grid of its own yet): the image tokenizer's shape
    soft_assign("soft_assign_fwd_kernel", "bf16", 65536, 16384, 256),
    soft_assign("soft_assign_fwd_kernel", "fp32", 65536, 16384, 256),
    soft_assign("soft_assign_pbar_kernel", "bf16", 65536, 16384, 256),
    soft_assign("soft_assign_bwd_dz_kernel", "bf16", 65536, 16384, 256),
    soft_assign("soft_assign_bwd_de_kernel", "bf16", 65536, 16384, 256),
]


def build_spec(w: Workload, recorded: list[dict[str, Any]]) -> dict[str, Any]:
    """The recorded specialization of ``w``'s kernel (the first whose constexprs agree with ``w.match``) with
    ``w``'s dtypes, constexprs, integer values and options: the launch at ``w``'s shape. Raises KeyError when
    the recording has no such kernel or ``w`` names an argument the kernel does not have (the kernel changed:
    update the workload)."""
    cands = [s for s in recorded if s["file"] == w.file and s["kernel"] == w.kernel_name
             and all(s["args"].get(a, {}).get("value") == v for a, v in w.match.items())]
    if not cands:
        raise KeyError(f"no recorded specialization of {w.kernel} (record the codebook tests: "
                       "bench/results/sass/README.md)")
    spec = copy.deepcopy(cands[0])
    args = spec["args"]
    for group, kind in ((w.tensors, "tensor"), (w.constexprs, "constexpr"), (w.ints, "int")):
        for name in group:
            if name not in args or args[name]["kind"] != kind:
                raise KeyError(f"{w.kernel}: no {kind} argument {name} in the recording (kernel changed?)")
    for name, dtype in w.tensors.items():
        args[name]["dtype"] = dtype
    for name, value in w.constexprs.items():
        args[name]["value"] = value
    for name, value in w.ints.items():
        args[name].update(value=value, one=value == 1, type="i32" if -2**31 <= value < 2**31 else "i64")
    spec["options"] = {**spec["options"], **w.options}
    # the ints the workload leaves out keep the recording's flags and the report's integer assumption
    spec["assumed_ints"] = sorted(a for a, v in args.items() if v["kind"] == "int" and "value" not in v)
    return spec


# --------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------


def mm_reference(w: Workload, model: dict[str, Any]) -> dict[str, Any]:
    """``torch.mm(z, codebook.T)`` at ``w``'s shape in its dtype as torch runs it by default: its FLOPs at
    the peak (fp32: no TF32, the FP32 pipe), and the N x K product's write at the model's DRAM bandwidth."""
    flops = 2.0 * w.n * w.k * w.d
    peak = TENSOR_PEAK["bf16"] if _half(w.dtype) else fp32_peak(model)
    out_bytes = w.n * w.k * (2 if _half(w.dtype) else 4)
    return {"flops": flops, "peak": peak, "compute_s": flops / peak,
            "tf32_s": flops / TENSOR_PEAK["tf32"],
            "write_s": out_bytes / model["dram_bytes_per_s"],
            "seconds": max(flops / peak, out_bytes / model["dram_bytes_per_s"])}


def predict(w: Workload, it: Iteration, warps: int, model: dict[str, Any]) -> dict[str, Any]:
    """Issue, pipe and tensor-core times of ``w``'s launch (seconds) from one tile iteration's instructions;
    the largest is the bound."""
    sms = model["sms"]
    waves = _cdiv(w.programs, sms)
    sms_used = w.programs / waves
    clk = model["clock_hz"]
    iters = w.programs * w.trips  # tile iterations over the grid
    c = it.counts()
    warp_instr = warps * (iters * c["instructions"] + w.programs * len(it.rest))
    issue_s = warp_instr / (sms_used * model["issue_per_sm_clk"] * clk)
    rest = {p: 0 for p in c["pipes"]}
    for op in it.rest:
        p = sp.opcode_pipe(op)
        if p is not None:
            rest[p] += 1
    pipe_instr = {p: warps * (iters * c["pipes"][p] + w.programs * rest[p]) for p in c["pipes"]}
    pipe_s = {
        "fp32": (pipe_instr["fma"] + pipe_instr["imad"]) / (sms_used * model["pipes"]["fma"] * clk),
        "alu": pipe_instr["alu"] / (sms_used * model["pipes"]["alu"] * clk),
        "mufu": pipe_instr["xu"] / (sms_used * model["pipes"]["xu"] * clk),
    }
    mma_flops: dict[str, float] = {}
    for m in it.mmas:
        mma_flops[m.dtype] = mma_flops.get(m.dtype, 0.0) + m.flops_per_warp * warps * iters
    unknown = [t for t in mma_flops if t not in TENSOR_PEAK]
    tensor_s = sum(f / (TENSOR_PEAK[t] * sms_used / sms) for t, f in mma_flops.items() if t in TENSOR_PEAK)
    times = {"issue": issue_s, **{f"pipe:{p}": s for p, s in pipe_s.items()}, "tensor": tensor_s}
    bound = max(times, key=times.get)
    ref = mm_reference(w, model)
    useful = 2.0 * sum(w.work.values())
    peaks = {"bf16": TENSOR_PEAK["bf16"], "fp16": TENSOR_PEAK["f16"], "tf32x3": TENSOR_PEAK["tf32"] / 3,
             "ieee": fp32_peak(model)}
    useful_s = sum(2.0 * dots / peaks[prec] for prec, dots in w.work.items())
    return {
        "programs": w.programs, "waves": waves, "sms_used": sms_used, "tile_iterations": iters,
        "warp_instructions": warp_instr, "issue_s": issue_s, "pipe_s": pipe_s, "tensor_s": tensor_s,
        "mma_flops": mma_flops, "mma_types_without_peak": unknown, "useful_flops": useful,
        "mma_flops_over_useful": sum(mma_flops.values()) / useful if mma_flops else 0.0, "useful_s": useful_s,
        "bound": bound, "bound_s": times[bound], "mm": ref, "over_mm": times[bound] / ref["seconds"],
        "over_mm_flops": times[bound] / ref["compute_s"],
    }


def analyze(w: Workload, sass: str, warps: int, model: dict[str, Any]) -> dict[str, Any]:
    """Everything the tiles report shows about one workload's compiled kernel."""
    instrs = sp.parse_sass(sass)
    it, how = iteration(instrs, w.chunked, w.chunks)
    c = it.counts()
    return {"iteration": {**c, "static_tile_loop": it.static, "chunk_body": it.chunk_body,
                          "once_per_program": len(it.rest), "inner_loop": how, "lines": it.lines,
                          "mma_shapes": sorted({f"{m.opcode.split('.')[0]}.{m.shape}.{m.dtype}" for m in it.mmas})},
            "predicted": predict(w, it, warps, model)}


TOP_LINES = 6  # source lines listed per workload


def fmt_time(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Tile kernels against the tensor cores: predicted, not measured",
        "",
        f"triton {meta['triton']}, sm_{meta['arch']} ({meta['ptxas']}), compiled on a machine without a GPU from "
        f"`{' '.join(meta['recordings'])}` with each workload's shape applied (`bench/_sass_tiles.py`). Model: "
        f"H100 SXM / H200, 132 SMs at 1.98 GHz, 4 warp-instructions per SM per clock; dense tensor-core peaks "
        f"bf16/fp16 989, tf32 494.7 TFLOP/s; FP32 FMA 67 TFLOP/s; MUFU 16 lanes per SM per clock; DRAM "
        f"{meta['dram_source']}. Every time is a floor from the SASS and this model: latency, occupancy, "
        "shared-memory and L2 bandwidth are outside it. Regenerate: `python bench/sass_report.py --tiles --out "
        "bench/results/sass` (see README.md).",
        "",
        "**Per tile iteration** (per warp): one pass of the loop over code tiles (LFQ forward, soft assignment's "
        "pbar and de: token tiles), each feature-chunk loop inside it counted ceil(D / BLOCK_D) times. instr: "
        "SASS instructions; MMA: "
        "tensor-core instructions (HGMMA is wgmma: one 64xNxK product per warpgroup of 4 warps); int / fp32 / "
        "mufu / other: instruction classes (other: moves, uniform datapath, shuffles, MMAs excluded). "
        "**issue**: all warp-instructions of the launch at 4 per SM per clock; **tensor**: the MMA FLOPs "
        "issued at the peak of their type (tf32x3 issues three tf32 products per product; BLOCK_D padding "
        "counts); **pipe**: the busiest of FP32 (FFMA with IMAD), ALU, MUFU. **bound**: the largest. "
        "**mm**: `torch.mm(z, codebook.T)` alone in the input dtype as torch runs it by default (bf16 on the "
        "tensor cores, fp32 without TF32 at 67 TFLOP/s), the larger of its FLOPs and the write of its N x K "
        "product; **vs mm**: bound / mm (above 1: the kernel is predicted slower than the matmul alone). SMs: "
        "SMs in use, programs / ceil(programs / 132).",
        "",
        "| op | kernel | dtype | shape | BLOCK N/K/D, warps | regs | spill B | programs x iters | SMs | "
        "instr/iter | MMA/iter (shape) | int fp32 mufu other | issue | tensor | pipe | bound | useful 2NKD at "
        "peak | mm | vs mm |",
        "| --- | --- | --- | --- | --- | ---: | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | "
        "---: | ---: | ---: |",
    ]
    for r in rows:
        w = r["workload"]
        if not r.get("ok"):
            lines.append(f"| {w['name']} | `{w['kernel_name']}` | {w['dtype']} | {_shape(w)} | | | | | | | | | | | "
                         f"| FAILED: {r['error'].splitlines()[0][:200]} | | | |")
            continue
        it, p = r["iteration"], r["predicted"]
        pipe = max(p["pipe_s"], key=p["pipe_s"].get)
        mma_cell = f"{it['mma']} ({', '.join(it['mma_shapes'])})" if it["mma"] else "0 (FFMA)"
        cl = it["classes"]
        blocks = "/".join(str(w["constexprs"].get(b, "-")) for b in ("BLOCK_N", "BLOCK_K", "BLOCK_D"))
        useful = fmt_time(p["useful_s"])
        lines.append(
            f"| {w['name']} | `{w['kernel_name']}` | {w['dtype']} | {_shape(w)} | {blocks}, {r['num_warps']} | "
            f"{r['regs']} | {r['spill_bytes']} | {w['programs']} x {w['trips']} | {p['sms_used']:.0f} | "
            f"{it['instructions']} | {mma_cell} | {cl['int']} {cl['fp32']} {it['mufu']} {it['other_than_mma']} | "
            f"{fmt_time(p['issue_s'])} | {fmt_time(p['tensor_s']) if p['tensor_s'] else '-'} | "
            f"{fmt_time(p['pipe_s'][pipe])} {pipe} | **{p['bound']}** {fmt_time(p['bound_s'])} | "
            f"{useful} | {fmt_time(p['mm']['seconds'])} | {p['over_mm']:.2f} |"
        )
    lines += ["", "useful 2NKD at peak: the op's own dot products (LFQ backward: two) at the peak of the precision "
              "the kernel runs them in (bf16 989, tf32x3 494.7 / 3, ieee fp32 67 TFLOP/s), all SMs; the MMAs "
              "issued can exceed them (tf32x3, BLOCK_D padding).", ""]
    if meta.get("findings"):
        lines += ["## Findings", ""] + [f"- {f}" for f in meta["findings"]] + [""]
    lines += ["## Per workload", ""]
    for r in rows:
        w = r["workload"]
        if not r.get("ok"):
            continue
        it, p = r["iteration"], r["predicted"]
        lines.append(f"- **{w['name']} {w['dtype']} {_shape(w)}** (`{r['name']}`): tile loop "
                     f"{it['static_tile_loop']} instructions in SASS, inner loop found by "
                     f"{'its MMA' if it['inner_loop'] == 'mma' else 'its global loads (no MMA)'}"
                     + (f", chunk body {it['chunk_body']} x {w['chunks']}" if w["chunked"] else "")
                     + f"; {it['once_per_program']} once per program; MMA opcodes "
                     f"{', '.join(f'{k} x{v}' for k, v in it['mma_opcodes'].items()) or 'none'}; MMA FLOPs issued "
                     f"/ useful {p['mma_flops_over_useful']:.2f}; pipes FP32 {fmt_time(p['pipe_s']['fp32'])}, "
                     f"ALU {fmt_time(p['pipe_s']['alu'])}, MUFU {fmt_time(p['pipe_s']['mufu'])}; mm FLOPs "
                     f"{fmt_time(p['mm']['compute_s'])} (tf32 {fmt_time(p['mm']['tf32_s'])}), its N x K write "
                     f"{fmt_time(p['mm']['write_s'])}" + (f". {w['note']}" if w.get("note") else "")
                     + (f". ints at the report's assumption: {', '.join(r['assumed_ints'])}"
                        if r.get("assumed_ints") else ""))
        texts = r.get("line_text", {})
        top = list(it["lines"].items())[:TOP_LINES]
        by_file: dict[str, int] = {}
        for key, n in it["lines"].items():
            name = key.rpartition(":")[0].rsplit("/", 1)[-1]
            by_file[name] = by_file.get(name, 0) + n
        # tiles.py is the shared operand loads and dot, the kernel's own file its epilogue, standard.py
        # triton's reductions (tl.min, tl.argmin, tl.sum) called from it
        lines.append("  - per tile iteration by file: " + ", ".join(
            f"{name} {n}" for name, n in sorted(by_file.items(), key=lambda kv: -kv[1])))
        lines.append("  - per tile iteration by source line: " + "; ".join(
            f"{key} {n}" + (f" `{texts[key]}`" if texts.get(key) else "") for key, n in top))
    return "\n".join(lines) + "\n"


def _shape(w: dict[str, Any]) -> str:
    return f"N={w['n']} K={w['k']} D={w['d']}"




def findings(rows: list[dict[str, Any]]) -> list[str]:
    """What the table implies, in words: the rows whose bound is not their tensor-core time, idle SMs, MMAs
    issued beyond the useful work, a tensor-core dot without wgmma."""
    out = []
    for r in rows:
        if not r.get("ok"):
            continue
        w, p, it = r["workload"], r["predicted"], r["iteration"]
        tag = f"{w['name']} {w['dtype']} {_shape(w)}"
        if p["tensor_s"] and p["bound"] != "tensor":
            out.append(f"{tag}: {p['bound']}-bound, {p['bound_s'] / p['tensor_s']:.1f}x its tensor-core time "
                       f"({it['instructions']} instructions per tile iteration around {it['mma']} MMAs)")
        if p["sms_used"] < 0.9 * 132:
            out.append(f"{tag}: {w['programs']} programs keep {p['sms_used']:.0f} of 132 SMs busy")
        if p["mma_flops_over_useful"] > 1.05:
            # what the precision explains: tf32x3's three products; the rest is padding or recomputation
            expected = sum(dots * (3 if prec == "tf32x3" else 1) for prec, dots in w["work"].items()) \
                / sum(w["work"].values())
            why = []
            if expected > 1:
                why.append(f"tf32x3's three products explain {expected:.1f}x")
            if w["d"] % w["constexprs"].get("BLOCK_D", 1):
                why.append(f"D = {w['d']} is padded to BLOCK_D = {w['constexprs']['BLOCK_D']}")
            out.append(f"{tag}: the MMAs issue {p['mma_flops_over_useful']:.1f}x the useful FLOPs"
                       + (f" ({'; '.join(why)})" if why else ""))
        if r.get("spill_bytes"):
            out.append(f"{tag}: spills {r['spill_bytes']} bytes at {r['regs']} registers "
                       f"(BLOCK_D = {w['constexprs'].get('BLOCK_D')}, {r['num_warps']} warps)")
        if it["mma"] and not any(s.startswith("HGMMA") for s in it["mma_shapes"]):
            out.append(f"{tag}: mma.sync (HMMA), not wgmma")
    return out
