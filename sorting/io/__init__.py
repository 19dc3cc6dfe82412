"""Read, write and validate the project's files (docs/formats.md).

The one place that touches calibration folders, ``xrt-rocks/1`` datasets and
``xrt-belt/1`` recordings. Readers check everything once, at the edge, and turn
every problem into :class:`InputError` naming the offending file; code behind
them can trust the arrays. Writers check their arguments with ``ValueError``
(a bad array there is a bug in the caller, not bad user input).

Arrays are ``uint16`` counts ``(lines, pixels, 2)``: axis 0 is time, the last axis
is the energy channel (0 = low, 1 = high).

Layout: :mod:`.calibration`, :mod:`.rocks` and :mod:`.belt` hold one format each,
:mod:`.summary` the ``describe`` behind ``sorting inspect`` (of data; models and YAML are
inspected by the CLI); :mod:`.tiff`, :mod:`.tables` and :mod:`.common` hold the low-level
checks they share, and the rule for output files (:func:`check_output_file`). Import
from ``sorting.io``: every public name is re-exported here.
"""
from __future__ import annotations

from sorting.io.assays import ASSAY_COLUMNS, Assays, read_assays
from sorting.io.belt import (
                          BELT_FORMAT,
                          TRUTH_COLUMNS,
                          BeltRecording,
                          BeltRecordingWriter,
                          read_belt_recording,
)
from sorting.io.calibration import (
                          MIN_CALIBRATION_LINES,
                          WEDGE_COLUMNS,
                          CalibrationScans,
                          WedgeScan,
                          read_calibration,
                          write_calibration,
)
from sorting.io.common import check_output_file
from sorting.io.rocks import (
                          AIR_COLUMN,
                          CHANNELS,
                          LABELS,
                          ROCK_COLUMNS,
                          ROCKS_FORMAT,
                          SPLITS,
                          RockDataset,
                          RockDatasetWriter,
                          RockRow,
                          check_crops,
                          read_air,
                          read_crop,
                          read_rocks_dataset,
)
from sorting.io.summary import describe

__all__ = [
    "AIR_COLUMN", "ASSAY_COLUMNS", "Assays", "read_assays",
    "BELT_FORMAT", "CHANNELS", "LABELS", "MIN_CALIBRATION_LINES", "ROCKS_FORMAT", "ROCK_COLUMNS", "SPLITS",
    "TRUTH_COLUMNS", "WEDGE_COLUMNS",
    "BeltRecording", "BeltRecordingWriter", "CalibrationScans", "RockDataset", "RockDatasetWriter", "RockRow",
    "WedgeScan",
    "check_crops", "check_output_file", "describe", "read_air", "read_belt_recording", "read_calibration", "read_crop",
    "read_rocks_dataset",
    "write_calibration",
]
