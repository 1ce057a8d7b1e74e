"""Where each record of a training stream comes from: passes, file orders, resume positions.

A training stream is a sequence of passes over the shard files. In pass p the
file list is permuted with a seed derived from (seed, p), the same on every
rank, and pipeline `shard_index` reads every `num_shards`-th file of that
order (file-level sharding). With fewer files than pipelines every pipeline
reads all files and keeps every `num_shards`-th record (element-level).

Everything here is arithmetic on record counts, computed eagerly. The one
TensorFlow op, the stateless permutation in file_order, is shared with the
tf.data pipeline (data_pipeline.reader), which evaluates it in-graph: both
sides must get the same order, so neither re-implements it.
"""

import tensorflow as tf

from data_pipeline.metadata import DataError

_PASS_SEED_STRIDE = 1_000_003


def shard_files_for(files: list, num_shards: int, shard_index: int) -> list | None:
    """The files of input pipeline `shard_index` in the unshuffled order, or None when there are too few files.

    File-level sharding (every `num_shards`-th file) is the cheap way to split
    data between ranks: each rank opens only its own files. It needs at least
    one file per rank.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards})")
    if len(files) < num_shards:
        return None
    return files[shard_index::num_shards]


def pass_seed(seed: int, pass_index):
    """The seed of pass `pass_index` (a Python int or an int64 tensor)."""
    return seed * _PASS_SEED_STRIDE + pass_index


def file_order(num_files: int, seed: int, pass_index) -> tf.Tensor:
    """The file order of pass `pass_index`: identical on every rank, different in every pass.

    A stateless op, so the pipeline computes it in-graph and records_per_pass
    eagerly, with the same result.
    """
    key = tf.random.stateless_uniform(
        [num_files], seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(pass_index, tf.int64)])
    )
    return tf.argsort(key, stable=True)


def pass_files(files: list, num_shards: int, shard_index: int, seed: int, pass_index: int) -> list | None:
    """The files pipeline `shard_index` reads in pass `pass_index`, or None under element-level sharding."""
    if len(files) < num_shards:
        return None
    order = file_order(len(files), seed, pass_index).numpy()
    return [files[i] for i in order[shard_index::num_shards]]


def records_per_pass(
    shard_counts: list[int], num_shards: int, shard_index: int, seed: int | None = None, pass_index: int = 0
) -> int:
    """How many records pipeline `shard_index` reads in one pass.

    Without `seed`, of the unshuffled file order (reader.shard_records); with
    it, of pass `pass_index` of a training stream.
    """
    if len(shard_counts) < num_shards:  # element-level: every num_shards-th record of the concatenation
        total = sum(shard_counts)
        return max(0, (total - shard_index + num_shards - 1) // num_shards)
    if seed is None:
        return sum(shard_files_for(list(shard_counts), num_shards, shard_index))
    return sum(pass_files(list(shard_counts), num_shards, shard_index, seed, pass_index))


def stream_position(
    shard_counts: list[int], num_shards: int, shard_index: int, seed: int, skip: int
) -> tuple[int, int]:
    """(pass, records into it) of record `skip` of pipeline `shard_index`'s training stream."""
    if records_per_pass(shard_counts, num_shards, shard_index) == 0 and len(shard_counts) < num_shards:
        raise DataError(f"{sum(shard_counts)} training records for {num_shards} input pipelines: "
                        f"pipeline {shard_index} gets none")
    if sum(shard_counts) == 0:
        raise DataError("the training shards hold no records")
    p = 0
    while True:
        n = records_per_pass(shard_counts, num_shards, shard_index, seed, p)
        if skip < n:
            return p, skip
        skip -= n
        p += 1


def files_at(files: list, shard_counts: list[int], num_shards: int, shard_index: int, seed: int, skip: int) -> list:
    """The files pipeline `shard_index` reads in the pass that holds record `skip` (all under element-level)."""
    first_pass, _ = stream_position(shard_counts, num_shards, shard_index, seed, skip)
    return pass_files(files, num_shards, shard_index, seed, first_pass) or list(files)
