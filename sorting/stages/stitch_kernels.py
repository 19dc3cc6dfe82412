"""Compiled kernels of the streaming stitcher (:mod:`sorting.stages.stitch`): horizontal runs of
foreground followed across lines, open particles as rows of an int64 table, their runs as
linked lists, masks built once when a particle is emitted.

The kernels reproduce the rules the stitcher had when it labelled each chunk with OpenCV
(``CCL_GRANA``) together with the previous chunk's last line, including the order in which
particles are numbered and merged, because that order decides the order of emission:

- a chunk's components are ranked like OpenCV's labels: by the first 2 x 2 block of the
  (previous line + chunk) buffer, padded by one column each side, that holds a pixel;
- open particles meeting a component are merged in (rank, particle number) order, the
  first one met keeping its number; components without an open particle get new numbers
  in rank order;
- a component's columns include those of its pixels on the previous line (so after a
  ``too_long`` emission the fresh continuation's box may be wider than its pixels).
"""
from __future__ import annotations

import numba
import numpy as np

from sorting.stages.concavity import bound_clears_gate, defect_depth_bound_rows
from sorting.stages.particles import is_speck

#: the speck rule, compiled from its one definition
_is_speck = numba.njit(cache=True, nogil=True, inline="always")(is_speck)

# particle table columns (one row per slot; PID 0 = free slot, HEAD then links free slots)
PID, LINE0, LINE1, COL0, COL1, AREA, SUM_LINE, SUM_COL, CUT, TOO_LONG, HEAD, TAIL, ALIAS, MARK = range(14)
N_PART_COLS = 14
# run table columns: absolute line, first and last column, next run of the list (-1: end)
R_LINE, R_C0, R_C1, R_NEXT = range(4)
# scalars: runs on the previous line, next particle number, first line after a (re)start,
# free-list heads and sizes, capacity requests
S_NPREV, S_NEXT_PID, S_START, S_FREE_SLOT, S_FREE_RUN, S_NFREE_SLOT, S_NFREE_RUN, S_NEED_SLOTS, S_NEED_RUNS = range(9)
N_SCALARS = 9
# emitted table columns (E_OFFSET: of the mask in the flat buffer, -1 for a speck; E_EDGE: the
# particle reaches the first or last detector column)
E_LINE0, E_LINE1, E_COL0, E_COL1, E_AREA, E_SUM_LINE, E_SUM_COL, E_CUT, E_TOO_LONG, E_OFFSET, E_KIND, E_EDGE, \
    E_HEAD = range(13)
N_EMIT_COLS = 13
# what an emitted particle needs next (E_KIND): nothing (a speck, dropped), nothing but its
# record (one particle: the gate is off, it is too long, or the concavity bound clears it), or
# the full touching-rock gate of :func:`sorting.stages.split.pieces`
KIND_SPECK, KIND_WHOLE, KIND_GATE = range(3)
# the gate's settings (float64 array): split_touching (0/1), pixel area mm2, min_area_mm2,
# larger pitch mm, gate threshold mm (0.75 split_depth_mm), detector columns
G_SPLIT, G_PIXEL_AREA, G_MIN_AREA, G_PITCH, G_DEPTH, G_PIXELS = range(6)
N_GATE = 6

BIG = 1 << 62


@numba.njit(cache=True, nogil=True)
def reset_state(parts, runs, sc):
    """Every slot and run free, no previous line, particle numbers from 1."""
    n_slots, n_runs = parts.shape[0], runs.shape[0]
    for s in range(n_slots):
        parts[s, PID] = 0
        parts[s, HEAD] = s + 1 if s + 1 < n_slots else -1
    for i in range(n_runs):
        runs[i, R_NEXT] = i + 1 if i + 1 < n_runs else -1
    sc[:] = 0
    sc[S_NEXT_PID] = 1
    sc[S_FREE_SLOT] = 0 if n_slots else -1
    sc[S_FREE_RUN] = 0 if n_runs else -1
    sc[S_NFREE_SLOT] = n_slots
    sc[S_NFREE_RUN] = n_runs


