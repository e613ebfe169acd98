"""generate-pseudo end to end on the tiny index, `duda pseudo export|import|show`, bad input,
and 2-process torchrun equals 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from typer.testing import CliRunner

from duda_cli.app import app
from stages import generate_pseudo
from stages.artifacts.checkpoint import MODEL_FILE, write_model_file
from stages.artifacts.manifest import CHECKPOINT
from stages.artifacts.writer import ArtifactWriter
from stages.config import Config, DeepLabV2Config
from stages.data.classes import CITYSCAPES_CLASSES
from stages.data.full_images import FullImageDataset
from stages.data.index import load_dataset_index
from stages.data.io import read_label
from stages.engine.inference import predict
from stages.method.selectors import SELECTORS, FixedSelector, IastSelector
from stages.nn.model import build_model
from stages.store.levels import quantize
from stages.store.pseudo_store import copy_store, open_store
from tests.conftest import make_index

runner = CliRunner()
TINY = DeepLabV2Config(backbone="resnet18", width_multiplier=0.25, dropout=0.1,
                   normalization="imagenet_rgb")
ROOT = Path(__file__).resolve().parent.parent


def make_checkpoint(path: Path, seed: int = 0, classes=CITYSCAPES_CLASSES) -> Path:
    torch.manual_seed(seed)
    model = build_model(TINY, len(classes))
    with torch.no_grad():  # spread the confidences so every selector has work to do
        for conv in model.classifier.branches:
            conv.weight.mul_(20.0)
            conv.bias[[0, 2, 10, 13]] += torch.tensor([1.0, 0.6, 0.9, 0.3])
    with ArtifactWriter(path, kind=CHECKPOINT, stage="warmup", config={},
                        config_hash=f"test{seed}") as writer:
        write_model_file(path / MODEL_FILE, student=model, teacher=None, model_config=TINY,
                         class_names=list(classes), iteration=3)
        writer.finish({"iteration": 3, "backbone": "resnet18", "num_classes": len(classes)})
    return path


def with_pseudo(config: Config, selector: dict, flip: bool = False) -> Config:
    raw = config.model_dump(mode="json")
    raw["generate_pseudo"]["selector"] = selector
    raw["generate_pseudo"]["inference"]["flip"] = flip
    return Config.model_validate(raw)


def direct_probabilities(index_path: Path, checkpoints: list[Path], flip: bool) -> torch.Tensor:
    """(N, C, 32, 64) mean softmax of the checkpoints, in batches of 2 as the stage runs."""
    from stages.artifacts.checkpoint import load_model

    samples = load_dataset_index(index_path).samples("target", "train")
    dataset = FullImageDataset(samples, (32, 64), "imagenet_rgb")
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    models = [load_model(checkpoint, "teacher").model for checkpoint in checkpoints]
    batches = []
    for start in range(0, len(images), 2):
        total = 0
        for model in models:
            total = total + predict(model, images[start:start + 2], (32, 64), flip=flip)
        batches.append(total / len(models))
    return torch.cat(batches)


@pytest.mark.parametrize("selector", ["fixed", "cbst"])
def test_labels_are_the_thresholded_prediction_with_diagnostics(
        tiny_index: Path, tiny_config: Config, tmp_path: Path, selector: str) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    config = with_pseudo(tiny_config, {"name": selector, **(
        {"threshold": 0.6} if selector == "fixed" else {"portion": 0.5})})
    result = generate_pseudo.run(config, tiny_index, checkpoint, tmp_path / "pseudo",
                                 device="cpu")
    store = open_store(result.path, load_dataset_index(tiny_index))
    probabilities = direct_probabilities(tiny_index, [checkpoint], flip=False)
    confidence, prediction = probabilities.max(1)
    levels = np.rint(confidence.numpy() * 255).astype(np.uint8)  # what the store keeps
    thresholds = np.array(store.thresholds)
    if selector == "fixed":
        np.testing.assert_array_equal(thresholds, 0.6)
    else:  # CBST: the stored level at rank ⌊0.5·N_c⌋ from the top, exactly
        for c in np.unique(prediction.numpy()):
            values = np.sort(levels[prediction.numpy() == c])[::-1]
            assert thresholds[c] == values[int(0.5 * values.size)] / 255
    labelled = 0
    for i in range(6):
        labels, stored_levels = store.read(i)
        np.testing.assert_array_equal(stored_levels, levels[i])
        # a pixel is kept where its stored confidence reaches its class's threshold
        kept = levels[i] / 255 >= thresholds[prediction[i].numpy()] - 1e-9
        expected = np.where(kept, prediction[i].numpy(), 255)
        np.testing.assert_array_equal(labels, expected)
        labelled += int((labels != 255).sum())
    summary = result.manifest.summary
    assert summary["labelled_fraction"] == pytest.approx(labelled / (6 * 32 * 64))
    assert 0 < labelled < 6 * 32 * 64
    assert summary["per_class"]["road"]["threshold"] == pytest.approx(thresholds[0])
    assert set(result.manifest.inputs) == {"data", "checkpoint"}
    # Diagnostics against the ground truth, marked as such.
    diagnostics = summary["diagnostics"]
    assert "never used for training" in diagnostics["note"]
    truth = np.stack([read_label(s.label) for s in
                      load_dataset_index(tiny_index).samples("target", "train")])
    labels = np.stack([store.read_labels(i) for i in range(6)])
    road = (labels == 0) & (truth != 255)
    if road.any():
        assert diagnostics["per_class"]["road"]["precision"] == pytest.approx(
            (truth[road] == 0).mean())
    assert diagnostics["per_class"]["road"]["recall"] == pytest.approx(
        ((labels == 0) & (truth == 0)).sum() / (truth == 0).sum())
    # Rerunning with the same config and inputs is a no-op.
    again = generate_pseudo.run(config, tiny_index, checkpoint, tmp_path / "pseudo",
                                device="cpu")
    assert again.up_to_date


def test_iast_follows_d1_in_index_order(tiny_index: Path, tiny_config: Config,
                                        tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    config = with_pseudo(tiny_config, {"name": "iast", "alpha": 0.3, "group_size": 4})
    result = generate_pseudo.run(config, tiny_index, checkpoint, tmp_path / "pseudo",
                                 device="cpu")
    store = open_store(result.path)
    confidence, prediction = direct_probabilities(tiny_index, [checkpoint], flip=False).max(1)
    # IAST walks the stored confidences: levels round(255 × p), read back as level / 255
    levels = np.rint(confidence.numpy() * 255).astype(np.uint8)
    confidence = levels.astype(np.float32) / np.float32(255)
    prediction = prediction.numpy()
    selector = IastSelector(19, alpha=0.3, beta=0.9, gamma=8.0, theta0=0.9)
    groups = [selector.update(confidence[0:4], prediction[0:4]),
              selector.update(confidence[4:6], prediction[4:6])]
    np.testing.assert_allclose(store.attrs["group_thresholds"], groups, atol=1e-12)
    np.testing.assert_allclose(store.thresholds, groups[-1], atol=1e-12)
    for i in range(6):
        kept = levels[i] / 255 >= np.asarray(groups[i // 4])[prediction[i]]
        np.testing.assert_array_equal(store.read_labels(i), np.where(kept, prediction[i], 255))
    assert store.selector["name"] == "iast"


class MarginSelector(FixedSelector):
    """A fixed threshold on a score of its own: the margin between the two most probable
    classes."""

    def score(self, probabilities: torch.Tensor) -> np.ndarray | None:
        top = probabilities.topk(2, dim=1).values
        return quantize(top[:, 0] - top[:, 1])


@pytest.mark.parametrize("kept", ["in memory", "spilled"])
def test_a_selector_thresholds_the_score_it_declares(tiny_index: Path, tiny_config: Config,
                                                     tmp_path: Path, monkeypatch,
                                                     kept: str) -> None:
    # The first pass keeps the selector's own score beside the confidence levels, even for
    # images whose levels went through the store; the store still holds the confidence.
    monkeypatch.setitem(SELECTORS, "fixed", MarginSelector.from_config)
    if kept == "spilled":
        monkeypatch.setattr(generate_pseudo, "RAW_BYTES", 0)
        monkeypatch.setattr(generate_pseudo, "COMPRESSED_BYTES", 1)
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    config = with_pseudo(tiny_config, {"name": "fixed", "threshold": 0.3})
    store = open_store(generate_pseudo.run(config, tiny_index, checkpoint, tmp_path / "pseudo",
                                           device="cpu").path)
    probabilities = direct_probabilities(tiny_index, [checkpoint], flip=False)
    top = probabilities.topk(2, dim=1)
    margin = quantize(top.values[:, 0] - top.values[:, 1])
    prediction = top.indices[:, 0].numpy()
    levels = quantize(top.values[:, 0])
    for i in range(6):
        labels, stored_levels = store.read(i)
        np.testing.assert_array_equal(stored_levels, levels[i])
        np.testing.assert_array_equal(
            labels, np.where(margin[i] / 255 >= 0.3 - 1e-9, prediction[i], 255))
    assert 0 < sum(int((store.read_labels(i) != 255).sum()) for i in range(6)) < 6 * 32 * 64


def test_ensemble_with_flip_averages_probabilities(tiny_index: Path, tiny_config: Config,
                                                   tmp_path: Path) -> None:
    checkpoints = [make_checkpoint(tmp_path / "a", seed=0), make_checkpoint(tmp_path / "b",
                                                                            seed=1)]
    config = with_pseudo(tiny_config, {"name": "fixed", "threshold": 0.0}, flip=True)
    result = generate_pseudo.run(config, tiny_index, checkpoints, tmp_path / "pseudo",
                                 device="cpu")
    assert set(result.manifest.inputs) == {"data", "checkpoint", "checkpoint_2"}
    confidence, prediction = direct_probabilities(tiny_index, checkpoints, flip=True).max(1)
    store = open_store(result.path)
    for i in range(6):
        np.testing.assert_allclose(store.read_confidence(i), confidence[i].numpy(),
                                   atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(store.read_labels(i), prediction[i].numpy())


def test_images_of_different_sizes_are_refused(tiny_index: Path, tiny_config: Config,
                                               tmp_path: Path) -> None:
    sample = load_dataset_index(tiny_index).samples("target", "train")[3]
    Image.new("RGB", (60, 30)).save(sample.image)
    with pytest.raises(Exception, match="target-train images differ in size"):
        generate_pseudo.run(tiny_config, tiny_index, make_checkpoint(tmp_path / "ckpt"),
                            tmp_path / "pseudo", device="cpu")
    assert not (tmp_path / "pseudo").exists()


# ------------------------------------------------------------------------------ the CLI


def generate(config_file: Path, data: Path, checkpoint: Path, out: Path, *extra: str):
    return runner.invoke(app, ["generate-pseudo", "-c", str(config_file), "--data", str(data),
                               "--checkpoint", str(checkpoint), "--out", str(out),
                               "--device", "cpu", *extra])


@pytest.fixture
def store_path(tiny_index: Path, tiny_config_file: Path, tmp_path: Path) -> Path:
    result = generate(tiny_config_file, tiny_index, make_checkpoint(tmp_path / "ckpt"),
                      tmp_path / "pseudo", "--set",
                      "generate_pseudo.selector={name: fixed, threshold: 0.5}")
    assert result.exit_code == 0, result.stderr
    return tmp_path / "pseudo"


def test_cli_prints_json_and_a_table_with_diagnostics(tiny_index: Path, tiny_config_file: Path,
                                                      tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    result = generate(tiny_config_file, tiny_index, checkpoint, tmp_path / "p", "--json")
    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["artifact"] == str(tmp_path / "p")
    assert output["summary"]["selector"]["name"] == "cbst"
    result = generate(tiny_config_file, tiny_index, checkpoint, tmp_path / "p2")
    assert result.exit_code == 0
    assert "diagnostics" in result.stderr and "precision" in result.stderr
    assert "wrote pseudo-label store" in result.stderr


def test_cli_refuses_to_overwrite_a_finished_store(store_path: Path, tiny_index: Path,
                                                   tiny_config_file: Path,
                                                   tmp_path: Path) -> None:
    result = generate(tiny_config_file, tiny_index, tmp_path / "ckpt", store_path,
                      "--set", "generate_pseudo.selector=cbst")
    assert result.exit_code == 2
    assert "already holds a finished" in result.stderr


def test_export_writes_trainid_and_palette_pngs(store_path: Path, tmp_path: Path) -> None:
    store = open_store(store_path)
    result = runner.invoke(app, ["pseudo", "export", str(store_path), str(tmp_path / "png")])
    assert result.exit_code == 0, result.stderr
    for i, sample_id in enumerate(store.ids):
        image = Image.open(tmp_path / "png" / f"{sample_id}.png")
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), store.read_labels(i))
    result = runner.invoke(app, ["pseudo", "export", str(store_path), str(tmp_path / "colour"),
                                 "--colour"])
    assert result.exit_code == 0
    image = Image.open(tmp_path / "colour" / f"{store.ids[0]}.png")
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), store.read_labels(0))
    assert image.getpalette()[:3] == [128, 64, 128]  # road


def test_import_round_trip(store_path: Path, tiny_index: Path, tmp_path: Path) -> None:
    runner.invoke(app, ["pseudo", "export", str(store_path), str(tmp_path / "png")])
    result = runner.invoke(app, ["pseudo", "import", str(tmp_path / "png"), "--data",
                                 str(tiny_index), "--out", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.stderr
    original, imported = open_store(store_path), open_store(tmp_path / "imported",
                                                           load_dataset_index(tiny_index))
    for i in range(len(original)):
        labels, levels = imported.read(i)
        np.testing.assert_array_equal(labels, original.read_labels(i))
        np.testing.assert_array_equal(levels, np.where(labels != 255, 255, 0))


def test_import_matches_by_image_stem(tiny_index: Path, tmp_path: Path) -> None:
    folder = tmp_path / "labels" / "city"
    folder.mkdir(parents=True)
    for sample in load_dataset_index(tiny_index).samples("target", "train"):
        Image.fromarray(np.full((32, 64), 2, np.uint8)).save(folder / f"{sample.image.stem}.png")
    result = runner.invoke(app, ["pseudo", "import", str(tmp_path / "labels"), "--data",
                                 str(tiny_index), "--out", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.stderr
    assert (open_store(tmp_path / "imported").read_labels(5) == 2).all()


@pytest.mark.parametrize("problem, message", [
    ("size", ("2 label PNGs are not 32×64 like the target-train images: "
              "target_train_0001.png (30×64), target_train_0004.png (30×64)")),
    ("values", "1 label PNGs hold values outside 0..18 and 255: target_train_0002.png (19, 40)"),
    ("missing", "no PNG for 2 of 6 target-train images: target_train_0000, target_train_0003"),
])
def test_import_refuses_bad_pngs(tiny_index: Path, tmp_path: Path, problem: str,
                                 message: str) -> None:
    folder = tmp_path / "labels"
    folder.mkdir()
    for i, sample in enumerate(load_dataset_index(tiny_index).samples("target", "train")):
        labels = np.zeros((32, 64), np.uint8)
        if problem == "size" and i in (1, 4):
            labels = np.zeros((30, 64), np.uint8)
        if problem == "values" and i == 2:
            labels[0, :2] = [19, 40]
        if problem == "missing" and i in (0, 3):
            continue
        Image.fromarray(labels).save(folder / f"{sample.id}.png")
    result = runner.invoke(app, ["pseudo", "import", str(folder), "--data", str(tiny_index),
                                 "--out", str(tmp_path / "imported")])
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "imported").exists()


def test_show_prints_lineage_thresholds_and_quality(store_path: Path, tiny_index: Path,
                                                    tmp_path: Path) -> None:
    child = tmp_path / "v2"
    with ArtifactWriter(child, kind="duda.pseudo_labels", stage="update_offline", config={},
                        config_hash="x") as writer:
        store = copy_store(store_path, child)
        writer.inputs["parent"] = store.parent
        writer.finish({}, content=["zarr.json"])
    result = runner.invoke(app, ["pseudo", "show", str(child), "--data", str(tiny_index),
                                 "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [entry["stage"] for entry in report["lineage"]] == ["update_offline",
                                                               "generate_pseudo"]
    assert report["lineage"][1]["checkpoints"] == [str((tmp_path / "ckpt").resolve())]
    assert report["thresholds"] == [0.5] * 19
    assert report["quality"]["images"] == 6
    assert "never used for training" in report["quality"]["note"]
    result = runner.invoke(app, ["pseudo", "show", str(child), "--data", str(tiny_index)])
    assert result.exit_code == 0
    assert "lineage" in result.stderr and "generate_pseudo" in result.stderr
    assert "precision" in result.stderr


def test_show_refuses_a_store_for_another_index(store_path: Path, tmp_path: Path) -> None:
    other = make_index(tmp_path / "other", seed=5)
    other_id = json.loads((other / "manifest.json").read_text())["id"]
    result = runner.invoke(app, ["pseudo", "show", str(store_path), "--data", str(other)])
    assert result.exit_code == 2
    assert "was made for dataset index" in result.stderr
    assert other_id in result.stderr


def test_show_refuses_unfinished_and_truncated_stores(store_path: Path) -> None:
    chunk = store_path / "labels" / "c" / "4" / "0" / "0"
    chunk.unlink()
    result = runner.invoke(app, ["pseudo", "show", str(store_path)])
    assert result.exit_code == 2
    assert "missing chunk" in result.stderr and "4 (target_train_0004)" in result.stderr
    (store_path / "manifest.json").unlink()
    result = runner.invoke(app, ["pseudo", "export", str(store_path), str(store_path / "x")])
    assert result.exit_code == 2
    assert "unfinished" in result.stderr


# ------------------------------------------------------------------ several processes


@pytest.mark.slow
def test_two_processes_equal_one(tiny_index: Path, tiny_config_file: Path,
                                 tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    common = ["generate-pseudo", "-c", str(tiny_config_file), "--data", str(tiny_index),
              "--checkpoint", str(checkpoint), "--device", "cpu", "--json",
              "--set", "generate_pseudo.selector={name: iast, alpha: 0.3, group_size: 2}"]
    # Both runs in subprocesses with one thread each: the CPU kernels' results depend on the
    # thread count, not on the number of processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    outputs = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [str(torchrun), "--standalone", "--nproc_per_node", "2"])):
        process = subprocess.run([*launcher, "-m", "duda_cli", *common, "--out",
                                  str(tmp_path / name)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=180, check=False)
        assert process.returncode == 0, process.stderr[-3000:]
        outputs[name] = json.loads(process.stdout)
    assert outputs["two"]["artifact"] == str(tmp_path / "two")
    one, two = zarr.open_group(tmp_path / "one", mode="r"), zarr.open_group(tmp_path / "two",
                                                                            mode="r")
    np.testing.assert_array_equal(one["labels"][:], two["labels"][:])
    np.testing.assert_array_equal(one["confidence"][:], two["confidence"][:])
    for key in ("thresholds", "group_thresholds", "statistics", "ids"):
        assert one.attrs[key] == two.attrs[key]
    summary_one, summary_two = outputs["one"]["summary"], outputs["two"]["summary"]
    assert summary_one["per_class"] == summary_two["per_class"]
    assert summary_one["diagnostics"] == summary_two["diagnostics"]
    open_store(tmp_path / "two")


def test_show_draws_overlays_of_the_first_images(store_path: Path, tiny_index: Path,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "overlays"
    result = runner.invoke(app, ["pseudo", "show", str(store_path), "--data", str(tiny_index),
                                 "--images", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    drawn = [Path(p) for p in json.loads(result.stdout)["overlays"]]
    store = open_store(store_path)
    assert [p.name for p in drawn] == [f"{i}.png" for i in store.ids[:2]]
    panel = np.asarray(Image.open(drawn[0]))
    height, width = store.height, store.width
    # image | labels | confidence | ground truth, each at the store's size
    assert panel.shape == (height, 4 * width, 3)
    levels = store.read_levels(0)
    np.testing.assert_array_equal(panel[:, 2 * width:3 * width, 0], levels)
    # A folder of the user's is refused, untouched; --out needs --data.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["pseudo", "show", str(store_path), "--data", str(tiny_index),
                                 "--out", str(mine)])
    assert result.exit_code == 2 and "left untouched" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    result = runner.invoke(app, ["pseudo", "show", str(store_path), "--out", str(out)])
    assert result.exit_code == 2 and "--data" in result.stderr


@pytest.mark.parametrize("selector", ["cbst", "iast"])
def test_every_label_is_written_once_kept_compressed_or_spilled(
        tiny_index: Path, tiny_config: Config, tmp_path: Path, monkeypatch, selector) -> None:
    # The first pass stays in memory (plain, or compressed when the pass is large, with the
    # images past the memory limit going through the store): the same store either way, and
    # an image's labels reach the store twice only past the limit.
    from stages.store.writer import StoreWriter

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    config = with_pseudo(tiny_config, {"name": selector})
    relabelled: list[int] = []
    original = StoreWriter.write_labels
    monkeypatch.setattr(StoreWriter, "write_labels",
                        lambda self, i, labels: (relabelled.append(i),
                                                 original(self, i, labels))[1])
    stores = {}
    for name, raw, compressed in (("plain", 1 << 30, 4 << 30), ("compressed", 0, 4 << 30),
                                  ("spilled", 0, 1)):
        monkeypatch.setattr(generate_pseudo, "RAW_BYTES", raw)
        monkeypatch.setattr(generate_pseudo, "COMPRESSED_BYTES", compressed)
        relabelled.clear()
        path = generate_pseudo.run(config, tiny_index, checkpoint, tmp_path / name,
                                   device="cpu").path
        store = open_store(path)
        stores[name] = [(store.read_labels(i), store.read_levels(i)) for i in range(len(store))]
        assert relabelled == ([] if name != "spilled" else list(range(len(store))))
    for name in ("compressed", "spilled"):
        for (labels, levels), (expected_labels, expected_levels) in zip(
                stores[name], stores["plain"], strict=True):
            np.testing.assert_array_equal(labels, expected_labels)
            np.testing.assert_array_equal(levels, expected_levels)
