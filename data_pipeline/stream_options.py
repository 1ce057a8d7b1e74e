"""The options of the two input streams (data_pipeline.reader), as frozen dataclasses.

The caller states this pipeline's share with `num_shards` and `shard_index`;
the pipeline never asks for a rank. TensorFlow-free, like data_pipeline.augment.
"""

import dataclasses
from dataclasses import dataclass, field

from data_pipeline.augment import Augment


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """What the training and the evaluation stream both take.

    Attributes:
      per_replica_batch_size: examples per batch of this pipeline.
      image_size: height and width of the model's input.
      channels: channels of the model's input.
      num_shards: number of input pipelines (the world size when training).
      shard_index: this pipeline's index, in [0, num_shards).
      shard_counts: the record count of every file, in the order of the
        stream's `files` (from metadata.json); a file holding fewer records
        is then an error. None: not checked.
      crop_fraction: the central fraction of the shorter side kept when not
        cropping at random.
      threads: size of this pipeline's private thread pool (0: TensorFlow's
        shared pool); pass the rank's share of the host's cores.
      deterministic: produce elements in order even when parallel reads or
        decodes finish out of order (slower when one file or image is slow).
      skip_corrupt: skip undecodable images and the rest of a shard after a
        corrupt record, instead of failing. A training stream replaces an
        undecodable record by the next one, so it keeps its length.
      label_offset: subtracted from every stored label (metadata.json's
        label_offset: 1 for adopted shards whose labels count from 1).
    """

    per_replica_batch_size: int
    image_size: int
    channels: int
    num_shards: int = 1
    shard_index: int = 0
    shard_counts: tuple[int, ...] | None = None
    crop_fraction: float = 1.0
    threads: int = 0
    deterministic: bool = True
    skip_corrupt: bool = False
    label_offset: int = 0

    def __post_init__(self):
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} is not in [0, {self.num_shards})")
        if self.shard_counts is not None:
            # A tuple whatever the caller passed: the options stay immutable.
            object.__setattr__(self, "shard_counts", tuple(int(n) for n in self.shard_counts))


@dataclass(frozen=True, kw_only=True)
class TrainOptions(StreamOptions):
    """A training stream: shuffled, augmented, pass after pass.

    The caller bounds each epoch with steps_per_epoch, which is what keeps
    every rank at the same step count; with `num_records` the stream ends
    after exactly that many records.

    Attributes:
      seed: data-order and augmentation seed, shared by all ranks.
      shuffle_buffer: serialized records per shuffled block.
      skip_records: records of the stream already consumed (a resumed run);
        used only with `num_records`.
      num_records: records the stream holds after `skip_records`; 0: it goes
        on forever. Needs `shard_counts` for every file.
      augment: random crop and flip, RandAugment, mixup and cutmix (default:
        none). With mixup or cutmix the labels are soft, float32
        [batch, num_classes].
      num_classes: the classes of the one-hot labels that mixup and cutmix
        mix; needed only with them.
    """

    seed: int = 0
    shuffle_buffer: int = 1024
    skip_records: int = 0
    num_records: int = 0
    augment: Augment = field(default_factory=Augment)
    num_classes: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.augment.mixes and self.num_classes < 1:
            raise ValueError("mixup and cutmix need num_classes")
        # A copy: the config's Augment is mutable, these options are not.
        object.__setattr__(self, "augment", dataclasses.replace(self.augment))


@dataclass(frozen=True, kw_only=True)
class EvalOptions(StreamOptions):
    """An evaluation stream: one pass in file order, centre-cropped, its last partial batch kept."""
