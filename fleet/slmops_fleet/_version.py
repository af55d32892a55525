"""The fleet's version (its own module, so submodules need not import the package's __init__)."""

__version__ = "0.1.0"
