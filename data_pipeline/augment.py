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
    For natural photos (ImageNet-like) turn both on; RandAugment, mixup and
    cutmix are the stronger recipe for long runs on large data.

    Attributes:
      random_resized_crop: train on a random box of crop_area_min..1 of the
        image area, aspect ratio 3/4..4/3 (Inception-style), resized to
        model.image_size.
      crop_area_min: smallest crop, as a fraction of the image area.
      flip: mirror left-right with probability 1/2 (wrong for digits or text).
      randaugment_layers: RandAugment operations applied one after another
        to each image after the crop and flip (Keras's RandAugment, num_ops;
        2 is the usual figure); 0 turns RandAugment off.
      randaugment_magnitude: the strength of each RandAugment operation, from
        0 to 1 (Keras's `factor`: each operation's strength is drawn up to
        it; 1 is the strongest).
      mixup_alpha: mixup (Keras's MixUp) on each per-replica batch: every
        image is blended with another image of the batch, weights drawn from
        Beta(alpha, alpha), and so are their labels; 0.2 to 0.8 are usual,
        0 turns it off.
      cutmix_alpha: cutmix (Keras's CutMix) on each per-replica batch: a box
        of another image of the batch is pasted in, its area drawn from
        Beta(alpha, alpha), labels mixed by area; at most 1 (Keras's bound,
        1 is the usual figure), 0 turns it off. With mixup also on, each
        batch gets one of the two, with probability 1/2 each. Either one
        makes the training labels soft: the training accuracy is then the
        share of examples whose prediction is the label with the most
        weight (docs/input-pipeline.md).
    """

    random_resized_crop: bool = False
    crop_area_min: float = 0.08
    flip: bool = False
    randaugment_layers: int = 0
    randaugment_magnitude: float = 0.5
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or cutmix): the training labels are then soft."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def describe(aug: Augment) -> str:
    """One line for the log: what the training images and labels go through."""
    parts = []
    if aug.random_resized_crop:
        parts.append(f"random resized crop {aug.crop_area_min:g}-1")
    if aug.flip:
        parts.append("flip")
    if aug.randaugment_layers:
        parts.append(f"RandAugment {aug.randaugment_layers} ops, magnitude {aug.randaugment_magnitude:g}")
    mixes = [f"{name} {alpha:g}" for name, alpha in (("mixup", aug.mixup_alpha), ("cutmix", aug.cutmix_alpha)) if alpha]
    if mixes:
        parts.append(" or ".join(mixes) + (" (one per batch, 1/2 each)" if len(mixes) == 2 else "")
                     + ": soft labels, training accuracy against the label of most weight")
    return ", ".join(parts) or "none"
