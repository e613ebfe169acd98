"""Dataset layouts: miniature trees in the real layouts, pairing, label decoding, and bad input."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.config import DomainConfig
from stages.data.io import image_size, read_label
from stages.data.layouts import convert_pair, list_split, read_synthia_ids
from stages.runtime.errors import DudaError

SIZE = (8, 16)  # H, W
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ tree builders


def write_rgb(path: Path, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def write_gray(path: Path, label: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)
    return path


def png16(array: np.ndarray) -> bytes:
    """Encode (H, W, 3) uint16 as a 16-bit RGB PNG by hand (rows alternate filters None/Sub)."""
    height, width, _ = array.shape
    rows = []
    for y in range(height):
        raw = np.frombuffer(array[y].astype(">u2").tobytes(), np.uint8)
        if y % 2:
            previous = np.concatenate([np.zeros(6, np.uint8), raw[:-6]])
            rows.append(b"\x01" + (raw - previous).astype(np.uint8).tobytes())  # Sub filter
        else:
            rows.append(b"\x00" + raw.tobytes())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def cityscapes_label_ids() -> np.ndarray:
    """Cityscapes label ids: road 7, car 26, sky 23, unlabeled 0, license plate region 1."""
    label = np.full(SIZE, 7, np.uint8)
    label[:2] = 23
    label[4:6, 4:8] = 26
    label[0, 0] = 0
    return label


def make_cityscapes(root: Path, split: str = "train", ids: dict[str, list[str]] | None = None,
                    kind: str = "labelTrainIds") -> Path:
    """leftImg8bit/<split>/<city>/<id>_leftImg8bit.png and gtFine/<split>/<city>/<id>_gtFine_*."""
    ids = ids or {"aachen": ["aachen_000000_000019", "aachen_000001_000019"],
                  "bochum": ["bochum_000000_000313"]}
    for city, names in ids.items():
        for name in names:
            write_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            raw = cityscapes_label_ids()
            if kind == "labelTrainIds":
                raw = np.asarray([0 if v == 7 else 13 if v == 26 else 10 if v == 23 else 255
                                  for v in raw.ravel()], np.uint8).reshape(SIZE)
            write_gray(root / "gtFine" / split / city / f"{name}_gtFine_{kind}.png", raw)
    return root


def make_gta5(root: Path, ids: list[str] | None = None) -> Path:
    """images/<id>.png and palettised labels/<id>.png whose palette index is the label id."""
    for name in ids or ["00001", "00002", "00003"]:
        write_rgb(root / "images" / f"{name}.png")
        label = Image.fromarray(cityscapes_label_ids(), mode="P")
        label.putpalette([v for i in range(256) for v in ((i * 7) % 256, i, 255 - i)])
        (root / "labels").mkdir(parents=True, exist_ok=True)
        label.save(root / "labels" / f"{name}.png")
    return root


def synthia_raw() -> np.ndarray:
    """(H, W, 3) uint16: R = SYNTHIA class id (road 3, car 8, sky 1, void 0), G = instance."""
    raw = np.zeros((*SIZE, 3), np.uint16)
    raw[..., 0] = 3
    raw[:2, :, 0] = 1
    raw[4:6, 4:8, 0] = 8
    raw[0, 0, 0] = 0
    raw[..., 1] = 1000 + np.arange(SIZE[1], dtype=np.uint16)  # instance ids above 255
    return raw


def make_synthia(root: Path, ids: list[str] | None = None) -> Path:
    for name in ids or ["0000000", "0000001"]:
        write_rgb(root / "RGB" / f"{name}.png")
        (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
        (root / "GT" / "LABELS" / f"{name}.png").write_bytes(png16(synthia_raw()))
    return root


def make_folder(root: Path, split: str = "train", ids: list[str] | None = None,
                labels: bool = True) -> Path:
    for name in ids or ["a", "b"]:
        write_rgb(root / split / "images" / f"{name}.jpg")
        if labels:
            label = np.zeros(SIZE, np.uint8)
            label[:, 8:] = 2
            label[0, 0] = 255
            write_gray(root / split / "labels" / f"{name}.png", label)
    return root


def domain(layout: str, root: Path, **extra) -> DomainConfig:
    return DomainConfig(layout=layout, root=str(root), **extra)


def convert(pair, num_classes: int = 19, output: Path | None = None, exclude: bool = False):
    result = convert_pair(pair, num_classes, output, exclude)
    if result.error is not None:
        raise DudaError(*result.error)
    return result


def expected_train_ids() -> np.ndarray:
    label = np.zeros(SIZE, np.uint8)
    label[:2] = 10
    label[4:6, 4:8] = 13
    label[0, 0] = 255
    return label


# ------------------------------------------------------------------------------- the layouts


def test_cityscapes_train_ids_are_paired_by_stem_across_cities_and_used_in_place(tmp_path):
    listing = list_split("target", domain("cityscapes", make_cityscapes(tmp_path)), "train")
    assert [p.id for p in listing.pairs] == ["aachen_000000_000019", "aachen_000001_000019",
                                             "bochum_000000_000313"]
    for pair in listing.pairs:
        assert pair.label.name == f"{pair.id}_gtFine_labelTrainIds.png"
        assert pair.image.name == f"{pair.id}_leftImg8bit.png"
        assert pair.label_format == "train_ids"
    result = convert(listing.pairs[0])
    assert result.pixel_counts[13] == 8 and result.pixel_counts[10] == 31
    assert sum(result.pixel_counts) == SIZE[0] * SIZE[1] - 1  # one ignore pixel


def test_cityscapes_label_ids_only_are_converted_to_train_ids(tmp_path):
    root = make_cityscapes(tmp_path, split="val", kind="labelIds")
    listing = list_split("target", domain("cityscapes", root, splits=["val"]), "val")
    pair = listing.pairs[0]
    assert pair.label_format == "cityscapes_ids"
    output = tmp_path / "out" / "x.png"
    convert(pair, output=output)
    np.testing.assert_array_equal(read_label(output), expected_train_ids())


def test_gta5_palette_index_is_the_label_id(tmp_path):
    root = make_gta5(tmp_path)
    listing = list_split("source", domain("gta5", root), "train")
    assert [p.id for p in listing.pairs] == ["00001", "00002", "00003"]
    output = tmp_path / "out.png"
    convert(listing.pairs[1], output=output)
    np.testing.assert_array_equal(read_label(output), expected_train_ids())


def test_gta5_exclude_iast_dropped_drops_those_ids(tmp_path):
    root = make_gta5(tmp_path, ["02153", "02154", "02158", "02159", "12054"])
    listing = list_split("source", domain("gta5", root, exclude_iast_dropped=True), "train")
    assert [p.id for p in listing.pairs] == ["02153", "02159"]
    assert listing.excluded == ["02154", "02158", "12054"]
    kept = list_split("source", domain("gta5", root), "train")
    assert len(kept.pairs) == 5


def test_gta5_size_mismatch_is_reported_not_fatal(tmp_path):
    root = make_gta5(tmp_path)
    write_rgb(root / "images" / "00002.png", size=(10, 16))
    pairs = list_split("source", domain("gta5", root), "train").pairs
    result = convert(pairs[1], exclude=True)
    assert result.size_mismatch == "00002: image 16x10, label 16x8"
    with pytest.raises(DudaError, match="is 16x8 but its image"):
        convert(pairs[1], exclude=False)


def test_pil_truncates_16_bit_synthia_labels_so_they_are_decoded_here(tmp_path):
    path = make_synthia(tmp_path) / "GT" / "LABELS" / "0000000.png"
    pil = np.asarray(Image.open(path))
    assert pil[..., 0].max() == 0  # PIL keeps the high byte only: every id would read as 0
    np.testing.assert_array_equal(read_synthia_ids(path), synthia_raw()[..., 0])


def test_synthia_first_channel_is_mapped_to_train_ids(tmp_path):
    listing = list_split("source", domain("synthia", make_synthia(tmp_path)), "train")
    assert [p.id for p in listing.pairs] == ["0000000", "0000001"]
    output = tmp_path / "out.png"
    result = convert(listing.pairs[0], output=output)
    np.testing.assert_array_equal(read_label(output), expected_train_ids())
    assert result.pixel_counts[0] == SIZE[0] * SIZE[1] - 2 * SIZE[1] - 8


def test_folder_layout_class_indices_in_place_and_unlabelled_split(tmp_path):
    root = make_folder(tmp_path)
    listing = list_split("target", domain("folder", root, classes=["x", "y", "z"]), "train")
    assert [(p.id, p.image.name, p.label.name) for p in listing.pairs] == [
        ("a", "a.jpg", "a.png"), ("b", "b.jpg", "b.png")]
    assert convert(listing.pairs[0], num_classes=3).pixel_counts == [63, 0, 64]
    make_folder(root, split="test", labels=False)
    unlabelled = list_split("target", domain("folder", root, classes=["x"]), "test")
    assert unlabelled.images_without_labels == 2
    assert all(p.label is None for p in unlabelled.pairs)


# ------------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path):
    with pytest.raises(DudaError, match=r"data.source.root .*nowhere does not exist"):
        list_split("source", domain("gta5", tmp_path / "nowhere"), "train")


def test_split_with_no_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DudaError, match="the split has no images"):
        list_split("source", domain("gta5", tmp_path), "train")


def test_labels_without_images_are_listed(tmp_path):
    root = make_gta5(tmp_path, [f"{i:05d}" for i in range(8)])
    for i in range(7):
        (root / "images" / f"{i:05d}.png").unlink()
    with pytest.raises(DudaError) as error:
        list_split("source", domain("gta5", root), "train")
    assert "7 label file(s)" in error.value.message
    assert "first: 00000.png, 00001.png, 00002.png, 00003.png, 00004.png)" in error.value.message


def test_images_without_labels_are_listed(tmp_path):
    root = make_cityscapes(tmp_path)
    (root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DudaError, match=r"1 image\(s\) .* \(first: bochum_000000_000313_leftImg8bit"):
        list_split("target", domain("cityscapes", root), "train")


def test_images_copied_into_the_label_folder(tmp_path):
    root = make_gta5(tmp_path)
    for name in ("00001", "00002", "00003"):
        (root / "labels" / f"{name}.png").write_bytes((root / "images" / f"{name}.png")
                                                      .read_bytes())
    with pytest.raises(DudaError, match="images copied into the label folder"):
        list_split("source", domain("gta5", root), "train")
    city = make_cityscapes(tmp_path / "cs")
    write_rgb(city / "gtFine/train/aachen/aachen_000000_000019_leftImg8bit.png")
    with pytest.raises(DudaError, match="images copied into the label folder"):
        list_split("target", domain("cityscapes", city), "train")


def test_a_copied_image_found_while_decoding_is_named_as_such(tmp_path):
    root = make_gta5(tmp_path, ["00001", "00002", "00003", "00004"])
    (root / "labels" / "00004.png").write_bytes((root / "images" / "00004.png").read_bytes())
    pair = list_split("source", domain("gta5", root), "train").pairs[3]
    with pytest.raises(DudaError, match="images copied into the label folder"):
        convert(pair)


def test_truncated_png(tmp_path):
    root = make_gta5(tmp_path)
    label = root / "labels" / "00002.png"
    label.write_bytes(label.read_bytes()[:60])
    pair = list_split("source", domain("gta5", root), "train").pairs[1]
    with pytest.raises(DudaError, match=r"00002.png is unreadable or truncated"):
        convert(pair)
    synthia = make_synthia(tmp_path / "syn")
    label = synthia / "GT" / "LABELS" / "0000001.png"
    label.write_bytes(label.read_bytes()[:-30])
    pair = list_split("source", domain("synthia", synthia), "train").pairs[1]
    with pytest.raises(DudaError, match=r"0000001.png is unreadable or truncated"):
        convert(pair)


def test_values_outside_the_class_table(tmp_path):
    root = make_folder(tmp_path)
    write_gray(root / "train" / "labels" / "b.png", np.full(SIZE, 5, np.uint8))
    pairs = list_split("target", domain("folder", root, classes=["x", "y", "z"]), "train").pairs
    with pytest.raises(DudaError, match=r"b.png holds values outside the class table \(5;"):
        convert(pairs[1], num_classes=3)
    city = make_cityscapes(tmp_path / "cs", kind="labelIds")
    bad = city / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    write_gray(bad, np.full(SIZE, 40, np.uint8))
    pairs = list_split("target", domain("cityscapes", city), "train").pairs
    with pytest.raises(DudaError, match="outside the class table"):
        convert(pairs[0])


def test_three_channel_label(tmp_path):
    root = make_cityscapes(tmp_path)
    label = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    write_rgb(label)
    pair = list_split("target", domain("cityscapes", root), "train").pairs[0]
    with pytest.raises(DudaError, match="is a 3-channel \\(RGB\\) image; a label map has one"):
        convert(pair)


def test_cityscapes_without_label_files(tmp_path):
    root = make_cityscapes(tmp_path)
    for path in (root / "gtFine").rglob("*.png"):
        path.unlink()
    with pytest.raises(DudaError, match="neither \\*_gtFine_labelTrainIds.png nor"):
        list_split("target", domain("cityscapes", root), "train")


def test_gta5_has_no_val_split(tmp_path):
    with pytest.raises(DudaError, match="gta5 has no splits"):
        list_split("source", domain("gta5", make_gta5(tmp_path), splits=["val"]), "val")


def test_png16_writer_round_trips_through_a_generic_decoder():
    # The hand-written 16-bit PNG is a valid PNG (PIL reads its size and 8-bit view).
    image = Image.open(io.BytesIO(png16(synthia_raw())))
    assert image.size == (SIZE[1], SIZE[0])


def test_synthia_ids_above_the_table_are_refused(tmp_path):
    root = make_synthia(tmp_path)
    raw = synthia_raw()
    raw[3, 3, 0] = 300  # would read as 44 if only the low byte were kept
    (root / "GT" / "LABELS" / "0000001.png").write_bytes(png16(raw))
    pair = list_split("source", domain("synthia", root), "train").pairs[1]
    with pytest.raises(DudaError, match=r"outside the class table \(300;"):
        convert(pair)


def _claims(width: int, height: int, depth: int, colour: int) -> bytes:
    """A PNG whose header claims width×height pixels over a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    # 2**27 pixels: a 20-megapixel photo passes (header only, nothing decoded here) ...
    photo = tmp_path / "photo.png"
    photo.write_bytes(_claims(5472, 3648, 8, 2))
    assert image_size(photo) == (5472, 3648)
    # ... and a header claiming more is refused, whichever reader meets it first: PIL's
    # (8-bit labels, images) or the 16-bit SYNTHIA decoder's own.
    root = make_synthia(tmp_path / "synthia")
    (root / "GT" / "LABELS" / "0000001.png").write_bytes(_claims(20_000, 20_000, 16, 2))
    (tmp_path / "label.png").write_bytes(_claims(12_000, 12_000, 8, 0))
    with pytest.raises(DudaError, match=r"claims 20000×20000 pixels and is larger than the "
                                        r"limit of 134,217,728 pixels"):
        convert(list_split("source", domain("synthia", root), "train").pairs[1])
    with pytest.raises(DudaError, match="label.png is larger than the limit"):
        read_label(tmp_path / "label.png")


def test_folder_images_with_one_stem_are_refused_naming_both(tmp_path):
    root = make_folder(tmp_path, ids=["a", "b"])
    write_rgb(root / "train" / "images" / "b.png")
    with pytest.raises(DudaError, match="two images named b: b.jpg and b.png") as error:
        list_split("target", domain("folder", root, classes=["x", "y", "z"]), "train")
    assert "keep one file per image name" in error.value.fix
