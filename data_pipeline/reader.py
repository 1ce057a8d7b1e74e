"""Per-rank tf.data input streams over the shards written by build_shards.

    train_stream(files, TrainOptions(...))  # shuffled, augmented, pass after pass
    eval_stream(files, EvalOptions(...))    # one pass in file order, centre-cropped

A training stream is a sequence of passes. In pass p every pipeline shuffles
the list of shard files with a seed derived from (seed, p), the same on every
rank, and reads every `num_shards`-th file of that order (file-level sharding),
so the ranks read disjoint files and each pass deals the files out anew. With
fewer files than pipelines every pipeline reads all files and keeps every
`num_shards`-th record (element-level sharding, slower). Records are then
shuffled in blocks (seed from (seed, p)), decoded and augmented with stateless
ops seeded by (seed, p, position in the pass), and batches mixed (mixup,
cutmix) with seeds from (seed, batch position): the stream is a function of the
position alone, so a resumed run that skips k records reads what the
uninterrupted run read after its first k. The arithmetic of passes and
positions is in data_pipeline.positions.
"""

import logging
import re

import tensorflow as tf

from data_pipeline.keras_augment import mix_batches, rand_augment
from data_pipeline.metadata import DataError
from data_pipeline.positions import file_order, pass_seed, shard_files_for, stream_position
from data_pipeline.preprocess import augment, decode, eval_image
from data_pipeline.records import parse_image_and_label
from data_pipeline.stream_options import EvalOptions, StreamOptions, TrainOptions

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
RANDAUGMENT_STREAM = 1  # folded into a record's seed for its RandAugment draws, apart from its crop and flip
MAX_PARALLEL_FILES = 8  # files read at once per pipeline: enough to hide one slow file, few open buffers


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
    if offset:
        ds = ds.skip(offset)
    return ds.take(count) if count else ds


def _train_parse(options: TrainOptions):
    """(record, augmentation seed) to (augmented image, label)."""
    aug = options.augment
    more = rand_augment(aug.randaugment_layers, aug.randaugment_magnitude) if aug.randaugment_layers else None

    def parse(serialized, element_seed):
        encoded, label = parse_image_and_label(serialized, options.label_offset)
        image = decode(encoded, options.channels)
        image = augment(image, element_seed, options.image_size, aug, options.crop_fraction)
        if more is not None:
            image.set_shape([options.image_size, options.image_size, options.channels])  # a random crop loses it
            image = more(image, tf.random.experimental.stateless_fold_in(element_seed, RANDAUGMENT_STREAM))
        return image, label
    return parse


def _eval_parse(options: EvalOptions):
    """Record to (centre-cropped image, label)."""
    def parse(serialized):
        encoded, label = parse_image_and_label(serialized, options.label_offset)
        return eval_image(encoded, options.channels, options.image_size, options.crop_fraction), label
    return parse


def _decode_and_batch(ds: tf.data.Dataset, parse, options: StreamOptions, drop_remainder: bool,
                      count: int = 0, skipped: tf.Variable | None = None, mix=None) -> tf.data.Dataset:
    """Records to (image, label) batches, on the pipeline's share of the cores.

    Holds `count` examples (0: all). With options.skip_corrupt, a record that
    does not decode is replaced by the next one, so the stream still holds
    `count` examples, and `skipped` (an int64 variable) grows by the records
    each batch skipped as that batch is handed out, not when it is prefetched.
    `mix` (batches -> batches) runs on the batches before the prefetch.
    """
    threads, deterministic = options.threads, options.deterministic
    # With a known share of the cores, decode on all of it and keep two batches
    # ready; autotuning would cost a quarter of the pipeline's CPU (measured)
    # to find much the same figures.
    if options.skip_corrupt:
        def numbered(i, record):
            return (i, *(parse(*record) if isinstance(record, tuple) else parse(record)))

        ds = ds.enumerate().map(numbered, num_parallel_calls=threads or AUTOTUNE, deterministic=deterministic)
        # Each example carries the records skipped just before it: its position minus the last one's, minus 1.
        ds = ds.ignore_errors(log_warning=True).scan(
            tf.constant(-1, tf.int64), lambda last, e: (e[0], (e[1], e[2], e[0] - last - 1)))
    else:
        ds = ds.map(parse, num_parallel_calls=threads or AUTOTUNE, deterministic=deterministic)
    if count:
        ds = ds.take(count)
    ds = ds.batch(options.per_replica_batch_size, drop_remainder=drop_remainder)
    if mix is not None:
        ds = mix(ds)
    ds = ds.prefetch(2 if threads else AUTOTUNE)
    tf_options = tf.data.Options()
    tf_options.deterministic = deterministic
    if threads:
        # N ranks on one host each get their share of its cores, not all of them.
        tf_options.threading.private_threadpool_size = threads
        tf_options.threading.max_intra_op_parallelism = 1
        tf_options.autotune.enabled = False
    ds = ds.with_options(tf_options)
    if options.skip_corrupt:
        def hand_out(images, labels, gaps):
            if skipped is None:
                return images, labels
            with tf.control_dependencies([skipped.assign_add(tf.reduce_sum(gaps))]):
                return tf.identity(images), tf.identity(labels)
        ds = ds.map(hand_out)  # after the prefetch: runs as the consumer takes the batch
    return ds


def train_stream(files: list[str], options: TrainOptions, skipped: tf.Variable | None = None) -> tf.data.Dataset:
    """This pipeline's training (image, label) batches: shuffled, augmented, pass after pass.

    `files` is every shard of the split, in a fixed order (the same on all
    ranks). Every batch has the full per-replica size. With skip_corrupt, an
    undecodable record is replaced by the next one (the stream keeps its
    length, so every rank its step count) and counted in `skipped`.
    """
    o = options
    first, offset = 0, 0
    if o.num_records:
        if o.shard_counts is None or len(o.shard_counts) != len(files):
            raise ValueError("a bounded training stream needs the record count of every file")
        first, offset = stream_position(list(o.shard_counts), o.num_shards, o.shard_index, o.seed, o.skip_records)
    # Skipping, the records go on past num_records: the examples, not the records, are counted.
    ds = training_records(
        files, o.num_shards, o.shard_index, seed=o.seed, shuffle_buffer=o.shuffle_buffer, first_pass=first,
        offset=offset, count=0 if o.skip_corrupt else o.num_records,
        shard_counts=None if o.shard_counts is None else list(o.shard_counts),
        deterministic=o.deterministic, skip_corrupt=o.skip_corrupt,
    )
    mix = None
    if o.augment.mixes:
        # The batch's place in the stream seeds its mix; a resumed run skips whole batches (its steps).
        first_batch = o.skip_records // o.per_replica_batch_size if o.num_records else 0

        def mix(batches):
            return mix_batches(batches, o.augment, o.num_classes, o.seed, first_batch, o.num_shards, o.shard_index)
    return _decode_and_batch(ds, _train_parse(o), o, drop_remainder=True,
                             count=o.num_records if o.skip_corrupt else 0, skipped=skipped, mix=mix)


def eval_stream(files: list[str], options: EvalOptions) -> tf.data.Dataset:
    """This pipeline's disjoint part of `files`, one pass in file order, centre-cropped, with its last partial batch.

    With skip_corrupt, undecodable records are left out (the caller counts
    them against metadata.json).
    """
    o = options
    ds = shard_records(files, o.num_shards, o.shard_index,
                       shard_counts=None if o.shard_counts is None else list(o.shard_counts),
                       deterministic=o.deterministic, skip_corrupt=o.skip_corrupt)
    return _decode_and_batch(ds, _eval_parse(o), o, drop_remainder=False)


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
