"""Rare-class sampling of the source crops: DAFormer's RCS (docs/method.md#rare-class-sampling).

A source crop is drawn in three steps, all from one generator (the crop's generator of
(seed, epoch, position), stages.data.crops), so the draw is as reproducible as any crop:

1. a class c with probability P(c) ∝ exp((1 − f_c) / T), f_c being c's share of the split's
   labelled pixels (`class_probabilities`); classes absent from the split, and classes that no
   image holds enough of (step 2), are never drawn;
2. uniformly, an image whose label holds more than `min_pixels` pixels of c (`eligible_images`;
   the counts are the index's per-image counts, at the label file's resolution);
3. a crop of that image, re-drawn (at most `MAX_CROP_TRIES` times) while it holds no more than
   min_pixels × min_crop_ratio pixels of c (`crop_holds_class`, counted in the crop itself, at
   the crop's resolution); the last crop is kept, checked or not. At min_crop_ratio 0 the first
   crop is kept.

The functions here are pure: counts and labels in, probabilities, indices and verdicts out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.config import RareClassSamplingConfig
from stages.data.index import DatasetIndex, Domain
from stages.runtime.errors import DudaError

# DAFormer checks a crop and re-draws it at most this many times (mmseg/datasets/uda_dataset.py).
MAX_CROP_TRIES = 10


def class_probabilities(counts: np.ndarray, temperature: float) -> np.ndarray:
    """(C,) pixel counts of a split -> (C,) float64 P(c) ∝ exp((1 − f_c) / T) over the classes
    present (f_c = counts[c] / counts.sum()); an absent class gets 0."""
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    if not present.any():
        return np.zeros_like(counts)
    logits = (1.0 - counts / counts.sum()) / float(temperature)
    # A softmax over the present classes; subtracting the largest logit keeps exp finite at
    # small T (1/T = 100 at DAFormer's 0.01).
    logits = np.where(present, logits, -np.inf)
    weights = np.exp(logits - logits[present].max())
    return weights / weights.sum()


def eligible_images(image_counts: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """(N, C) per-image pixel counts -> for each class, the indices (ascending) of the images
    holding more than `min_pixels` of it (DAFormer's strict `>`)."""
    image_counts = np.asarray(image_counts)
    return [np.flatnonzero(image_counts[:, c] > min_pixels) for c in range(image_counts.shape[1])]


def crop_holds_class(label: np.ndarray, cls: int, min_crop_pixels: float) -> bool:
    """Whether a label crop holds more than `min_crop_pixels` pixels of class `cls`."""
    return int((np.asarray(label) == cls).sum()) > min_crop_pixels


@dataclass(frozen=True)
class RareClassSampler:
    """The drawable classes of one split with their probabilities and eligible images."""

    classes: np.ndarray  # (K,) int64 class ids that can be drawn
    probabilities: np.ndarray  # (K,) float64, summing to 1
    images: tuple[np.ndarray, ...]  # per drawable class, the eligible image indices
    min_crop_pixels: float  # a crop must hold more than this many pixels of the class
    redraw_crops: bool  # False at min_crop_ratio 0: the first crop is kept, as DAFormer

    @classmethod
    def build(cls, image_counts: np.ndarray, temperature: float, min_pixels: int,
              min_crop_ratio: float) -> RareClassSampler:
        """The sampler of a split from its (N, C) per-image pixel counts; refuses a split where
        no image holds more than `min_pixels` of any class."""
        image_counts = np.asarray(image_counts, np.int64)
        probabilities = class_probabilities(image_counts.sum(axis=0), temperature)
        eligible = eligible_images(image_counts, min_pixels)
        drawable = [c for c in range(image_counts.shape[1])
                    if probabilities[c] > 0 and len(eligible[c]) > 0]
        if not drawable:
            raise DudaError(f"rare-class sampling: no source-train image holds more than "
                            f"{min_pixels} pixels of any class",
                            "lower input.rare_class_sampling.min_pixels (it counts pixels at "
                            "the label files' resolution), or disable it")
        kept = probabilities[drawable]
        return cls(classes=np.asarray(drawable, np.int64), probabilities=kept / kept.sum(),
                   images=tuple(eligible[c] for c in drawable),
                   min_crop_pixels=float(min_pixels) * float(min_crop_ratio),
                   redraw_crops=min_crop_ratio > 0)

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        """(class, image index): a class by `probabilities`, then one of its images uniformly."""
        k = int(rng.choice(len(self.classes), p=self.probabilities))
        images = self.images[k]
        return int(self.classes[k]), int(images[rng.integers(len(images))])

    def accepts(self, label_crop: np.ndarray, cls: int) -> bool:
        """Whether the crop may stop the re-drawing (always, when crops are not re-drawn)."""
        return not self.redraw_crops or crop_holds_class(label_crop, cls, self.min_crop_pixels)


def rare_class_sampler(config: RareClassSamplingConfig, index: DatasetIndex, domain: Domain,
                       split: str = "train") -> RareClassSampler | None:
    """The sampler `config` asks for over `domain`/`split` of the index; None when off (then the
    index's per-image counts are not needed, so an index written before them still trains)."""
    if not config.enabled:
        return None
    return RareClassSampler.build(index.image_pixel_counts(domain, split), config.temperature,
                                  config.min_pixels, config.min_crop_ratio)
