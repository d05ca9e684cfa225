"""Node simulator: a stand-in for a Hyperliquid non-validating node.

- ``engine.Simulator(seed, coins, start_height, start_time, blocks_per_sec, volume)``:
  ``step() -> Block`` (``statuses``, ``diffs``, ``fills``: node-format dicts),
  ``snapshot() -> (height, coins)`` of the true state (fileSnapshot shape).
- ``writer.NodeWriter(data_dir, modes, partial_p, seed)``: ``write_block(block)``
  appends to the hourly files of every stream (by-block and/or streaming).
- ``info_server.InfoServer``: ``POST /info`` fileSnapshot (l4Snapshots).
- ``service.NodeSim(SimConfig(...))``: all of it; ``start()``/``stop()`` in a
  thread, ``info_url``, ``height``; ``service.run(cfg)`` is ``hlbook sim``.
"""
