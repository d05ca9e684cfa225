"""Gateway: the public Hyperliquid WebSocket/HTTP protocol over the book shards."""
