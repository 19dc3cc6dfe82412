"""sorting: dual-energy X-ray transmission ore sorting, with a digital twin of the sorter."""
from sorting.version import VERSION

__version__ = VERSION
