"""Where a node writes its streams: ``<data-dir>/hl/data/node_<stream>_<mode>/hourly/YYYYMMDD/H``
(hour not zero-padded)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

MODES = ("by-block", "streaming")
_MODE_SUFFIX = {"by-block": "by_block", "streaming": "streaming"}


def stream_dir(data_dir: str | Path, stream: str, mode: str) -> Path:
    """Folder of one stream's hourly files; ``stream`` is one of models.STREAMS."""
    return Path(data_dir) / "hl" / "data" / f"node_{stream}_{_MODE_SUFFIX[mode]}" / "hourly"


def hour_file(data_dir: str | Path, stream: str, mode: str, when: datetime) -> Path:
    """The file a node writes ``stream`` into during the hour of ``when`` (node local time)."""
    return stream_dir(data_dir, stream, mode) / when.strftime("%Y%m%d") / str(when.hour)


def hour_key(path: Path) -> tuple[str, int]:
    """Sort key of an hourly file: (YYYYMMDD, hour)."""
    return path.parent.name, int(path.name)


def hour_files(data_dir: str | Path, stream: str, mode: str) -> list[Path]:
    """All hourly files of a stream, oldest first (hours sort numerically, across days)."""
    root = stream_dir(data_dir, stream, mode)
    if not root.is_dir():
        return []
    files = [
        f
        for day in root.iterdir()
        if day.is_dir() and day.name.isdigit()
        for f in day.iterdir()
        if f.is_file() and f.name.isdigit()
    ]
    return sorted(files, key=hour_key)


def _hours(day: Path) -> list[Path]:
    return sorted((f for f in day.iterdir() if f.name.isdigit() and f.is_file()), key=lambda f: int(f.name))


def next_hour_file(path: Path) -> Path | None:
    """The first hourly file after ``path`` (same day, else the next day that has
    one), listing only the current day and the day folders: cheap to poll."""
    day = path.parent
    later = [f for f in _hours(day) if int(f.name) > int(path.name)] if day.is_dir() else []
    if later:
        return later[0]
    for next_day in sorted(d for d in day.parent.iterdir() if d.name.isdigit() and d.name > day.name):
        hours = _hours(next_day)
        if hours:
            return hours[0]
    return None
