"""The class tables: the 19 Cityscapes training classes, their palette, and the evaluation
protocols.

Defined once here and used by every stage (docs/method.md#datasets-and-classes,
docs/method.md#evaluation). A `ClassTable` is what a dataset index records and what checkpoints
and pseudo-label stores are checked against.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from stages.config import DataConfig
from stages.runtime.errors import DudaError

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# docs/method.md#datasets-and-classes: Cityscapes / GTA5 label id -> trainId. Every id not listed
# maps to 255.
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# docs/method.md#datasets-and-classes: SYNTHIA-RAND-CITYSCAPES class id -> trainId (19-way:
# terrain, truck, train kept).
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12,
    8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}

# docs/method.md#evaluation: the SYNTHIA protocols are subsets of the 19-class IoU vector.
PROTOCOLS: dict[int, tuple[int, ...]] = {
    19: tuple(range(19)),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    13: (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}


# The classes the built-in synthetic benchmark draws (stages/data/synthetic.py): its protocol,
# so that classes it never draws do not count as zeros in its mean IoU.
SYNTHETIC_PROTOCOL: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15)


def cityscapes_label_ids(size: int = 256) -> list[int]:
    """The official trainId -> Cityscapes labelId table (cityscapesscripts' `trainId2label`),
    dense over `size` entries: what the Cityscapes evaluator and benchmark server read.

    The inverse of CITYSCAPES_ID_TO_TRAINID on the 19 training classes; every other value,
    255 (ignore) included, maps to 0 ("unlabeled")."""
    table = [0] * size
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        table[train_id] = label_id
    return table


def lookup_table(mapping: dict[int, int], size: int = 256) -> list[int]:
    """A dense id -> trainId table of `size` entries; ids not in `mapping` map to 255."""
    table = [IGNORE_INDEX] * size
    for source_id, train_id in mapping.items():
        table[source_id] = train_id
    return table


class ClassTable(BaseModel):
    """Class names and colours of a dataset, and which protocols (class subsets) it reports."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    protocols: dict[int, tuple[int, ...]]  # the first one is the primary (headline) protocol

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def primary_protocol(self) -> tuple[int, tuple[int, ...]]:
        """(name, class ids) of the protocol whose mean is the headline mIoU."""
        name = next(iter(self.protocols))
        return name, tuple(self.protocols[name])

    def describe(self) -> str:
        return f"{self.num_classes} classes ({', '.join(self.names[:4])}, …)"


def cityscapes_table(protocols: tuple[int, ...] = (19,)) -> ClassTable:
    """The 19-class Cityscapes table reporting the given protocols (19, and 16/13 for SYNTHIA)."""
    return ClassTable(
        names=CITYSCAPES_CLASSES,
        palette=CITYSCAPES_PALETTE,
        protocols={n: PROTOCOLS[n] for n in protocols},
    )


def synthetic_table() -> ClassTable:
    """The 19-class table reporting the synthetic benchmark's 14-class protocol."""
    return ClassTable(names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE,
                      protocols={len(SYNTHETIC_PROTOCOL): SYNTHETIC_PROTOCOL})


def custom_table(names: list[str]) -> ClassTable:
    """A table for a user's own classes: a generated palette and the all-class protocol only."""
    palette = tuple(
        CITYSCAPES_PALETTE[i] if i < len(CITYSCAPES_PALETTE)
        else ((37 * i) % 256, (91 * i) % 256, (163 * i) % 256)
        for i in range(len(names))
    )
    return ClassTable(names=tuple(names), palette=palette,
                      protocols={len(names): tuple(range(len(names)))})


def class_table(data: DataConfig) -> ClassTable:
    """The class table shared by both domains: Cityscapes trainIds, or the folder's classes."""
    named = [(domain, tuple(getattr(data, domain).classes)) for domain in ("source", "target")
             if getattr(data, domain).layout == "folder"]
    if not named:
        if data.source.layout == data.target.layout == "synthetic":
            return synthetic_table()
        return cityscapes_table(data.ordered_protocols())
    names = named[0][1]
    if len(names) > 255:
        raise DudaError(f"data.{named[0][0]}.classes has {len(names)} classes; labels are 8-bit "
                        "with 255 = ignore, so at most 255 classes fit",
                        "merge classes")
    others = [domain for domain, other in named if other != names]
    if others or (len(named) == 1 and names != CITYSCAPES_CLASSES):
        raise DudaError("the source and target domains have different classes "
                        f"(data.{named[0][0]}.classes: {', '.join(names[:4])}, …)",
                        "give both folder domains the same data.<domain>.classes, or, next to "
                        "a Cityscapes-style domain, the 19 Cityscapes class names in trainId "
                        "order")
    return (cityscapes_table(data.ordered_protocols()) if names == CITYSCAPES_CLASSES
            else custom_table(list(names)))
