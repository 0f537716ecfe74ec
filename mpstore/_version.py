"""The package's version, in a leaf module: the package root, the store's ``ping`` and the
CLI read it from here, so none of them has to import another to know it."""

__all__ = ["__version__"]

__version__ = "0.1.0"
