"""Node simulator: a stand-in for a Hyperliquid non-validating node.

- ``engine.Simulator(seed, coins, start_height, start_time, blocks_per_sec, volume)``:
  ``step(time_ns=None) -> Block`` (events as the node's JSON bytes, ``Block.events()``;
  ``statuses``, ``diffs``, ``fills`` decode them into dicts), ``snapshot() -> (height, coins)``
  of the true state (fileSnapshot shape), ``capture()`` of it for the info server.
  ``market.Market``: a coin's book and flow state; ``rejects.Senders``: the rejections.
- ``writer.NodeWriter(data_dir, modes, partial_p, seed, clock=None)``: ``write_block(block)``
  appends to the hourly files of every stream (by-block and/or streaming); ``local_time`` is
  the clock's reading when given (a live run), else block time + ~350 ms.
- ``info_server.InfoServer``: ``POST /info`` fileSnapshot (l4Snapshots).
- ``service.NodeSim(SimConfig(...))``: all of it; ``start()``/``stop()`` in a
  thread, ``info_url``, ``height``; ``service.run(cfg)`` is ``hlbook sim``. Without a
  start time, block times and local times follow the clock; falling behind is logged.
"""
