"""common.chain: the one rule for "is this the next message?" used by shards,
gateway feeds and the client library."""

from __future__ import annotations

from hlbook.common import wire
from hlbook.common.chain import Chain, Chains, Step


def test_publisher_and_consumer_agree_message_by_message() -> None:
    prev, chain = wire.PrevTracker(), Chain()
    sent = [(h, prev.next(b"B|BTC|", h)) for h in (5, 9, 12, 15)]
    assert sent == [(5, None), (9, 5), (12, 9), (15, 12)]
    assert chain.check(*sent[0]) is Step.NEXT  # nothing held: the first message starts the chain
    assert chain.check(*sent[1]) is Step.NEXT
    assert chain.check(*sent[3]) is Step.GAP  # 12 was lost
    assert chain.check(*sent[2]) is Step.SEEN  # late or replayed: below what is held


def test_first_message_after_a_snapshot() -> None:
    chain = Chain()
    chain.from_snapshot(100)
    assert chain.step(100, 95) is Step.SEEN  # the snapshot holds it
    assert chain.step(103, 97) is Step.NEXT  # its previous message is in the snapshot
    assert chain.step(103, 100) is Step.NEXT
    assert chain.step(103, 101) is Step.GAP  # 101 came after the snapshot and was lost
    assert chain.step(103, None) is Step.NEXT  # a restarted publisher: nothing after the snapshot to miss
    chain.advance(103)
    assert chain.step(104, 101) is Step.GAP  # from now on prev must be exactly the last height
    assert chain.step(104, None) is Step.GAP  # publisher restarted: what it sent before is unknown
    assert chain.step(104, 103) is Step.NEXT


def test_dense_streams_accept_a_restarted_publisher_at_the_next_height() -> None:
    chain = Chain(dense=True)
    chain.advance(10)
    assert chain.step(11, None) is Step.NEXT
    assert chain.step(12, None) is Step.GAP
    assert chain.step(12, 11) is Step.GAP  # 11 was sent and lost
    assert chain.step(12, 10) is Step.NEXT  # the publisher had no 11 (a block missing upstream): nothing lost here
    assert chain.step(11, 10) is Step.NEXT


def test_a_publisher_position_makes_the_chain_exact() -> None:
    chain = Chain()
    chain.at(40)  # e.g. an l4 sync marker: the next update's prev will be 40
    assert chain.step(41, 40) is Step.NEXT
    assert chain.step(41, 39) is Step.GAP
    chain.clear()
    assert chain.step(7, 3) is Step.NEXT


def test_chains_by_topic() -> None:
    chains = Chains(dense_prefixes=(b"S|",))
    assert chains[b"S|0|"].dense and not chains[b"T|BTC|"].dense
    chains[b"T|BTC|"].advance(5)
    assert chains[b"T|BTC|"].step(6, 5) is Step.NEXT
    chains.pop(b"T|BTC|")
    assert chains[b"T|BTC|"].last is None
