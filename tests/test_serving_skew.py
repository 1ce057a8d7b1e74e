"""Train/serve agreement: for every file, the export's input from the original equals the validation stream's.

A folder of textures (sizes, aspect ratios, JPEG and PNG) and of every mode
build_shards treats specially is converted by build_shards; a tiny model is
exported by trainer.export.export_serving with the shards' metadata.json, and
loaded as a server would. Per file (records carry image/id, the path), the
model input the validation stream (data_pipeline.reader.eval_stream) makes of
its record must equal the one the export's `preprocess` makes of the original
file: within 2/255 on every pixel (in practice only a CMYK JPEG differs at
all). Records stored as PNG keep the converter's pixels exactly; a record the
converter re-encoded as JPEG differs from them by that encoding's loss (printed),
so there the served input is held to the same file's input when the same
conversion stores PNG.
"""

import json

import keras
import numpy as np
import PIL
import pytest
import tensorflow as tf

import source_samples
from data_pipeline import metadata as md
from data_pipeline.build_shards import build
from data_pipeline.images import ImageOptions
from data_pipeline.reader import eval_stream, shard_records
from data_pipeline.records import parse_example
from data_pipeline.stream_options import EvalOptions
from trainer.config import load_config
from trainer.export import export_info, export_serving

IMAGE_SIZE, CROP = 24, 0.875
TOLERANCE = 2 / 255


def _folder(root) -> None:
    files = {**source_samples.textures(), **source_samples.modes()}
    for i, (name, data) in enumerate(sorted(files.items())):
        path = root / ("a" if i % 2 else "b") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _model(channels: int) -> keras.Model:
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, channels))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    return keras.Model(inputs, outputs)


def _validation_inputs(shards, channels: int) -> dict[str, tuple[np.ndarray, str, bytes]]:
    """{image/id: (the validation stream's model input, the record's format, its bytes)} over every record."""
    meta = md.load_metadata(str(shards))
    files = md.shard_files(str(shards), meta, "train") + md.shard_files(str(shards), meta, "validation")
    options = EvalOptions(per_replica_batch_size=8, image_size=IMAGE_SIZE, channels=channels, crop_fraction=CROP)
    records = [parse_example(r) for r in shard_records(files, 1, 0)]  # in the stream's own order
    inputs = np.concatenate([images.numpy() for images, _ in eval_stream(files, options)])
    assert len(records) == len(inputs) == sum(meta["splits"][s]["num_examples"] for s in ("train", "validation"))
    return {r["image/id"].numpy().decode(): (image, r["image/format"].numpy().decode(), r["image/encoded"].numpy())
            for r, image in zip(records, inputs)}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("skew") / "images"
    _folder(root)
    return root


def _convert(originals, out, encoding: str, max_side: int):
    build(str(originals), str(out), num_shards=2, val_fraction=0.25,
          image_options=ImageOptions(3, encoding, max_side=max_side))
    return load_config(None, [f"data.dir={out}", f"data.crop_fraction={CROP}"])


# PNG records: the converter's pixels, to the level. `auto`: JPEG files kept as their own bytes or
# re-encoded, the rest PNG; served to a grayscale model, so the reader converts the RGB records too.
# (Without --max-side, source_image is held to Pillow directly in test_source_image.)
@pytest.fixture(scope="module", params=[("png", 40, 3), ("auto", 40, 1)], ids=["png-rgb", "auto-gray-model"])
def served_and_validated(request, originals, tmp_path_factory):
    """(params, {id: served input}, {id: (validation input, format, record bytes)}, {id: original bytes},
    {id: validation input of the same conversion stored as PNG}) of one conversion (RGB records) and one
    real export of it, for a model of `channels`."""
    encoding, max_side, channels = request.param
    tmp = tmp_path_factory.mktemp("skew")
    cfg = _convert(originals, tmp / "shards", encoding, max_side)
    model = _model(channels)
    export_serving(model, str(tmp / "export"), export_info(cfg, model, {"global_step": 0}, "0" * 64))
    loaded = tf.saved_model.load(str(tmp / "export"))
    # The export records the normalisation it repeats: the one metadata.json says the converter applied.
    recorded = json.loads((tmp / "shards" / "metadata.json").read_text())["normalisation"]
    assert json.loads(loaded.metadata().numpy())["normalisation"] == recorded
    assert recorded["max_side"] == max_side and recorded["pillow_version"] == PIL.__version__
    preprocess = loaded.preprocess
    validated = _validation_inputs(tmp / "shards", channels)
    files = {key: (originals / key).read_bytes() for key in validated}
    served = {key: preprocess(tf.constant(data)).numpy() for key, data in files.items()}
    lossless = validated
    if encoding != "png":
        _convert(originals, tmp / "png-shards", "png", max_side)
        lossless = _validation_inputs(tmp / "png-shards", channels)
    return request.param, served, validated, files, lossless


def test_served_input_equals_the_validation_input_file_by_file(served_and_validated):
    (encoding, max_side, channels), served, validated, files, lossless = served_and_validated
    exact, reencoded = {}, {}
    for key, (image, fmt, stored) in validated.items():
        assert served[key].shape == image.shape == (IMAGE_SIZE, IMAGE_SIZE, channels)
        # A PNG record holds the converter's pixels; a JPEG record its file's own bytes, or a re-encoding.
        if fmt == "png" or stored == files[key]:
            exact[key] = np.abs(served[key] - image).max()
        else:
            reencoded[key] = (np.abs(served[key] - lossless[key][0]).max(), np.abs(served[key] - image))
    loss = [d for _, d in reencoded.values()]
    print(f"{encoding} max_side={max_side} channels={channels}: {len(exact)} files, largest difference "
          f"{max(exact.values()) * 255:.2f}/255; {len(reencoded)} records re-encoded as JPEG, whose loss is "
          f"{max((d.max() for d in loss), default=0) * 255:.1f}/255 at most, "
          f"{np.mean([d.mean() for d in loss] or [0]) * 255:.2f}/255 on average")
    assert {k: m * 255 for k, m in exact.items() if m > TOLERANCE} == {}
    # Beyond the JPEG encoding, the served input is the converter's: the same file's input when stored as PNG.
    assert {k: m * 255 for k, (m, _) in reencoded.items() if m > TOLERANCE} == {}
    # What each conversion must have exercised, or the comparison above proves less than it claims.
    assert len(exact) + len(reencoded) == len(files) >= 38
    if encoding == "auto":
        assert reencoded and any(k.endswith(".jpg") for k in exact), "no kept and re-encoded JPEG records both"
    else:
        assert not reencoded
