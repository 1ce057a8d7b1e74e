"""The serving export: a SavedModel that takes encoded images and needs none of this project's code.

    loaded = tf.saved_model.load(RUN_DIR + "/export")
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([open("a.png", "rb").read()]))

Signatures (both return the same three outputs):
  serving_default  image_bytes: string [batch], JPEG, PNG, GIF (first frame) or BMP files
  serving_images   images: float32 [batch, size, size, channels], already preprocessed, in [0, 1]
Outputs:
  probabilities    float32 [batch, classes]
  top_k_indices    int32 [batch, k], the most probable classes first
  top_k_names      string [batch, k], their class names

The bytes signature runs data_pipeline.preprocess.eval_image, the function of
the evaluation stream itself, inside the graph. A served file is an original,
not a record: it first goes through the normalisation build_shards recorded in
metadata.json (mode rules, the --max-side downscale, with Pillow's integer
formulas; data_pipeline.source_image), then it is decoded with the training
channels, centre-cropped by data.crop_fraction and resized exactly as the
validation images were. Shards adopted from another converter
(data_pipeline.adopt_shards, normalisation `as_stored`) hold the files as that
converter stored them: a served file is then decoded as a record is. A string
that is not a JPEG, PNG, GIF or BMP, or a file the export cannot normalise as
the converter did, fails the whole call with InvalidArgumentError saying why.

`loaded.preprocess(one_file_bytes)` is the per-image part of serving_default
(check, decode, crop, resize, scale), for callers that decode in their own
tf.data pipeline and then call serving_images (trainer.predict does).

Metadata (class names, input size and channels, crop fraction, top-k, the
run's config hash, the checkpoint's step and validation metrics) is in
assets/serving.json and returned as a JSON string by `loaded.metadata()`.

The export also loads the way TensorFlow Serving's C++ loader and
`saved_model_cli run` load it: a session built from the MetaGraph, whose
restore op fills the variables the signatures read. That needs the tracked
variables to be the tf.Variables the traced functions read, which is what
keras.export.ExportArchive tracks: Keras's own Variable wrappers
(model.variables) export a second copy of each weight, which the restore op
fills while the functions read the first, uninitialised one
(keras-team/keras#20095); tf.saved_model.load does not show it. ExportArchive
itself is not used: every function it carries becomes a serving signature
(`preprocess` and `metadata` among them), and it has no place for an asset.
"""

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field

import tensorflow as tf

from data_pipeline import atomic
from data_pipeline import metadata as md
from data_pipeline.normalisation import Normalisation, from_metadata
from data_pipeline.preprocess import eval_image

METADATA_FILE = "serving.json"
BYTES_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "serving_images"
# The leading bytes of each format decode_image reads: anything else is refused
# with a message that says so, rather than decode_image's generic one.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


@dataclass(frozen=True)
class ExportInfo:
    """What the export records besides the weights.

    Attributes:
      class_names: one name per model output, in label order.
      image_size: the model's input height and width.
      channels: 1 (grayscale) or 3 (RGB): how served images are decoded.
      crop_fraction: data.crop_fraction of the evaluation geometry.
      top_k: how many classes the signatures return per image.
      config_sha256: the hash of the training run's resolved config.
      global_step: the optimizer step of the exported weights.
      metrics: the checkpoint's validation metrics (val_accuracy, ...).
      normalisation: what build_shards did to each file before storing it
        (metadata.json), repeated on a served file; None (synthetic data, or
        shards adopted as their converter stored them, normalisation
        `as_stored`): served files are decoded as records are.
    """

    class_names: tuple[str, ...]
    image_size: int
    channels: int
    crop_fraction: float = 1.0
    top_k: int = 5
    config_sha256: str = ""
    global_step: int = 0
    metrics: dict = field(default_factory=dict)
    normalisation: Normalisation | None = None


def class_names_for(num_classes: int, names: list[str] | None) -> tuple[str, ...]:
    """The data's class names, or the label numbers where it names fewer (synthetic data)."""
    names = list(names or [])
    return tuple(names[:num_classes] + [str(i) for i in range(len(names), num_classes)])


def export_info(cfg, model, result: dict, config_sha256: str) -> ExportInfo:
    """The metadata of an export of `model`, trained with `cfg`, whose validation `result` has val_ keys.

    `result` may give `global_step` (an evaluated checkpoint's); the optimizer's step otherwise.
    """
    _, size, _, channels = model.input_shape
    meta = None if cfg.data.synthetic else md.load_metadata(cfg.data.dir)
    names = None if meta is None else meta["class_names"]
    step = result.get("global_step")
    if step is None:
        step = int(model.optimizer.iterations.numpy())
    return ExportInfo(
        class_names=class_names_for(int(model.output_shape[-1]), names), image_size=int(size),
        channels=int(channels), crop_fraction=float(cfg.data.crop_fraction), top_k=cfg.train.export_top_k,
        config_sha256=config_sha256, global_step=int(step),
        metrics={k: v for k, v in result.items() if k.startswith("val_")},
        normalisation=None if meta is None else from_metadata(meta),
    )


