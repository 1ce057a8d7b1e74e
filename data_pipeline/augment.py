"""The training-time augmentation settings, without TensorFlow.

One definition for both sides: the experiment config's `data.augment`
(trainer.config, which must import without TensorFlow) and the reader's
preprocessing (data_pipeline.preprocess).
"""

from dataclasses import dataclass


# Not frozen: the config loader sets the fields one by one from YAML and --set.
# The reader takes a copy when it builds a stream (reader.TrainOptions).
@dataclass
class Augment:
    """Training-time augmentation, seeded per record (exact on resume).

    Off by default: right for small or symmetric-sensitive images such as the
    8x8 digits (a mirrored digit is another glyph, and a crop loses strokes).
    For natural photos (ImageNet-like) turn both on.

    Attributes:
      random_resized_crop: train on a random box of crop_area_min..1 of the
        image area, aspect ratio 3/4..4/3 (Inception-style), resized to
        model.image_size.
      crop_area_min: smallest crop, as a fraction of the image area.
      flip: mirror left-right with probability 1/2 (wrong for digits or text).
    """

    random_resized_crop: bool = False
    crop_area_min: float = 0.08
    flip: bool = False
