"""The class tables agree with cityscapesScripts and with docs/method.md#datasets-and-classes
and docs/method.md#evaluation."""

from __future__ import annotations

import pytest
from cityscapesscripts.helpers.labels import labels as cityscapes_labels

from stages.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    PROTOCOLS,
    SYNTHIA_ID_TO_TRAINID,
    cityscapes_table,
    custom_table,
    lookup_table,
)

TRAIN_LABELS = sorted((label for label in cityscapes_labels if 0 <= label.trainId < 255),
                      key=lambda label: label.trainId)


def test_names_colours_and_train_ids_match_cityscapes_scripts():
    assert [label.trainId for label in TRAIN_LABELS] == list(range(19))
    assert CITYSCAPES_CLASSES == tuple(label.name for label in TRAIN_LABELS)
    assert CITYSCAPES_PALETTE == tuple(tuple(label.color) for label in TRAIN_LABELS)


def test_id_to_train_id_table_matches_cityscapes_scripts():
    expected = {label.id: label.trainId for label in cityscapes_labels
                if label.id >= 0 and 0 <= label.trainId < 255}
    assert CITYSCAPES_ID_TO_TRAINID == expected
    table = lookup_table(CITYSCAPES_ID_TO_TRAINID)
    for label in cityscapes_labels:
        if label.id >= 0:
            want = label.trainId if 0 <= label.trainId < 255 else IGNORE_INDEX
            assert table[label.id] == want, label.name


def test_synthia_table_is_the_19_way_map_of_algorithm_a1():
    # docs/method.md#datasets-and-classes, column "SYNTHIA class id", in trainId order.
    synthia_ids = [3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11]
    assert SYNTHIA_ID_TO_TRAINID == {sid: train for train, sid in enumerate(synthia_ids)}
    table = lookup_table(SYNTHIA_ID_TO_TRAINID)
    assert table[0] == IGNORE_INDEX and table[13] == IGNORE_INDEX and table[22] == IGNORE_INDEX


def test_protocols_16_and_13_are_the_synthia_subsets():
    names = {n: [CITYSCAPES_CLASSES[i] for i in PROTOCOLS[n]] for n in (16, 13)}
    assert len(names[16]) == 16 and len(names[13]) == 13
    assert set(CITYSCAPES_CLASSES) - set(names[16]) == {"terrain", "truck", "train"}
    assert set(names[16]) - set(names[13]) == {"wall", "fence", "pole"}
    assert PROTOCOLS[19] == tuple(range(19))


@pytest.mark.parametrize("protocols", [(19,), (19, 16, 13)])
def test_cityscapes_table_reports_the_requested_protocols(protocols):
    table = cityscapes_table(protocols)
    assert table.num_classes == 19
    assert sorted(table.protocols) == sorted(protocols)


def test_custom_table_has_one_colour_per_class_and_the_all_class_protocol():
    table = custom_table([f"c{i}" for i in range(25)])
    assert len(table.palette) == 25 and len(set(table.palette)) == 25
    assert table.protocols == {25: tuple(range(25))}
