"""Subscribe to a few feeds and print per-subscription metrics and connection state.

    python examples/subscribe_metrics.py --url ws://127.0.0.1:8000/ws --coins BTC ETH --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json

from hlbook.client import HLClient


async def main(url: str, coins: list[str], seconds: float, every: float = 5.0) -> list[dict]:
    async with HLClient(url) as client:
        ids = []
        for coin in coins:
            ids.append(await client.subscribe({"type": "l2Book", "coin": coin}, lambda m: None))
            ids.append(await client.subscribe({"type": "trades", "coin": coin}, lambda m: None))
            ids.append(await client.subscribe({"type": "bbo", "coin": coin}, lambda m: None))
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.sleep(min(every, max(0.0, end - loop.time())))
            for info in client.list_subscriptions():
                sub, m = info["subscription"], client.subscription_metrics(info["id"])
                print(f"#{info['id']:<3} {sub['type']:<7} {sub.get('coin', ''):<8} {info['state']:<8} msgs={m['message_count']:<6} "
                      f"last_min={m['messages_last_minute']:<5} per_min={m['messages_per_minute']:<8} reconnects={m['reconnects']}")
            for conn in client.connection_info():
                print(json.dumps({**conn, **client.connection_metrics(conn["id"])}))
        return [{**info, **client.subscription_metrics(info["id"])} for info in client.list_subscriptions()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws")
    parser.add_argument("--coins", nargs="+", default=["BTC", "ETH"])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.coins, args.seconds))
