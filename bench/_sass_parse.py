"""Text analysis of one compiled kernel: its TTIR (what each global access moves) and its SASS (what the
hot path issues), and the H100 cost model that puts the two side by side. Pure functions on strings, no
triton or GPU needed, so the tests can feed them small hand-written listings.

Definitions the report relies on:

- Hot path. Loops are found in SASS as backward branches; a loop is hot when it contains a global load or
  store other than ``LDG.*.CONSTANT`` (the constant-table reads of libdevice's slow paths, e.g. sinf's
  Payne-Hanek reduction). With hot loops, the hot path is one iteration of each outermost hot loop;
  without, it is the whole body. Either way it is the *shortest* path through the forward-branch graph:
  a branch that skips a region (a slow path for huge or denormal arguments) is taken as skipping it.
  Predicated instructions count whether or not their predicate is true: they take an issue slot.
- Elements: the largest tile any global load or store of the kernel touches (E, from TTIR). Elements per
  thread = E / (32 num_warps); instructions per element = hot-path instructions / elements per thread.
- Bytes per element: the tile-shaped loads and stores of the hot region at their element size (masks
  taken as all-true; of a runtime ``if``, the heavier branch), divided by E. Scalar accesses (a seed, a
  per-program partial) and indexed accesses (addresses through a tensor division or remainder, a
  comparison used as a number, or loaded values: a broadcast operand, mostly cache hits, or a per-row
  partial) are left out: what remains is the minimal DRAM traffic of the op.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------------
# H100/H200 SXM model (predicted, not measured): the two share the SMs and clocks, not the memory
# --------------------------------------------------------------------------------------------------------

# a nominal device-to-device copy bandwidth, the default only: a GPU run's measured copy bandwidth replaces it
# (sass_report.py --copy-bandwidth), and the report says which it used
NOMINAL_DRAM_BYTES_PER_S = 3.0e12
H100 = {
    "sms": 132,
    "clock_hz": 1.98e9,
    "issue_per_sm_clk": 4.0,  # warp-instructions: one scheduler per SM sub-partition
    "dram_bytes_per_s": NOMINAL_DRAM_BYTES_PER_S,
    "dram_source": "nominal default, not measured",
    # warp-instructions per SM per clock of each pipe (32 lanes / lanes per clock per SM)
    "pipes": {"fma": 4.0, "imad": 2.0, "alu": 2.0, "xu": 0.5},
}

# --------------------------------------------------------------------------------------------------------
# opcode classes
# --------------------------------------------------------------------------------------------------------

CLASSES = ("int", "fp32", "mufu", "conv", "mem", "ctrl", "other")
_INT = {
    "IADD3", "IADD", "IADD32I", "IMAD", "IMUL", "IMUL32I", "ISCADD", "LEA", "LOP3", "LOP", "LOP32I", "SHF", "SHL",
    "SHR", "ISETP", "ISET", "ICMP", "IMNMX", "IABS", "SEL", "PRMT", "POPC", "FLO", "BREV", "BMSK", "SGXT", "BFE",
    "BFI", "IDP", "IDP4A", "VIADD", "VIADDMNMX", "VIMNMX", "VIMNMX3", "PLOP3", "P2R", "R2P", "VABSDIFF",
    "VABSDIFF4", "IMNMX3",
}
_FP = {
    "FFMA", "FFMA32I", "FMUL", "FMUL32I", "FADD", "FADD32I", "FMNMX", "FMNMX3", "FSETP", "FSET", "FSEL", "FCHK",
    "FSWZADD", "FFMA2", "FMUL2", "FADD2", "HFMA2", "HMUL2", "HADD2", "HSETP2", "HSET2", "HMNMX2",
}
_CONV = {"F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP", "FRND", "I2I", "I2IP"}
_MEM = {
    "LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "ATOM", "ATOMG", "ATOMS", "RED", "REDG", "LDGSTS",
    "LDGDEPBAR", "LDSM", "STSM", "STAS", "CCTL", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF",
}
_CTRL = {
    "BRA", "BRX", "BRXU", "JMP", "JMX", "EXIT", "RET", "CALL", "BSSY", "BSYNC", "BAR", "WARPSYNC", "YIELD",
    "NANOSLEEP", "BPT", "KILL", "BREAK", "DEPBAR", "ERRBAR", "MEMBAR", "ELECT", "BMOV", "ACQBULK", "ARRIVES",
    "SYNCS", "WARPGROUP", "FENCE",
}
# pipe of each issued instruction for the per-pipe bound (approximate: sm_80/sm_90 throughput tables)
_XU = {"MUFU", "F2F", "F2I", "I2F", "I2FP", "F2IP", "FRND", "I2I", "POPC", "FLO", "BREV"}
_FMA = {"FFMA", "FFMA32I", "FMUL", "FMUL32I", "FADD", "FADD32I", "HFMA2", "HMUL2", "HADD2", "FFMA2", "FMUL2",
        "FADD2"}
_IMAD = {"IMAD", "IMUL", "IMUL32I", "IDP", "IDP4A"}


def opcode_class(opcode: str) -> str:
    """Class of a SASS opcode (``IMAD.WIDE.U32`` -> ``int``); uniform-datapath (U*) ops are ``other``."""
    base = opcode.split(".", 1)[0]
    if base in _INT:
        return "int"
    if base in _FP:
        return "fp32"
    if base == "MUFU":
        return "mufu"
    if base in _CONV:
        return "conv"
    if base in _MEM:
        return "mem"
    if base in _CTRL:
        return "ctrl"
    return "other"


def opcode_pipe(opcode: str) -> str | None:
    """The throughput-limited pipe an instruction occupies, or None where the model leaves it out."""
    base = opcode.split(".", 1)[0]
    if base in _XU:
        return "xu"
    if base in _IMAD:
        return "imad"
    if base in _FMA:
        return "fma"
    if base in _INT or base in {"FSETP", "FSET", "FSEL", "FMNMX", "FMNMX3", "HSETP2", "HMNMX2", "MOV", "F2FP"}:
        return "alu"
    return None


def classify(opcodes: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for op in opcodes:
        counts[opcode_class(op)] += 1
    return counts


def access_width(opcode: str) -> int:
    """Bits per thread of a global load/store (``LDG.E.128`` -> 128, ``STG.E.U16`` -> 16, ``LDG.E`` -> 32)."""
    for mod in opcode.split(".")[1:]:
        if mod in ("128", "64"):
            return int(mod)
        if mod in ("U16", "S16"):
            return 16
        if mod in ("U8", "S8"):
            return 8
    return 32


# --------------------------------------------------------------------------------------------------------
# SASS
# --------------------------------------------------------------------------------------------------------

Frame = tuple[str, int]  # (file, line)


@dataclass
class Instr:
    addr: int
    pred: str | None  # "@!P5", or None
    opcode: str
    operands: str
    loc: tuple[Frame, ...] = ()  # innermost first
    target: int | None = None  # branch target address

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def conditional(self) -> bool:
        return self.pred is not None and self.pred not in ("@PT", "@UPT")


# modifiers may hold lower case: wgmma's shape, HGMMA.64x64x16.F32.BF16
_INSTR = re.compile(r"/\*([0-9a-fA-F]+)\*/\s*(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_FILE = re.compile(r'"([^"]+)", line (\d+)')  # File "a.py", line 44 inlined at "b.py", line 86
_TARGET = re.compile(r"`\((\.L\w+)\)")


def parse_sass(text: str) -> list[Instr]:
    """Instructions of an ``nvdisasm -c -gi`` listing (one kernel), with branch targets and source lines."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    loc: tuple[Frame, ...] = ()
    fresh_comment = False
    for line in text.splitlines():
        if "//##" in line:
            frames = tuple((f, int(n)) for f, n in _FILE.findall(line))
            # a block of //## lines: the first carries the whole inline chain, the rest repeat outer frames
            if not fresh_comment or len(frames) > len(loc):
                loc = frames
            fresh_comment = True
            continue
        m = _LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        fresh_comment = False
        addr = int(m.group(1), 16)
        for lab in pending_labels:
            labels[lab] = addr
        pending_labels = []
        pred = m.group(2).strip() if m.group(2) else None
        instrs.append(Instr(addr, pred, m.group(3), m.group(4).strip(), loc))
    for ins in instrs:
        t = _TARGET.search(ins.operands)
        if t and t.group(1) in labels:
            ins.target = labels[t.group(1)]
    return instrs


