"""Compiled kernel of :func:`sorting.stages.features.features_batch`: every particle of a batch in one call.

Each particle is computed alone in its own bounding box (found here, so a margin around it
cannot matter), in raster order; particles share nothing but scratch memory. What each step
computes is defined in :mod:`sorting.stages.features` and :mod:`sorting.stages.normalize`; numpy and
OpenCV did the same in ~100 calls per batch on small arrays, whose per-call overhead was
most of the cost.

Numerics: per-pixel maps in float32 as the numpy path did (transmission, the Gaussian taps
of ``cv2.getGaussianKernel``, -ln of the normalized blur, the mafic line); exp and ln by
branch-free float32 polynomials (Cephes expf / logf, < 1 ulp, as accurate as cv2.exp /
cv2.log) so the pixel loops vectorize; the basis table read by bilinear interpolation with
exact float32 weights (the cell offsets of the float32 coordinates; ``cv2.remap`` quantized
them to 1/32 of a cell) in float32 arithmetic, twice the lanes of float64; sums and
statistics in float64.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

#: the kernel's output columns, in its order (features.py maps them onto FEATURE_NAMES)
OUTPUTS = ("area_mm2", "equiv_diameter_mm", "length_mm", "width_mm", "elongation", "thickness_mean_mm",
           "volume_cm3", "a_low_mean", "a_high_mean", "r_mean", "mafic_mean", "mafic_std", "mafic_p10",
           "mafic_p25", "mafic_p50", "mafic_p75", "mafic_p90", "fe_frac_mean", "fe_frac_std", "fayalite_share",
           "oxide_share", "mafic_texture", "starved_share", "interior_share")
(_AREA, _EQD, _LENGTH, _WIDTH, _ELONG, _THICK, _VOLUME, _A_LOW, _A_HIGH, _R, _MAFIC, _MAFIC_STD, _Q0, _Q1, _Q2,
 _Q3, _Q4, _FE, _FE_STD, _FAYALITE, _OXIDE, _TEXTURE, _STARVED, _INTERIOR) = range(len(OUTPUTS))
N_QUANTILES = 5

#: layout of the float32 parameter vector ``p32``
(P_X_SCALE, P_R_MIN, P_Y_SCALE, P_STARVED, P_FAYALITE, P_OXIDE, P_HIST_SCALE, P_HIST_SHIFT, P_HIST_TOP,
 P_INV00, P_INV01, P_INV10, P_INV11, P_FLOOR) = range(14)
N_P32 = 14
#: radius of the smoothing Gaussian's taps (sigma 1 px: 9 taps, as OpenCV sizes it for float)
RB = 4

_U = np.uint64
_F0, _F1, _HALF, _TINY, _DEN_FLOOR, _A_FLOOR = (np.float32(v) for v in (0.0, 1.0, 0.5, 1e-30, 1e-6, 1e-3))


# ---------------------------------------------------------------- float32 exp and ln
@intrinsic
def _as_int(typingctx, x):
    """The bits of a float32 as an int32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _as_float(typingctx, i):
    """The float32 of these int32 bits."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _floor(typingctx, x):
    """floor of a float32 as LLVM's own intrinsic (``math.floor`` compiles to a call of libm's
    floorf, which no loop vectorizes around)."""
    def codegen(context, builder, sig, args):
        return builder.call(builder.module.declare_intrinsic("llvm.floor", [ir.FloatType()]), args)
    return types.float32(types.float32), codegen


_LN_P = tuple(np.float32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                       1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                       3.3333331174e-1))
_EXP_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                        1.6666665459e-1, 5.0000001201e-1))
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_SQRT_HALF, _LOG2E = np.float32(0.707106781186547524), np.float32(1.44269504088896341)
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _ln(x):
    """ln x for a positive normal float32 (Cephes logf: x = m 2^e, m in [sqrt(1/2), sqrt(2)))."""
    bits = _as_int(x)
    e = np.float32((bits >> 23) - 126)
    m = _as_float(np.int32((bits & 0x7FFFFF) | 0x3F000000))  # [1/2, 1)
    small = m < _SQRT_HALF
    e = e - _F1 if small else e
    u = (m + m - _F1) if small else (m - _F1)
    z = u * u
    p = _LN_P[0]
    p = p * u + _LN_P[1]
    p = p * u + _LN_P[2]
    p = p * u + _LN_P[3]
    p = p * u + _LN_P[4]
    p = p * u + _LN_P[5]
    p = p * u + _LN_P[6]
    p = p * u + _LN_P[7]
    p = p * u + _LN_P[8]
    y = p * u * z
    y += _LN2_LO * e
    y -= _HALF * z
    return u + y + _LN2_HI * e


@numba.njit(cache=True, nogil=True, inline="always")
def _exp(x):
    """exp x for a float32, x clamped to [-87, 88] (Cephes expf)."""
    x = min(max(x, _EXP_LO), _EXP_HI)
    nf = _floor(x * _LOG2E + _HALF)
    n = np.int32(nf)
    r = x - nf * _LN2_HI
    r = r - nf * _LN2_LO
    p = _EXP_P[0]
    p = p * r + _EXP_P[1]
    p = p * r + _EXP_P[2]
    p = p * r + _EXP_P[3]
    p = p * r + _EXP_P[4]
    p = p * r + _EXP_P[5]
    p = p * (r * r) + r + _F1
    return p * _as_float(np.int32((n + 127) << 23))


@numba.njit(cache=True, nogil=True)
def exp_f32(x, out):
    """out = exp(x), float32 arrays (tests compare it with numpy)."""
    for i in range(x.size):
        out[i] = _exp(x[i])


@numba.njit(cache=True, nogil=True)
def ln_f32(x, out):
    """out = ln(x) for positive normal float32 (tests compare it with numpy)."""
    for i in range(x.size):
        out[i] = _ln(x[i])


# ---------------------------------------------------------------- pieces
# Every per-pixel map of a particle lives on one canvas: its box with PAD zero rows and
# columns around it, rows of wc = w + 2 PAD one after the other. Each step is then one flat
# loop over the box's rows (pad columns included) instead of one short loop per row, and
# shifts by whole rows or columns read zeros outside the box, as the maps are defined (a
# row-by-row loop over ~50 pixels spent most of its time entering and leaving the loop).
@numba.njit(cache=True, nogil=True)
def _bounds(m, o, hh, ww, colany):
    """Bounding rows and columns (r0, r1, c0, c1, inclusive) of mask block ``m[o:o + hh*ww]``;
    r0 = -1 when empty. ``colany``: (ww,) uint8 scratch."""
    for c in range(ww):
        colany[c] = 0
    r0 = r1 = -1
    for r in range(hh):
        mr = m[o + r * ww:o + (r + 1) * ww]
        row = np.uint8(0)
        for c in range(ww):
            j = _U(c)
            v = mr[j]
            row |= v
            colany[j] |= v
        if row:
            if r0 < 0:
                r0 = r
            r1 = r
    if r0 < 0:
        return -1, -1, ww, -1
    c0, c1 = 0, ww - 1
    while not colany[c0]:
        c0 += 1
    while not colany[c1]:
        c1 -= 1
    return r0, r1, c0, c1


@numba.njit(cache=True, nogil=True)
def _gauss(x, hr, out, n, wc, b0, nb, k):
    """``out[b0:b0 + nb]`` = the 9-tap Gaussian ``k`` of the canvas ``x`` (``n`` values, rows of
    ``wc``, zero outside the rock with >= RB zero rows and columns around the box), rows
    first; ``hr`` (n) scratch. Zero outside the box, as on empty belt. (Unsigned indices
    here and below: numba then skips negative-index wrapping, and the loops vectorize.)"""
    k0, k1, k2, k3, k4 = k[0], k[1], k[2], k[3], k[4]
    # along the rows: at a pad column the taps run into the neighbouring row's pad columns,
    # zero as beyond the box's edge
    xs, hs = x[:n], hr[RB:n - RB]
    for i in range(n - 2 * RB):
        j = _U(i)
        hs[j] = (k0 * (xs[j] + xs[j + _U(8)]) + k1 * (xs[j + _U(1)] + xs[j + _U(7)])
                 + k2 * (xs[j + _U(2)] + xs[j + _U(6)]) + k3 * (xs[j + _U(3)] + xs[j + _U(5)]) + k4 * xs[j + _U(4)])
    for i in range(RB):
        hr[i] = hr[n - 1 - i] = 0.0
    rs = hr[b0 - RB * wc:b0 + nb + RB * wc]
    os = out[b0:b0 + nb]
    uw = _U(wc)
    for i in range(nb):
        j = _U(i)
        os[j] = (k0 * (rs[j] + rs[j + _U(8) * uw]) + k1 * (rs[j + uw] + rs[j + _U(7) * uw])
                 + k2 * (rs[j + _U(2) * uw] + rs[j + _U(6) * uw]) + k3 * (rs[j + _U(3) * uw] + rs[j + _U(5) * uw])
                 + k4 * rs[j + _U(4) * uw])


@numba.njit(cache=True, nogil=True)
def _interior(mb, hz, core, wc, b0, nb):
    """``core[b0:b0 + nb]`` = the interior: the mask eroded by a radius-2 disk (OpenCV's 5 x 5
    ellipse: rows -1..1 five wide, rows -2 and 2 the centre only), else by radius 1 (a
    cross), else the whole mask. ``mb``: the mask canvas (>= 3 zero rows and columns around
    the box); ``hz``: scratch of its size."""
    uw = _U(wc)
    ms = mb[b0 - wc - 2:b0 + nb + wc + 2]
    hs = hz[b0 - wc:b0 + nb + wc]
    for i in range(nb + 2 * wc):
        j = _U(i)  # 5 wide, centred on ms[j + 2]
        hs[j] = ms[j] & ms[j + _U(1)] & ms[j + _U(2)] & ms[j + _U(3)] & ms[j + _U(4)]
    ms = mb[b0 - 2 * wc:b0 + nb + 2 * wc]
    cs = core[b0:b0 + nb]
    n = 0
    for i in range(nb):
        j = _U(i)  # centre at hs[j + wc], ms[j + 2 wc]
        e = hs[j] & hs[j + uw] & hs[j + _U(2) * uw] & ms[j] & ms[j + _U(4) * uw]
        cs[j] = e
        n += e
    if n:
        return
    ms = mb[b0 - wc - 1:b0 + nb + wc + 1]
    for i in range(nb):
        j = _U(i)  # centre at ms[j + wc + 1]
        e = ms[j + _U(1)] & ms[j + uw] & ms[j + uw + _U(1)] & ms[j + uw + _U(2)] & ms[j + _U(2) * uw + _U(1)]
        cs[j] = e
        n += e
    if n:
        return
    ms = mb[b0:b0 + nb]
    for i in range(nb):
        cs[i] = ms[i]


@numba.njit(cache=True, nogil=True)
def _box_mean(v, core, local, wc, b0, nb, bx, by, p0, p1, h0, h1):
    """``local[b0:b0 + nb]`` = the mean of ``v`` over the ``core`` pixels in the
    (2 by + 1, 2 bx + 1) window around each pixel (0 where there are none), by float32 box
    sums along the rows then down the columns. ``core`` is 0 outside the box and the canvas
    has more than max(bx, by) zero rows and columns around it. Scratch: ``p0``, ``p1``,
    ``h0``, ``h1``, canvas-sized float32."""
    lo, hi = b0 - by * wc, b0 + nb + by * wc  # the rows the column sums read
    for i in range(lo, b0):
        p0[i] = p1[i] = 0.0
    for i in range(b0 + nb, hi):
        p0[i] = p1[i] = 0.0
    vs, cs, q0, q1 = v[b0:b0 + nb], core[b0:b0 + nb], p0[b0:b0 + nb], p1[b0:b0 + nb]
    for i in range(nb):
        j = _U(i)
        inside = cs[j] != 0
        q0[j] = vs[j] if inside else _F0
        q1[j] = _F1 if inside else _F0
    n = hi - lo
    s0, s1 = p0[lo - bx:hi + bx], p1[lo - bx:hi + bx]
    o0, o1 = h0[lo:hi], h1[lo:hi]
    if bx == 2:  # the reference machine's 4 mm at 0.8 mm: one pass, the same sums in the same order
        for i in range(n):
            j = _U(i)
            o0[j] = s0[j] + s0[j + _U(1)] + s0[j + _U(2)] + s0[j + _U(3)] + s0[j + _U(4)]
            o1[j] = s1[j] + s1[j + _U(1)] + s1[j + _U(2)] + s1[j + _U(3)] + s1[j + _U(4)]
    else:
        for i in range(n):
            j = _U(i)
            o0[j] = s0[j]
            o1[j] = s1[j]
        for d in range(1, 2 * bx + 1):
            ud = _U(d)
            for i in range(n):
                j = _U(i)
                o0[j] += s0[j + ud]
                o1[j] += s1[j + ud]
    s0, s1 = h0[lo:hi], h1[lo:hi]
    o0, o1 = p0[b0:b0 + nb], p1[b0:b0 + nb]  # the inputs are no longer needed
    ls = local[b0:b0 + nb]
    if by == 2:
        uw = _U(wc)
        for i in range(nb):
            j = _U(i)
            v0 = s0[j] + s0[j + uw] + s0[j + _U(2) * uw] + s0[j + _U(3) * uw] + s0[j + _U(4) * uw]
            v1 = s1[j] + s1[j + uw] + s1[j + _U(2) * uw] + s1[j + _U(3) * uw] + s1[j + _U(4) * uw]
            ls[j] = v0 / max(v1, _F1)
        return
    for i in range(nb):
        j = _U(i)
        o0[j] = s0[j]
        o1[j] = s1[j]
    for d in range(1, 2 * by + 1):
        ud = _U(d * wc)
        for i in range(nb):
            j = _U(i)
            o0[j] += s0[j + ud]
            o1[j] += s1[j + ud]
    for i in range(nb):
        j = _U(i)
        ls[j] = o0[j] / max(o1[j], _F1)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _thickness_sums(mask, thick, n):
    """Over the mask pixels of the first ``n``: the sums of ``thick`` and of max(thick, 0)."""
    s = sp = 0.0
    for i in range(n):
        j = _U(i)
        t = float(thick[j]) if mask[j] != 0 else 0.0
        s += t
        sp += max(t, 0.0)
    return s, sp


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _core_sums(core, al, ah, thick, wts, n):
    """Over the core pixels of the first ``n``: their count, the sums of ``al`` and ``ah``, and
    the weights max(thick, 0) (into ``wts``, 0 off the core) and their sum. (Sums in any
    order: they vectorize.)"""
    n_core = 0
    s_low = s_high = total = 0.0
    for i in range(n):
        j = _U(i)
        inside = core[j] != 0
        wt = max(float(thick[j]), 0.0) if inside else 0.0
        wts[j] = wt
        total += wt
        n_core += np.int64(inside)
        s_low += float(al[j]) if inside else 0.0
        s_high += float(ah[j]) if inside else 0.0
    return n_core, s_low, s_high, total


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _weighted_sums(wts, u, v, n):
    """sum(wts u), sum(wts v) over the first ``n`` (finite values; 0 weight off the core)."""
    su = sv = 0.0
    for i in range(n):
        j = _U(i)
        su += wts[j] * u[j]
        sv += wts[j] * v[j]
    return su, sv


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _spread(wts, maf, fe, local, n, mean_maf, mean_fe, fay_level, oxide_level):
    """Weighted sums of the squared deviations of mafic_frac from its mean, of fe_frac from
    its mean and of mafic_frac from its local mean, and the weights above the two levels."""
    v_maf = v_fe = tex = fay = oxide = 0.0
    for i in range(n):
        j = _U(i)
        wt, mv = wts[j], maf[j]
        d = mv - mean_maf
        v_maf += wt * d * d
        d = fe[j] - mean_fe
        v_fe += wt * d * d
        d = float(mv) - local[j]
        tex += wt * d * d
        fay += wt if mv > fay_level else 0.0
        oxide += wt if mv > oxide_level else 0.0
    return v_maf, v_fe, tex, fay, oxide


@numba.njit(cache=True, nogil=True)
def gather_ring(ring, boxes, layout, a):
    """Copy each box of the ring buffer ``ring`` (R, W, 2), R a power of two (stream line i in
    row i % R), one after the other into ``a`` (2 * the total pixels, or more); ``boxes``
    (n, 4) int64: first line, first column, height, width. ``layout`` (n, 3) int64 is
    written: per box the offset of its first pixel, height, width (the ``boxes`` argument of
    :func:`particles`). Returns the total pixels."""
    rows = ring.shape[0]
    o = 0
    for k in range(boxes.shape[0]):
        line0, col0, h, w = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        layout[k, 0], layout[k, 1], layout[k, 2] = o, h, w
        for r in range(h):
            src = ring[(line0 + r) & (rows - 1)].reshape(-1)[2 * col0:2 * (col0 + w)]
            dst = a[2 * (o + w * r):2 * (o + w * (r + 1))]
            for j in range(2 * w):
                dst[j] = src[j]
        o += h * w
    return o


# ---------------------------------------------------------------- the batch
@numba.njit(cache=True, nogil=True)
def _pad(bx, by):
    """Zero rows and columns around the box on the canvas: the blur's radius, and more than
    the texture window's half-widths (its sums read one row and column further)."""
    return max(RB, max(bx, by) + 1)


