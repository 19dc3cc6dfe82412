"""Reference code for tests (as :mod:`numpy.testing`): starved low-channel pixels from the
raw counts, and the feature table of many crops. Not on the product's path.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from sorting.stages.counts import SIGNAL_FLOOR_ADU
from sorting.stages.features import features_batch
from sorting.stages.normalize import check_block

if TYPE_CHECKING:
    from sorting.stages.calibrate import Calibration


def starved(raw: np.ndarray, a: np.ndarray, cal: Calibration, x0: int = 0) -> np.ndarray:
    """Pixels whose low channel is starved: no counts above dark, or ``A_low`` above
    ``cal.starved_a_low`` (STARVED_A, or lower where the calibration measured that
    fewer than STARVED_QUANTA equivalent quanta are left).

    Parameters
    ----------
    raw : (L, W, 2) ndarray of uint16
    a : (L, W, 2) ndarray of float32, ``attenuation(raw, cal, x0)``
    cal : Calibration
    x0 : detector column of column 0

    Returns
    -------
    (L, W) ndarray of bool
    """
    raw = check_block(raw, cal, x0)
    a = np.asarray(a)
    if a.shape != raw.shape:
        raise ValueError(f"`a` (shape {a.shape}) does not match `raw` (shape {raw.shape})")
    cols = slice(x0, x0 + raw.shape[1])
    flags = a[..., 0] > np.float32(cal.starved_a_low)
    no_signal = raw[..., 0] <= cal.dark[cols, 0] + np.float32(SIGNAL_FLOOR_ADU)
    no_signal[:, cal.bad[cols]] = False  # their counts mean nothing; the repaired A speaks for them
    flags |= no_signal
    return flags


def feature_table(crops: Iterable[tuple[np.ndarray, np.ndarray]], cal: Calibration, pixel_pitch_mm: float,
                  line_pitch_mm: float) -> np.ndarray:
    """Features of many particles (:func:`features_batch` on any iterable).

    Parameters
    ----------
    crops : iterable of (a (h, w, 2) float32, mask (h, w) bool)

    Returns
    -------
    (n, F) ndarray of float32; no input gives shape (0, F).
    """
    return features_batch(list(crops), cal, pixel_pitch_mm, line_pitch_mm)
