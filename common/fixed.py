"""Exact decimals as fixed-point integers.

Prices and sizes travel as decimal strings (``"81307.0"``). Internally they are
ints scaled by ``10**DECIMALS`` so sums, comparisons and bucket rounding are
exact and fast. Output strings are canonical: shortest form with at least one
decimal (``"81307.0"``, ``"0.00014"``).
"""

from __future__ import annotations

DECIMALS = 10
ONE = 10**DECIMALS
_POW10 = [10**i for i in range(DECIMALS + 1)]


def parse(text: str) -> int:
    """Parse a decimal string into a fixed-point int; ValueError if malformed or too precise."""
    dot = text.find(".")
    if dot < 0:
        return int(text) * ONE
    frac_len = len(text) - dot - 1
    if frac_len > DECIMALS or frac_len == 0:
        raise ValueError(f"decimal {text!r} is malformed or has more than {DECIMALS} decimals")
    digits = text[:dot] + text[dot + 1 :]
    if not digits.lstrip("-").isdigit():
        raise ValueError(f"decimal {text!r} is malformed")
    return int(digits) * _POW10[DECIMALS - frac_len]


def fmt(value: int) -> str:
    """Canonical decimal string of a fixed-point int."""
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), ONE)
    if frac == 0:
        return f"{sign}{whole}.0"
    return f"{sign}{whole}.{frac:0{DECIMALS}d}".rstrip("0")


def canonical(text: str) -> str:
    """Canonical form of a decimal string (``"1.50"`` -> ``"1.5"``, ``"3"`` -> ``"3.0"``)."""
    return fmt(parse(text))
