"""The converter's normalisation repeated in TensorFlow ops (data_pipeline.source_image) gives Pillow's pixels.

Each file goes through both: data_pipeline.images.normalise (Pillow, as
build_shards runs it, stored as PNG so nothing is lost) and
source_image.normalise (what the serving export runs). They must agree pixel
for pixel: exactly, except a CMYK JPEG, which TensorFlow's decoder converts to
RGB itself (within 1 level of Pillow's formula, 2 after a downscale).
"""

import io
import json

import numpy as np
import PIL
import pytest
import tensorflow as tf
from PIL import Image

import source_samples
from data_pipeline import images, pillow_resize, source_image
from data_pipeline.metadata import DataError, check_metadata
from data_pipeline.normalisation import PASS_ORDERS, Normalisation, from_metadata, pass_order_of, record

SETTINGS = [(max_side, channels) for max_side in (0, 40) for channels in (3, 1)]


def converter_pixels(name: str, data: bytes, max_side: int, channels: int) -> np.ndarray:
    out = images.normalise(data, "." + name.rsplit(".", 1)[1], images.ImageOptions(channels, "png", max_side=max_side))
    return np.asarray(Image.open(io.BytesIO(out.data))).reshape(out.shape)


@pytest.fixture(scope="module")
def served():
    """{(max_side, channels): one traced normalise} with the record this Pillow writes."""
    fns = {}
    for max_side, channels in SETTINGS:
        norm = Normalisation(**record(channels, "png", max_side, PIL.__version__))
        fns[max_side, channels] = tf.function(lambda data, norm=norm: source_image.normalise(data, norm))
    return fns


def _worst(files: dict[str, bytes], served) -> dict[str, int]:
    worst = {}
    for (max_side, channels), fn in served.items():
        for name, data in files.items():
            expected = converter_pixels(name, data, max_side, channels)
            got = fn(tf.constant(data)).numpy()
            assert got.shape == expected.shape, (name, max_side, channels)
            diff = int(np.abs(got.astype(int) - expected.astype(int)).max())
            worst[name] = max(worst.get(name, 0), diff)
    return worst


def test_textures_of_every_size_and_shape_match_pillow_exactly(served):
    # JPEG drafts at 1/2 to 1/8, reduce() by several factors, both pass orders, 1x and 30x aspect ratios.
    worst = _worst(source_samples.textures(), served)
    print("largest difference per file, in levels of 255:", worst)
    assert worst == {name: 0 for name in worst}


def test_every_mode_rule_matches_pillow(served):
    worst = _worst(source_samples.modes(), served)
    print("largest difference per file, in levels of 255:", worst)
    assert worst.pop("cmyk-adobe.jpg") <= 2
    assert worst == {name: 0 for name in worst}


def test_exif_orientation_is_ignored_by_both():
    files = source_samples.modes()
    plain = converter_pixels("x.jpg", files["exif-rotated.jpg"], 0, 3)
    assert plain.shape[:2] == (45, 70)  # stored order, not the displayed (rotated) one
    norm = Normalisation(**record(3, "png", 0, PIL.__version__))
    assert np.array_equal(source_image.normalise(tf.constant(files["exif-rotated.jpg"]), norm).numpy(), plain)


@pytest.mark.parametrize("name", sorted(source_samples.refused()))
def test_files_the_export_cannot_reproduce_are_refused_with_the_reason(name):
    data, reason = source_samples.refused()[name]
    converter_pixels(name, data, 0, 3)  # the converter reads it: the export must not guess
    norm = Normalisation(**record(3, "png", 0, PIL.__version__))
    fn = tf.function(lambda b: source_image.normalise(b, norm))
    with pytest.raises(tf.errors.InvalidArgumentError, match=reason):
        fn(tf.constant(data))


@pytest.mark.parametrize("version,order", [("10.4.0", 0), ("12.1.1", 0), ("12.2.0", 1), ("12.3.0", 1),
                                           ("13.0.0", 2), ("13.1.0.dev0", 2)])
def test_pass_order_follows_the_pillow_version(version, order):
    assert pass_order_of(version) == PASS_ORDERS[order]


def test_the_installed_pillows_pass_order_is_the_one_recorded():
    """A tall checkerboard shrinks differently in the two orders: the recorded one must be Pillow's."""
    checker = source_samples.texture(236, 79, "checker", 0)
    expected = np.asarray(Image.fromarray(checker).resize((42, 126), Image.Resampling.BICUBIC, reducing_gap=3.0))
    got = {order: pillow_resize.resize(tf.constant(checker), 126, 42, 3.0, order).numpy() for order in PASS_ORDERS}
    recorded = pass_order_of(PIL.__version__)
    assert np.array_equal(got[recorded], expected)
    assert any(not np.array_equal(g, expected) for g in got.values()), "the case no longer tells the orders apart"


def _meta(**normalisation) -> dict:
    meta = {"class_names": ["a"], "image_shape": None, "channels": 3,
            "splits": {"train": {"num_examples": 0, "shards": []}},
            "options": {"encoding": "auto", "max_side": 64}}
    if normalisation:
        meta["normalisation"] = normalisation
    return meta


def test_shards_from_before_the_record_get_the_same_algorithm():
    old = from_metadata(_meta())
    new = from_metadata(_meta(**record(3, "auto", 64, PIL.__version__)))
    assert (old.max_side, old.encoding, old.channels) == (64, "auto", 3)
    assert old == Normalisation(**{**json.loads(json.dumps(new.__dict__)), "pillow_version": ""})


@pytest.mark.parametrize("change,message", [
    ({"resize_filter": "lanczos"}, "normalisation.resize_filter='lanczos'"),
    ({"exif_orientation": "applied"}, "normalisation.exif_orientation='applied'"),
    ({"max_side": "64"}, "normalisation.max_side='64'"),
    ({"sharpen": True}, "normalisation.sharpen"),
])
def test_a_record_the_export_cannot_follow_stops_the_data_check(change, message):
    meta = _meta(**{**record(3, "auto", 64, PIL.__version__), **change})
    with pytest.raises(DataError, match=message):
        check_metadata(meta, "metadata.json")
