"""The software version recorded in every operation record."""

__version__ = "0.1.0"
