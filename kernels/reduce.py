"""Deterministic reductions and the backward of the losses whose gradient the forward already wrote.

Every fused loss kernel reduces its tile to fp32 partials instead of using float atomics, so a result never
depends on the order programs run in:

- a full reduction (sum / mean / batchmean) writes one partial per program, summed in a fixed order by
  ``sum_partials_kernel`` (reads 4 P bytes, writes one element);
- a per-row reduction (``reduction="per_sample"``: the sum over every dim but the first, a row of
  ``row_len`` elements per sample) writes one partial per (program, row) pair that meet. Segments are
  numbered in memory order, so the segment of program p in row r is slot p + r (a new segment starts at
  every program boundary and at every row boundary): P + R slots, no N-sized intermediate, and row r's
  slots are the contiguous range [p_first(r) + r, p_last(r) + r], summed by ``sum_row_partials_kernel``.

Tiles are laid out in memory order, BLOCK elements from program_id * BLOCK; ``row_col`` gives each element
its row and column without a 64-bit division per element (rows at least BLOCK long meet a tile at most
twice; shorter rows fit 32-bit arithmetic).
"""

import triton
import triton.language as tl

# interpreter_safe_loops: a loop over a runtime bound here is a `while`, not `for ... in range(0, n, STEP)`. Under
# TRITON_INTERPRET=1, triton 3.3 to 3.6 at least (the declared floor is 3.3) hands a kernel's integer argument
# over as a 1-element numpy array and range() takes it through int(), which numpy >= 2.4 rejects ("only
# 0-dimensional arrays can be converted to Python scalars"); a `while` condition goes through bool(), which
# numpy still allows. Compiled, it is an scf.while where range() gave an scf.for: no software pipelining of
# the loads, which these loops (one to a few passes a launch, after the loss kernel) do not need; every
# recorded specialization of them compiles for sm_90 without spills under triton 3.6 and 3.9.
# ci/interpreter_smoke.py runs them on the floor's triton with the newest numpy.

# GO_MODE: the shape of the grad_output that scales a forward-written gradient
GO_SCALAR = tl.constexpr(0)  # a full reduction: one value
GO_ELEMENTWISE = tl.constexpr(1)  # reduction="none": one value per element
GO_ROWS = tl.constexpr(2)  # reduction="per_sample": one value per row


@triton.jit
def row_col(pid, row_len, BLOCK: tl.constexpr, LONG_ROWS: tl.constexpr):
    """(row, column) of each of this program's BLOCK elements, in memory order (1-D, int64 rows)."""
    start = pid.to(tl.int64) * BLOCK
    r0 = start // row_len
    c0 = start - r0 * row_len
    i = tl.arange(0, BLOCK)
    if LONG_ROWS:  # row_len >= BLOCK: the tile wraps into the next row at most once
        col = c0 + i
        wrap = col >= row_len
        return r0 + wrap.to(tl.int64), tl.where(wrap, col - row_len, col)
    else:  # row_len < BLOCK: loc = c0 + i < 2 * BLOCK
        loc = c0.to(tl.int32) + i
        # loc // row_len through fp32, exact here: (loc + 1/2) / row_len is at least 1/(2 row_len) from an
        # integer and below 2 BLOCK / row_len, where the two roundings err by ~2^-21 BLOCK / row_len; about
        # a fifth of the instructions of an integer division an element (the reciprocal is one a program)
        q = ((loc.to(tl.float32) + 0.5) * (1.0 / row_len)).to(tl.int32)
        return r0 + q.to(tl.int64), (loc - q * row_len).to(tl.int64)


@triton.jit
def _segmented_add(a, a_start, b, b_start):
    # b follows a in memory; a sum restarts where b begins a segment
    return tl.where(b_start != 0, b, a + b), a_start | b_start


