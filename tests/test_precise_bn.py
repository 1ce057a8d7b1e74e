"""trainer.precise_bn: population BatchNorm statistics, in one process and on 2 ranks, and in real runs."""

import json
import logging
import sys

import numpy as np
import pytest

from helpers import checkpoint_dir, run, worker_reports, write_shapes


def _ctx():
    import horovod.tensorflow as hvd

    from trainer.distributed import DistContext

    hvd.init()
    return DistContext(rank=0, local_rank=0, size=1, local_size=1)


def _probed_model(policy: str = "float32"):
    """A model with Keras's BatchNorm, the fused one, one nested in a Sequential and a frozen one, and dropout.

    Also returns a probe: the same layers, giving the inputs of the three BatchNorm layers that training updates.
    """
    import keras

    from trainer.batchnorm import BatchNormalization

    keras.utils.set_random_seed(1)
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((6, 6, 2))
        probes = [inputs]
        x = keras.layers.BatchNormalization(name="bn_keras")(inputs)  # on the data itself
        x = keras.layers.Conv2D(4, 3, padding="same")(x)
        probes.append(x)
        x = keras.layers.ReLU()(BatchNormalization(name="bn_fused")(x))
        x = keras.layers.Conv2D(3, 3, padding="same")(x)
        probes.append(x)
        nested = keras.Sequential([keras.layers.BatchNormalization(name="bn_nested")], name="block")
        x = keras.layers.ReLU()(nested(x))
        frozen = BatchNormalization(name="bn_frozen")
        frozen.trainable = False
        x = frozen(x)
        x = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(x))
        outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(x)
        return keras.Model(inputs, outputs), keras.Model(inputs, probes)
    finally:
        keras.config.set_dtype_policy("float32")


def _batches():
    # Batch means far apart: the variance of all examples is much more than the mean of the batch variances.
    rng = np.random.default_rng(0)
    return [rng.normal(2.0 * i, 1.0 + i, (8, 6, 6, 2)).astype(np.float32) for i in range(5)]


def _dataset(batches):
    import tensorflow as tf

    x = np.stack(batches)
    return tf.data.Dataset.from_tensor_slices((x, np.zeros(x.shape[:2], np.int32)))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_the_statistics_are_those_of_all_examples_together(policy):
    from trainer.precise_bn import PreciseBatchNorm, batchnorm_layers

    model, probe = _probed_model(policy)
    batches = _batches()
    # The reference: each layer's input in training mode, batch by batch, pooled over all examples.
    inputs = [np.concatenate(parts).astype(np.float64) for parts in
              zip(*[[np.asarray(t) for t in probe(x, training=True)] for x in batches])]
    expected = [(a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2))) for a in inputs]
    # pycls's estimate, the mean of the batch variances, is far from it here: the test can tell them apart.
    per_batch = np.mean([x.var(axis=(0, 1, 2)) for x in batches], axis=0)
    assert np.all(np.abs(per_batch - expected[0][1]) > 0.2 * expected[0][1])

    layers = batchnorm_layers(model)
    assert [layer.name for layer in layers] == ["bn_keras", "bn_fused", "bn_nested"]  # not the frozen one
    frozen = model.get_layer("bn_frozen")
    frozen.moving_mean.assign(np.full(3, 5.0))
    for layer in layers:
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 7.0))  # to be replaced
    weights = [w.numpy() for w in model.trainable_variables]
    seeds = [v.numpy() for v in model.non_trainable_variables if "seed" in v.path]
    assert seeds

    precise = PreciseBatchNorm("true", len(batches), 8, 1, lambda ctx, n: _dataset(batches))
    assert precise.maybe_run(model, _ctx(), 1) is not None
    tol = 2e-3 if policy == "mixed_float16" else 1e-5
    for layer, (mean, variance) in zip(layers, expected):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=tol, atol=tol, err_msg=layer.name)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=tol, atol=tol, err_msg=layer.name)
    # Nothing else moved: frozen statistics, weights, the dropout seed generators (training goes on as without).
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), np.full(3, 5.0))
    for before, w in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(before, w.numpy())
    for before, v in zip(seeds, [v for v in model.non_trainable_variables if "seed" in v.path]):
        np.testing.assert_array_equal(before, v.numpy())