@numba.njit(cache=True, nogil=True, inline="always")
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True, inline="always")
def _resolve(parts, s):
    while parts[s, ALIAS] >= 0:
        s = parts[s, ALIAS]
    return s


@numba.njit(cache=True, nogil=True)
def _alloc_slot(parts, sc, pid):
    s = sc[S_FREE_SLOT]
    sc[S_FREE_SLOT] = parts[s, HEAD]
    sc[S_NFREE_SLOT] -= 1
    _fresh(parts, s, pid, 0)
    return s


@numba.njit(cache=True, nogil=True)
def _fresh(parts, s, pid, too_long):
    parts[s, PID] = pid
    parts[s, LINE0] = BIG
    parts[s, COL0] = BIG
    parts[s, LINE1] = -1
    parts[s, COL1] = -1
    parts[s, AREA] = 0
    parts[s, SUM_LINE] = 0
    parts[s, SUM_COL] = 0
    parts[s, CUT] = 0
    parts[s, TOO_LONG] = too_long
    parts[s, HEAD] = -1
    parts[s, TAIL] = -1
    parts[s, ALIAS] = -1
    parts[s, MARK] = 0


@numba.njit(cache=True, nogil=True)
def _free_slot(parts, sc, s):
    parts[s, PID] = 0
    parts[s, HEAD] = sc[S_FREE_SLOT]
    sc[S_FREE_SLOT] = s
    sc[S_NFREE_SLOT] += 1


@numba.njit(cache=True, nogil=True)
def _append_run(parts, runs, sc, s, line, c0, c1):
    i = sc[S_FREE_RUN]
    sc[S_FREE_RUN] = runs[i, R_NEXT]
    sc[S_NFREE_RUN] -= 1
    runs[i, R_LINE] = line
    runs[i, R_C0] = c0
    runs[i, R_C1] = c1
    runs[i, R_NEXT] = -1
    if parts[s, TAIL] < 0:
        parts[s, HEAD] = i
    else:
        runs[parts[s, TAIL], R_NEXT] = i
    parts[s, TAIL] = i


@numba.njit(cache=True, nogil=True)
def _absorb(parts, runs, keep, gone):
    parts[keep, LINE0] = min(parts[keep, LINE0], parts[gone, LINE0])
    parts[keep, LINE1] = max(parts[keep, LINE1], parts[gone, LINE1])
    parts[keep, COL0] = min(parts[keep, COL0], parts[gone, COL0])
    parts[keep, COL1] = max(parts[keep, COL1], parts[gone, COL1])
    parts[keep, AREA] += parts[gone, AREA]
    parts[keep, SUM_LINE] += parts[gone, SUM_LINE]
    parts[keep, SUM_COL] += parts[gone, SUM_COL]
    parts[keep, CUT] |= parts[gone, CUT]
    parts[keep, TOO_LONG] |= parts[gone, TOO_LONG]
    if parts[gone, HEAD] >= 0:
        if parts[keep, TAIL] < 0:
            parts[keep, HEAD] = parts[gone, HEAD]
        else:
            runs[parts[keep, TAIL], R_NEXT] = parts[gone, HEAD]
        parts[keep, TAIL] = parts[gone, TAIL]
    parts[gone, HEAD] = -1
    parts[gone, TAIL] = -1


@numba.njit(cache=True, nogil=True)
def _sort_by_box(parts, slots, n):
    """Insertion sort of slots[:n] by (line0, col0, particle number): few per chunk."""
    for i in range(1, n):
        s = slots[i]
        j = i - 1
        while j >= 0:
            t = slots[j]
            if (parts[t, LINE0], parts[t, COL0], parts[t, PID]) <= (parts[s, LINE0], parts[s, COL0], parts[s, PID]):
                break
            slots[j + 1] = t
            j -= 1
        slots[j + 1] = s


