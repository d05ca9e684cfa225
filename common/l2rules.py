"""The l2Book parameters the public API allows: depth, ``nSigFigs`` and ``mantissa``
(checked by the gateway on subscribe and by the shards on queries)."""

from __future__ import annotations

MAX_LEVELS = 100
N_SIG_FIGS = (2, 3, 4, 5)
MANTISSAS = (1, 2, 5)


def validate(n_sig_figs: int | None, mantissa: int | None) -> None:
    """ValueError unless the aggregation is one the API allows."""
    if n_sig_figs is None:
        if mantissa is not None:
            raise ValueError("mantissa requires nSigFigs")
        return
    if n_sig_figs not in N_SIG_FIGS:
        raise ValueError(f"nSigFigs must be 2..5 or null, not {n_sig_figs}")
    if mantissa is not None and mantissa not in MANTISSAS:
        raise ValueError(f"mantissa must be 1, 2 or 5, not {mantissa}")
    if mantissa not in (None, 1) and n_sig_figs != 5:
        raise ValueError("mantissa is only allowed with nSigFigs 5")
