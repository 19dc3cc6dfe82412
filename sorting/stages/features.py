"""Per-particle features (pipeline stage 3): one fixed-order vector of physical quantities.

Every feature is in physical units (mm, mm2, cm3, attenuation, material fractions), so a
model means the same on another machine with its own pitch and calibration. Material
statistics come from the rock's interior (mask eroded by ``EDGE_PX``) without starved
pixels: the thin rim reads noise-dominated material values, a starved pixel none at all.
Distributions are thickness-weighted where that is the physical quantity (the share of the
rock's volume, not of its projected pixels).

The batch path (:func:`dataset_features`, :func:`features_batch` on rock crops) and the
belt (:func:`features_from_ring`, each particle's box read from the stream's ring buffer)
run the same kernel on the particles' boxes, so a model trained on rock crops sees the
numbers the belt produces.
One compiled kernel (:mod:`sorting.stages.features_kernel`) computes a whole batch: each
particle alone in its own bounding box, so its numbers do not depend on its neighbours in
the batch nor on a margin around its box, and :func:`particle_features` (a batch of one)
gives the same numbers. The maps are those of :mod:`sorting.stages.maps` (smoothing: the
normalized Gaussian of the transmission inside the rock, ``blurred_transmission`` /
``smoothed_attenuation``; the basis table of ``basis_thickness``, here read by exact
bilinear interpolation; ``mafic_line``); ``tests/test_features_kernel.py`` holds a slow
numpy reference of every feature.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from tqdm import tqdm

from sorting.stages import features_kernel as kernel
from sorting.stages.normalize import (
    FRACTION_FLOOR_MM,
    attenuation,
    basis_table,
    mafic_inverse,
)
from sorting.stages.particles import SegmentConfig
from sorting.stages.segment import segment_crop

if TYPE_CHECKING:
    from sorting.io import RockDataset
    from sorting.parallel import Workers
    from sorting.stages.calibrate import Calibration

#: bump when any definition changes: models carry it and are refused on a mismatch.
#: 4: the basis table read by exact bilinear interpolation (3: cv2.remap's 1/32-cell weights)
FEATURE_VERSION = "4"

_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
_MAFIC_Q_NAMES = tuple(f"mafic_p{int(q * 100):02d}" for q in _QUANTILES)
FEATURE_NAMES: tuple[str, ...] = (
    "area_mm2",
    "equiv_diameter_mm",
    "length_mm",  # major axis of the moment ellipse (full length)
    "width_mm",  # minor axis
    "elongation",  # length / width
    "thickness_mean_mm",  # equivalent rock thickness on the syenite->hedenbergite line
    "volume_cm3",  # sum of equivalent thickness x pixel area
    "a_low_mean",
    "a_high_mean",
    "r_mean",  # A_low / A_high of the interior sums
    "mafic_mean",  # thickness-weighted: the rock's volume share on the syenite->hedenbergite line
    "mafic_std",
    *_MAFIC_Q_NAMES,
    "fe_frac_mean",
    "fe_frac_std",
    "fayalite_share",  # volume share with mafic_frac above FAYALITE_LEVEL
    "oxide_share",  # volume share with mafic_frac above OXIDE_LEVEL
    "mafic_texture",  # thickness-weighted rms of mafic_frac minus its local mean (TEXTURE_WINDOW_MM)
    "starved_share",  # share of rock pixels with a starved low channel
    "interior_share",  # share of rock pixels in the material statistics (not rim, not starved)
)
N_FEATURES = len(FEATURE_NAMES)

#: rim pixels kept out of the material statistics
EDGE_PX = 2
#: mafic_frac above this: denser / higher Z than any pyroxene-amphibole-feldspar mix (pure
#: hedenbergite reads 1 by definition, hastingsite 1.1, fayalite and ilmenite 3.0-3.1)
FAYALITE_LEVEL = 1.3
#: ... and above this: magnetite (reads 6.6); halfway from fayalite and ilmenite (3.0-3.1),
#: so it takes pixels dominated by magnetite grains
OXIDE_LEVEL = 4.5
#: width (mm) of the box whose mean mafic fraction inside the rock is the local background of
#: ``mafic_texture``: grain-scale heterogeneity (disseminated oxide grains, pyroxene clots of
#: a few mm in an ore rock) stays above it, rock-scale banding and thickness gradients are
#: taken out; a homogeneous syenite reads only noise
TEXTURE_WINDOW_MM = 4.0
#: weighted quantiles of the mafic fraction: fixed bins (O(n), no sort), the cumulative weight
#: at the bin edges interpolated linearly inside the bin where it crosses q (np.interp's
#: definition); values outside the range count in the end bins
_HIST_LO, _HIST_HI, _HIST_STEP = -1.0, 8.0, 0.02
_HIST_BINS = int(round((_HIST_HI - _HIST_LO) / _HIST_STEP))
_HIST_EDGES = _HIST_LO + _HIST_STEP * np.arange(_HIST_BINS + 1)
#: particle pixels per kernel call in the batch path (bounded scratch memory)
_BATCH_PIXELS = 1 << 20
#: the smoothing Gaussian (sigma 1 px): OpenCV's taps, as ``maps.blurred_transmission`` uses
_TAPS = cv2.getGaussianKernel(9, 1.0, cv2.CV_32F).ravel().copy()
#: where each of the kernel's outputs goes in FEATURE_NAMES order
_COLS = np.array([FEATURE_NAMES.index(name) for name in kernel.OUTPUTS], np.int64)
assert sorted(kernel.OUTPUTS) == sorted(FEATURE_NAMES) and len(kernel.OUTPUTS) == N_FEATURES
_Q = np.array(_QUANTILES)
assert _Q.size == kernel.N_QUANTILES


def texture_window(pixel_pitch_mm: float, line_pitch_mm: float) -> tuple[int, int]:
    """Odd box (columns, rows) closest to TEXTURE_WINDOW_MM on this machine's pitches, at least 3 px."""
    def odd(pitch: float) -> int:
        return 2 * max(int(math.floor(0.5 * (TEXTURE_WINDOW_MM / pitch - 1.0) + 0.5)), 1) + 1

    return odd(pixel_pitch_mm), odd(line_pitch_mm)


