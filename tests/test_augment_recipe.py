"""RandAugment, mixup and cutmix (data.augment): seeded by position, in range, soft labels and their loss."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.augment import Augment
from data_pipeline.keras_augment import StatelessRandAugment, StatelessSeeds, batch_mixer, rand_augment
from data_pipeline.reader import train_stream
from data_pipeline.stream_options import TrainOptions
from test_reader import write_shards

RECIPE = Augment(random_resized_crop=True, crop_area_min=0.3, flip=True, randaugment_layers=2,
                 randaugment_magnitude=0.9, mixup_alpha=0.8, cutmix_alpha=1.0)


def test_randaugment_is_a_function_of_the_seed_and_stays_in_range():
    image = tf.random.stateless_uniform([12, 12, 3], seed=[1, 2])
    apply = rand_augment(2, 0.9)
    outs = [apply(image, tf.constant([7, i], tf.int64)).numpy() for i in range(8)]
    assert all(o.shape == (12, 12, 3) and 0 <= o.min() and o.max() <= 1 for o in outs)
    assert len({o.tobytes() for o in outs}) == 8  # another position, other operations or strengths
    assert all(np.array_equal(apply(image, tf.constant([7, i], tf.int64)).numpy(), outs[i]) for i in (0, 5))
    # A second layer (a resumed run's) draws the same: no state carried from call to call.
    assert np.array_equal(rand_augment(2, 0.9)(image, tf.constant([7, 5], tf.int64)).numpy(), outs[5])


def test_randaugment_computes_only_the_chosen_operations_with_keras_s_result():
    layer = StatelessRandAugment(value_range=(0, 1), num_ops=2, factor=0.9, dtype="float32")
    images = tf.random.stateless_uniform([1, 10, 10, 3], seed=[3, 4])
    chosen = set()
    for i in range(12):
        t = layer.get_random_transformation(images, seed=tf.constant([9, i], tf.int64))
        chosen.update(t["layer_idxes"].numpy().tolist())
        ours = layer.transform_images(images, t).numpy()
        keras_own = super(StatelessRandAugment, layer).transform_images(images, t).numpy()
        np.testing.assert_allclose(ours, keras_own, atol=1e-6)
    assert len(chosen) > 5


def test_stateless_seeds_give_a_new_seed_per_draw_and_the_same_sequence_each_time():
    first = [StatelessSeeds(tf.constant([1, 2], tf.int64)) for _ in range(2)]
    draws = [[tuple(s.next().numpy()) for _ in range(3)] for s in first]
    assert draws[0] == draws[1] and len(set(draws[0])) == 3


def test_mixed_batches_have_soft_labels_summing_to_one_and_pixels_in_range():
    mix = batch_mixer(RECIPE, 5)
    images = tf.random.stateless_uniform([6, 8, 8, 3], seed=[5, 6])
    labels = tf.constant([0, 1, 2, 3, 4, 0])
    outs = [mix(images, labels, tf.constant([1, k], tf.int64)) for k in range(6)]
    for x, y in outs:
        assert y.shape == (6, 5) and x.shape == (6, 8, 8, 3)
        np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0, atol=1e-5)
        assert 0 <= x.numpy().min() and x.numpy().max() <= 1
    assert any(y.numpy().max() < 0.99 for _, y in outs)  # labels really mixed
    again = mix(images, labels, tf.constant([1, 3], tf.int64))
    assert np.array_equal(again[0].numpy(), outs[3][0].numpy()) and np.array_equal(again[1].numpy(), outs[3][1].numpy())
    assert len({x.numpy().tobytes() for x, _ in outs}) == 6
    # Both kinds come up: cutmix keeps pixels unblended (each one some image's own), mixup blends them.
    kinds = {bool(np.isin(x.numpy(), images.numpy()).all()) for x, _ in outs}
    assert kinds == {True, False}


def stream(files, counts, skip_steps, steps, shard_index=0):
    return train_stream(files, TrainOptions(
        num_shards=2, shard_index=shard_index, per_replica_batch_size=4, image_size=6, channels=3, seed=4,
        shuffle_buffer=4, augment=RECIPE, num_classes=3, skip_records=skip_steps * 4, num_records=steps * 4,
        shard_counts=counts))


def test_the_augmented_and_mixed_stream_is_a_function_of_the_position(tmp_path):
    counts = [9, 7, 8]
    files = write_shards(tmp_path, counts)
    full = [(x.numpy(), y.numpy()) for x, y in stream(files, counts, 0, 8)]
    assert len(full) == 8 and all(y.shape == (4, 3) and y.dtype == np.float32 for _, y in full)
    for skip in (1, 5):  # a resumed run's stream: the batches of the uninterrupted one, pixels and labels
        resumed = [(x.numpy(), y.numpy()) for x, y in stream(files, counts, skip, 8 - skip)]
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                   for a, b in zip(resumed, full[skip:], strict=True)), skip
    for x, y in full:
        assert 0 <= x.min() and x.max() <= 1
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
    other = [x.numpy() for x, _ in stream(files, counts, 0, 8, shard_index=1)]
    assert not any(np.array_equal(a, b) for (a, _), b in zip(full, other))  # the ranks augment apart


def test_the_loss_on_soft_labels_is_the_cross_entropy_against_the_smoothed_soft_labels():
    import keras

    from trainer.assembly import training_loss

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=3).astype("float32")
    soft = np.array([[0.7, 0.3, 0, 0], [0, 0, 1, 0], [0.1, 0, 0.45, 0.45]], dtype="float32")
    for smoothing in (0.0, 0.2):
        target = soft * (1 - smoothing) + smoothing / 4
        expected = -(target * np.log(probs)).sum(axis=1).mean()
        assert float(training_loss(smoothing, soft_labels=True)(soft, probs)) == pytest.approx(expected, rel=1e-5)
    # The training accuracy on soft labels: the prediction against the label with the most weight.
    accuracy = keras.metrics.CategoricalAccuracy()
    accuracy.update_state(soft, np.array([[0.1, 0.8, 0.05, 0.05], [0, 0, 1, 0], [0, 0, 0.6, 0.4]], "float32"))
    assert float(accuracy.result()) == pytest.approx(2 / 3)


def test_the_tensorboard_sample_names_the_label_of_most_weight(tmp_path):
    from trainer.summaries import write_input_sample

    images = tf.zeros([3, 4, 4, 1])
    soft = tf.constant([[0.25, 0.75, 0], [0, 0, 1], [0.6, 0.4, 0]])
    writer = tf.summary.create_file_writer(str(tmp_path))
    write_input_sample(writer, tf.data.Dataset.from_tensors((images, soft)), 3, step=0)
    described = [v.metadata.summary_description for f in tmp_path.iterdir()
                 for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value]
    assert described == ["labels with the most weight, row by row: 1:0.75 2:1.00 0:0.60"]