def check_image_bytes(image_bytes: tf.Tensor) -> tf.Tensor:
    """An op that fails with InvalidArgumentError when an element is not a JPEG, PNG, GIF or BMP file."""
    head = tf.strings.substr(image_bytes, 0, 4)
    known = tf.zeros_like(image_bytes, tf.bool)
    for magic in _MAGIC:
        known = tf.logical_or(known, tf.equal(tf.strings.substr(head, 0, len(magic)), magic))
    bad = tf.where(tf.logical_not(known))[:, 0]
    return tf.debugging.Assert(
        tf.equal(tf.size(bad), 0),
        ["image_bytes: not a JPEG, PNG, GIF or BMP image at batch index", bad], summarize=16)


def read_variables(functions) -> list:
    """The tf.Variables the traced `functions` read, each once, in the order first read.

    What a SavedModel must track for its restore op to fill them (see the
    module docstring); keras.export.ExportArchive collects the same.
    """
    found = {}
    for concrete in functions:
        for variable in concrete.variables:
            found.setdefault(id(variable), variable)
    return list(found.values())


class ServingModule(tf.Module):
    """The Keras model, its preprocessing and its class names, as tf.functions with fixed signatures."""

    def __init__(self, model, info: ExportInfo, metadata_path: str):
        super().__init__()
        self._predict = lambda images: model(images, training=False)
        self.info = info
        self.metadata_file = tf.saved_model.Asset(metadata_path)
        size, channels = info.image_size, info.channels
        self.serve_bytes = tf.function(
            self._from_bytes, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.serve_images = tf.function(
            self._from_images, input_signature=[tf.TensorSpec([None, size, size, channels], tf.float32, name="images")])
        self.metadata = tf.function(self._metadata, input_signature=[])
        # One file to the model's input, as serving_default does it: for callers that
        # decode in their own tf.data pipeline (trainer.predict), then use serving_images.
        self.preprocess = tf.function(self._preprocess, input_signature=[tf.TensorSpec([], tf.string)])
        # Only what the signatures read is tracked, not the model: it would bring
        # its optimizer's variables (and the training step's state) into the export.
        self.model_variables = read_variables(self.concrete_signatures().values())

    def concrete_signatures(self) -> dict:
        """The serving signatures by name, as concrete functions (traced at the first call)."""
        return {BYTES_SIGNATURE: self.serve_bytes.get_concrete_function(),
                IMAGES_SIGNATURE: self.serve_images.get_concrete_function()}

    def _outputs(self, images: tf.Tensor) -> dict:
        probabilities = tf.cast(self._predict(images), tf.float32)
        top = tf.math.top_k(probabilities, k=min(self.info.top_k, len(self.info.class_names)))
        names = tf.gather(tf.constant(list(self.info.class_names)), top.indices)
        return {"probabilities": probabilities, "top_k_indices": top.indices, "top_k_names": names}

    def _preprocess(self, encoded):
        i = self.info
        # decode_image reads more formats (WebP): the check keeps `preprocess` to the four of serving_default.
        with tf.control_dependencies([check_image_bytes(encoded[tf.newaxis])]):
            encoded = tf.identity(encoded)
        return eval_image(encoded, i.channels, i.image_size, i.crop_fraction, source=i.normalisation)

    def _from_bytes(self, image_bytes):
        i = self.info
        with tf.control_dependencies([check_image_bytes(image_bytes)]):
            image_bytes = tf.identity(image_bytes)
        images = tf.map_fn(self._preprocess, image_bytes,
                           fn_output_signature=tf.TensorSpec([i.image_size, i.image_size, i.channels], tf.float32))
        return self._outputs(images)

    def _from_images(self, images):
        return self._outputs(images)

    def _metadata(self):
        return tf.constant(json.dumps(metadata_dict(self.info), sort_keys=True))


def metadata_dict(info: ExportInfo) -> dict:
    return {**asdict(info), "class_names": list(info.class_names),
            "signatures": {"bytes": BYTES_SIGNATURE, "images": IMAGES_SIGNATURE}}


class _CaptureRenameNote(logging.Filter):
    """Drops TensorFlow's INFO note that a signature's inputs are renamed in the SavedModel.

    tf.saved_model.save writes it (through absl) for every signature that
    reads a variable: each read enters the traced function as a placeholder
    that TensorFlow names `resource`, stored under a unique name. Those are
    not inputs a client gives; the signatures' own inputs (image_bytes,
    images) keep their names, as `saved_model_cli show` lists them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Function `%s` contains input name(s)")


@contextlib.contextmanager
def _without_capture_rename_note():
    absl_log = logging.getLogger("absl")
    note = _CaptureRenameNote()
    absl_log.addFilter(note)
    try:
        yield
    finally:
        absl_log.removeFilter(note)


def export_serving(model, final: str, info: ExportInfo) -> str:
    """Writes the serving SavedModel to `final`; an old export is replaced only once the new one is whole.

    Durable, as checkpoints are: a power loss after the rename cannot leave an
    export whose files are empty. A kill between the rename of the old export
    aside and that of the new one into place is repaired at the next start
    (atomic.recover_dir, from trainer.outputs).
    """
    with tempfile.TemporaryDirectory() as scratch:
        metadata_path = os.path.join(scratch, METADATA_FILE)
        with open(metadata_path, "w", encoding="utf-8") as f:
            json.dump(metadata_dict(info), f, indent=2, sort_keys=True)
        module = ServingModule(model, info, metadata_path)
        with atomic.staged_dir(final, durable=True) as tmp, _without_capture_rename_note():
            tf.saved_model.save(module, tmp, signatures=module.concrete_signatures())
    return final