def _unconditional_end(ins: Instr) -> bool:
    return ins.base in ("BRA", "EXIT", "RET", "BRX", "JMP", "JMX", "KILL") and not ins.conditional


@dataclass
class Loop:
    head: int  # index of the first instruction
    latch: int  # index of the backward branch
    hot: bool


def find_loops(instrs: list[Instr]) -> list[Loop]:
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for j, ins in enumerate(instrs):
        if ins.base == "BRA" and ins.target is not None and ins.target <= ins.addr and ins.target in index:
            h = index[ins.target]
            if h == j:  # the `.L: BRA .L` trap after the last EXIT
                continue
            body = instrs[h:j + 1]
            hot = any(b.base in ("LDG", "STG", "ATOMG", "RED", "REDG", "LDGSTS") and ".CONSTANT" not in b.opcode
                      for b in body)
            loops.append(Loop(h, j, hot))
    return loops


def _shortest_path(instrs: list[Instr], start: int, stop: int | None, free: set[int]) -> list[int]:
    """Indices on the cheapest forward path from ``start`` to an unconditional EXIT (or to index ``stop``,
    inclusive), each instruction costing 1 unless in ``free``. Backward branches are not followed;
    a conditional EXIT is taken as falling through."""
    n = len(instrs)
    end = n if stop is None else stop + 1
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    inf = math.inf
    dist = [inf] * (end + 1)
    nxt: list[int | None] = [None] * (end + 1)
    for i in range(end - 1, start - 1, -1):
        ins = instrs[i]
        cost = 0 if i in free else 1
        if stop is not None and i == stop:
            dist[i], nxt[i] = cost, None
            continue
        if ins.base == "EXIT" and not ins.conditional and stop is None:
            dist[i], nxt[i] = cost, None
            continue
        succs = []
        if not _unconditional_end(ins) and i + 1 < end:
            succs.append(i + 1)
        if ins.base == "BRA" and ins.target is not None and ins.target > ins.addr:
            t = index.get(ins.target)
            if t is not None and t < end:
                succs.append(t)
        best = min(succs, key=lambda s: dist[s], default=None)
        if best is not None and dist[best] < inf:
            dist[i], nxt[i] = cost + dist[best], best
    if dist[start] == inf:
        return []
    path, i = [], start
    while i is not None:
        if i not in free:
            path.append(i)
        i = nxt[i]
    return path


