"""slimtune's version (one place: the package, the CLI and the profiler's result records read it)."""
__version__ = "0.1.0"
