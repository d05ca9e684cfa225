"""Follow one user's orders and fills, with modifies folded into one event.

    python examples/order_tracker.py --url ws://127.0.0.1:8000/ws --user 0x… --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio

from hlbook.client import HLClient, OrderEvent, OrderTracker


def show(event: OrderEvent) -> None:
    if event.kind == "fill" and event.fill:
        f = event.fill
        print(f"fill      oid={event.oid} {f.get('coin')} {f.get('side')} {f.get('sz')} @ {f.get('px')} tid={f.get('tid')}")
    elif event.kind == "modified":
        print(f"modified  oid={event.prev_oid} -> {event.oid} cloid={event.cloid} sz={event.order and event.order.get('sz')}")
    else:
        print(f"{event.kind:<9} oid={event.oid} {event.coin} cloid={event.cloid}")


async def main(url: str, user: str, seconds: float) -> OrderTracker:
    async with HLClient(url) as client:
        tracker = OrderTracker(show)
        await tracker.subscribe(client, user)
        await asyncio.sleep(seconds)
        print(f"open orders: {sorted(tracker.open_orders)}; tracker: {tracker.metrics()}")
        await tracker.close()
        return tracker


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    parser.add_argument("--user", required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.user, args.seconds))