def test_non_finite_statistics_keep_the_moving_averages(caplog):
    from trainer.precise_bn import PreciseBatchNorm

    model, _ = _probed_model()
    batches = _batches()
    batches[1][0, 0, 0, 0] = np.inf
    layer = model.get_layer("bn_keras")
    layer.moving_mean.assign([0.5, 0.25])
    with caplog.at_level(logging.WARNING, logger="trainer.precise_bn"):
        PreciseBatchNorm("true", 5, 8, 1, lambda ctx, n: _dataset(batches)).maybe_run(model, _ctx(), 1)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.5, 0.25])
    assert "not finite in" in caplog.text and "bn_keras" in caplog.text


def test_auto_recomputes_until_the_moving_averages_have_converged_and_warns_once(caplog):
    from trainer.precise_bn import PreciseBatchNorm, updates_needed

    assert updates_needed(0.99) == 688  # 0.99 ** 688 <= 0.001 < 0.99 ** 687
    model, _ = _probed_model()
    ctx = _ctx()
    auto = PreciseBatchNorm("auto", 2, 64, 2, None)  # 2 micro-batches per step: 2 updates
    with caplog.at_level(logging.WARNING, logger="trainer.precise_bn"):
        assert auto.wanted(model, ctx, 30) and auto.wanted(model, ctx, 343)
        assert not auto.wanted(model, ctx, 344)
    assert caplog.text.count("train.precise_bn=auto") == 1
    assert ("train.precise_bn=auto: after 60 updates (30 steps x 2 micro-batches) the BatchNorm moving averages "
            "(momentum 0.99) still give their initial values a weight of 0.547: until they have had 688 (weight "
            "0.001), the statistics are recomputed from 128 training examples") in caplog.text
    assert PreciseBatchNorm("true", 2, 64, 1, None).wanted(model, ctx, 10**6)
    assert not PreciseBatchNorm("false", 2, 64, 1, None).wanted(model, ctx, 1)


def test_a_model_without_batchnorm_is_left_alone():
    import keras

    from trainer.precise_bn import PreciseBatchNorm

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert PreciseBatchNorm("true", 1, 8, 1, None).maybe_run(model, _ctx(), 1) is None


def test_the_sample_is_the_training_streams_first_batches_with_their_augmentation(digits_shards):
    from trainer.config import load_config
    from trainer.data import precise_bn_dataset, resolve_data, train_dataset
    from trainer.precise_bn import batches_for

    cfg = load_config("configs/digits.yaml", ["run_dir=unused", f"data.dir={digits_shards}",
                                              "data.augment.random_resized_crop=true", "data.augment.flip=true",
                                              "train.precise_bn_examples=150", "data.global_batch_size=32"])
    spec = resolve_data(cfg)
    ctx = _ctx()
    k = batches_for(cfg.train.precise_bn_examples, spec.num_train, cfg.data.global_batch_size)
    assert k == 5  # 150 rounded up to whole batches of 32
    assert batches_for(10**6, spec.num_train, 32) == -(-spec.num_train // 32)  # at most the training set
    sample = precise_bn_dataset(cfg, spec, ctx, k)
    first, again = ([x.numpy() for x, _ in sample] for _ in range(2))
    training = [x.numpy() for x, _ in train_dataset(cfg, spec, ctx, 32, 0).take(k)]
    assert len(first) == len(again) == k
    for a, b, c in zip(first, again, training):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)  # every pass the same (held in memory after the first)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The quick start's case: 120 images of 3 classes of shapes, 108 for training, and their shards."""
    from data_pipeline.build_shards import build

    root = tmp_path_factory.mktemp("shapes")
    images = write_shapes(root / "images")
    build(str(images), str(root / "shards"), num_shards=16)
    return images, root / "shards"


def _train(run_dir, shards, *overrides):
    return run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
                "--set", f"run_dir={run_dir}", "--set", f"data.dir={shards}", "--set", "model.image_size=16",
                *[a for o in overrides for a in ("--set", o)]])


def test_a_small_data_sets_export_classifies_its_training_images_as_training_did(shapes, tmp_path):
    import tensorflow as tf

    images, shards = shapes
    # The quick start's settings: 108 training images at a global batch of 64, one step per epoch.
    res = _train(tmp_path / "run", shards, "model.name=resnet20", "data.augment.random_resized_crop=true",
                 "data.augment.flip=true", "train.epochs=20")
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = np.mean([r["accuracy"] for r in records[-5:]])  # one noisy batch an epoch: the last five
    serve = tf.saved_model.load(str(tmp_path / "run" / "export")).signatures["serving_default"]
    files = sorted(images.glob("*/*.png"))
    names = [serve(image_bytes=tf.constant([f.read_bytes()]))["top_k_names"].numpy()[0][0].decode() for f in files]
    served = np.mean([name == f.parent.name for name, f in zip(names, files)])
    # Without precise statistics the export is at chance (1/3) after training at about 0.7.
    assert trained > 0.55 and served > 0.5 and abs(served - trained) < 0.12, (served, trained)
    assert "train.precise_bn=auto: after 1 updates (1 steps x 1 micro-batches) the BatchNorm moving" in res.stderr
    assert all("precise_bn_time_sec" in r for r in records)


