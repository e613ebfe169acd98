"""The synthetic benchmark: deterministic, street-like, and two domains with a real gap."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from stages.data.io import read_label
from stages.data.synthetic import generate_sample, write_sample

H, W = 64, 128


def batch(domain: str, count: int = 12):
    pairs = [generate_sample(0, domain, "train", i, H, W) for i in range(count)]
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


@pytest.mark.parametrize("args, expected", EASY_HASHES)
def test_easy_pair_is_bit_identical_to_its_recorded_images(args, expected):
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
