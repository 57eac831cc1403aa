"""Checkpoint input and output: lazy readers, the streaming shard writer, support files."""

from modelalloy.io.checkpoint import Checkpoint
from modelalloy.io.opener import open_checkpoint
from modelalloy.io.writer import ShardedWriter, parse_size

__all__ = ["Checkpoint", "ShardedWriter", "open_checkpoint", "parse_size"]
