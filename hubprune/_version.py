"""The package version, importable without importing the package (setuptools reads it too)."""

__version__ = "0.1.0"
