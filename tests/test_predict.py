"""`duda predict`: prediction PNGs in every format at each image's own size, the Cityscapes round
trip through cityscapesscripts' evaluator, and every bad input refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_index
from PIL import Image
from typer.testing import CliRunner

from duda_cli.app import app
from stages import evaluate, predict, prepare_data
from stages.artifacts.checkpoint import MODEL_FILE, write_model_file
from stages.artifacts.manifest import CHECKPOINT, MANIFEST, PREDICTIONS, load_artifact
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, DeepLabV2Config
from stages.data.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    cityscapes_label_ids,
    cityscapes_table,
)
from stages.data.crops import resize_image
from stages.data.io import read_image
from stages.data.transforms import normalize
from stages.engine.inference import predict_scores
from stages.nn.model import build_model
from stages.runtime.errors import DudaError

runner = CliRunner()
TINY = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.1,
                   normalization="imagenet_rgb")
CONFIG = {
    "experiment": "predict",
    "seed": 0,
    "data": {"source": {"layout": "synthetic"}, "target": {"layout": "synthetic"}},
    "input": {"source_size": [32, 64], "target_size": [32, 64], "crop_size": [24, 48]},
    "model": TINY.model_dump(mode="json"),
    "evaluate": {"inference": {"batch_size": 1, "num_workers": 0}},
}
ALL = "trainid,labelid,color,confidence"


def make_checkpoint(path: Path, classes=CITYSCAPES_CLASSES, seed: int = 0) -> Path:
    """A checkpoint artifact of a random tiny model whose head favours a few classes."""
    torch.manual_seed(seed)
    model = build_model(TINY, len(classes))
    with torch.no_grad():
        for conv in model.classifier.branches:
            conv.bias[:4] += 0.2 * torch.tensor([1.0, 0.5, 0.8, 0.3])[: len(classes)]
    with ArtifactWriter(path, kind=CHECKPOINT, stage="warmup", config={},
                        config_hash=f"predict-test-{seed}-{len(classes)}") as writer:
        write_model_file(path / MODEL_FILE, student=model, teacher=None, model_config=TINY,
                         class_names=list(classes), iteration=0)
        writer.finish({"iteration": 0})
    return path


def raw_config(**evaluate) -> dict:
    raw = json.loads(json.dumps(CONFIG))
    raw["evaluate"]["inference"].update(evaluate.pop("inference", {}))
    raw["evaluate"].update(evaluate)
    return raw


def config(**evaluate) -> Config:
    return Config.model_validate(raw_config(**evaluate))


def config_file(tmp_path: Path, **evaluate) -> Path:
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(raw_config(**evaluate)))
    return path


def write_image(path: Path, height: int, width: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def direct(checkpoint: Path, image: Path, size=(32, 64)) -> tuple[np.ndarray, np.ndarray]:
    """Independent inference: (trainIds, 255 × max probability) at the image's own size."""
    data = torch.load(checkpoint / MODEL_FILE, weights_only=True)
    model = build_model(TINY, len(data["class_names"]))
    model.load_state_dict(data["student"])
    pixels = read_image(image)
    batch = normalize(resize_image(pixels, size), "imagenet_rgb")[None]
    scores, _ = predict_scores(model.eval(), batch, pixels.shape[:2])
    confidence = (scores.softmax(1).amax(1)[0] * 255).round().to(torch.uint8).numpy()
    return scores.argmax(1)[0].numpy().astype(np.uint8), confidence


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def invoke(*args: str):
    return runner.invoke(app, ["predict", *args])


# ---------------------------------------------------------------------------- the outputs


def test_label_id_table_is_the_official_one() -> None:
    from cityscapesscripts.helpers.labels import trainId2label

    table = cityscapes_label_ids()
    for train_id in range(19):
        assert table[train_id] == trainId2label[train_id].id
    assert table[255] == trainId2label[255].id == 0
    assert {table[t]: t for t in range(19)} == CITYSCAPES_ID_TO_TRAINID


def test_write_prediction_writes_each_format(tmp_path: Path) -> None:
    prediction = np.array([[0, 13, 18], [10, 2, 0]], np.uint8)
    confidence = np.array([[255, 128, 0], [1, 2, 3]], np.uint8)
    predict.write_prediction(tmp_path, "a_leftImg8bit", prediction, confidence,
                             ("trainid", "labelid", "color", "confidence"), cityscapes_table())
    np.testing.assert_array_equal(png(tmp_path / "trainid/a_leftImg8bit.png"), prediction)
    np.testing.assert_array_equal(png(tmp_path / "labelid/a_leftImg8bit.png"),
                                  [[7, 26, 33], [23, 11, 7]])
    colour = png(tmp_path / "color/a_leftImg8bit.png")
    assert colour.shape == (2, 3, 3) and tuple(colour[0, 1]) == CITYSCAPES_PALETTE[13]
    np.testing.assert_array_equal(png(tmp_path / "confidence/a_leftImg8bit.png"), confidence)
    assert Image.open(tmp_path / "trainid/a_leftImg8bit.png").mode == "L"


