"""The synthetic benchmark: deterministic, street-like, and two domains with a real gap."""

from __future__ import annotations

import numpy as np
from PIL import Image

from stages.data.io import read_label
from stages.data.synthetic import generate_sample, write_sample

H, W = 64, 128


def batch(domain: str, count: int = 12):
    pairs = [generate_sample(0, domain, "train", i, H, W) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


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