def _parameters(cal: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """The basis table (nR, nA, 2) and the kernel's float32 parameters for this calibration."""
    tab = basis_table(cal)
    inv = mafic_inverse()
    p = np.empty(kernel.N_P32, np.float32)
    p[kernel.P_X_SCALE], p[kernel.P_R_MIN], p[kernel.P_Y_SCALE] = tab.x_scale, tab.r_min, tab.y_scale
    p[kernel.P_STARVED] = cal.starved_a_low
    p[kernel.P_FAYALITE], p[kernel.P_OXIDE] = FAYALITE_LEVEL, OXIDE_LEVEL
    p[kernel.P_HIST_SCALE] = 1.0 / _HIST_STEP
    p[kernel.P_HIST_SHIFT] = -_HIST_LO / _HIST_STEP
    p[kernel.P_HIST_TOP] = _HIST_BINS - 0.5
    p[kernel.P_INV00], p[kernel.P_INV01], p[kernel.P_INV10], p[kernel.P_INV11] = inv.ravel()
    p[kernel.P_FLOOR] = FRACTION_FLOOR_MM
    return tab.table, p


def _constants(cal: Calibration, pixel_pitch_mm: float, line_pitch_mm: float) -> tuple:
    """(table, p32, win, pitch) for the kernel, built once per calibration and pitches."""
    def build() -> tuple:
        table, p32 = _parameters(cal)
        win = np.array(texture_window(pixel_pitch_mm, line_pitch_mm), np.int64)
        pitch = np.array([pixel_pitch_mm, line_pitch_mm], np.float64)
        return table, p32, win, pitch

    return cal.derived(("features", float(pixel_pitch_mm), float(line_pitch_mm)), build)


class _Workspace:
    """Scratch for the crops' pixels, grown on demand and reused from chunk to chunk (one per thread)."""

    def __init__(self) -> None:
        self.a = np.empty(0, np.float32)
        self.m = np.empty(0, np.uint8)
        self.m_bool = self.m.view(np.bool_)

    def buffers(self, n_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(attenuation, mask as uint8, the same mask memory as bool: masks copy without a cast)."""
        if n_px > self.m.size:
            size = max(n_px, 2 * self.m.size, 1 << 15)
            self.a = np.empty(2 * size, np.float32)
            self.m = np.empty(size, np.uint8)
            self.m_bool = self.m.view(np.bool_)
        return self.a, self.m, self.m_bool


_LOCAL = threading.local()


def _workspace() -> _Workspace:
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = _Workspace()
    return ws


def features_batch(crops: Sequence[tuple[np.ndarray, np.ndarray]], cal: Calibration, pixel_pitch_mm: float,
                   line_pitch_mm: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """The feature vectors of several particles, computed together.

    One compiled pass over the batch (:mod:`sorting.stages.features_kernel`); each particle is
    computed alone in its own bounding box, so its numbers are those it gets alone
    (:func:`particle_features` is this function on one crop).

    Parameters
    ----------
    crops : sequence of (a, mask)
        ``a`` (h, w, 2) float32, attenuation of the particle's box (a margin of belt around
        it is allowed; it may be a strided view), ``mask`` (h, w) bool, its pixels.
    cal : Calibration (its basis table and starved level).
    pixel_pitch_mm, line_pitch_mm : pixel size across and along the belt.
    out : (n, F) ndarray of float32, optional

    Returns
    -------
    (n, F) ndarray of float32 in :data:`FEATURE_NAMES` order; always finite (an empty mask
    gives zeros). Inputs are not modified.
    """
    if not (pixel_pitch_mm > 0 and line_pitch_mm > 0):
        raise ValueError(f"pitches must be > 0, got pixel {pixel_pitch_mm!r}, line {line_pitch_mm!r} mm")
    n = len(crops)
    if out is None:
        out = np.empty((n, N_FEATURES), np.float32)
    elif out.shape != (n, N_FEATURES) or out.dtype != np.float32:
        raise ValueError(f"`out` (shape {out.shape}, {out.dtype}) must be float32 of shape ({n}, {N_FEATURES})")
    if n == 0:
        return out
    checked = []
    for i, (a, mask) in enumerate(crops):
        if type(a) is not np.ndarray:
            a = np.asarray(a)
        if type(mask) is not np.ndarray or mask.dtype != np.bool_:
            mask = np.asarray(mask, dtype=bool)
        if a.ndim != 3 or a.shape[2] != 2 or mask.shape != a.shape[:2]:
            raise ValueError(f"crop {i}: `a` (shape {a.shape}) must be (h, w, 2) and `mask` (shape {mask.shape}) "
                             "(h, w)")
        checked.append((a, mask))
    table, p32, win, pitch = _constants(cal, pixel_pitch_mm, line_pitch_mm)
    i0 = 0
    while i0 < n:
        # the crops are copied one after the other into contiguous scratch: the kernel sees
        # one layout whatever the caller's (views of the stream's ring are strided)
        i1, n_px = i0, 0
        while i1 < n and (i1 == i0 or n_px + checked[i1][1].size <= _BATCH_PIXELS):
            n_px += checked[i1][1].size
            i1 += 1
        a_buf, m_buf, m_bool = _workspace().buffers(n_px)
        boxes = []
        o = 0
        for a, mask in checked[i0:i1]:
            h, w = mask.shape
            a_buf[2 * o:2 * (o + h * w)].reshape(h, w, 2)[...] = a
            m_bool[o:o + h * w].reshape(h, w)[...] = mask
            boxes.append((o, h, w))
            o += h * w
        f = out[i0:i1]
        if not f.flags.c_contiguous:  # the kernel writes C-ordered rows (one compiled signature)
            f = np.empty((i1 - i0, N_FEATURES), np.float32)
        kernel.particles(a_buf, m_buf, np.array(boxes, np.int64), _TAPS, table, p32, _HIST_EDGES, _Q, win, pitch,
                         _COLS, f)
        if f.base is None:
            out[i0:i1] = f
        i0 = i1
    return out


def features_from_ring(ring: np.ndarray, boxes: np.ndarray, masks: Sequence[np.ndarray], cal: Calibration,
                       pixel_pitch_mm: float, line_pitch_mm: float, *, out: np.ndarray) -> np.ndarray:
    """:func:`features_batch` of particles whose attenuation lies in the stream's ring buffer
    (trusted inputs: the streaming loop's own; the same kernel, so the same numbers).

    Parameters
    ----------
    ring : (R, W, 2) float32 C-contiguous, R a power of two; stream line ``i`` is row ``i % R``.
    boxes : (n, 4) int64, per particle: first line (stream index), first column, height, width.
    masks : n C-contiguous bool arrays, (height, width) each.
    out : (n, F) float32 C-contiguous, written and returned.

    The boxes are gathered from the ring (wrapping around its end) by one compiled copy,
    instead of two numpy assignments per particle.
    """
    n = boxes.shape[0]
    if n == 0:
        return out
    n_px = 0
    for m in masks:
        n_px += m.size
    a_buf, m_buf, m_bool = _workspace().buffers(n_px)
    np.concatenate([m.reshape(-1) for m in masks], out=m_bool[:n_px])
    layout = np.empty((n, 3), np.int64)
    kernel.gather_ring(ring, boxes, layout, a_buf)
    table, p32, win, pitch = _constants(cal, pixel_pitch_mm, line_pitch_mm)
    kernel.particles(a_buf, m_buf, layout, _TAPS, table, p32, _HIST_EDGES, _Q, win, pitch, _COLS, out)
    return out


def particle_features(a: np.ndarray, mask: np.ndarray, cal: Calibration, pixel_pitch_mm: float,
                      line_pitch_mm: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """The feature vector of one particle: :func:`features_batch` of one crop.

    Parameters
    ----------
    a : (h, w, 2) ndarray of float32
        Attenuation of the particle's box (a margin of belt around it is allowed).
    mask : (h, w) ndarray of bool
        The particle's pixels.
    cal : Calibration (its basis table and starved level).
    pixel_pitch_mm, line_pitch_mm : pixel size across and along the belt.
    out : (F,) ndarray of float32, optional

    Returns
    -------
    (F,) ndarray of float32 in :data:`FEATURE_NAMES` order; always finite (an empty mask
    gives zeros). Inputs are not modified.
    """
    a = np.asarray(a)
    mask = np.asarray(mask, dtype=bool)
    if a.ndim != 3 or a.shape[2] != 2 or mask.shape != a.shape[:2]:
        raise ValueError(f"`a` (shape {a.shape}) must be (h, w, 2) and `mask` (shape {mask.shape}) (h, w)")
    if out is None:
        out = np.zeros(N_FEATURES, np.float32)
    elif out.shape != (N_FEATURES,) or out.dtype != np.float32:
        raise ValueError(f"`out` (shape {out.shape}, {out.dtype}) must be float32 of shape ({N_FEATURES},)")
    features_batch([(a, mask)], cal, pixel_pitch_mm, line_pitch_mm, out=out.reshape(1, N_FEATURES))
    return out


#: rocks whose features are computed together in the batch path
_DATASET_BATCH = 32
#: rocks per parallel task of :func:`dataset_features` (bounds: per-task overhead vs. balance)
_CHUNK_MIN, _CHUNK_MAX = 32, 512


class _CropFiles:
    """What a worker needs to read one chunk's crops (picklable; no calibration scans, no other rows)."""

    def __init__(self, root: Path, pixels: int, rows: tuple) -> None:
        self.root, self.pixels, self.rows = root, pixels, rows

    def crop(self, k: int) -> np.ndarray:
        from sorting.io.rocks import read_crop

        return read_crop(self.root, self.rows[k], self.pixels)

    def air(self, k: int, shape: tuple[int, ...]) -> np.ndarray | None:
        from sorting.io.rocks import read_air

        return read_air(self.root, self.rows[k], shape)


def _chunk_features(source, indices: Sequence[int], cal: Calibration, pp: float, lp: float,
                    config: SegmentConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One task of :func:`dataset_features`: read, normalize, segment and measure the rocks
    ``indices`` of ``source`` (a dataset, or the :class:`_CropFiles` of a chunk sent to a
    worker). Only the features travel back.

    The chunk runs on its own copy of the calibration (same arrays, empty table cache): the
    tables derived per crop window (one per crop position and width) are dropped with it,
    so memory stays bounded however many crops the dataset holds.

    OpenCV runs single-threaded here: a crop is too small for its thread pool, whose hand-offs
    cost more than they save (6,000 saved crops in this process: 1,530-1,790 crops/s on 1.3
    cores with OpenCV's two threads, 2,070-2,160 crops/s on one core with one).
    """
    from sorting.parallel import opencv_threads

    with opencv_threads(1):
        return _chunk_features_one_thread(source, indices, cal, pp, lp, config)


def _chunk_features_one_thread(source, indices: Sequence[int], cal: Calibration, pp: float, lp: float,
                               config: SegmentConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    cal = dataclasses.replace(cal)
    x = np.full((len(indices), N_FEATURES), np.nan, np.float32)
    ok = np.zeros(len(indices), bool)
    problems: list[str] = []
    pending: list[int] = []
    crops: list[tuple[np.ndarray, np.ndarray]] = []
    air = getattr(source, "air", None)
    for k, i in enumerate(indices):
        row = source.rows[i]
        counts = source.crop(i)
        # a crop saved by the sorter carries the air level the loop normalized it with (a source
        # without air levels: every crop uses the calibration's)
        level = air(i, counts.shape) if air is not None else None
        a = attenuation(counts, cal, row.x0, log_flat=level)
        mask, problem = segment_crop(a, cal, row.x0, pp, lp, config)
        if problem is not None:
            problems.append(f"{row.rock_id}: {problem}")
            continue
        pending.append(k)
        crops.append((a, mask))
        if len(pending) >= _DATASET_BATCH:
            x[pending] = features_batch(crops, cal, pp, lp)
            ok[pending] = True
            pending, crops = [], []
    if pending:
        x[pending] = features_batch(crops, cal, pp, lp)
        ok[pending] = True
    return x, ok, problems


def dataset_features(ds: RockDataset, cal: Calibration, indices: Iterable[int] | None = None,
                     progress: bool = True, config: SegmentConfig = SegmentConfig(),
                     workers: Workers | None = None, chunk_rocks: int | None = None,
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The batch path over an ``xrt-rocks/1`` dataset: crop -> attenuation -> segment_crop
    -> features of the rock's box (:func:`features_batch`, a few dozen rocks at a time).
    A row with an ``air_file`` (a crop saved by the sorter) is normalized with the air level
    it carries (the one the loop tracked and used), any other with the calibration's flat field.

    The rocks are cut into chunks (``chunk_rocks``, by default about four per worker, 32-512
    rocks) that run as independent tasks on ``workers`` (:mod:`sorting.parallel`: local
    processes or a Dask cluster; default: this process). Each task reads its own crops, so
    the crops are streamed and never all in memory; only the feature rows come back. The
    numbers do not depend on the chunking nor on where the chunks ran.

    Returns
    -------
    X : (n, F) float32, NaN rows where the crop gave no usable rock
    ok : (n,) bool
    problems : one line per failed row, ``"rock_id: problem"``
    """
    from sorting.parallel import Workers, imap

    workers = workers or Workers(1)
    idx = list(range(len(ds.rows))) if indices is None else [int(i) for i in indices]
    n = len(idx)
    x = np.full((n, N_FEATURES), np.nan, np.float32)
    ok = np.zeros(n, bool)
    problems: list[str] = []
    pp, lp = float(ds.pixel_pitch_mm), float(ds.line_pitch_mm)
    if n == 0:
        return x, ok, problems
    if chunk_rocks is None:
        par = 1 if workers.scheduler is None and workers.local_jobs == 1 else max(workers.local_jobs, 2)
        chunk_rocks = min(max(-(-n // (4 * par)), _CHUNK_MIN), _CHUNK_MAX)
    starts = range(0, n, int(chunk_rocks))
    if workers.scheduler is None and workers.local_jobs == 1:  # in this process: the dataset itself
        tasks = ((ds, idx[s:s + chunk_rocks], cal, pp, lp, config) for s in starts)
    else:  # to a worker: the chunk's rows and where its files are
        tasks = ((_CropFiles(Path(ds.root), ds.pixels, tuple(ds.rows[i] for i in idx[s:s + chunk_rocks])),
                  range(min(chunk_rocks, n - s)), cal, pp, lp, config) for s in starts)
    with tqdm(total=n, desc="features", unit="rock", disable=None if progress else True) as bar:
        for s, (xc, okc, pc) in zip(starts, imap(_chunk_features, tasks, workers)):
            x[s:s + len(xc)] = xc
            ok[s:s + len(xc)] = okc
            problems.extend(pc)
            bar.update(len(xc))
    return x, ok, problems
