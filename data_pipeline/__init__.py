"""Image folders to sharded TFRecords, and per-rank tf.data input streams.

This package never imports Horovod: readers are told their shard with
``num_shards`` and ``shard_index`` by the caller.
"""