def test_images_folder_every_format_at_native_size(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    images = tmp_path / "images"
    small = write_image(images / "street_small.png", 24, 40, 1)
    large = write_image(images / "city" / "street_large.jpg", 40, 96, 2)
    write_image(images / ".hidden" / "skipped.png", 8, 8, 3)
    (images / "notes.txt").write_text("not an image")
    result = invoke("-c", str(config_file(tmp_path)), "--checkpoint", str(checkpoint),
                    "--images", str(images), "--out", str(tmp_path / "out"), "--format", ALL,
                    "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["summary"]["images"] == 2 and out["summary"]["formats"] == ALL.split(",")
    manifest = load_artifact(tmp_path / "out", PREDICTIONS)
    assert manifest.inputs["images"].path == str(images.resolve())
    listing = json.loads((tmp_path / "out" / predict.LISTING_FILE).read_text())
    assert [entry["stem"] for entry in listing["images"]] == ["street_large", "street_small"]
    assert listing["images"][0]["size"] == [40, 96]
    for image in (small, large):
        trainid = png(tmp_path / "out/trainid" / f"{image.stem}.png")
        expected, confidence = direct(checkpoint, image)
        assert trainid.shape == read_image(image).shape[:2]
        np.testing.assert_array_equal(trainid, expected)
        np.testing.assert_array_equal(png(tmp_path / "out/confidence" / f"{image.stem}.png"),
                                      confidence)
        np.testing.assert_array_equal(png(tmp_path / "out/labelid" / f"{image.stem}.png"),
                                      np.asarray(cityscapes_label_ids(), np.uint8)[trainid])
        colour = png(tmp_path / "out/color" / f"{image.stem}.png")
        np.testing.assert_array_equal(colour, np.asarray(CITYSCAPES_PALETTE, np.uint8)[trainid])
    assert len(set(np.unique(png(tmp_path / "out/trainid/street_large.png")))) > 1

    again = invoke("-c", str(config_file(tmp_path)), "--checkpoint", str(checkpoint),
                   "--images", str(images), "--out", str(tmp_path / "out"), "--format", ALL)
    assert again.exit_code == 0 and "up to date" in again.stderr
    write_image(small, 24, 40, 4)  # a changed input makes the output stale
    changed = invoke("-c", str(config_file(tmp_path)), "--checkpoint", str(checkpoint),
                     "--images", str(images), "--out", str(tmp_path / "out"), "--format", ALL)
    assert changed.exit_code == 2 and "another config or other inputs" in changed.stderr


def test_default_formats_and_a_split_with_recalibration(tmp_path: Path) -> None:
    data = make_index(tmp_path / "data")
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    result = predict.run(config(recalibration={"enabled": True, "batches": 2}), checkpoint,
                         tmp_path / "out", data=data, split="val", device="cpu")
    assert sorted(p.name for p in result.path.iterdir() if not p.name.startswith(".")) == [
        "color", "manifest.json", "predictions.json", "trainid"]
    assert sorted(p.name for p in (result.path / "trainid").iterdir()) == [
        f"{i:04d}.png" for i in range(4)]
    assert result.manifest.summary["bn_recalibration"]["batches"] == 2
    assert result.manifest.inputs["data"].id == load_artifact(data, "duda.dataset_index").id


def test_a_writer_error_is_raised_before_the_manifest(tmp_path: Path, monkeypatch) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    write_image(tmp_path / "images" / "a.png", 32, 64, 0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict, "write_prediction", full_disk)
    with pytest.raises(DudaError, match="cannot write .*out: the disk is full"):
        predict.run(config(), checkpoint, tmp_path / "out", images=tmp_path / "images",
                    device="cpu")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ refusals


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    images = tmp_path / "images"
    write_image(images / "a.png", 32, 64, 0)
    return {"config": config_file(tmp_path), "checkpoint": make_checkpoint(tmp_path / "ckpt"),
            "images": images, "out": tmp_path / "out"}


def refused(setup: dict[str, Path], *extra: str, images: Path | None = None) -> str:
    result = invoke("-c", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
                    "--images", str(images or setup["images"]), "--out", str(setup["out"]),
                    *extra)
    assert result.exit_code == 2, result.output
    assert not setup["out"].exists()
    return " ".join(result.stderr.split())


def test_an_unknown_format_word(setup) -> None:
    message = refused(setup, "--format", "trainid,colour")
    assert "unknown format 'colour'" in message and "trainid,labelid,color,confidence" in message


def test_an_empty_folder(setup, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert "holds no images" in refused(setup, images=tmp_path / "empty")


def test_unreadable_images_are_all_named(setup) -> None:
    (setup["images"] / "text.png").write_text("not a png")
    good = (setup["images"] / "a.png").read_bytes()
    (setup["images"] / "cut.png").write_bytes(good[: len(good) // 2])
    write_image(setup["images"] / "z.png", 32, 64, 5)
    message = refused(setup, "--set", "evaluate.inference.num_workers=1")
    assert "2 of 4 images cannot be read" in message
    assert "text.png" in message and "cut.png" in message and "replace or remove" in message


def test_labelid_needs_the_cityscapes_classes(setup, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "other", classes=("background", "thing", "stuff"))
    message = refused({**setup, "checkpoint": checkpoint}, "--format", "trainid,labelid")
    assert "labelid writes Cityscapes label ids" in message and "3 classes" in message
    assert "drop labelid" in message


def test_recalibration_without_a_dataset_index(setup) -> None:
    message = refused(setup, "--set", "evaluate.recalibration.enabled=true")
    assert "needs a dataset index" in message and "--data" in message


def test_two_images_with_one_stem_and_an_out_inside_the_images(setup) -> None:
    write_image(setup["images"] / "sub" / "a.jpg", 32, 64, 1)
    assert "two images named a" in refused(setup)
    (setup["images"] / "sub" / "a.jpg").unlink()
    inside = {**setup, "out": setup["images"] / "predictions"}
    assert "lies inside the input" in refused(inside)


def test_neither_or_both_sources(setup) -> None:
    result = invoke("-c", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
                    "--out", str(setup["out"]))
    assert result.exit_code == 2 and "--images DIR, or --split SPLIT" in result.stderr
    assert not setup["out"].exists()


def test_a_failed_force_leaves_the_old_predictions(setup) -> None:
    first = invoke("-c", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
                   "--images", str(setup["images"]), "--out", str(setup["out"]))
    assert first.exit_code == 0, first.output
    before = (setup["out"] / MANIFEST).read_text()
    (setup["images"] / "b.png").write_text("broken")
    result = invoke("-c", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
                    "--images", str(setup["images"]), "--out", str(setup["out"]), "--force")
    assert result.exit_code == 2 and "b.png" in result.stderr
    assert (setup["out"] / MANIFEST).read_text() == before


# ----------------------------------------------------------------- the Cityscapes round trip


CITIES = {"aachen": ["aachen_000000_000019", "aachen_000001_000019"],
          "bochum": ["bochum_000000_000313"]}


def make_cityscapes_val(root: Path, height: int = 48, width: int = 96) -> Path:
    """leftImg8bit/val/<city>/<id>_leftImg8bit.png with gtFine/val/<city>/<id>_gtFine_labelIds.png
    holding evaluated classes and ignored ids (0 unlabeled, 4 static, 5 dynamic); each image
    paints its label in the class colours, with noise."""
    rng = np.random.default_rng(0)
    colours = np.zeros((256, 3), np.int16)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        colours[label_id] = CITYSCAPES_PALETTE[train_id]
    for number, (city, name) in enumerate((c, n) for c, names in CITIES.items() for n in names):
        label = np.full((height, width), 7, np.uint8)  # road
        label[: height // 3] = 23  # sky
        label[height // 3: height // 2] = 11  # building
        label[height // 2:, : width // 4] = 8  # sidewalk
        label[-14:-4, 30 + 12 * number:60 + 12 * number] = 26  # car
        label[16:30, 60:66] = 24  # person
        label[2:6, 2:10] = 0
        label[10:14, 70:80] = 4
        label[-3:, -20:] = 5
        image = colours[label] + rng.integers(-40, 40, (height, width, 3))
        path = root / "leftImg8bit/val" / city / f"{name}_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        (root / "gtFine/val" / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(label, mode="L").save(
            root / "gtFine/val" / city / f"{name}_gtFine_labelIds.png")
    return root


def fitted_checkpoint(path: Path, data: Path, steps: int = 30) -> Path:
    """A checkpoint of the tiny model fitted for a few steps to the split's labels, so that its
    predictions are partly right (IoUs between 0 and 1, not all 0)."""
    from stages.data.full_images import FullImageDataset
    from stages.data.index import load_dataset_index

    samples = load_dataset_index(data).samples("target", "val")
    dataset = FullImageDataset(samples, (32, 64), "imagenet_rgb", with_labels=True)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])  # (N, 48, 96)
    torch.manual_seed(0)
    model = build_model(TINY, 19)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        logits = torch.nn.functional.interpolate(model(images), size=labels.shape[-2:],
                                                 mode="bilinear", align_corners=True)
        loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with ArtifactWriter(path, kind=CHECKPOINT, stage="warmup", config={},
                        config_hash="predict-test-fitted") as writer:
        write_model_file(path / MODEL_FILE, student=model, teacher=None, model_config=TINY,
                         class_names=list(CITYSCAPES_CLASSES), iteration=steps)
        writer.finish({"iteration": steps})
    return path


def cityscapes_scores(predictions: Path, root: Path, monkeypatch) -> dict[str, float]:
    """Per-class IoU from cityscapesscripts' own evaluator (instance-level scores off)."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    if not hasattr(np, "in1d"):  # removed from numpy 2.4; the evaluator still calls it
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    for name, value in (("evalInstLevelScore", False), ("quiet", True), ("JSONOutput", False),
                        ("predictionPath", str(predictions)), ("predictionWalk", None)):
        monkeypatch.setattr(cs.args, name, value)
    truth = sorted(str(p) for p in (root / "gtFine/val").glob("*/*_gtFine_labelIds.png"))
    found = [cs.getPrediction(cs.args, path) for path in truth]
    assert [Path(p).name.split("_leftImg8bit")[0] for p in found] == [
        Path(p).name.split("_gtFine")[0] for p in truth]
    return cs.evaluateImgLists(found, truth, cs.args)["classScores"]


@pytest.mark.slow
def test_cityscapes_round_trip_matches_evaluate(tmp_path: Path, monkeypatch) -> None:
    root = make_cityscapes_val(tmp_path / "Cityscapes")
    cityscapes = {"layout": "cityscapes", "root": str(root), "splits": ["val"]}
    raw = raw_config(inference={"batch_size": 2})
    raw["data"] = {"source": cityscapes, "target": cityscapes, "workers": 1}
    cfg = Config.model_validate(raw)
    data = prepare_data.run(cfg, tmp_path / "data").path
    checkpoint = fitted_checkpoint(tmp_path / "ckpt", data)

    result = predict.run(cfg, checkpoint, tmp_path / "out", data=data, split="val",
                         formats="labelid,trainid", device="cpu")
    stems = sorted(p.stem for p in (result.path / "labelid").iterdir())
    assert stems == sorted(f"{n}_leftImg8bit" for names in CITIES.values() for n in names)
    assert png(result.path / "labelid" / f"{stems[0]}.png").shape == (48, 96)
    report = json.loads((evaluate.run(cfg, data, checkpoint, tmp_path / "eval", device="cpu")
                         .path / "report.json").read_text())

    scores = cityscapes_scores(result.path / "labelid", root, monkeypatch)
    predicted = set()
    for path in (result.path / "trainid").iterdir():
        predicted.update(int(v) for v in np.unique(png(path)))
    compared = [name for i, name in enumerate(CITYSCAPES_CLASSES)
                if report["present_in_ground_truth"][name] or i in predicted]
    assert {"road", "sky", "building", "sidewalk", "car", "person"} <= set(compared)
    assert sum(0.2 < report["per_class"][name] < 1 for name in compared) >= 3
    for name in compared:
        assert scores[name] == pytest.approx(report["per_class"][name], abs=1e-6), name


def test_every_option_reaches_the_stage(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def run(config, checkpoint, out, **kwargs):
        seen.update(config=config, checkpoint=checkpoint, out=out, **kwargs)
        raise DudaError("stop here")

    monkeypatch.setattr(predict, "run", run)
    path = config_file(tmp_path)
    result = invoke("-c", str(path), "--checkpoint", "ck", "--split", "train", "--domain",
                    "source", "--format", "labelid,trainid", "--force", "--device", "cpu",
                    "--set", "evaluate.inference.flip=true")
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen["checkpoint"] == Path("ck") and seen["out"] == Path("runs/predict/predictions")
    assert seen["data"] == Path("runs/predict/data") and seen["images"] is None
    assert (seen["split"], seen["domain"], seen["formats"]) == ("train", "source",
                                                                "labelid,trainid")
    assert seen["force"] is True and seen["device"] == "cpu"
    assert seen["config"].evaluate.inference.flip is True
    result = invoke("-c", str(path), "--checkpoint", "ck", "--images", "pics", "--out", "o")
    assert seen["images"] == Path("pics") and seen["data"] is None and seen["split"] is None
    assert seen["out"] == Path("o") and seen["formats"] == "trainid,color"
    assert seen["force"] is False and seen["domain"] == "target"
