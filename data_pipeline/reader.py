"""Per-rank tf.data input streams over the shards written by build_shards.

A training stream is a sequence of passes. In pass p every pipeline shuffles
the list of shard files with a seed derived from (seed, p), the same on every
rank, and reads every `num_shards`-th file of that order (file-level sharding),
so the ranks read disjoint files and each pass deals the files out anew. With
fewer files than pipelines every pipeline reads all files and keeps every
`num_shards`-th record (element-level sharding, slower). Records are then
shuffled in blocks (seed from (seed, p)), decoded and augmented with stateless ops seeded
by (seed, p, position in the pass): the stream is a function of the position
alone, so a resumed run that skips k records reads what the uninterrupted run
read after its first k.
"""

import logging
import re

import tensorflow as tf

from data_pipeline.metadata import DataError
from data_pipeline.preprocess import Augment, augment, center_crop, decode
from data_pipeline.records import parse_example

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
MAX_PARALLEL_FILES = 8  # files read at once per pipeline: enough to hide one slow file, few open buffers
_PASS_SEED_STRIDE = 1_000_003


def shard_files_for(files: list[str], num_shards: int, shard_index: int) -> list[str] | None:
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

    Without `seed`, of the unshuffled file order (shard_records); with it, of
    pass `pass_index` of a training stream.
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


def _interleave_files(
    files: tf.Tensor, counts: tf.Tensor | None, deterministic: bool, skip_corrupt: bool
) -> tf.data.Dataset:
    """The records of `files`, several files read at once, one record from each in turn.

    With `counts` (records per file, from metadata.json) a file that ends early
    is an error: a file cut at a record boundary reads as a valid, shorter one.
    """
    def read(path, count=None):
        ds = tf.data.TFRecordDataset(path)
        if skip_corrupt:
            # A truncated or corrupt record ends that file's records; the other files go on.
            return ds.ignore_errors(log_warning=True)
        return ds if count is None else ds.apply(tf.data.experimental.assert_cardinality(count))

    names = tf.data.Dataset.from_tensor_slices(files if counts is None else (files, counts))
    return names.interleave(
        read,
        cycle_length=MAX_PARALLEL_FILES,
        block_length=1,
        num_parallel_calls=MAX_PARALLEL_FILES,  # reads wait on storage, not on a core
        deterministic=deterministic,
    )


def _block_shuffle(records: tf.data.Dataset, block: int, seed: tf.Tensor) -> tf.data.Dataset:
    """Permutes each run of `block` records, block k with the stateless seed (seed, k).

    Not Dataset.shuffle: its seed mixes in TensorFlow's global seed, which the
    trainer sets per rank, and it fails on a tensor seed when that global seed
    is 0. A stateless permutation depends on (seed, pass, block) alone.
    """
    def permute(k, records_of_block):
        key = tf.random.stateless_uniform(tf.shape(records_of_block)[:1], seed=tf.stack([seed, k]))
        return tf.gather(records_of_block, tf.argsort(key, stable=True))

    return records.batch(block).enumerate().map(permute).unbatch()


def shard_records(
    files: list[str], num_shards: int, shard_index: int, *, shard_counts: list[int] | None = None,
    deterministic: bool = True, skip_corrupt: bool = False,
) -> tf.data.Dataset:
    """The serialized records of input pipeline `shard_index`, one pass in the unshuffled file order."""
    if not files:
        raise DataError("no shard files given")
    mine = shard_files_for(list(range(len(files))), num_shards, shard_index)
    if mine is None:
        # Every pipeline must see the records in the same order to keep disjoint shares.
        mine, deterministic, shard = list(range(len(files))), True, True
    else:
        shard = False
    counts = None if shard_counts is None else tf.constant([shard_counts[i] for i in mine], tf.int64)
    ds = _interleave_files(tf.constant([files[i] for i in mine]), counts, deterministic, skip_corrupt)
    return ds.shard(num_shards, shard_index) if shard else ds


def training_records(
    files: list[str],
    num_shards: int,
    shard_index: int,
    *,
    seed: int,
    shuffle_buffer: int,
    first_pass: int = 0,
    offset: int = 0,
    count: int = 0,
    shard_counts: list[int] | None = None,
    deterministic: bool = True,
    skip_corrupt: bool = False,
) -> tf.data.Dataset:
    """Pairs (serialized record, int64 [2] augmentation seed) of the training stream.

    Starts `offset` records into pass `first_pass` (stream_position) and holds
    `count` records, or goes on forever with count 0. `shard_counts` (records
    per file) makes a file that holds fewer an error. Passes follow each
    other without end, so a pipeline whose files hold fewer records than
    another's simply starts its next pass sooner: every rank gets as many
    records as it asks for.
    """
    if not files:
        raise DataError("no shard files given")
    element_level = len(files) < num_shards
    if element_level:
        log.warning(
            "%d shard files for %d input pipelines: sharding by element, so every pipeline reads all "
            "files and drops %d of every %d records (%dx the reading of file-level sharding; write at "
            "least %d shards)",
            len(files), num_shards, num_shards - 1, num_shards, num_shards, num_shards,
        )
    names = tf.constant(files)
    counts = None if shard_counts is None else tf.constant(shard_counts, tf.int64)

    def one_pass(p):
        order = file_order(len(files), seed, p)
        mine = order if element_level else order[shard_index::num_shards]
        records = _interleave_files(
            tf.gather(names, mine), None if counts is None else tf.gather(counts, mine),
            True if element_level else deterministic, skip_corrupt,
        )
        if element_level:
            records = records.shard(num_shards, shard_index)
        p_seed = pass_seed(seed, p)
        records = _block_shuffle(records, shuffle_buffer, p_seed)
        # Distinct per pipeline: ranks at the same position draw different crops.
        return records.enumerate().map(
            lambda i, r: (r, tf.stack([p_seed, i * num_shards + shard_index])), num_parallel_calls=None
        )

    ds = tf.data.Dataset.counter(first_pass).flat_map(one_pass)
    if count:
        ds = ds.skip(offset).take(count)
    return ds