@dataclass
class HotPath:
    mode: str  # "loop" (one iteration of the hot loops) or "body"
    instrs: list[Instr]
    rest: list[Instr]  # outside the hot loops, once per program (empty in body mode)
    loops: list[Loop] = field(default_factory=list)


def hot_path(instrs: list[Instr]) -> HotPath:
    loops = find_loops(instrs)
    hot = [lp for lp in loops if lp.hot]
    # outermost hot loops only
    hot = [lp for lp in hot if not any(o is not lp and o.head <= lp.head and lp.latch <= o.latch for o in hot)]
    if not hot:
        return HotPath("body", [instrs[i] for i in _shortest_path(instrs, 0, None, set())], [], loops)
    in_loops = {i for lp in hot for i in range(lp.head, lp.latch + 1)}
    body = [instrs[i] for lp in hot for i in _shortest_path(instrs, lp.head, lp.latch, set())]
    rest = [instrs[i] for i in _shortest_path(instrs, 0, None, in_loops)]
    return HotPath("loop", body, rest, loops)


def global_accesses(instrs: list[Instr]) -> list[Instr]:
    return [i for i in instrs if i.base in ("LDG", "STG", "ATOMG", "RED", "REDG")]


def local_instructions(instrs: list[Instr]) -> int:
    """Local-memory loads and stores: register spills, or a local array (libdevice's sinf slow path)."""
    return sum(1 for i in instrs if i.base in ("LDL", "STL"))


def parse_resource_usage(text: str) -> dict[str, int]:
    """``cuobjdump -res-usage``: {'REG': 53, 'STACK': 0, 'SHARED': 1024, 'LOCAL': 0, ...} of the kernel."""
    for line in text.splitlines():
        if "REG:" in line:
            return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return {}


# --------------------------------------------------------------------------------------------------------
# TTIR
# --------------------------------------------------------------------------------------------------------

