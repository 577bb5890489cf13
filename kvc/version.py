"""The package version, in one place (the manifest records it; `kvc.__version__` re-exports it)."""
__version__ = "0.1.0"
