"""Human-readable numbers, the way the docs and the Hub print them (decimal MB: 7,340,032 B = 7.34 MB)."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """Decimal units with two decimals: 7340032 → '7.34 MB'."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"