_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)\s*$")
_DEF = re.compile(r"^\s*((?:%[\w.$-]+(?::\d+)?)(?:\s*,\s*%[\w.$-]+)*)\s*=\s*(\"?[\w.]+\"?)(.*)$")
_VALUE = re.compile(r"%[\w.$-]+")
_DIV_OPS = {"arith.divsi", "arith.divui", "arith.remsi", "arith.remui", "arith.floordivsi", "arith.ceildivsi",
            "arith.ceildivui"}
_ELEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1}


@dataclass
class Access:
    op: str  # "load" | "store" | "atomic"
    elem: str  # f32, bf16, ...
    shape: tuple[int, ...]  # () for a scalar access
    loc: tuple[Frame, ...]
    in_loop: bool
    indexed: bool
    branch: tuple[tuple[int, int], ...] = ()  # (scf.if number, 0 then / 1 else) of each enclosing runtime if

    @property
    def elements(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def tile_bytes(self) -> int:
        return self.elements * _ELEM_BYTES.get(self.elem, 4) if self.shape else 0


@dataclass
class TTIR:
    accesses: list[Access]
    has_program_id: bool
    loops: int


def _split_loc(s: str) -> str:
    """The argument of the trailing ``loc(...)`` of an op line, or ''."""
    k = s.rfind(" loc(")
    if k < 0:
        return ""
    depth, start = 0, k + 5
    for i in range(start - 1, len(s)):
        if s[i] == "(":
            depth += 1
        elif s[i] == ")":
            depth -= 1
            if depth == 0:
                return s[start:i]
    return ""


def _resolve(expr: str, aliases: dict[str, str], depth: int = 0) -> tuple[Frame, ...]:
    expr = expr.strip()
    if depth > 64 or not expr or expr == "unknown":
        return ()
    if expr.startswith("#loc"):
        return _resolve(aliases.get(expr, ""), aliases, depth + 1)
    m = re.match(r'^"([^"]+)":(\d+):\d+', expr)
    if m:
        return ((m.group(1), int(m.group(2))),)
    if expr.startswith("callsite("):
        inner = expr[len("callsite("):-1]
        callee, _, caller = inner.partition(" at ")
        return _resolve(callee, aliases, depth + 1) + _resolve(caller, aliases, depth + 1)
    m = re.match(r'^"[^"]*"\((.*)\)$', expr)  # a named location
    if m:
        return _resolve(m.group(1), aliases, depth + 1)
    if expr.startswith("fused"):
        parts = re.findall(r"#loc\d*|\"[^\"]+\":\d+:\d+", expr)
        return _resolve(parts[0], aliases, depth + 1) if parts else ()
    return ()


def _ptr_type(line: str) -> tuple[str, tuple[int, ...]] | None:
    """(element type, shape) of the pointer operand type of a load/store line."""
    m = re.search(r"tensor<((?:\d+x)+)!tt\.ptr<(\w+)>", line)
    if m:
        return m.group(2), tuple(int(d) for d in m.group(1).rstrip("x").split("x"))
    m = re.search(r":\s*!tt\.ptr<(\w+)>", line)
    if m:
        return m.group(1), ()
    return None


def parse_ttir(text: str) -> TTIR:
    lines = text.splitlines()
    aliases = {}
    for line in lines:
        m = _LOC_DEF.match(line)
        if m:
            aliases[m.group(1)] = m.group(2)
    defs: dict[str, tuple[str, list[str], bool]] = {}  # value -> (op, operands, tensor-typed)
    stack: list[tuple[str, int, int]] = []  # (op, scf.if number, branch) of each open region
    ifs = 0
    accesses: list[Access] = []
    has_pid = False
    loops = 0
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#loc") or line.startswith("module"):
            continue
        if line.startswith("}"):
            top = stack.pop() if stack else ("", 0, 0)
            if line.rstrip().endswith("{"):  # } else {
                stack.append(("scf.if", top[1], 1))
            continue
        m = _DEF.match(line)
        op = m.group(2).strip('"') if m else line.split(" ", 1)[0].strip('"')
        body = m.group(3) if m else line[len(op):]
        if m:
            results = _VALUE.findall(m.group(1))
            operands = _VALUE.findall(body.split(" loc(")[0])
            types = body.split(" loc(")[0].rsplit(":", 1)[-1]
            tensor = " tensor<" in types or "-> tensor<" in body
            if op in ("arith.extui", "arith.extsi") and re.search(r"tensor<[\dx]*xi1>", types):
                op = "bool_to_int"  # a comparison turned into an offset: a row index, not a contiguous one
            for r in results:
                defs[r] = (op, operands, tensor)
        if op == "tt.get_program_id":
            has_pid = True
        if op in ("scf.for", "scf.while"):
            loops += 1
            # iter_args(%a = %init, ...): trace a loop-carried value to its initial value
            for arg, init in re.findall(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)", line.split("iter_args", 1)[-1]):
                defs.setdefault(arg, ("iter_arg", [init], False))
        if op in ("tt.load", "tt.store", "tt.atomic_rmw", "tt.atomic_cas"):
            ptr_t = _ptr_type(line)
            operands = _VALUE.findall(body.split(" loc(")[0])
            if ptr_t and operands:
                ptr = operands[0] if op != "tt.atomic_rmw" else operands[0]
                accesses.append(Access(
                    op={"tt.load": "load", "tt.store": "store"}.get(op, "atomic"),
                    elem=ptr_t[0], shape=ptr_t[1],
                    loc=_resolve(_split_loc(line), aliases),
                    in_loop=any(s[0] in ("scf.for", "scf.while") for s in stack),
                    indexed=_indexed(ptr, defs),
                    branch=tuple((s[1], s[2]) for s in stack if s[0] == "scf.if"),
                ))
        if line.endswith("{"):
            if op == "scf.if":
                ifs += 1
            stack.append((op, ifs, 0))
    return TTIR(accesses, has_pid, loops)


def region_bytes(accesses: list[Access], depth: int = 0) -> int:
    """Tile bytes of one pass through a region: an access outside any runtime ``if`` counts once, the
    branches of an ``if`` count as their heavier one (a full-tile path and a bounds-checked tail path are
    alternatives, not both run)."""
    total = sum(a.tile_bytes for a in accesses if len(a.branch) == depth)
    nested: dict[int, dict[int, list[Access]]] = {}
    for a in accesses:
        if len(a.branch) > depth:
            if_id, side = a.branch[depth]
            nested.setdefault(if_id, {}).setdefault(side, []).append(a)
    for sides in nested.values():
        total += max(region_bytes(accs, depth + 1) for accs in sides.values())
    return total


def _indexed(ptr: str, defs: dict[str, tuple[str, list[str], bool]]) -> bool:
    """Whether an address depends on a tensor division or remainder, a comparison used as a number, or loaded
    values: a gather, a broadcast operand, or a per-row slot, not a contiguous tile."""
    seen, todo = set(), [ptr]
    while todo and len(seen) < 2000:
        v = todo.pop()
        if v in seen or v not in defs:
            continue
        seen.add(v)
        op, operands, tensor = defs[v]
        if (op in _DIV_OPS and tensor) or op in ("tt.load", "tt.gather", "bool_to_int"):
            return True
        todo.extend(operands)
    return False


# --------------------------------------------------------------------------------------------------------
# LLIR: the width of each global access, at its source line
# --------------------------------------------------------------------------------------------------------
# The SASS line table cannot place vector accesses: the inline asm of a masked vector load is printed with
# one `.loc` per line of its asm string, so an LDG.E.128 lands three source lines below its tl.load. The
# LLVM IR's !dbg of the asm call is exact, and ptxas keeps the vector width the PTX asks for.

_ASM_ACCESS = re.compile(r"(?<![A-Za-z.])(ld|st|atom|red)\.global[\w:.]*?((?:\.v[248])?)\.([bfsu])(8|16|32|64|128)\b")
_LL_ACCESS = re.compile(r"=?\s*(load|store)\s+(?:volatile\s+)?(<(\d+) x (\w+)>|\w+)[^!]*addrspace\(1\)")
_LL_BITS = {"i8": 8, "i16": 16, "half": 16, "bfloat": 16, "i32": 32, "float": 32, "i64": 64, "double": 64,
            "ptr": 64, "i1": 8}


def _ll_locations(lines: list[str]) -> dict[str, tuple[Frame, ...]]:
    meta = {}
    for line in lines:
        m = re.match(r"^(![0-9]+) = (?:distinct )?(!\w+)\((.*)\)\s*$", line)
        if m:
            meta[m.group(1)] = (m.group(2), m.group(3))

    def field_of(body: str, name: str) -> str | None:
        f = re.search(rf"\b{name}: (\"[^\"]*\"|![0-9]+|\d+)", body)
        return f.group(1) if f else None

    def file_of(ref: str | None, depth: int = 0) -> str:
        if ref is None or ref not in meta or depth > 32:
            return "?"
        kind, body = meta[ref]
        if kind == "!DIFile":
            name, directory = field_of(body, "filename"), field_of(body, "directory")
            name = name.strip('"') if name else "?"
            return name if name.startswith("/") or not directory else f"{directory.strip(chr(34))}/{name}"
        return file_of(field_of(body, "file") or field_of(body, "scope"), depth + 1)

    cache: dict[str, tuple[Frame, ...]] = {}

    def chain(ref: str, depth: int = 0) -> tuple[Frame, ...]:
        if ref in cache:
            return cache[ref]
        if ref not in meta or meta[ref][0] != "!DILocation" or depth > 64:
            return ()
        body = meta[ref][1]
        frame = (file_of(field_of(body, "scope")), int(field_of(body, "line") or 0))
        inl = field_of(body, "inlinedAt")
        cache[ref] = (frame,) + (chain(inl, depth + 1) if inl else ())
        return cache[ref]

    return {ref: chain(ref) for ref, (kind, _) in meta.items() if kind == "!DILocation"}


def llir_access_widths(text: str) -> list[tuple[str, int, tuple[Frame, ...]]]:
    """(op, bits per thread, source frames innermost first) of every global access instruction of the LLIR."""
    lines = text.splitlines()
    locs = _ll_locations(lines)
    out = []
    for line in lines:
        dbg = re.search(r"!dbg (![0-9]+)", line)
        loc = locs.get(dbg.group(1), ()) if dbg else ()
        if " asm " in line:
            for op, vec, _, bits in _ASM_ACCESS.findall(line.split(", !dbg")[0]):
                n = int(vec[2:]) if vec else 1
                out.append(({"ld": "load", "st": "store"}.get(op, "atomic"), n * int(bits), loc))
            continue
        m = _LL_ACCESS.search(line)
        if m:
            n, t = (int(m.group(3)), m.group(4)) if m.group(3) else (1, m.group(2))
            if t in _LL_BITS:
                out.append((m.group(1), n * _LL_BITS[t], loc))
    return out


# --------------------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------------------


def predict(path_opcodes: list[str], elements_per_thread: float, bytes_per_element: float,
            model: dict[str, Any] = H100) -> dict[str, Any]:
    """Issue-limited, busiest-pipe and DRAM time per element (picoseconds) of a hot path on ``model``."""
    per_elem = len(path_opcodes) / elements_per_thread  # thread instructions per element
    sm_clk = model["sms"] * model["clock_hz"]
    issue_ps = per_elem / 32 / (sm_clk * model["issue_per_sm_clk"]) * 1e12
    pipes: dict[str, float] = dict.fromkeys(model["pipes"], 0.0)
    for op in path_opcodes:
        p = opcode_pipe(op)
        if p is not None:
            pipes[p] += 1
    pipe_ps = {p: c / elements_per_thread / 32 / (sm_clk * model["pipes"][p]) * 1e12 for p, c in pipes.items()}
    # IMAD runs on the FMA-heavy half of the FMA pipe: FP32 work and IMAD share its rate
    pipe_ps["fma"] = (pipes["fma"] + pipes["imad"]) / elements_per_thread / 32 / (sm_clk * model["pipes"]["fma"]) \
        * 1e12
    busiest = max(pipe_ps, key=pipe_ps.get)
    dram_ps = bytes_per_element / model["dram_bytes_per_s"] * 1e12
    return {
        "instr_per_element": per_elem,
        "issue_ps_per_element": issue_ps,
        "pipe_ps_per_element": pipe_ps,
        "busiest_pipe": busiest,
        "dram_ps_per_element": dram_ps,
        "issue_over_dram": issue_ps / dram_ps if dram_ps else None,
        "pipe_over_dram": pipe_ps[busiest] / dram_ps if dram_ps else None,
        "bound": max((("issue", issue_ps), (f"pipe:{busiest}", pipe_ps[busiest]), ("dram", dram_ps)),
                     key=lambda kv: kv[1])[0],
    }


def parse_ptxas_log(text: str) -> dict[str, int]:
    """Spill bytes and stack frame of a ``ptxas -v`` log, summed over the functions it lists (a kernel and
    any subroutine it calls). A stack frame alone is not a spill: libdevice's sinf slow path keeps a small
    local array there."""
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.findall(r"Used (\d+) registers", text)
    return {
        "stack_frame": max((int(f[0]) for f in frames), default=0),
        "spill_stores": sum(int(f[1]) for f in frames),
        "spill_loads": sum(int(f[2]) for f in frames),
        "ptxas_regs": max((int(r) for r in regs), default=0),
        "ptxas_reported": bool(frames),
    }


def resources(res_text: str, ptxas_text: str) -> dict[str, Any]:
    """Registers, local memory, stack and spills of a kernel from cuobjdump and ptxas; spills as ptxas
    counts them, or any local memory when there is no ptxas log to read."""
    res = parse_resource_usage(res_text)
    log = parse_ptxas_log(ptxas_text)
    spill_bytes = log["spill_stores"] + log["spill_loads"] if log["ptxas_reported"] else res.get("LOCAL", 0)
    return {
        "regs": res.get("REG", log["ptxas_regs"]),
        "local_bytes": res.get("LOCAL", 0),
        "stack_bytes": max(res.get("STACK", 0), log["stack_frame"]),
        "spill_bytes": spill_bytes,
        "spills": spill_bytes > 0,
    }


def _short(frame: Frame) -> str:
    return f"{frame[0].rsplit('/', 1)[-1]}:{frame[1]}"


def analyze(ttir_text: str, llir_text: str, sass_text: str, res: dict[str, Any], num_warps: int,
            model: dict[str, Any] = H100) -> dict[str, Any]:
    """Everything the report shows about one compiled specialization (see the module docstring)."""
    ttir = parse_ttir(ttir_text)
    instrs = parse_sass(sass_text)
    hp = hot_path(instrs)
    elements = max((a.elements for a in ttir.accesses if a.shape), default=1)
    ept = elements / (32 * num_warps)

    # widths of each access from the LLIR (exact lines); SASS histograms as the cross-check
    by_line: dict[tuple[str, Frame], dict[str, int]] = {}
    for op, bits, loc in llir_access_widths(llir_text):
        if loc:
            hist = by_line.setdefault((op, loc[0]), {})
            hist[str(bits)] = hist.get(str(bits), 0) + 1
    widths: dict[str, dict[str, int]] = {}
    for ins in global_accesses(instrs):
        w = str(access_width(ins.opcode))
        widths.setdefault(ins.base, {}).setdefault(w, 0)
        widths[ins.base][w] += 1
    accesses = []
    for a in ttir.accesses:
        accesses.append({
            "op": a.op, "dtype": a.elem, "tile": list(a.shape), "line": _short(a.loc[0]) if a.loc else "?",
            "kind": "scalar" if not a.shape else ("indexed" if a.indexed else "tile"),
            "in_loop": a.in_loop, "widths": by_line.get((a.op, a.loc[0]), {}) if a.loc else {},
        })
    counted = [a for a in ttir.accesses if a.shape and not a.indexed]
    if hp.mode == "loop" and any(a.in_loop for a in counted):
        counted = [a for a in counted if a.in_loop]
    bytes_per_element = region_bytes(counted) / elements

    opcodes = [i.opcode for i in hp.instrs]
    counts = classify(opcodes)
    out = {
        **res,
        "local_instructions": local_instructions(instrs),
        "elements_per_program": elements,
        "elements_per_thread": ept,
        "single_program": not ttir.has_program_id,
        "accesses": accesses,
        "global_widths": widths,
        "tile_widths": sorted({int(w) for a in accesses if a["kind"] == "tile" for w in a["widths"]}),
        "hot_path": {
            "mode": hp.mode,
            "instructions": len(hp.instrs),
            "once_per_program": len(hp.rest),
            "per_element": {c: n / ept for c, n in counts.items()},
            "sass_instructions_total": len(instrs),
        },
        "bytes_per_element": bytes_per_element,
    }
    out["predicted"] = None if ttir.has_program_id is False else predict(opcodes, ept, bytes_per_element, model)
    return out