@numba.njit(cache=True, nogil=True)
def _emit_row(parts, s, cut, emit, k):
    emit[k, E_LINE0] = parts[s, LINE0]
    emit[k, E_LINE1] = parts[s, LINE1]
    emit[k, E_COL0] = parts[s, COL0]
    emit[k, E_COL1] = parts[s, COL1]
    emit[k, E_AREA] = parts[s, AREA]
    emit[k, E_SUM_LINE] = parts[s, SUM_LINE]
    emit[k, E_SUM_COL] = parts[s, SUM_COL]
    emit[k, E_CUT] = cut
    emit[k, E_TOO_LONG] = parts[s, TOO_LONG]
    emit[k, E_HEAD] = parts[s, HEAD]


@numba.njit(cache=True, nogil=True)
def _finish(runs, sc, emit, n_emit, gate):
    """Each emitted particle's kind (speck, whole, or for the full gate) and its mask from its
    runs, into one flat buffer (offsets in E_OFFSET; specks get none); the runs go back to the
    free list. The concavity bound is read off the runs: the same value
    :func:`sorting.stages.concavity.defect_depth_bound_px` gives on the mask, and the same test as
    :func:`sorting.stages.split._surely_shallow`."""
    split = gate[G_SPLIT] != 0
    pixels = int(gate[G_PIXELS])
    total = 0
    for k in range(n_emit):
        emit[k, E_EDGE] = emit[k, E_COL0] == 0 or emit[k, E_COL1] + 1 == pixels
        if _is_speck(emit[k, E_AREA], gate[G_PIXEL_AREA], gate[G_MIN_AREA]):
            emit[k, E_KIND] = KIND_SPECK
            emit[k, E_OFFSET] = -1
            continue
        emit[k, E_KIND] = KIND_GATE if split and emit[k, E_TOO_LONG] == 0 else KIND_WHOLE
        emit[k, E_OFFSET] = total
        total += (emit[k, E_LINE1] - emit[k, E_LINE0] + 1) * (emit[k, E_COL1] - emit[k, E_COL0] + 1)
    flat = np.zeros(total, np.bool_)
    for k in range(n_emit):
        off, line0, col0 = emit[k, E_OFFSET], emit[k, E_LINE0], emit[k, E_COL0]
        h, w = emit[k, E_LINE1] - line0 + 1, emit[k, E_COL1] - col0 + 1
        gated = emit[k, E_KIND] == KIND_GATE
        n_rows = h if gated else 0
        lo = np.empty(n_rows, np.int64)
        hi = np.empty(n_rows, np.int64)
        n_runs = np.zeros(n_rows, np.int64)
        i = emit[k, E_HEAD]
        last = -1
        n_back = 0
        while i >= 0:
            n_back += 1
            if off >= 0:
                row = off + (runs[i, R_LINE] - line0) * w - col0
                for c in range(runs[i, R_C0], runs[i, R_C1] + 1):
                    flat[row + c] = True
            if gated:
                r = runs[i, R_LINE] - line0
                n_runs[r] += 1
                lo[r] = runs[i, R_C0] - col0
                hi[r] = runs[i, R_C1] - col0
            last = i
            i = runs[i, R_NEXT]
        if last >= 0:
            runs[last, R_NEXT] = sc[S_FREE_RUN]
            sc[S_FREE_RUN] = emit[k, E_HEAD]
            sc[S_NFREE_RUN] += n_back
        if gated:
            # a line's runs are maximal, so one run per row is the mask's one-interval rows
            simple = True
            for r in range(h):
                if n_runs[r] != 1:
                    simple = False
                    break
            if simple:
                bound_px = defect_depth_bound_rows(lo, hi, w)
                if bound_clears_gate(bound_px, gate[G_PITCH], gate[G_DEPTH]):
                    emit[k, E_KIND] = KIND_WHOLE
    return flat


