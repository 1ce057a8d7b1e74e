"""Keras's RandAugment, MixUp and CutMix driven by our stateless per-position seeds.

    rand_augment(num_ops, magnitude)(image, seed)       # one image, in the per-record map
    batch_mixer(augment, num_classes)(images, labels, seed)  # one per-replica batch, after batching

The Keras layers draw their randomness from a SeedGenerator: a variable that
moves at every call, so what a record gets depends on how many calls came
before it, in this process. A resumed run would then augment differently
from the uninterrupted one, and parallel map calls would race for the
variable. Keras's random ops take a SeedGenerator or a Python int, not a
seed tensor, so StatelessSeeds is a SeedGenerator without a variable: each
`next()` folds a counter into the int64 [2] seed it was made with. The draws
a layer makes follow its code, the same at every trace, so the transformation
is a function of that seed alone.
"""

import functools

import keras
import tensorflow as tf

from data_pipeline.augment import Augment
from data_pipeline.positions import pass_seed


class StatelessSeeds(keras.random.SeedGenerator):
    """A SeedGenerator for one call: the n-th `next()` gives fold_in(seed, n), without state.

    Subclassed because Keras's random ops accept a seed generator or an int
    only (keras.src.random.seed_generator.draw_seed), and ours is a tensor.
    """

    def __init__(self, seed: tf.Tensor):  # no super().__init__: it would make the state variable
        self.name = "stateless_seeds"
        self._seed = tf.cast(seed, tf.int64)
        self._drawn = 0

    def next(self, ordered=True):
        self._drawn += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._drawn)


class StatelessRandAugment(keras.layers.RandAugment):
    """keras.layers.RandAugment whose draws come from a given seed.

    Keras's get_random_transformation ignores its `seed` argument and draws
    from the layer's generator (_get_seed_generator); here that generator is
    a StatelessSeeds of the seed for the time of the call.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._call_seeds = None

    def _get_seed_generator(self, backend=None):
        return self._call_seeds if self._call_seeds is not None else super()._get_seed_generator(backend)

    def get_random_transformation(self, data, training=True, seed=None):
        self._call_seeds = None if seed is None else StatelessSeeds(seed)
        try:
            return super().get_random_transformation(data, training=training)
        finally:
            self._call_seeds = None

    def transform_images(self, images, transformation, training=True):
        """Keras's result, computing only the chosen operations.

        Keras runs all eleven operations for each of the num_ops and keeps one
        with a `where`, eleven times the work (32x32 images, one thread:
        1,000 images/s against 4,850 with switch_case, which runs the chosen
        one only).
        """
        images = tf.cast(images, self.compute_dtype)
        if not training:
            return images
        transforms = transformation["transforms"]
        for i in range(self.num_ops):
            branches = [functools.partial(getattr(self, name).transform_images, images, value)
                        for name, value in transforms.items()]
            shape = images.shape
            images = tf.switch_case(tf.cast(transformation["layer_idxes"][i], tf.int32), branches)
            images.set_shape(shape)  # some branches lose the static channels, which the colour operations need
        return tf.cast(images, self.compute_dtype)


def rand_augment(num_ops: int, magnitude: float):
    """(image float32 [h, w, c] in [0, 1], seed int64 [2]) -> the image after `num_ops` random operations.

    `magnitude` is Keras's `factor`, from 0 to 1: each operation's strength is
    drawn up to it.
    """
    layer = StatelessRandAugment(value_range=(0, 1), num_ops=num_ops, factor=magnitude, dtype="float32")

    def apply(image, seed):
        images = image[None]
        transformation = layer.get_random_transformation(images, seed=seed)
        # Keras's operations keep the values in value_range (clipping where they could leave it).
        return layer.transform_images(images, transformation)[0]

    return apply


def batch_seed(seed: int, batch_index, num_shards: int, shard_index: int) -> tf.Tensor:
    """The int64 [2] mixing seed of batch `batch_index` of pipeline `shard_index`.

    Apart from the records' seeds (data_pipeline.reader.training_records:
    (pass_seed(seed, pass), position * num_shards + shard_index)): pass -1
    is no pass.
    """
    index = tf.cast(batch_index, tf.int64) * num_shards + shard_index
    return tf.stack([tf.constant(pass_seed(seed, -1), tf.int64), index])


def batch_mixer(augment: Augment, num_classes: int):
    """(images [n, h, w, c], int labels [n], seed int64 [2]) -> (mixed images, soft labels float32 [n, num_classes]).

    Keras's MixUp and CutMix pair each image with the image at a random
    permutation of the batch (an image the permutation leaves in place stays
    as it was, label and all); both on, each batch gets one of them with
    probability 1/2, as timm's mixup_switch_prob 0.5 does.
    """
    mixup = keras.layers.MixUp(alpha=augment.mixup_alpha, dtype="float32") if augment.mixup_alpha else None
    # CutMix draws its Beta parameter from U(factor): (alpha, alpha) fixes it at alpha.
    cutmix = (keras.layers.CutMix(factor=(augment.cutmix_alpha, augment.cutmix_alpha), dtype="float32")
              if augment.cutmix_alpha else None)

    def mix(layer, images, labels, seed):
        transformation = layer.get_random_transformation(images, seed=StatelessSeeds(seed))
        return layer.transform_images(images, transformation), layer.transform_labels(labels, transformation)

    def apply(images, labels, seed):
        labels = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
        images = tf.cast(images, tf.float32)
        choice_seed, layer_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if mixup is None or cutmix is None:
            return mix(mixup or cutmix, images, labels, layer_seed)
        return tf.cond(tf.random.stateless_uniform([], seed=choice_seed) < 0.5,
                       lambda: mix(mixup, images, labels, layer_seed),
                       lambda: mix(cutmix, images, labels, layer_seed))

    return apply


def mix_batches(batches: tf.data.Dataset, augment: Augment, num_classes: int, seed: int, first_batch: int,
                num_shards: int, shard_index: int) -> tf.data.Dataset:
    """`batches` (images, int labels, *rest) mixed: batch k of the stream (from `first_batch` on) with batch_seed k.

    The stream's k-th batch gets the same mix in a resumed run that starts at
    `first_batch` as in the uninterrupted one.
    """
    mixer = batch_mixer(augment, num_classes)

    def apply(k, batch):
        images, labels = mixer(batch[0], batch[1], batch_seed(seed, k, num_shards, shard_index))
        return (images, labels, *batch[2:])

    return batches.enumerate(first_batch).map(apply)
