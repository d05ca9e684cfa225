"""Logging: one line per record, service name first."""

from __future__ import annotations

import logging
import sys


def setup(service: str, level: str = "INFO") -> logging.Logger:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    return logging.getLogger(f"hlbook.{service}")
