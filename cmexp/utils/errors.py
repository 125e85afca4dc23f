"""Errors that the command-line layer reports on one line (torch-free)."""

from __future__ import annotations


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss is NaN or infinite; the last good checkpoint is kept."""
