"""Physics reference data shared by the product and the twin: the material library
(attenuation from xraydb) and the shipped tube-spectrum table."""
from sorting.physics.materials import MaterialLibrary, load_materials
from sorting.physics.spectra import tube_spectrum

__all__ = ["MaterialLibrary", "load_materials", "tube_spectrum"]