@triton.jit
def store_partials(x, mask, partial_ptr, pid, row_len,
                   PER_ROW: tl.constexpr, BLOCK: tl.constexpr, LONG_ROWS: tl.constexpr):
    """Reduce this program's values ``x`` (any tile shape of BLOCK elements in memory order) to fp32
    partials: one at slot pid, or with PER_ROW one per row segment at slot pid + row."""
    x = tl.reshape(tl.where(mask, x, 0.0).to(tl.float32), [BLOCK])
    if PER_ROW and LONG_ROWS:  # at most two segments: row r0 up to the wrap, then row r0 + 1
        start = pid.to(tl.int64) * BLOCK
        r0 = start // row_len
        wrap = (start - r0 * row_len) + tl.arange(0, BLOCK) >= row_len
        second = tl.max((tl.reshape(mask, [BLOCK]) & wrap).to(tl.int32), axis=0)
        tl.store(partial_ptr + pid + r0, tl.sum(tl.where(wrap, 0.0, x), axis=0))
        tl.store(partial_ptr + pid + r0 + 1, tl.sum(tl.where(wrap, x, 0.0), axis=0), mask=second != 0)
    elif PER_ROW:
        valid = tl.reshape(mask, [BLOCK])
        row, col = row_col(pid, row_len, BLOCK, LONG_ROWS)
        i = tl.arange(0, BLOCK)
        begins = ((col == 0) | (i == 0)).to(tl.int32)
        seg, _ = tl.associative_scan((x, begins), 0, _segmented_add)
        ends = valid & ((col == row_len - 1) | (i == BLOCK - 1))
        tl.store(partial_ptr + pid + row, seg, mask=ends)
    else:
        tl.store(partial_ptr + pid, tl.sum(x, axis=0))


@triton.jit
def store_loss(loss, mask, loss_ptr, offs, pid, row_len,
               REDUCE: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr, LONG_ROWS: tl.constexpr):
    """A loss kernel's output: per element at ``offs`` in loss_ptr's dtype, or with REDUCE its fp32 partials
    (``store_partials``)."""
    if REDUCE:
        store_partials(loss, mask, loss_ptr, pid, row_len, PER_ROW, BLOCK, LONG_ROWS)
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sum_partials_kernel(partial_ptr, out_ptr, n_partials, scale, BLOCK: tl.constexpr):
    """out = scale * sum_p partial[p], in a fixed order, by one program."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < n_partials:  # not range(): see interpreter_safe_loops above
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
        start += BLOCK
    tl.store(out_ptr, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty))


@triton.jit
def sum_row_partials_kernel(partial_ptr, out_ptr, n_rows, row_len, tile, max_segments, scale,
                            rows_per_set, set_stride, ROWS: tl.constexpr, SEGMENTS: tl.constexpr):
    """out[q] = scale * sum of row q's segment partials (slots p + r for the programs p of tile size ``tile``
    that row r meets). Rows come in sets of ``rows_per_set`` (one set per sample drawn, each set's slots
    ``set_stride`` apart; a single set otherwise). Reads 4 (P + R) bytes a set, writes R elements."""
    q = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = q < n_rows
    s = q // rows_per_set
    r = q - s * rows_per_set
    first = s * set_stride + r * row_len // tile + r
    last = s * set_stride + ((r + 1) * row_len - 1) // tile + r
    acc = tl.zeros([ROWS], dtype=tl.float32)
    j = 0
    while j < max_segments:  # not range(): see interpreter_safe_loops above
        slot = first[:, None] + j + tl.arange(0, SEGMENTS)[None, :]
        m = live[:, None] & (slot <= last[:, None])
        acc += tl.sum(tl.load(partial_ptr + slot, mask=m, other=0.0), axis=1)
        j += SEGMENTS
    tl.store(out_ptr + q, (acc * scale).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def scale_grad_kernel(grad_ptr, out_ptr, grad_out_ptr, n, row_len,
                      GO_MODE: tl.constexpr, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr,
                      LONG_ROWS: tl.constexpr):
    """out = grad * grad_out, with grad_out broadcast by GO_MODE: the backward of a loss whose gradient the
    forward already wrote (scaled by the reduction).

    In place with a scalar grad_out that is exactly 1.0 (the usual ``loss.backward()``) every load and store is
    masked off, so the common backward moves no tensor-sized bytes and never syncs with the host to find out.
    Otherwise: reads N grad elements (+N or R grad_out elements), writes N in out's dtype: out-of-place is how
    a gradient kept in fp32 for a 16-bit input comes back in the input's dtype.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if GO_MODE == GO_ELEMENTWISE:
        go = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif GO_MODE == GO_ROWS:
        row, _ = row_col(pid, row_len, BLOCK, LONG_ROWS)
        go = tl.load(grad_out_ptr + row, mask=mask, other=0.0).to(tl.float32)
    else:
        go = tl.load(grad_out_ptr).to(tl.float32)
        if IN_PLACE:
            mask = offs < tl.where(go != 1.0, n, 0)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=mask)
