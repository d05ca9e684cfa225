"""``hlbook replay``: the gateway protocol over a past span of the node's files, from L4 checkpoints."""