def make_dataset(
    files: list[str],
    num_shards: int,
    shard_index: int,
    per_replica_batch_size: int,
    image_size: int,
    channels: int,
    *,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 1024,
    drop_remainder: bool = True,
    skip_records: int = 0,
    num_records: int = 0,
    shard_counts: list[int] | None = None,
    augmentation: Augment | None = None,
    crop_fraction: float = 1.0,
    threads: int = 0,
    deterministic: bool = True,
    skip_corrupt: bool = False,
) -> tf.data.Dataset:
    """The stream of (image, label) batches of one rank.

    Args:
      files: every shard of the split, in a fixed order (the same on all ranks).
      num_shards: number of input pipelines (the world size when training).
      shard_index: this pipeline's index (the rank).
      per_replica_batch_size: examples per batch on this rank.
      image_size, channels: the model's input shape.
      training: shuffle, augment, and pass over the shards again and again;
        the caller bounds each epoch with steps_per_epoch, which is what keeps
        every rank at the same step count. Otherwise one pass in file order,
        centre-cropped.
      seed: data-order and augmentation seed, shared by all ranks.
      shuffle_buffer: serialized records per shuffled block.
      drop_remainder: keep every batch at the full per-replica size.
      skip_records, num_records, shard_counts: a training stream of
        `num_records` records that starts after `skip_records` (a resumed run),
        given the record count of every file in `files`. Without them the
        stream goes on forever. With shard_counts, a file holding fewer
        records than listed is an error.
      augmentation: training-time crop and flip (None: none).
      crop_fraction: the central fraction of the shorter side kept when not
        cropping at random.
      threads: size of this pipeline's private thread pool (0: TensorFlow's
        shared pool); pass the rank's share of the host's cores.
      deterministic: produce elements in order even when parallel reads or
        decodes finish out of order (slower when one file or image is slow).
      skip_corrupt: skip undecodable images and the rest of a shard after a
        corrupt record, instead of failing.
    """
    aug = augmentation or Augment()
    if training:
        first, offset = 0, 0
        if num_records:
            if shard_counts is None or len(shard_counts) != len(files):
                raise ValueError("a bounded training stream needs the record count of every file")
            first, offset = stream_position(shard_counts, num_shards, shard_index, seed, skip_records)
        ds = training_records(
            files, num_shards, shard_index, seed=seed, shuffle_buffer=shuffle_buffer, first_pass=first,
            offset=offset, count=num_records, shard_counts=shard_counts, deterministic=deterministic,
            skip_corrupt=skip_corrupt,
        )

        def parse(serialized, element_seed):
            ex = parse_example(serialized)
            image = augment(decode(ex["image/encoded"], channels), element_seed, image_size, aug, crop_fraction)
            return image, tf.cast(ex["image/class/label"], tf.int32)
    else:
        ds = shard_records(files, num_shards, shard_index, shard_counts=shard_counts, deterministic=deterministic,
                           skip_corrupt=skip_corrupt)

        def parse(serialized):
            ex = parse_example(serialized)
            image = center_crop(decode(ex["image/encoded"], channels), image_size, crop_fraction)
            return image, tf.cast(ex["image/class/label"], tf.int32)

    # With a known share of the cores, decode on all of it and keep two batches
    # ready; autotuning would cost a quarter of the pipeline's CPU (measured)
    # to find much the same figures.
    ds = ds.map(parse, num_parallel_calls=threads or AUTOTUNE, deterministic=deterministic)
    if skip_corrupt:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(per_replica_batch_size, drop_remainder=drop_remainder)
    ds = ds.prefetch(2 if threads else AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    if threads:
        # N ranks on one host each get their share of its cores, not all of them.
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        options.autotune.enabled = False
    return ds.with_options(options)


_OP_NOISE = re.compile(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", re.S)


def find_corrupt_shard(files: list[str], shard_counts: list[int] | None = None) -> tuple[str, str] | None:
    """(file, reason) of the first shard that cannot be read whole, or holds other than its listed count."""
    for i, path in enumerate(files):
        n = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                n += 1
        except tf.errors.OpError as e:
            return path, _OP_NOISE.sub("", str(e)).strip() or type(e).__name__
        if shard_counts is not None and n != shard_counts[i]:
            return path, f"holds {n} records, metadata.json lists {shard_counts[i]}"
    return None


def corrupt_shard_error(files: list[str], error: Exception, shard_counts: list[int] | None = None) -> Exception:
    """A DataError naming the shard behind a record read `error`, or `error` itself if none is found."""
    found = find_corrupt_shard(files, shard_counts)
    if found is None:
        return error
    path, reason = found
    return DataError(
        f"shard {path!r} is corrupt ({reason}); rebuild the shards, or set data.skip_corrupt_records=true to skip it"
    )


def synthetic_dataset(
    per_replica_batch_size: int, image_size: int, channels: int, num_classes: int, seed: int = 0
) -> tf.data.Dataset:
    """One random batch of the model's input shape, repeated forever.

    The standard way to measure training throughput without the input pipeline.
    """
    gen = tf.random.Generator.from_seed(seed)
    images = gen.uniform([per_replica_batch_size, image_size, image_size, channels])
    labels = gen.uniform([per_replica_batch_size], maxval=num_classes, dtype=tf.int32)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()
