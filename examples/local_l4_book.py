"""Keep a local L4 book (every resting order) of one coin and print its top.

The book checks block heights and oids; on a gap it asks the server for a fresh
snapshot by itself (``resyncs`` counts that).

    python examples/local_l4_book.py --url ws://127.0.0.1:8000/ws --coin BTC --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio

from hlbook.client import HLClient, L4Book


async def main(url: str, coin: str, seconds: float, strict: bool = True) -> L4Book:
    async with HLClient(url) as client:
        book = L4Book(coin, strict_heights=strict)
        await book.subscribe(client)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(min(2.0, max(0.0, end - loop.time())))
            if book.synced:
                print(book.render(depth=5))
                best = book.side_orders("B")[:1]
                if best:
                    o = best[0]
                    print(f"first in queue at best bid: oid={o.oid} user={o.user} sz={o.sz}")
            else:
                print(f"{coin}: waiting for a snapshot (resyncs={book.resyncs})")
        return book


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    parser.add_argument("--coin", default="BTC")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--lax-heights", action="store_true", help="upstream order_book_server: updates only for changed blocks")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.coin, args.seconds, strict=not args.lax_heights))
