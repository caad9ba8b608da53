"""BLOCK-EM reference pipeline."""

__version__ = "0.1.0"