@numba.njit(cache=True, nogil=True)
def _free_runs(parts, runs, sc, s):
    i = parts[s, HEAD]
    n = 0
    last = -1
    while i >= 0:
        last = i
        n += 1
        i = runs[i, R_NEXT]
    if last >= 0:
        runs[last, R_NEXT] = sc[S_FREE_RUN]
        sc[S_FREE_RUN] = parts[s, HEAD]
        sc[S_NFREE_RUN] += n
    return n


_ONES = np.uint64(0x0101010101010101)  # eight set bytes of a bool mask


@numba.njit(cache=True, nogil=True)
def _scan_runs(mask, cr, row_start, n):
    """The horizontal runs of ``mask`` (L, W) uint8 (nonzero: set) appended to ``cr`` from row
    n as (row + 1, first column, last column, own index); row_start[r + 1] = first run of line
    r, row_start[L + 1] = end. Eight bytes at a time where they are all clear or all set (most
    of a belt), when the buffer allows aligned 8-byte reads; byte by byte elsewhere."""
    n_lines, width = mask.shape
    flat = mask.reshape(-1)
    if mask.ctypes.data % 8 == 0 and flat.size % 8 == 0:
        words = flat.view(np.uint64)
    else:
        words = np.empty(0, np.uint64)
    n_words = words.size
    for r in range(n_lines):
        row_start[r + 1] = n
        start = r * width
        end = start + width
        p = start
        c0 = -1  # first column of the open run (-1: none)
        while p < end:
            if p & 7 == 0 and p + 8 <= end and (p >> 3) < n_words:
                word = words[p >> 3]
                if word == 0:
                    if c0 >= 0:
                        cr[n, 0], cr[n, 1], cr[n, 2], cr[n, 3] = r + 1, c0, p - 1 - start, n
                        n += 1
                        c0 = -1
                    p += 8
                    continue
                if word == _ONES:
                    if c0 < 0:
                        c0 = p - start
                    p += 8
                    continue
            if flat[p]:
                if c0 < 0:
                    c0 = p - start
            elif c0 >= 0:
                cr[n, 0], cr[n, 1], cr[n, 2], cr[n, 3] = r + 1, c0, p - 1 - start, n
                n += 1
                c0 = -1
            p += 1
        if c0 >= 0:
            cr[n, 0], cr[n, 1], cr[n, 2], cr[n, 3] = r + 1, c0, width - 1, n
            n += 1
    row_start[n_lines + 1] = n
    return n


