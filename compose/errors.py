"""Errors raised by the composition engine (torch-free, so the CLI can catch them cheaply)."""

from __future__ import annotations


class CompositionError(ValueError):
    """Adapters that do not fit the model or each other; the message names the module and shapes."""