@numba.njit(cache=True, nogil=True, error_model="numpy")  # no zero-division branch: the pixel loops vectorize
def particles(a, m, boxes, taps, table, p32, edges, q, win, pitch, cols, f):
    """Features of every particle of a batch.

    Parameters
    ----------
    a : (N * 2,) float32, the crops' attenuations one after the other, each (hh, ww, 2) C order
    m : (N,) uint8, their masks one after the other, each (hh, ww)
    boxes : (n, 3) int64, per crop: offset of its first pixel in ``m`` (``a``: twice that), hh, ww
    taps : (9,) float32, the smoothing Gaussian (sigma 1 px)
    table : (nR, nA, 2) float32 C-contiguous, the basis inverse (t_pom, t_fe) on the (R, A_high) grid
    p32 : (N_P32,) float32 parameters (``P_*``)
    edges : (n_bins + 1,) float64, the mafic histogram's bin edges
    q : (N_QUANTILES,) float64, quantile levels, ascending
    win : (2,) int64, texture box (columns, rows), odd
    pitch : (2,) float64, pixel and line pitch, mm
    cols : (len(OUTPUTS),) int64, column of ``f`` for each output
    f : (n, F) float32 C-contiguous, written (an empty mask gives zeros; non-finite values become 0)
    """
    n = boxes.shape[0]
    mh = mw = 1
    for k in range(n):
        mh = max(mh, boxes[k, 1])
        mw = max(mw, boxes[k, 2])
    bx, by = win[0] // 2, win[1] // 2
    pad = _pad(bx, by)
    npx = (mh + 2 * pad) * (mw + 2 * pad)
    # (allocated here, not passed in: LLVM then knows the arrays do not overlap and
    # vectorizes without run-time overlap checks)
    colany = np.empty(mw, np.uint8)
    mb = np.empty(npx, np.uint8)  # the mask
    hz = np.empty(npx, np.uint8)  # ... eroded across the rows
    core = np.empty(npx, np.uint8)  # the interior
    stv = np.empty(npx, np.uint8)  # starved
    a0 = np.empty(npx, np.float32)  # attenuation (NaN, inf: 0)
    a1 = np.empty(npx, np.float32)
    x0 = np.empty(npx, np.float32)  # T_low, T_high, mask: zero outside the rock
    x1 = np.empty(npx, np.float32)
    x2 = np.empty(npx, np.float32)
    hr = np.empty(npx, np.float32)
    b0s = np.empty(npx, np.float32)  # blurred
    b1s = np.empty(npx, np.float32)
    b2s = np.empty(npx, np.float32)
    al = np.empty(npx, np.float32)  # smoothed attenuation low, high
    ah = np.empty(npx, np.float32)
    t_pom = np.empty(npx, np.float32)
    t_fe = np.empty(npx, np.float32)
    local = np.empty(npx, np.float32)  # texture: the local mean of mafic_frac
    thick = np.empty(npx, np.float32)
    maf = np.empty(npx, np.float32)
    fe = np.empty(npx, np.float32)
    wts = np.empty(npx, np.float64)
    wx = np.empty(npx, np.float32)  # the bilinear weights of each pixel's table cell
    wy = np.empty(npx, np.float32)
    cell = np.empty((4, npx), np.int32)  # ... and the cell's corners
    nb = edges.size - 1
    hist = np.empty(nb + 1, np.float64)
    hist4 = np.zeros((4, nb), np.float64)
    res = np.empty(len(OUTPUTS), np.float64)
    pp, lp = pitch[0], pitch[1]
    floor, starved_a = p32[P_FLOOR], p32[P_STARVED]
    x_scale, r_min, y_scale = p32[P_X_SCALE], p32[P_R_MIN], p32[P_Y_SCALE]
    inv00, inv01, inv10, inv11 = p32[P_INV00], p32[P_INV01], p32[P_INV10], p32[P_INV11]
    fay_level, oxide_level = p32[P_FAYALITE], p32[P_OXIDE]
    h_scale, h_shift, h_top = p32[P_HIST_SCALE], p32[P_HIST_SHIFT], p32[P_HIST_TOP]
    n_r, n_a = table.shape[0], table.shape[1]
    flat_table = table.reshape(-1)
    top_x, top_y = np.float32(n_a), np.float32(n_r)
    for k in range(n):
        o, hh, ww = boxes[k, 0], boxes[k, 1], boxes[k, 2]
        r0, r1, c0, c1 = _bounds(m, o, hh, ww, colany)
        if r0 < 0:
            for j in range(f.shape[1]):
                f[k, j] = 0.0
            continue
        h, w = r1 - r0 + 1, c1 - c0 + 1
        wc = w + 2 * pad  # canvas row
        cn = (h + 2 * pad) * wc  # canvas
        b0 = pad * wc  # the box's rows: canvas[b0:b0 + bn]
        bn = h * wc
        # --- the box: mask, moments, attenuation, starved pixels
        for i in range(b0):
            mb[i] = 0
            x0[i] = x1[i] = x2[i] = 0.0
        for i in range(b0 + bn, cn):
            mb[i] = 0
            x0[i] = x1[i] = x2[i] = 0.0
        area = n_starved = m10 = m01 = m20 = m02 = m11 = 0  # exact in integers
        for r in range(h):
            src = o + (r + r0) * ww + c0
            mr = m[src:src + w]
            ar = a[2 * src:2 * (src + w)]
            dst = b0 + r * wc
            for c in range(pad):
                mb[dst + c] = mb[dst + pad + w + c] = 0
            dst += pad
            mo, so, d0, d1 = mb[dst:dst + w], stv[dst:dst + w], a0[dst:dst + w], a1[dst:dst + w]
            cnt = c_r = cc_r = s_r = 0
            for c in range(w):
                j = _U(c)
                inside = mr[j] != 0
                lo = ar[_U(2) * j]
                hi = ar[_U(2) * j + _U(1)]
                lo = lo if inside & (lo - lo == 0) else _F0  # NaN, inf: a broken pixel must not poison the rock
                hi = hi if inside & (hi - hi == 0) else _F0
                s = np.uint8(inside & (lo > starved_a))
                ins = np.uint8(inside)
                mo[j] = ins
                so[j] = s
                d0[j] = lo
                d1[j] = hi
                cnt += ins
                s_r += s
                c_r += c * ins
                cc_r += c * c * ins
            area += cnt
            n_starved += s_r
            m10 += c_r
            m20 += cc_r
            m01 += r * cnt
            m02 += r * r * cnt
            m11 += r * c_r
        # --- shape: the central second moments as cv2.moments forms them
        cx, cy = m10 / area, m01 / area
        mu20, mu02, mu11 = (m20 - m10 * cx) / area, (m02 - m01 * cy) / area, (m11 - m10 * cy) / area
        px_area = pp * lp
        res[_AREA] = area * px_area
        res[_EQD] = math.sqrt(4.0 * res[_AREA] / math.pi)
        cxx = mu20 * pp * pp + pp * pp / 12.0  # + pitch^2/12: each pixel is a square, not a point
        cyy = mu02 * lp * lp + lp * lp / 12.0
        cxy = mu11 * pp * lp
        half_tr, det = 0.5 * (cxx + cyy), cxx * cyy - cxy * cxy
        root = math.sqrt(max(half_tr * half_tr - det, 0.0))
        length = 4.0 * math.sqrt(half_tr + root)
        width = 4.0 * math.sqrt(max(half_tr - root, 0.0))
        res[_LENGTH], res[_WIDTH] = length, width
        res[_ELONG] = length / max(width, 1e-6)
        # --- smoothing inside the rock: normalized Gaussian of the transmission
        ms, e0, e1 = mb[b0:b0 + bn], a0[b0:b0 + bn], a1[b0:b0 + bn]
        y0, y1, y2 = x0[b0:b0 + bn], x1[b0:b0 + bn], x2[b0:b0 + bn]
        for i in range(bn):
            j = _U(i)
            inside = ms[j] != 0
            t_low, t_high = _exp(-e0[j]), _exp(-e1[j])  # unconditional: the loop vectorizes
            y0[j] = t_low if inside else _F0
            y1[j] = t_high if inside else _F0
            y2[j] = _F1 if inside else _F0
        _gauss(x0, hr, b0s, cn, wc, b0, bn, taps)
        _gauss(x1, hr, b1s, cn, wc, b0, bn, taps)
        _gauss(x2, hr, b2s, cn, wc, b0, bn, taps)
        g0, g1, g2, sl, sh = b0s[b0:b0 + bn], b1s[b0:b0 + bn], b2s[b0:b0 + bn], al[b0:b0 + bn], ah[b0:b0 + bn]
        for i in range(bn):
            j = _U(i)
            den = max(g2[j], _DEN_FLOOR)
            sl[j] = -_ln(max(g0[j] / den, _TINY))
            sh[j] = -_ln(max(g1[j] / den, _TINY))
        # --- per rock pixel: basis thickness, mafic line
        # table coordinates as maps.basis_thickness forms them (NaN reads the edge); the
        # table lookups in a loop of their own, so many are in flight at once (its cache misses
        # are most of their cost), the arithmetic around them in loops that vectorize
        cl0, cl1, cl2, cl3 = cell[0, b0:b0 + bn], cell[1, b0:b0 + bn], cell[2, b0:b0 + bn], cell[3, b0:b0 + bn]
        vx, vy = wx[b0:b0 + bn], wy[b0:b0 + bn]
        for i in range(bn):
            j = _U(i)
            lo, hi = sl[j], sh[j]
            map_x = hi * x_scale
            map_x = min(map_x, top_x) if map_x >= -1.0 else np.float32(-1.0)
            map_y = lo / max(hi, _A_FLOOR)
            map_y -= r_min
            map_y *= y_scale
            map_y = min(map_y, top_y) if map_y >= -1.0 else np.float32(-1.0)
            xi = int(map_x + _F1)  # floor + 1: the coordinates are >= -1
            yi = int(map_y + _F1)
            vx[j] = map_x - np.float32(xi - 1)  # exact: map_x is within one of xi - 1
            vy[j] = map_y - np.float32(yi - 1)
            ix0 = min(max(xi - 1, 0), n_a - 1)
            ix1 = min(xi, n_a - 1)
            row0 = min(max(yi - 1, 0), n_r - 1) * n_a
            row1 = min(yi, n_r - 1) * n_a
            cl0[j] = 2 * (row0 + ix0)
            cl1[j] = 2 * (row0 + ix1)
            cl2[j] = 2 * (row1 + ix0)
            cl3[j] = 2 * (row1 + ix1)
        tp_s, tf_s = t_pom[b0:b0 + bn], t_fe[b0:b0 + bn]
        for i in range(bn):
            j = _U(i)
            if not ms[j]:
                tp_s[j] = tf_s[j] = _F0
                continue
            fx, fy = vx[j], vy[j]
            gx, gy = _F1 - fx, _F1 - fy
            a00, a01, a10, a11 = _U(cl0[j]), _U(cl1[j]), _U(cl2[j]), _U(cl3[j])
            tp_s[j] = gy * (gx * flat_table[a00] + fx * flat_table[a01]) + fy * (gx * flat_table[a10]
                                                                                 + fx * flat_table[a11])
            tf_s[j] = (gy * (gx * flat_table[a00 + _U(1)] + fx * flat_table[a01 + _U(1)])
                       + fy * (gx * flat_table[a10 + _U(1)] + fx * flat_table[a11 + _U(1)]))
        th_s, mf_s, fe_s = thick[b0:b0 + bn], maf[b0:b0 + bn], fe[b0:b0 + bn]
        for i in range(bn):
            j = _U(i)
            tp, tf = tp_s[j], tf_s[j]
            total = max(tp + tf, floor)
            fe_s[j] = tf / total
            syenite = inv00 * tp + inv01 * tf
            mafic = inv10 * tp + inv11 * tf
            t = syenite + mafic
            th_s[j] = t
            mf_s[j] = mafic / max(t, floor)
        sum_t, sum_tp = _thickness_sums(ms, th_s, bn)
        res[_THICK] = sum_t / area
        res[_VOLUME] = sum_tp * (px_area * 1e-3)
        res[_STARVED] = n_starved / area
        # --- which pixels enter the material statistics
        _interior(mb, hz, core, wc, b0, bn)
        cs, ss = core[b0:b0 + bn], stv[b0:b0 + bn]
        if n_starved:
            # the interior's unstarved pixels; else the unstarved rim; else the interior all the same
            n_ok = 0
            for i in range(bn):
                n_ok += cs[i] & (1 - ss[i])
            if n_ok:
                for i in range(bn):
                    cs[i] &= 1 - ss[i]
            elif n_starved < area:
                for i in range(bn):
                    cs[i] = ms[i] & (1 - ss[i])
        # --- material statistics over the core, thickness-weighted
        ws = wts[b0:b0 + bn]
        n_core, s_low, s_high, total_w = _core_sums(cs, sl, sh, th_s, ws, bn)
        res[_INTERIOR] = n_core / area
        res[_A_LOW] = s_low / n_core
        res[_A_HIGH] = s_high / n_core
        res[_R] = s_low / max(s_high, 1e-3 * n_core)
        if not total_w > 0:  # a noise-level rock: weight its pixels equally
            for i in range(bn):
                ws[i] = 1.0 if cs[i] else 0.0
            total_w = float(n_core)
        s_maf, s_fe = _weighted_sums(ws, mf_s, fe_s, bn)
        mean_maf, mean_fe = s_maf / total_w, s_fe / total_w
        # texture: mafic_frac minus its mean over the core pixels in the window around the pixel
        _box_mean(maf, core, local, wc, b0, bn, bx, by, x0, x1, x2, hr)  # the blur's scratch, done with
        v_maf, v_fe, tex, fay, oxide = _spread(ws, mf_s, fe_s, local[b0:b0 + bn], bn, mean_maf, mean_fe, fay_level,
                                               oxide_level)
        # four histograms in turn: neighbouring pixels mostly fall in the same bin, and one
        # histogram would wait for each add to land before the next; off the core the weight
        # is +0 (and mafic_frac finite), so no branch. Only the core's range of bins is
        # summed, searched and cleared (hist4 is all zero between particles).
        b_lo, b_hi = nb, -1
        for i in range(bn):
            j = _U(i)
            hv = mf_s[j] * h_scale
            hv += h_shift
            hv = min(max(hv, _F0), h_top)
            bi = int(hv)
            hist4[i & 3, _U(bi)] += ws[j]
            inside = cs[j] != 0
            b_lo = min(b_lo, bi if inside else nb)
            b_hi = max(b_hi, bi if inside else -1)
        if b_hi < b_lo:  # no core (cannot happen: the interior falls back to the mask)
            b_lo = b_hi = 0
        res[_MAFIC], res[_MAFIC_STD] = mean_maf, math.sqrt(max(v_maf / total_w, 0.0))
        res[_FE], res[_FE_STD] = mean_fe, math.sqrt(max(v_fe / total_w, 0.0))
        res[_FAYALITE] = fay / total_w
        res[_OXIDE] = oxide / total_w
        res[_TEXTURE] = math.sqrt(max(tex / total_w, 0.0))
        # weighted quantiles: the cumulative weight at the bin edges, linear inside the bin
        # where it crosses q (np.interp's definition: from the last edge at or below the level)
        # (below b_lo the cumulative weight is 0, from b_hi + 1 on the total: the search
        # from edge 0 would pass every edge below b_lo)
        run = 0.0
        for b in range(b_lo, b_hi + 1):
            hb = (hist4[0, b] + hist4[1, b]) + (hist4[2, b] + hist4[3, b])
            hist4[0, b] = hist4[1, b] = hist4[2, b] = hist4[3, b] = 0.0
            run, hist[b] = run + hb, run
        hist[b_hi + 1] = run
        j = b_lo
        for iq in range(N_QUANTILES):
            level = q[iq] * run
            if level >= run:
                val = edges[nb]
            elif level < 0.0:
                val = edges[0]
            else:
                while hist[j + 1] <= level:
                    j += 1
                val = (edges[j + 1] - edges[j]) / (hist[j + 1] - hist[j]) * (level - hist[j]) + edges[j]
            res[_Q0 + iq] = val
        for j in range(len(OUTPUTS)):
            v = res[j]
            f[k, cols[j]] = v if math.isfinite(v) else 0.0
