"""hlbook: self-hosted Hyperliquid market-data server."""
