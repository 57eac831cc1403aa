"""The package version, apart from `__init__` so that the engine can record it without importing the package's front door."""

__version__ = "0.1.0"
