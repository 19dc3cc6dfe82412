"""TIFF counts files: reading and validating ``(h, w, 2)`` uint16 pages, writing them; and the
optional air-level files of saved crops (``(h, w, 2)`` float32, docs/formats.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from sorting.errors import InputError
from sorting.io.common import oneline, require


def _check_pages(path: Path, n_pages: int, shape: tuple, spp: int, planar) -> None:
    """One page, channels interleaved: the layout of docs/formats.md (no guessing)."""
    if n_pages != 1:
        raise InputError(path, f"has {n_pages} pages of shape {shape}; expected one page (h, w, 2) "
                               "with the low and high channels as the 2 samples of each pixel")
    if spp > 1 and planar == tifffile.PLANARCONFIG.SEPARATE:
        raise InputError(path, f"channels are stored as separate planes (shape {shape}); expected "
                               "(h, w, 2) with planarconfig contig (samples interleaved per pixel)")


def _open_page(path: Path, decode: bool, air: bool = False) -> tuple[tuple, np.dtype, np.ndarray | None]:
    """The one place a TIFF is opened and checked: pages, layout, that the pixel data lies
    inside the file (a truncated copy), and, with ``decode``, the pixels themselves. Every
    failure is an InputError with the same wording, whichever verb reads the file."""
    require(path)
    data = None
    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            n_pages = len(tif.pages)
            page = tif.pages[0]
            shape, dtype = tuple(page.shape), np.dtype(page.dtype)
            spp, planar = page.samplesperpixel, page.planarconfig
            end = max((o + n for o, n in zip(page.dataoffsets, page.databytecounts)), default=0)
            _check_pages(path, n_pages, shape, spp, planar)
            _check_layout(path, shape, dtype, "air-level TIFF" if air else "TIFF", air)
            if end > size:
                raise InputError(path, f"is truncated: its pixel data ends at byte {end}, the file has {size} bytes")
            if decode:
                data = page.asarray()
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types on corrupt files; all mean bad input
        raise InputError(path, f"not a readable TIFF ({oneline(exc)})") from None
    return shape, dtype, data


def read_tiff(path: Path) -> np.ndarray:
    """One single-page ``(h, w, 2)`` uint16 TIFF, channels as samples; native byte order."""
    _, _, data = _open_page(path, decode=True)
    return _check_counts(path, data, "TIFF")


def _check_layout(path: Path, shape: tuple[int, ...], dtype: np.dtype, what: str, air: bool = False) -> None:
    if len(shape) != 3:
        raise InputError(path, f"{what} has shape {shape} ({len(shape)}-D); expected (h, w, 2): "
                               "rows, columns, 2 energy channels (low, high)")
    if shape[2] != 2:
        raise InputError(path, f"{what} has {shape[2]} channels (shape {shape}); expected 2 (low, high)")
    if air:
        if dtype.kind != "f" or dtype.itemsize != 4:
            raise InputError(path, f"{what} has dtype {dtype.name}; expected float32 ln(air - dark)")
    elif dtype.kind != "u" or dtype.itemsize != 2:
        raise InputError(path, f"{what} has dtype {dtype.name}; expected uint16 raw counts")
    if shape[0] < 1 or shape[1] < 1:
        raise InputError(path, f"{what} is empty (shape {shape})")


def _check_counts(path: Path, a: np.ndarray, what: str) -> np.ndarray:
    _check_layout(path, a.shape, a.dtype, what)
    return a.astype(np.uint16, copy=False)


def read_air_tiff(path: Path) -> np.ndarray:
    """An air-level file of a saved crop: one ``(h, w, 2)`` float32 page of ln(air - dark),
    finite, native byte order (docs/formats.md, ``air_file``)."""
    _, _, data = _open_page(path, decode=True, air=True)
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        raise InputError(path, "air-level TIFF holds values that are not finite numbers")
    return data


def air_tiff_shape(path: Path) -> tuple[int, ...]:
    """:func:`tiff_shape` of an air-level file."""
    shape, _, _ = _open_page(path, decode=False, air=True)
    return shape


def tiff_shape(path: Path) -> tuple[int, ...]:
    """The checks of :func:`read_tiff` that need no decoding: pages, layout, dtype, and
    that the pixel data lies inside the file (a truncated copy fails here). Returns the shape."""
    shape, _, _ = _open_page(path, decode=False)
    return shape


# ------------------------------------------------------------ writer helpers
def check_array(a: np.ndarray, name: str, pixels: int | None = None) -> None:
    if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[2] != 2 or a.dtype != np.uint16:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a (n, w, 2) uint16 array, got {desc}")
    if pixels is not None and a.shape[1] != pixels:
        raise ValueError(f"{name} has {a.shape[1]} pixels; the calibration has {pixels}")


def write_tiff(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, a, photometric="minisblack", planarconfig="contig")


def write_air_tiff(path: Path, a: np.ndarray) -> None:
    """An air-level file: ``(h, w, 2)`` float32, deflate-compressed (its rows repeat: the level
    changes only every few hundred stream lines)."""
    if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[2] != 2 or a.dtype != np.float32:
        desc = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"an air level must be a (h, w, 2) float32 array, got {desc}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, a, photometric="minisblack", planarconfig="contig", compression="zlib")
