"""The synthetic benchmark: deterministic, street-like, and two domains with a real gap."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest
from PIL import Image

from stages.data.classes import SYNTHETIC_PROTOCOL
from stages.data.io import read_label
from stages.data.synthetic import generate_sample, write_sample

H, W = 64, 128


@functools.cache
def batch(domain: str, count: int = 12, pair: str = "easy"):
    """Images (N, H, W, 3) and labels (N, H, W) of train images 0..N-1, seed 0 (do not modify)."""
    pairs = [generate_sample(0, domain, "train", i, H, W, pair) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# SHA-256 of image bytes + label bytes of a few images of the original (easy) pair, recorded
# before the generator grew the hard pair: the easy benchmark must not change under anyone's
# results.
EASY_HASHES = [
    ((0, "source", "train", 0, 64, 128),
     "d9df4927c2788b3d468113dbf737aeb833f92bf04f61b3115cb5bb972fcf41bf"),
    ((0, "target", "train", 0, 64, 128),
     "cb3e43c6ba85b081002f055210c96a4b512267fddff5a73e836282aa23ed68ae"),
    ((3, "target", "val", 7, 64, 128),
     "67744b3595a8216acccb0b235598a19895fff2a1be6f290dd45dc4fd54563db0"),
    ((1, "source", "val", 5, 128, 256),
     "0a13e2df6ea894a62ca25bc82e54e3881e77b1b02f1b03dd3dc22ed33c0c11fa"),
    ((2, "target", "train", 11, 128, 256),
     "52e490c06ae8c925a76dedfcf336aa43300b00a859196736d7b9711e03ea7fd7"),
]


# The same for the hard pair as calibrated (the figures in configs/synthetic_hard.yaml).
HARD_HASHES = [
    ((0, "source", "train", 0, 64, 128, "hard"),
     "a2596a9aabee10e2fde14028a718a67875e3350de239783d81bb90d875e60d9f"),
    ((0, "target", "train", 0, 64, 128, "hard"),
     "deb2837d6cc47e85b5f0e40d85b0801697987ab2401d13fef37056ac7a704b33"),
    ((2, "target", "val", 9, 128, 256, "hard"),
     "45eed21cad14055fc7cc5a215536a306e6cf8a63e73399e15c5a84d8a59e8f74"),
]


@pytest.mark.parametrize("args, expected", EASY_HASHES + HARD_HASHES)
def test_pairs_are_bit_identical_to_their_recorded_images(args, expected):
    image, label = generate_sample(*args)
    assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest() == expected


def test_any_image_regenerates_identically_from_its_seed():
    image, label = generate_sample(3, "target", "val", 7, H, W)
    again_image, again_label = generate_sample(3, "target", "val", 7, H, W)
    np.testing.assert_array_equal(image, again_image)
    np.testing.assert_array_equal(label, again_label)
    other_image, _ = generate_sample(3, "target", "val", 8, H, W)
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(generate_sample(4, "target", "val", 7, H, W)[0], image)


def test_scenes_are_streets_in_cityscapes_train_ids():
    for domain in ("source", "target"):
        images, labels = batch(domain)
        assert images.shape == (12, H, W, 3) and images.dtype == np.uint8
        assert labels.max() <= 18
        present = set(np.unique(labels).tolist())
        # road, sidewalk, building, pole, vegetation, sky, person, car in every domain
        assert {0, 1, 2, 5, 8, 10, 11, 13} <= present, domain
        # the sky is above the road: top rows sky/building, bottom rows road/sidewalk
        assert np.isin(labels[:, -1], (0, 1, 9)).mean() > 0.9
        assert np.isin(labels[:, 0], (2, 3, 8, 10)).mean() > 0.9


def test_domains_share_layout_but_not_appearance():
    source_images, source_labels = batch("source", 24)
    target_images, target_labels = batch("target", 24)
    # Layout statistics agree: road covers a similar share of the picture.
    road_share = [np.mean(labels == 0) for labels in (source_labels, target_labels)]
    assert abs(road_share[0] - road_share[1]) < 0.1
    # A nearest-class-mean colour classifier fitted on source pixels loses accuracy on target.
    classes = [c for c in range(19) if (source_labels == c).any() and (target_labels == c).any()]
    means = np.stack([source_images[source_labels == c].mean(0) for c in classes])

    def accuracy(images, labels):
        keep = np.isin(labels, classes)
        pixels = images[keep].astype(np.float64)
        nearest = np.argmin(((pixels[:, None] - means[None]) ** 2).sum(-1), axis=1)
        return np.mean(np.asarray(classes)[nearest] == labels[keep])

    assert accuracy(source_images, source_labels) - accuracy(target_images, target_labels) > 0.2
    # The target is noisy: neighbouring road pixels differ more.
    def roughness(images, labels):
        inner = (labels[:, :, 1:] == 0) & (labels[:, :, :-1] == 0)
        diff = np.abs(np.diff(images.astype(np.int16), axis=2)).sum(-1)
        return diff[inner].mean()

    assert roughness(target_images, target_labels) > 2 * roughness(source_images, source_labels)


def test_target_has_more_cars_than_source():
    _, source_labels = batch("source", 24)
    _, target_labels = batch("target", 24)
    assert np.mean(target_labels == 13) > np.mean(source_labels == 13)


def test_write_sample_writes_pngs_and_counts_every_pixel(tmp_path):
    counts = write_sample(0, "source", "train", 0, H, W, tmp_path / "i.png", tmp_path / "l.png")
    _, label = generate_sample(0, "source", "train", 0, H, W)
    np.testing.assert_array_equal(read_label(tmp_path / "l.png"), label)
    assert Image.open(tmp_path / "i.png").size == (W, H)
    assert len(counts) == 19 and sum(counts) == H * W
    assert counts == np.bincount(label.ravel(), minlength=19).tolist()


# ------------------------------------------------------------------------------ the hard pair

ROAD, SIDEWALK, BUILDING, FENCE, POLE, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    0, 1, 2, 4, 5, 8, 9, 10, 11, 13)


def mean_colour(images: np.ndarray, labels: np.ndarray, cls: int) -> np.ndarray:
    return images[labels == cls].astype(np.float64).mean(0)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def test_hard_pair_is_deterministic_per_seed_and_not_the_easy_pair():
    for domain in ("source", "target"):
        image, label = generate_sample(2, domain, "val", 4, H, W, "hard")
        again_image, again_label = generate_sample(2, domain, "val", 4, H, W, "hard")
        np.testing.assert_array_equal(image, again_image)
        np.testing.assert_array_equal(label, again_label)
        assert not np.array_equal(generate_sample(3, domain, "val", 4, H, W, "hard")[1], label)
        assert not np.array_equal(generate_sample(2, domain, "val", 4, H, W)[1], label)


def test_hard_pair_draws_the_benchmark_classes_only():
    for domain in ("source", "target"):
        _, labels = batch(domain, 24, "hard")
        present = set(np.unique(labels).tolist())
        assert present <= set(SYNTHETIC_PROTOCOL), domain
        assert {ROAD, SIDEWALK, BUILDING, FENCE, POLE, VEGETATION, SKY, PERSON} <= present, domain


def test_hard_target_classes_look_like_other_source_classes():
    source_images, source_labels = batch("source", 24, "hard")
    target_images, target_labels = batch("target", 24, "hard")
    source = {c: mean_colour(source_images, source_labels, c)
              for c in (ROAD, SIDEWALK, BUILDING, VEGETATION)}
    # Autumn trees are coloured like the source's façades, not like its trees.
    vegetation = mean_colour(target_images, target_labels, VEGETATION)
    assert distance(vegetation, source[BUILDING]) < 0.5 * distance(vegetation, source[VEGETATION])
    # Sidewalks are paved like the source's road.
    sidewalk = mean_colour(target_images, target_labels, SIDEWALK)
    assert distance(sidewalk, source[ROAD]) < 0.5 * distance(sidewalk, source[SIDEWALK])


def test_hard_gap_survives_a_global_colour_correction():
    """A nearest-class-mean colour classifier on per-domain standardised colours: on the easy
    pair standardising recovers much of the target accuracy, on the hard pair it does not."""
    def standardised(images):
        pixels = images.reshape(-1, 3).astype(np.float64)
        return (images - pixels.mean(0)) / pixels.std(0)

    def target_accuracy(pair):
        source_images, source_labels = batch("source", 24, pair)
        target_images, target_labels = batch("target", 24, pair)
        source_images, target_images = standardised(source_images), standardised(target_images)
        classes = [c for c in range(19) if (source_labels == c).any()]
        means = np.stack([source_images[source_labels == c].mean(0) for c in classes])
        keep = np.isin(target_labels, classes)
        pixels = target_images[keep]
        nearest = np.argmin(((pixels[:, None] - means[None]) ** 2).sum(-1), axis=1)
        return np.mean(np.asarray(classes)[nearest] == target_labels[keep])

    assert target_accuracy("easy") > 0.4
    assert target_accuracy("hard") < 0.2


def test_hard_target_has_more_persons_than_cars_and_the_source_the_reverse():
    _, source_labels = batch("source", 24, "hard")
    _, target_labels = batch("target", 24, "hard")
    assert np.sum(target_labels == PERSON) > np.sum(target_labels == CAR)
    assert np.sum(source_labels == CAR) > 3 * np.sum(source_labels == PERSON)


def test_hard_target_camera_is_higher_pitched_down_and_wider():
    _, source_labels = batch("source", 24, "hard")
    _, target_labels = batch("target", 24, "hard")
    ground = (ROAD, SIDEWALK, TERRAIN)
    # Pitched down: less sky and more ground in the picture.
    assert np.mean(target_labels == SKY) < 0.8 * np.mean(source_labels == SKY)
    assert np.mean(np.isin(target_labels, ground)) > np.mean(np.isin(source_labels, ground)) + 0.05
    # The horizon (the lowest row that still shows sky, per image) sits higher up.
    def horizon(labels):
        return np.mean([np.nonzero((label == SKY).any(1))[0].max() for label in labels])

    assert horizon(target_labels) < horizon(source_labels) - 0.05 * H


def test_hard_target_thin_classes_are_thinner():
    """Poles are thinner and fences are see-through railings: per row, runs of pole and fence
    pixels are shorter in the target."""
    def mean_run(labels, cls):
        mask = (labels == cls).reshape(-1, labels.shape[-1]).astype(np.int8)
        starts = np.sum(np.diff(mask, axis=1, prepend=0) == 1)
        return mask.sum() / max(starts, 1)

    _, source_labels = batch("source", 24, "hard")
    _, target_labels = batch("target", 24, "hard")
    for cls in (POLE, FENCE):
        assert mean_run(target_labels, cls) < 0.9 * mean_run(source_labels, cls), cls


def test_write_sample_writes_the_hard_pair(tmp_path):
    counts = write_sample(1, "target", "train", 2, H, W, tmp_path / "i.png", tmp_path / "l.png",
                          "hard")
    image, label = generate_sample(1, "target", "train", 2, H, W, "hard")
    np.testing.assert_array_equal(read_label(tmp_path / "l.png"), label)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "i.png")), image)
    assert counts == np.bincount(label.ravel(), minlength=19).tolist()