def test_a_stop_and_resume_give_the_statistics_of_the_uninterrupted_run(shapes, tmp_path):
    import h5py

    _, shards = shapes
    # 3 steps an epoch; simple_cnn has dropout, whose random state precise BatchNorm must not move. One batch
    # of the 108 images: a sample that moved on from one recomputation to the next would differ after the resume.
    base = ("model.name=simple_cnn", "data.global_batch_size=32", "train.epochs=2", "train.export=false",
            "runtime.deterministic=true", "train.precise_bn=true", "train.precise_bn_examples=32")
    assert _train(tmp_path / "straight", shards, *base).returncode == 0
    stopped = _train(tmp_path / "stopped", shards, *base, "runtime.fault_stop_after_step=4")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = _train(tmp_path / "stopped", shards, *base)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]

    def weights(run_dir):
        out = {}
        with h5py.File(checkpoint_dir(run_dir, 6) / "model.weights.h5") as f:
            f.visititems(lambda name, item: out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
        return out

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    assert sorted(a) == sorted(b) and sum("batch_normalization" in k for k in a) >= 4
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# Each rank starts from its own weights and statistics; rank 0's weights are broadcast, as the trainer does.
# Mode `one` runs both ranks' samples in one process, in rank order.
PRECISE_WORKER = """
import json, sys
import horovod.tensorflow as hvd
import keras
import numpy as np
from trainer.config import load_config
from trainer.data import precise_bn_dataset, resolve_data
from trainer.distributed import DistContext
from trainer.models import build_model
from trainer.precise_bn import PreciseBatchNorm, batchnorm_layers, batches_for

mode, shards = sys.argv[1:3]
hvd.init()
ctx = DistContext(hvd.rank(), hvd.local_rank(), hvd.size(), hvd.local_size())
cfg = load_config("configs/digits.yaml", ["run_dir=unused", f"data.dir={shards}", "model.image_size=16",
                                          "data.global_batch_size=16", "train.precise_bn_examples=48",
                                          "data.augment.random_resized_crop=true", "data.augment.flip=true"])
spec = resolve_data(cfg)
k = batches_for(cfg.train.precise_bn_examples, spec.num_train, cfg.data.global_batch_size)


def sample(c, n):
    if mode == "ranks":
        return precise_bn_dataset(cfg, spec, c, n)
    parts = [precise_bn_dataset(cfg, spec, DistContext(r, r, 2, 2), n) for r in range(2)]
    return parts[0].concatenate(parts[1])


report = {"rank": hvd.rank(), "batches": k}
for policy in ("float32", "mixed_bfloat16"):
    keras.utils.set_random_seed(hvd.rank())
    keras.config.set_dtype_policy(policy)
    model = build_model("simple_cnn", spec.input_shape, spec.num_classes)
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0 + hvd.rank()))
    ctx.broadcast_variables(model.trainable_variables, "weights." + policy)
    PreciseBatchNorm("true", k, 16, 1, sample).maybe_run(model, ctx, 1)
    report[policy] = [[l.moving_mean.numpy().tolist(), l.moving_variance.numpy().tolist()] for l in layers]
sys.stdout.write("REPORT " + json.dumps(report) + "\\n")
"""


@pytest.mark.horovod
def test_two_ranks_get_identical_statistics_equal_to_one_process_over_their_examples(shapes, tmp_path):
    _, shards = shapes
    r0, r1 = worker_reports(tmp_path, PRECISE_WORKER, "ranks", str(shards))
    (one,) = worker_reports(tmp_path, PRECISE_WORKER, "one", str(shards), ranks=1)
    assert r0["batches"] == 3
    for policy in ("float32", "mixed_bfloat16"):
        assert r0[policy] == r1[policy], policy  # identical, not merely close
        assert len(one[policy]) == len(r0[policy]) == 2
        for i, (mean, variance) in enumerate(one[policy]):
            assert np.all(np.asarray(mean) != 3.0)  # recomputed on both ranks
            np.testing.assert_allclose(r0[policy][i][0], mean, rtol=1e-5, atol=1e-6, err_msg=f"{policy} {i}")
            np.testing.assert_allclose(r0[policy][i][1], variance, rtol=1e-5, atol=1e-6, err_msg=f"{policy} {i}")
