"""Compiled kernel of :func:`sorting.features.features_batch`: every particle of a batch in one call.

Each particle is computed alone in its own bounding box (found here, so a margin around it
cannot matter), in raster order; particles share nothing but scratch memory. What each step
computes is defined in :mod:`sorting.features` and :mod:`sorting.normalize`; numpy and
OpenCV did the same in ~100 calls per batch on small arrays, whose per-call overhead was
most of the cost (issue 5).

Numerics: per-pixel maps in float32 as the numpy path did (transmission, the Gaussian taps
of ``cv2.getGaussianKernel``, -ln of the normalized blur, the mafic line); exp and ln by
branch-free float32 polynomials (Cephes expf / logf, < 1 ulp, as accurate as cv2.exp /
cv2.log) so the pixel loops vectorize; the basis table read by exact bilinear
interpolation in float64 (``cv2.remap`` quantized the weights to 1/32 of a cell); sums and
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
    n = math.floor(x * _LOG2E + _HALF)
    nf = np.float32(n)
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
@numba.njit(cache=True, nogil=True)
def _bounds(m, o, hh, ww):
    """Bounding rows and columns (r0, r1, c0, c1, inclusive) of mask block ``m[o:o + hh*ww]``;
    r0 = -1 when empty."""
    r0 = r1 = c1 = -1
    c0 = ww
    for r in range(hh):
        base = o + r * ww
        for c in range(ww):
            if m[base + c]:
                if r0 < 0:
                    r0 = r
                r1 = r
                c0 = min(c0, c)
                c1 = max(c1, c)
    return r0, r1, c0, c1


@numba.njit(cache=True, nogil=True)
def _gauss(x, rows, out, h, w, k):
    """``out`` (h*w) = the 9-tap Gaussian ``k`` of ``x`` ((h, w + 8), 4 zero columns each side),
    rows first; ``rows`` ((h + 8) * w) scratch. Zero outside the box, as on empty belt.
    (Unsigned indices here and below: numba then skips negative-index wrapping, and the
    loops vectorize.)"""
    k0, k1, k2, k3, k4 = k[0], k[1], k[2], k[3], k[4]
    wp = w + 2 * RB
    for i in range(RB * w):
        rows[i] = 0.0
        rows[(h + RB) * w + i] = 0.0
    for r in range(h):
        xs = x[r * wp:(r + 1) * wp]
        rs = rows[(r + RB) * w:(r + RB + 1) * w]
        for c in range(w):
            j = _U(c)
            rs[j] = (k0 * (xs[j] + xs[j + _U(8)]) + k1 * (xs[j + _U(1)] + xs[j + _U(7)])
                     + k2 * (xs[j + _U(2)] + xs[j + _U(6)]) + k3 * (xs[j + _U(3)] + xs[j + _U(5)]) + k4 * xs[j + _U(4)])
    uw = _U(w)
    for r in range(h):
        rs = rows[r * w:(r + 2 * RB + 1) * w]
        os = out[r * w:(r + 1) * w]
        for c in range(w):
            j = _U(c)
            os[j] = (k0 * (rs[j] + rs[j + _U(8) * uw]) + k1 * (rs[j + uw] + rs[j + _U(7) * uw])
                     + k2 * (rs[j + _U(2) * uw] + rs[j + _U(6) * uw]) + k3 * (rs[j + _U(3) * uw] + rs[j + _U(5) * uw])
                     + k4 * rs[j + _U(4) * uw])


@numba.njit(cache=True, nogil=True)
def _bilinear(flat, n_r, n_a, y, x):
    """Exact bilinear reading of the (n_r, n_a, 2) table ``flat`` (raveled) at row ``y``, column
    ``x`` (float32 in [-1, n_r], [-1, n_a]), edges replicated: both channels, float32."""
    xi = int(x + _F1)  # floor(x) + 1: x >= -1
    yi = int(y + _F1)
    fx = float(x) - (xi - 1)
    fy = float(y) - (yi - 1)
    ix0 = min(max(xi - 1, 0), n_a - 1)
    ix1 = min(xi, n_a - 1)
    row0 = min(max(yi - 1, 0), n_r - 1) * n_a
    row1 = min(yi, n_r - 1) * n_a
    a00, a01, a10, a11 = _U(2 * (row0 + ix0)), _U(2 * (row0 + ix1)), _U(2 * (row1 + ix0)), _U(2 * (row1 + ix1))
    gx, gy = 1.0 - fx, 1.0 - fy
    p = gy * (gx * flat[a00] + fx * flat[a01]) + fy * (gx * flat[a10] + fx * flat[a11])
    q = (gy * (gx * flat[a00 + _U(1)] + fx * flat[a01 + _U(1)])
         + fy * (gx * flat[a10 + _U(1)] + fx * flat[a11 + _U(1)]))
    return np.float32(p), np.float32(q)


@numba.njit(cache=True, nogil=True)
def _interior(mp, hz, core, h, w):
    """``core`` (h*w) = the interior: the mask eroded by a radius-2 disk (OpenCV's 5 x 5
    ellipse: rows -1..1 five wide, rows -2 and 2 the centre only), else by radius 1 (a
    cross), else the whole mask. ``mp``: the mask with 2 zero rows and columns around it,
    (h + 4, w + 4); ``hz``: scratch of its size."""
    wp = w + 4
    uwp = _U(wp)
    for r in range(h + 4):
        ms = mp[r * wp:(r + 1) * wp]
        hs = hz[r * wp:(r + 1) * wp]
        for c in range(w):
            j = _U(c)  # 5 wide, centred on column c
            hs[j] = ms[j] & ms[j + _U(1)] & ms[j + _U(2)] & ms[j + _U(3)] & ms[j + _U(4)]
    n = 0
    for r in range(h):
        hs = hz[(r + 1) * wp:(r + 4) * wp]
        ms = mp[r * wp + 2:(r + 5) * wp]
        cs = core[r * w:(r + 1) * w]
        for c in range(w):
            j = _U(c)
            e = hs[j] & hs[j + uwp] & hs[j + _U(2) * uwp] & ms[j] & ms[j + _U(4) * uwp]
            cs[j] = e
            n += e
    if n:
        return
    for r in range(h):
        ms = mp[(r + 1) * wp + 1:(r + 4) * wp]
        cs = core[r * w:(r + 1) * w]
        for c in range(w):
            j = _U(c)  # centre at ms[j + wp + 1]
            e = ms[j + _U(1)] & ms[j + uwp] & ms[j + uwp + _U(1)] & ms[j + uwp + _U(2)] & ms[j + _U(2) * uwp + _U(1)]
            cs[j] = e
            n += e
    if n:
        return
    for r in range(h):
        for c in range(w):
            core[r * w + c] = mp[(r + 2) * wp + c + 2]


@numba.njit(cache=True, nogil=True)
def _box_mean(v, core, local, h, w, bx, by, pad, rows, acc):
    """``local`` (h*w) = the mean of ``v`` over the ``core`` pixels in the (2 by + 1, 2 bx + 1)
    window around each pixel (0 where there are none), by float32 box sums in rows then
    columns. Scratch: ``pad`` (2, h (w + 2 bx)), ``rows`` (2, (h + 2 by) w), ``acc`` (2, w)."""
    wp = w + 2 * bx
    ubx = _U(bx)
    for r in range(h):
        p0, p1 = pad[0, r * wp:(r + 1) * wp], pad[1, r * wp:(r + 1) * wp]
        for c in range(bx):
            p0[c] = p1[c] = p0[w + bx + c] = p1[w + bx + c] = 0.0
        vr, cr = v[r * w:(r + 1) * w], core[r * w:(r + 1) * w]
        for c in range(w):
            j = _U(c)
            inside = cr[j] != 0
            p0[j + ubx] = vr[j] if inside else _F0
            p1[j + ubx] = _F1 if inside else _F0
    for i in range(by * w):
        rows[0, i] = rows[1, i] = rows[0, (h + by) * w + i] = rows[1, (h + by) * w + i] = 0.0
    for r in range(h):
        p0, p1 = pad[0, r * wp:(r + 1) * wp], pad[1, r * wp:(r + 1) * wp]
        o0, o1 = rows[0, (r + by) * w:(r + by + 1) * w], rows[1, (r + by) * w:(r + by + 1) * w]
        for c in range(w):
            o0[c] = o1[c] = 0.0
        for d in range(2 * bx + 1):
            ud = _U(d)
            for c in range(w):
                j = _U(c)
                o0[j] += p0[j + ud]
                o1[j] += p1[j + ud]
    a0, a1 = acc[0, :w], acc[1, :w]
    for r in range(h):
        for c in range(w):
            a0[c] = a1[c] = 0.0
        for d in range(2 * by + 1):
            r0, r1 = rows[0, (r + d) * w:(r + d + 1) * w], rows[1, (r + d) * w:(r + d + 1) * w]
            for c in range(w):
                j = _U(c)
                a0[j] += r0[j]
                a1[j] += r1[j]
        lr = local[r * w:(r + 1) * w]
        for c in range(w):
            j = _U(c)
            lr[j] = a0[j] / max(a1[j], _F1)


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


# ---------------------------------------------------------------- the batch
@numba.njit(cache=True, nogil=True)
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
    f : (n, F) float64, written (an empty mask gives zeros; non-finite values become 0)
    """
    n = boxes.shape[0]
    mh = mw = 1
    for k in range(n):
        mh = max(mh, boxes[k, 1])
        mw = max(mw, boxes[k, 2])
    npx = mh * mw
    bx, by = win[0] // 2, win[1] // 2
    mb = np.empty(npx, np.uint8)  # the mask in the box
    mp = np.zeros((mh + 4) * (mw + 4), np.uint8)  # ... with 2 empty rows and columns around it
    hz = np.empty((mh + 4) * (mw + 4), np.uint8)
    core = np.empty(npx, np.uint8)
    stv = np.empty(npx, np.uint8)  # starved
    a_in = np.empty((2, npx), np.float32)  # attenuation (NaN, inf: 0)
    x = np.empty((3, mh * (mw + 2 * RB)), np.float32)  # T_low, T_high, mask with 4 empty columns each side
    rows = np.empty((mh + 2 * RB) * mw, np.float32)
    bl = np.empty((3, npx), np.float32)  # blurred
    al = np.empty(npx, np.float32)  # smoothed attenuation low, high
    ah = np.empty(npx, np.float32)
    thick = np.empty(npx, np.float32)
    maf = np.empty(npx, np.float32)
    fe = np.empty(npx, np.float32)
    wts = np.empty(npx, np.float64)
    cell = np.empty((4, npx), np.int32)  # the basis table cells around each pixel
    wx = np.empty(npx, np.float64)  # ... and the bilinear weights
    wy = np.empty(npx, np.float64)
    t_pom = np.zeros(npx, np.float32)
    t_fe = np.zeros(npx, np.float32)
    local = np.empty(npx, np.float32)  # texture: the local mean of mafic_frac
    pad = np.empty((2, mh * (mw + 2 * bx)), np.float32)
    rows_box = np.empty((2, (mh + 2 * by) * mw), np.float32)
    acc = np.empty((2, mw), np.float32)
    nb = edges.size - 1
    hist = np.empty(nb + 1, np.float64)
    res = np.empty(len(OUTPUTS), np.float64)
    pp, lp = pitch[0], pitch[1]
    floor, starved_a, x_scale, r_min, y_scale = p32[P_FLOOR], p32[P_STARVED], p32[P_X_SCALE], p32[P_R_MIN], p32[P_Y_SCALE]
    inv00, inv01, inv10, inv11 = p32[P_INV00], p32[P_INV01], p32[P_INV10], p32[P_INV11]
    fay_level, oxide_level = p32[P_FAYALITE], p32[P_OXIDE]
    h_scale, h_shift, h_top = p32[P_HIST_SCALE], p32[P_HIST_SHIFT], p32[P_HIST_TOP]
    n_r, n_a = table.shape[0], table.shape[1]
    flat_table = table.reshape(-1)
    top_x, top_y = np.float32(n_a), np.float32(n_r)
    for k in range(n):
        o, hh, ww = boxes[k, 0], boxes[k, 1], boxes[k, 2]
        r0, r1, c0, c1 = _bounds(m, o, hh, ww)
        if r0 < 0:
            for j in range(f.shape[1]):
                f[k, j] = 0.0
            continue
        h, w = r1 - r0 + 1, c1 - c0 + 1
        hw = h * w
        wp = w + 2 * RB
        # --- the box: mask, moments, attenuation, starved pixels
        area = n_starved = m10 = m01 = m20 = m02 = m11 = 0  # exact in integers
        for r in range(h):
            src = o + (r + r0) * ww + c0
            mr = m[src:src + w]
            ar = a[2 * src:2 * (src + w)]
            mo, so, a0, a1 = mb[r * w:(r + 1) * w], stv[r * w:(r + 1) * w], a_in[0, r * w:], a_in[1, r * w:]
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
                a0[j] = lo
                a1[j] = hi
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
        for r in range(h):
            s = r * wp
            for c in range(RB):
                for j in range(3):
                    x[j, s + c] = 0.0
                    x[j, s + RB + w + c] = 0.0
            x0, x1, x2 = x[0, s + RB:s + RB + w], x[1, s + RB:s + RB + w], x[2, s + RB:s + RB + w]
            a0, a1, mr = a_in[0, r * w:(r + 1) * w], a_in[1, r * w:(r + 1) * w], mb[r * w:(r + 1) * w]
            for c in range(w):
                j = _U(c)
                inside = mr[j] != 0
                t_low, t_high = _exp(-a0[j]), _exp(-a1[j])  # unconditional: the loop vectorizes
                x0[j] = t_low if inside else _F0
                x1[j] = t_high if inside else _F0
                x2[j] = _F1 if inside else _F0
        for j in range(3):
            _gauss(x[j], rows, bl[j], h, w, taps)
        b0, b1, b2 = bl[0], bl[1], bl[2]
        for i in range(hw):
            j = _U(i)
            den = max(b2[j], _DEN_FLOOR)
            al[j] = -_ln(max(b0[j] / den, _TINY))
            ah[j] = -_ln(max(b1[j] / den, _TINY))
        # --- per rock pixel: basis thickness, mafic line
        # table coordinates as normalize.basis_thickness forms them (NaN reads the edge); the
        # table lookups in a loop of their own, so many are in flight at once (its cache misses
        # are most of their cost), the arithmetic around them in loops that vectorize
        for i in range(hw):
            j = _U(i)
            lo, hi = al[j], ah[j]
            map_x = hi * x_scale
            map_x = min(map_x, top_x) if map_x >= -1.0 else np.float32(-1.0)
            map_y = lo / max(hi, _A_FLOOR)
            map_y -= r_min
            map_y *= y_scale
            map_y = min(map_y, top_y) if map_y >= -1.0 else np.float32(-1.0)
            xi = int(map_x + _F1)  # floor + 1: the coordinates are >= -1
            yi = int(map_y + _F1)
            wx[j] = float(map_x) - (xi - 1)
            wy[j] = float(map_y) - (yi - 1)
            ix0 = min(max(xi - 1, 0), n_a - 1)
            ix1 = min(xi, n_a - 1)
            row0 = min(max(yi - 1, 0), n_r - 1) * n_a
            row1 = min(yi, n_r - 1) * n_a
            cell[0, j] = 2 * (row0 + ix0)
            cell[1, j] = 2 * (row0 + ix1)
            cell[2, j] = 2 * (row1 + ix0)
            cell[3, j] = 2 * (row1 + ix1)
        for i in range(hw):
            j = _U(i)
            if not mb[j]:
                continue
            fx, fy = wx[j], wy[j]
            gx, gy = 1.0 - fx, 1.0 - fy
            a00, a01, a10, a11 = _U(cell[0, j]), _U(cell[1, j]), _U(cell[2, j]), _U(cell[3, j])
            t_pom[j] = gy * (gx * flat_table[a00] + fx * flat_table[a01]) + fy * (gx * flat_table[a10]
                                                                                  + fx * flat_table[a11])
            t_fe[j] = (gy * (gx * flat_table[a00 + _U(1)] + fx * flat_table[a01 + _U(1)])
                       + fy * (gx * flat_table[a10 + _U(1)] + fx * flat_table[a11 + _U(1)]))
        sum_t = sum_tp = 0.0
        for i in range(hw):
            j = _U(i)
            tp, tf = t_pom[j], t_fe[j]
            total = max(tp + tf, floor)
            fe[j] = tf / total
            syenite = inv00 * tp + inv01 * tf
            mafic = inv10 * tp + inv11 * tf
            t = syenite + mafic
            thick[j] = t
            maf[j] = mafic / max(t, floor)
        for i in range(hw):
            j = _U(i)
            if mb[j]:
                t = thick[j]
                sum_t += t
                sum_tp += max(t, _F0)
        res[_THICK] = sum_t / area
        res[_VOLUME] = sum_tp * (px_area * 1e-3)
        res[_STARVED] = n_starved / area
        # --- which pixels enter the material statistics
        wm = w + 4
        for r in range(h):
            mp[(r + 2) * wm + 2:(r + 2) * wm + 2 + w] = mb[r * w:(r + 1) * w]
        _interior(mp, hz, core, h, w)
        for r in range(h):  # leave mp empty for the next particle
            mp[(r + 2) * wm + 2:(r + 2) * wm + 2 + w] = 0
        if n_starved:
            # the interior's unstarved pixels; else the unstarved rim; else the interior all the same
            n_ok = 0
            for i in range(hw):
                n_ok += core[i] & (1 - stv[i])
            if n_ok:
                for i in range(hw):
                    core[i] &= 1 - stv[i]
            elif n_starved < area:
                for i in range(hw):
                    core[i] = mb[i] & (1 - stv[i])
        # --- material statistics over the core, thickness-weighted
        n_core, s_low, s_high, total_w = _core_sums(core, al, ah, thick, wts, hw)
        res[_INTERIOR] = n_core / area
        res[_A_LOW] = s_low / n_core
        res[_A_HIGH] = s_high / n_core
        res[_R] = s_low / max(s_high, 1e-3 * n_core)
        if not total_w > 0:  # a noise-level rock: weight its pixels equally
            for i in range(hw):
                wts[i] = 1.0 if core[i] else 0.0
            total_w = float(n_core)
        s_maf, s_fe = _weighted_sums(wts, maf, fe, hw)
        mean_maf, mean_fe = s_maf / total_w, s_fe / total_w
        # texture: mafic_frac minus its mean over the core pixels in the window around the pixel
        _box_mean(maf, core, local, h, w, bx, by, pad, rows_box, acc)
        v_maf, v_fe, tex, fay, oxide = _spread(wts, maf, fe, local, hw, mean_maf, mean_fe, fay_level, oxide_level)
        for b in range(nb):
            hist[b] = 0.0
        for i in range(hw):
            j = _U(i)
            if core[j]:
                hv = maf[j] * h_scale
                hv += h_shift
                hv = min(max(hv, _F0), h_top)
                hist[_U(int(hv))] += wts[j]
        res[_MAFIC], res[_MAFIC_STD] = mean_maf, math.sqrt(max(v_maf / total_w, 0.0))
        res[_FE], res[_FE_STD] = mean_fe, math.sqrt(max(v_fe / total_w, 0.0))
        res[_FAYALITE] = fay / total_w
        res[_OXIDE] = oxide / total_w
        res[_TEXTURE] = math.sqrt(max(tex / total_w, 0.0))
        # weighted quantiles: the cumulative weight at the bin edges, linear inside the bin
        # where it crosses q (np.interp's definition: from the last edge at or below the level)
        run = 0.0
        for b in range(nb):
            run, hist[b] = run + hist[b], run
        hist[nb] = run
        j = 0
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
