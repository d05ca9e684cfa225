"""Recent blocks kept for replay, served over a ROUTER socket."""

from __future__ import annotations

from collections import deque

import zmq

from hlbook.common import topics, wire
from hlbook.services.ingest import metrics
from hlbook.services.ingest.messages import Message


class ReplayStore:
    """The published messages of the last ``capacity`` blocks, as sent (bytes), in the order
    they were sent: a block's books phase, (streaming) its trades, later its details phase
    (another block's books may come between)."""

    def __init__(self, capacity: int, phases: int = 2) -> None:
        self.blocks: deque[tuple[int, list[Message]]] = deque(maxlen=phases * capacity)  # entries: a block's phases
        self.head: int | None = None  # newest height held
        self.evicted = -1  # the highest height one of whose entries was dropped

    def add(self, height: int, messages: list[Message]) -> None:
        if len(self.blocks) == self.blocks.maxlen:
            self.evicted = max(self.evicted, self.blocks[0][0])
        self.blocks.append((height, messages))
        self.head = height if self.head is None else max(self.head, height)

    @property
    def oldest(self) -> int | None:
        """The oldest height held whole (every phase): entries of later blocks' books may have
        been dropped before an earlier block's details (streaming: its trades too)."""
        if not self.blocks:
            return None
        height, messages = self.blocks[0]
        first = height if messages and messages[0][0] == topics.HEADER else height + 1
        return max(first, self.evicted + 1)

    def answer(self, request: wire.ReplayRequest) -> list[bytes]:
        """Reply frames: ReplayReply, then topic/payload pairs."""
        oldest, head = self.oldest, self.head
        if request.op != "replay":
            return [wire.encode(wire.ReplayReply(False, oldest, head, f"unknown op {request.op!r}"))]
        if oldest is not None and request.from_height < oldest and not request.partial:
            metrics.REPLAY_REQUESTS.labels("too_old").inc()
            error = f"height {request.from_height} is no longer held (oldest {oldest})"
            return [wire.encode(wire.ReplayReply(False, oldest, head, error))]
        frames = [wire.encode(wire.ReplayReply(True, oldest, head))]
        prefixes = tuple(request.prefixes)
        for height, messages in self.blocks:
            if height < request.from_height:
                continue
            for topic, payload in messages:
                if not prefixes or topic.startswith(prefixes):
                    frames += (topic, payload)
        metrics.REPLAY_REQUESTS.labels("ok").inc()
        return frames


SERVED_AT_ONCE = 100  # requests answered per wake-up (after a restart every consumer asks at once)


def serve_waiting(router: zmq.Socket, store: ReplayStore) -> None:
    """Answer the requests waiting on ``router``, up to ``SERVED_AT_ONCE``."""
    for _ in range(SERVED_AT_ONCE):
        try:
            serve_one(router, store, zmq.NOBLOCK)
        except zmq.Again:
            return


def serve_one(router: zmq.Socket, store: ReplayStore, flags: int = 0) -> None:
    """Answer one request waiting on ``router`` (REQ or DEALER peers; every frame
    before the request comes back first, so a DEALER can match replies by id)."""
    frames = router.recv_multipart(flags)
    envelope, body = frames[:-1], frames[-1]  # identity, any request-id frames, delimiter: all come back
    if not envelope:  # a ROUTER always prepends the identity: not reached
        return
    try:
        request = wire.decode(body, wire.ReplayRequest)
    except Exception as exc:  # malformed request: answer, never crash
        metrics.REPLAY_REQUESTS.labels("bad_request").inc()
        reply = [wire.encode(wire.ReplayReply(False, store.oldest, store.head, f"bad request: {exc}"))]
    else:
        reply = store.answer(request)
    wire.reply(router, envelope + reply, "ingest")
