"""Physics of the sorter: tube spectra, attenuation (xraydb) and the dual-layer detector."""
from .detector import DetectorResponse, PixelPattern, build_response, pixel_pattern, sample_counts
from .materials import MaterialLibrary, load_materials
from .spectra import tube_spectrum

__all__ = [
    "DetectorResponse",
    "MaterialLibrary",
    "PixelPattern",
    "build_response",
    "load_materials",
    "pixel_pattern",
    "sample_counts",
    "tube_spectrum",
]
