"""slmops builder: import, convert and quantize per hardware profile, evaluate, package and sign."""

__all__ = ["__version__"]
__version__ = "0.1.0"
