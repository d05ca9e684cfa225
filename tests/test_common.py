"""common/: exact decimals, topics, wire codec, node file layout."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from hlbook.common import fixed, nodefiles, topics, wire
from hlbook.common.config import env
from hlbook.common.models import block_time_ms


@pytest.mark.parametrize(
    "text, canonical",
    [("81307.0", "81307.0"), ("81307", "81307.0"), ("0.00014", "0.00014"), ("1.50", "1.5"),
     ("-0.5", "-0.5"), ("0.0", "0.0"), ("1110136.0", "1110136.0"), ("0.0000000001", "0.0000000001")],
)
def test_decimals_are_exact_and_canonical(text: str, canonical: str) -> None:
    assert fixed.canonical(text) == canonical
    assert fixed.fmt(fixed.parse(text)) == canonical


def test_decimal_arithmetic_is_exact() -> None:
    total = sum(fixed.parse(s) for s in ["0.1"] * 10 + ["0.2"])
    assert fixed.fmt(total) == "1.2"
    assert fixed.fmt(fixed.parse("0.20195") - fixed.parse("0.00195")) == "0.2"


@pytest.mark.parametrize("bad", ["", "abc", "1.2.3", "1e5", "0.00000000001", "1.", "--1"])
def test_malformed_decimals_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        fixed.parse(bad)


def test_topic_prefixes_are_exact() -> None:
    assert not topics.book("@10").startswith(topics.book("@1"))
    assert topics.book("@1") == b"B|@1|"
    assert topics.l2("BTC", 5, 2, 20) == b"L2|BTC|5|2|20|" and topics.l2("BTC", None, None, 100) == b"L2|BTC|-|-|100|"
    assert topics.l2("BTC") == b"L2|BTC|-|-|"  # without a depth: the prefix of every depth
    assert topics.coin_of(topics.l2("PURR/USDC", 3)) == "PURR/USDC"
    assert topics.coin_of(topics.user("0xABC")) == "0xabc"
    assert topics.split(b"L2|dex:XYZ|4|-|") == ["L2", "dex:XYZ", "4", "-"]
    assert {topics.shard_of(c, 4) for c in ["BTC", "ETH", "SOL", "@1", "@107", "HYPE", "kPEPE"]} <= {0, 1, 2, 3}


def test_wire_roundtrip() -> None:
    header = wire.BlockHeader(7, 6, 1, "t", "l", 2, 3, ["BTC"])
    assert wire.decode(wire.encode(header), wire.BlockHeader) == header
    assert wire.decode(wire.encode(header))["book_coins"] == ["BTC"]
    end = wire.BlockEnd(7, 6, 1, 900, ["BTC"], ["order_statuses"])
    assert wire.decode(wire.encode(end), wire.BlockEnd) == end
    sync = wire.L4Sync(9, 7, "BTC")
    assert wire.decode(wire.encode(sync), wire.L4Message) == sync  # L4| carries a tagged union
    assert wire.decode(wire.encode(wire.L4Updates(9, 7, 1, "BTC", [], [])), wire.L4Message).height == 9


def test_node_file_layout_sorts_hours_numerically(tmp_path: Path) -> None:
    for day, hour in [("20261122", 9), ("20261122", 10), ("20261122", 23), ("20261123", 0)]:
        path = nodefiles.hour_file(tmp_path, "fills", "by-block", datetime(int(day[:4]), int(day[4:6]), int(day[6:]), hour))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    names = [f"{p.parent.name}/{p.name}" for p in nodefiles.hour_files(tmp_path, "fills", "by-block")]
    assert names == ["20261122/9", "20261122/10", "20261122/23", "20261123/0"]
    assert "node_fills_by_block/hourly" in str(nodefiles.stream_dir(tmp_path, "fills", "by-block"))
    files = nodefiles.hour_files(tmp_path, "fills", "by-block")
    assert [nodefiles.next_hour_file(f) for f in files] == [*files[1:], None]


def test_block_time_and_env_names() -> None:
    assert block_time_ms("2026-05-05T17:39:13.024084407") == 1778002753024
    assert env("data-dir") == "HLBOOK_DATA_DIR"