@numba.njit(cache=True, nogil=True)
def track_chunk(mask, first_line, parts, runs, prev, sc, cr, row_start, max_lines, emit, gate):
    """Follow the runs of ``mask`` (L, P) uint8, lines first_line.., into the open particles.

    Returns (status, n_emit, flat): status 1 means the particle or run table is too small
    (sizes wanted in sc[S_NEED_*]; nothing was changed); otherwise the first n_emit rows of
    ``emit`` are the finished particles in emission order, their masks in ``flat`` (see
    :func:`_finish`; ``gate`` holds the G_* settings).
    """
    n_lines, width = mask.shape
    n_prev = sc[S_NPREV]
    # ---- runs: row 0 is the previous line (owners known), rows 1..L the chunk
    for i in range(n_prev):
        cr[i, 0] = 0
        cr[i, 1] = prev[i, 0]
        cr[i, 2] = prev[i, 1]
        cr[i, 3] = i
    row_start[0] = 0
    n = _scan_runs(mask, cr, row_start, n_prev)
    n_new_runs = n - n_prev
    # ---- 8-connectivity between consecutive rows; union-find root = smallest run index
    parent = cr[:, 3]
    for r in range(1, n_lines + 1):
        a0, a1 = row_start[r - 1], row_start[r]
        i = a0
        for j in range(row_start[r], row_start[r + 1]):
            while i < a1 and cr[i, 2] + 1 < cr[j, 1]:
                i += 1
            k = i
            while k < a1 and cr[k, 1] <= cr[j, 2] + 1:
                ra, rb = _find(parent, k), _find(parent, j)
                if ra < rb:
                    parent[rb] = ra
                elif rb < ra:
                    parent[ra] = rb
                k += 1
    # ---- components: OpenCV's label order, statistics
    comp = np.empty(n, np.int64)
    n_comp = 0
    for i in range(n):
        root = _find(parent, i)
        if root == i:
            comp[i] = n_comp
            n_comp += 1
        else:
            comp[i] = comp[root]
    if n_comp > sc[S_NFREE_SLOT] or n_new_runs > sc[S_NFREE_RUN]:
        sc[S_NEED_SLOTS] = n_comp
        sc[S_NEED_RUNS] = n_new_runs
        return 1, 0, np.zeros(0, np.bool_)
    key = np.full(n_comp, BIG, np.int64)
    new_px = np.zeros(n_comp, np.int64)
    top = np.full(n_comp, BIG, np.int64)
    bottom = np.zeros(n_comp, np.int64)
    x0 = np.full(n_comp, BIG, np.int64)
    x1 = np.full(n_comp, -1, np.int64)
    s_line = np.zeros(n_comp, np.int64)
    s_col = np.zeros(n_comp, np.int64)
    blocks_per_row = width // 2 + 2
    for i in range(n):
        k = comp[i]
        row, c0, c1 = cr[i, 0], cr[i, 1], cr[i, 2]
        # the labelled buffer had a background column first: padded column c0 + 1
        b = (row // 2) * blocks_per_row + (c0 + 1) // 2
        if b < key[k]:
            key[k] = b
        if c0 < x0[k]:
            x0[k] = c0
        if c1 > x1[k]:
            x1[k] = c1
        if row >= 1:
            length = c1 - c0 + 1
            new_px[k] += length
            if row < top[k]:
                top[k] = row
            bottom[k] = row
            line = first_line - 1 + row
            s_line[k] += line * length
            s_col[k] += c0 * length + (length * (length - 1)) // 2
    by_rank = np.argsort(key)
    rank = np.empty(n_comp, np.int64)
    for r in range(n_comp):
        rank[by_rank[r]] = r
    owner = np.full(n_comp, -1, np.int64)
    cand = np.empty(n_prev + n_comp, np.int64)  # particles that may end with this chunk
    n_cand = 0
    # ---- open particles meeting a component merge: in (rank, particle number) order
    if n_prev:
        pair = np.empty(n_prev, np.int64)
        for i in range(n_prev):
            s = prev[i, 2]
            parts[s, ALIAS] = -1
            pair[i] = rank[comp[i]] * (1 << 40) + parts[s, PID]
        order = np.argsort(pair)
        last_pair = -1
        for j in range(n_prev):
            i = order[j]
            if pair[i] == last_pair:
                continue
            last_pair = pair[i]
            s = _resolve(parts, prev[i, 2])
            k = comp[i]
            have = owner[k]
            if have < 0:
                owner[k] = s
            else:
                keep = _resolve(parts, have)
                if keep != s:
                    _absorb(parts, runs, keep, s)
                    parts[s, ALIAS] = keep
        for k in range(n_comp):
            if owner[k] >= 0:
                owner[k] = _resolve(parts, owner[k])
        for i in range(n_prev):
            s = prev[i, 2]
            if parts[s, ALIAS] < 0 and parts[s, MARK] == 0:
                parts[s, MARK] = 1
                cand[n_cand] = s
                n_cand += 1
    # ---- components with pixels in the chunk: new particles numbered in rank order
    for r in range(n_comp):
        k = by_rank[r]
        if new_px[k] <= 0:
            continue
        s = owner[k]
        if s < 0:
            s = _alloc_slot(parts, sc, sc[S_NEXT_PID])
            sc[S_NEXT_PID] += 1
            owner[k] = s
            parts[s, MARK] = 1
            cand[n_cand] = s
            n_cand += 1
        line_top = first_line - 1 + top[k]
        if line_top == sc[S_START]:
            parts[s, CUT] = 1
        if line_top < parts[s, LINE0]:
            parts[s, LINE0] = line_top
        if first_line - 1 + bottom[k] > parts[s, LINE1]:
            parts[s, LINE1] = first_line - 1 + bottom[k]
        if x0[k] < parts[s, COL0]:
            parts[s, COL0] = x0[k]
        if x1[k] > parts[s, COL1]:
            parts[s, COL1] = x1[k]
        parts[s, AREA] += new_px[k]
        parts[s, SUM_LINE] += s_line[k]
        parts[s, SUM_COL] += s_col[k]
    for i in range(n_prev, n):
        _append_run(parts, runs, sc, owner[comp[i]], first_line - 1 + cr[i, 0], cr[i, 1], cr[i, 2])
    # merged-away slots are free now (nothing refers to them after this chunk)
    if n_prev:
        for i in range(n_prev):
            s = prev[i, 2]
            if parts[s, PID] != 0 and parts[s, ALIAS] >= 0:
                _free_slot(parts, sc, s)
    # ---- the last line: alive particles, and the runs the next chunk starts from
    n_last = 0
    for i in range(row_start[n_lines], n):
        s = owner[comp[i]]
        parts[s, MARK] = 2
        prev[n_last, 0] = cr[i, 1]
        prev[n_last, 1] = cr[i, 2]
        prev[n_last, 2] = s
        n_last += 1
    sc[S_NPREV] = n_last
    # ---- finished: by first line, first column, number; then too long, by number
    done = np.empty(n_cand, np.int64)
    alive = np.empty(n_cand, np.int64)
    n_done = n_alive = 0
    for j in range(n_cand):
        s = cand[j]
        if parts[s, MARK] == 2:
            alive[n_alive] = s
            n_alive += 1
        else:
            done[n_done] = s
            n_done += 1
        parts[s, MARK] = 0
    _sort_by_box(parts, done, n_done)
    n_emit = 0
    for j in range(n_done):
        s = done[j]
        if parts[s, AREA] > 0:
            _emit_row(parts, s, parts[s, CUT], emit, n_emit)
            n_emit += 1
        else:
            _free_runs(parts, runs, sc, s)
        _free_slot(parts, sc, s)
    if n_alive:
        newest = first_line + n_lines - 1
        pids = np.empty(n_alive, np.int64)
        for j in range(n_alive):
            pids[j] = parts[alive[j], PID]
        for j in np.argsort(pids):
            s = alive[j]
            if newest - parts[s, LINE0] + 1 >= max_lines:
                parts[s, TOO_LONG] = 1
                _emit_row(parts, s, parts[s, CUT], emit, n_emit)
                n_emit += 1
                _fresh(parts, s, parts[s, PID], 1)
    return 0, n_emit, _finish(runs, sc, emit, n_emit, gate)


@numba.njit(cache=True, nogil=True)
def emit_all(parts, runs, sc, emit, gate):
    """Every open particle, cut, by first line, first column and number; then all state is free.
    Returns (n_emit, flat) like :func:`track_chunk`."""
    slots = np.empty(parts.shape[0], np.int64)
    n = 0
    for s in range(parts.shape[0]):
        if parts[s, PID] != 0:
            slots[n] = s
            n += 1
    _sort_by_box(parts, slots, n)
    n_emit = 0
    for j in range(n):
        s = slots[j]
        if parts[s, AREA] > 0:
            _emit_row(parts, s, 1, emit, n_emit)
            n_emit += 1
    flat = _finish(runs, sc, emit, n_emit, gate)
    reset_state(parts, runs, sc)
    return n_emit, flat
