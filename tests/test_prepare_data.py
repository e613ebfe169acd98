"""`duda prepare-data` end to end: real layouts, the synthetic benchmark, and every bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_index
from test_layouts import (
    SIZE,
    expected_train_ids,
    make_cityscapes,
    make_gta5,
    make_synthia,
    write_gray,
    write_rgb,
)
from typer.testing import CliRunner

from duda_cli.app import app
from stages.data.index import load_dataset_index
from stages.data.io import read_label
from stages.runtime.errors import DudaError

runner = CliRunner()


def write_config(path: Path, source: dict, target: dict, **data) -> Path:
    config = {"experiment": "t", "data": {"source": source, "target": target, **data}}
    path.write_text(yaml.safe_dump(config))
    return path


def prepare(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["prepare-data", "-c", str(config), "--out", str(out), *extra])


@pytest.fixture
def gta_cityscapes(tmp_path: Path) -> Path:
    """GTA5 source, Cityscapes target with labelIds only (train) and labelTrainIds (val)."""
    gta = make_gta5(tmp_path / "GTA5")
    city = make_cityscapes(tmp_path / "Cityscapes", "train", kind="labelIds")
    make_cityscapes(city, "val")
    return write_config(tmp_path / "c.yaml", {"layout": "gta5", "root": str(gta)},
                        {"layout": "cityscapes", "root": str(city),
                         "splits": ["train", "val"]}, workers=1)


def test_real_layouts_are_indexed_with_converted_and_in_place_labels(gta_cityscapes, tmp_path):
    out = tmp_path / "data"
    result = prepare(gta_cityscapes, out, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    rows = {(r["domain"], r["split"]): r for r in summary["splits"]}
    assert rows["source", "train"]["pairs"] == 3 and rows["target", "val"]["pairs"] == 3
    assert rows["target", "train"]["layout"] == "cityscapes"
    assert rows["source", "train"]["pixel_shares"]["car"] == pytest.approx(8 / 127, abs=1e-5)
    assert summary["classes"][13] == "car"

    index = load_dataset_index(out)
    gta = index.samples("source", "train")
    assert [s.id for s in gta] == ["00001", "00002", "00003"]
    assert gta[0].label == out.resolve() / "labels/source/train/00001.png"
    np.testing.assert_array_equal(read_label(gta[0].label), expected_train_ids())
    converted = index.samples("target", "train")[0]
    assert converted.label.is_relative_to(out.resolve())
    np.testing.assert_array_equal(read_label(converted.label), expected_train_ids())
    in_place = index.samples("target", "val")[0]
    assert in_place.label == tmp_path / "Cityscapes/gtFine/val/aachen/" \
        "aachen_000000_000019_gtFine_labelTrainIds.png"
    split = index.content.domains["source"].splits["train"]
    assert split.pixel_counts[13] == 3 * 8 and sum(split.pixel_counts) == 3 * 127


def test_synthia_source_is_indexed_with_its_16_bit_labels(tmp_path):
    synthia = make_synthia(tmp_path / "SYNTHIA")
    city = make_cityscapes(tmp_path / "Cityscapes", "val")
    config = write_config(tmp_path / "c.yaml", {"layout": "synthia", "root": str(synthia)},
                          {"layout": "cityscapes", "root": str(city), "splits": ["val"]},
                          protocols=[19, 16, 13])
    assert prepare(config, tmp_path / "data").exit_code == 0
    index = load_dataset_index(tmp_path / "data")
    assert sorted(index.classes.protocols) == [13, 16, 19]
    label = index.samples("source", "train")[1].label
    np.testing.assert_array_equal(read_label(label), expected_train_ids())


def test_synthetic_benchmark_rerun_is_a_no_op_and_force_rebuilds(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"layout": "synthetic", "splits": ["train", "val"]},
                          {"layout": "synthetic", "splits": ["train", "val"]},
                          synthetic={"height": 32, "width": 64, "num_source_train": 5,
                                     "num_source_val": 2, "num_target_train": 4,
                                     "num_target_val": 3})
    out = tmp_path / "data"
    first = prepare(config, out)
    assert first.exit_code == 0, first.stderr
    assert "wrote dataset index" in first.stderr
    for column in ("source", "target", "synthetic", "road", "car"):
        assert column in first.stderr
    index = load_dataset_index(out)
    assert [len(index.samples(d, s)) for d in ("source", "target") for s in ("train", "val")] \
        == [5, 2, 4, 3]
    sample = index.samples("target", "val")[2]
    assert read_label(sample.label).shape == (32, 64)
    assert sum(index.content.domains["target"].splits["val"].pixel_counts) == 3 * 32 * 64
    manifest_before = (out / "manifest.json").read_text()

    again = prepare(config, out)
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert (out / "manifest.json").read_text() == manifest_before
    forced = prepare(config, out, "--force")
    assert forced.exit_code == 0 and "wrote dataset index" in forced.stderr
    assert json.loads((out / "manifest.json").read_text())["id"] == \
        json.loads(manifest_before)["id"]  # same content, same id


# ---------------------------------------------------------------------------- bad input


def _missing_root(root: Path) -> tuple[dict, str]:
    return {"layout": "gta5", "root": str(root / "nowhere")}, "nowhere"


def _no_images(root: Path) -> tuple[dict, str]:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    return {"layout": "gta5", "root": str(root)}, "has no images"


def _copied(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    for name in ("00001", "00002", "00003"):
        (root / "labels" / f"{name}.png").write_bytes((root / "images" / f"{name}.png")
                                                      .read_bytes())
    return {"layout": "gta5", "root": str(root)}, "images copied into the label folder"


def _orphan_label(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    (root / "images" / "00002.png").unlink()
    return {"layout": "gta5", "root": str(root)}, "00002.png"


def _orphan_image(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    (root / "labels" / "00003.png").unlink()
    return {"layout": "gta5", "root": str(root)}, "00003.png"


def _truncated(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    label = root / "labels" / "00002.png"
    label.write_bytes(label.read_bytes()[:50])
    return {"layout": "gta5", "root": str(root)}, "00002.png is unreadable or truncated"


def _truncated_image(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    image = root / "images" / "00001.png"
    image.write_bytes(image.read_bytes()[:100])
    return {"layout": "gta5", "root": str(root)}, "00001.png is unreadable or truncated"


def _bad_values(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    write_gray(root / "labels" / "00003.png", np.full(SIZE, 77, np.uint8))
    return {"layout": "gta5", "root": str(root)}, "00003.png holds values outside the class table"


def _three_channels(root: Path) -> tuple[dict, str]:
    make_gta5(root)
    write_rgb(root / "labels" / "00001.png")
    return {"layout": "gta5", "root": str(root)}, "00001.png is a 3-channel"


def _no_cityscapes_labels(root: Path) -> tuple[dict, str]:
    make_cityscapes(root)
    for path in (root / "gtFine").rglob("*.png"):
        path.unlink()
    return ({"layout": "cityscapes", "root": str(root)},
            "neither *_gtFine_labelTrainIds.png nor *_gtFine_labelIds.png")


@pytest.mark.parametrize("broken", [_missing_root, _no_images, _copied, _orphan_label,
                                    _orphan_image, _truncated, _truncated_image, _bad_values,
                                    _three_channels, _no_cityscapes_labels],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_exits_2_with_one_message_and_writes_nothing(broken, tmp_path):
    source, expected = broken(tmp_path / "dataset")
    config = write_config(tmp_path / "c.yaml", source, {"layout": "synthetic"},
                          synthetic={"height": 16, "width": 32, "num_target_train": 2})
    out = tmp_path / "out" / "data"
    result = prepare(config, out)
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr.replace("\n", "")
    assert result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_config_typo_names_the_key_the_file_and_the_allowed_keys(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"layout": "synthetic"}, {"layout": "synthetic"},
                          wokers=2)
    result = prepare(config, tmp_path / "data")
    assert result.exit_code == 2
    message = result.stderr.replace("\n", "")
    assert "unknown key 'data.wokers'" in message and str(config) in message
    assert "allowed keys" in message and "workers" in message
    assert not (tmp_path / "data").exists()


def test_yaml_string_for_a_number_is_explained(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("experiment: t\ndata:\n  source: {layout: synthetic}\n"
                      "  target: {layout: synthetic}\nwarmup:\n  optimizer:\n    lr: 1e-3\n")
    result = prepare(config, tmp_path / "data")
    assert result.exit_code == 2
    message = result.stderr.replace("\n", "")
    assert "'warmup.optimizer.lr' must be a number, got the string '1e-3'" in message
    assert "Traceback" not in result.stderr


def test_worker_processes_give_the_same_benchmark_as_one_process(tmp_path):
    sizes = {"height": 16, "width": 32, "num_source_train": 70, "num_target_train": 1}
    outputs = []
    for workers in (1, 2):
        config = write_config(tmp_path / f"c{workers}.yaml", {"layout": "synthetic"},
                              {"layout": "synthetic"}, synthetic=sizes, workers=workers)
        out = tmp_path / f"data{workers}"
        assert prepare(config, out).exit_code == 0
        outputs.append(out)
    serial, parallel = (load_dataset_index(out) for out in outputs)
    assert serial.content.domains["source"].splits["train"].pixel_counts == \
        parallel.content.domains["source"].splits["train"].pixel_counts
    for a, b in zip(serial.samples("source", "train"), parallel.samples("source", "train")):
        assert a.image.read_bytes() == b.image.read_bytes()


def test_gta5_size_mismatch_is_left_out_with_a_warning(tmp_path):
    gta = make_gta5(tmp_path / "GTA5")
    write_rgb(gta / "images" / "00002.png", size=(10, 16))
    config = write_config(tmp_path / "c.yaml", {"layout": "gta5", "root": str(gta)},
                          {"layout": "synthetic"}, synthetic={"height": 16, "width": 32,
                                                              "num_target_train": 1})
    result = prepare(config, tmp_path / "data", "--json")
    assert result.exit_code == 0
    assert "left out 1 gta5 pair(s) whose image and label sizes differ" in result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["splits"][0]["size_mismatches"] == 1 and summary["splits"][0]["pairs"] == 2
    assert "00002: image 16x10, label 16x8" in summary["warnings"][0]
    ids = [s.id for s in load_dataset_index(tmp_path / "data").samples("source", "train")]
    assert ids == ["00001", "00003"]


def test_labels_are_indexed_with_their_digests_and_a_later_edit_is_refused(gta_cityscapes,
                                                                           tmp_path):
    out = tmp_path / "data"
    assert prepare(gta_cityscapes, out).exit_code == 0
    index = load_dataset_index(out)
    converted, in_place = index.samples("source", "train")[0], index.samples("target", "val")[0]
    for sample in (converted, in_place):
        assert sample.label_sha256 == hashlib.sha256(sample.label.read_bytes()).hexdigest()
        np.testing.assert_array_equal(sample.read_label(), expected_train_ids())
    # The user's own label file, edited to another valid class after indexing.
    label = read_label(in_place.label).copy()
    label[label == 13] = 0
    write_gray(in_place.label, label)
    with pytest.raises(DudaError, match="changed after the dataset index was built") as error:
        in_place.read_label()
    assert "prepare-data --force" in error.value.fix
    assert prepare(gta_cityscapes, out, "--force").exit_code == 0
    assert 13 not in load_dataset_index(out).samples("target", "val")[0].read_label()


def test_an_index_without_digests_loads_and_its_labels_are_range_checked(tmp_path):
    index = load_dataset_index(make_index(tmp_path / "data"))  # as written before digests
    sample = index.samples("source", "train")[0]
    assert sample.label_sha256 is None and sample.read_label().shape == (32, 64)
    label = read_label(sample.label).copy()
    label[0, :2] = [19, 40]
    write_gray(sample.label, label)
    with pytest.raises(DudaError, match=r"label value out of range \(19, 40; the class table "
                                        r"has 0..18 and 255 = ignore\)"):
        sample.read_label()
