"""sorting: dual-energy X-ray transmission ore sorting, with a digital twin of the sorter."""
__version__ = "0.1.0"
