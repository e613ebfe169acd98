"""Bad input, class by class: a checklist a reader can scan.

Every row is one way a careless or hostile user can feed `duda` something wrong. Each row builds
the bad input in a fresh temporary folder, runs one command through the command line, and checks
what the user sees: the exit code (2 for a user error), a fragment of the message, no traceback,
that every file named as precious is still there byte for byte, and that nothing is left behind
that looks finished. The rows are grouped by class of failure; a class is fixed once in the code,
and each row pins one case of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CONFIG, make_index
from typer.testing import CliRunner

from duda_cli.app import app
from stages import evaluate, generate_pseudo, pseudo, warmup
from stages.artifacts import writer as artifact_writer
from stages.config import Config

runner = CliRunner()


@dataclass
class Scenario:
    """What a row's setup built: the command to run and what must hold after it."""

    args: list[str | Path]
    survive: list[Path] = field(default_factory=list)  # files that must stay byte for byte
    absent: list[Path] = field(default_factory=list)   # paths that must not exist afterwards


@dataclass(frozen=True)
class Case:
    """One row: `setup(tmp, inputs, monkeypatch)` builds the bad input and returns a Scenario."""

    name: str
    setup: Callable[..., Scenario]
    message: str
    exit_code: int = 2

    def __str__(self) -> str:
        return self.name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A config file, a dataset index, a warmup checkpoint and its store, built once; rows copy
    what they damage."""
    root = tmp_path_factory.mktemp("inputs")
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(TINY_CONFIG, sort_keys=False))
    config = Config.model_validate(json.loads(json.dumps(TINY_CONFIG)))
    data = make_index(root / "data")
    checkpoint = warmup.run(config, data, root / "warmup", device="cpu").path
    pseudo = generate_pseudo.run(config, data, checkpoint, root / "pseudo", device="cpu").path
    return {"config": config_file, "data": data, "checkpoint": checkpoint, "pseudo": pseudo,
            "root": root}


def _digests(paths: list[Path]) -> dict[Path, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


# ------------------------------------------------------------------------- config files and --set
# (rows for: encodings, -c not a file, seed range, YAML aliases, duplicate keys, --set into a
# default variant)

def _config_file(name: str, content: bytes) -> Callable[..., Scenario]:
    """A row whose config file holds `content`, shown with `duda config show`."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        path = tmp / name
        path.write_bytes(content)
        return Scenario(["config", "show", "-c", path], survive=[path])
    return setup


def _config_path(path: str) -> Callable[..., Scenario]:
    """A row whose `-c` is `path` (`{tmp}` is the row's folder, with a config inside)."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        (tmp / "tiny.yaml").write_bytes(inputs["config"].read_bytes())
        return Scenario(["config", "show", "-c", path.format(tmp=tmp)], survive=[tmp])
    return setup


def _stage_with(*args: str) -> Callable[..., Scenario]:
    """A row running `args` (`{config}`, `{data}`, `{out}` filled in) that must write nothing."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        out = tmp / "out"
        filled = [a.format(config=inputs["config"], data=inputs["data"], out=out) for a in args]
        return Scenario(filled, survive=[inputs["config"]], absent=[out])
    return setup


def _tiny_text() -> str:
    return yaml.safe_dump(TINY_CONFIG, sort_keys=False)


# Six levels of nine aliases: 9**6 strings once expanded, past the bound; small enough that a
# regression fails the row instead of filling the memory.
LAUGHS = "experiment: lol\na0: &a0 [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
    f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]\n" for level in range(1, 6))

CONFIG_CASES: list[Case] = [
    Case("config saved as Latin-1",
         _config_file("latin1.yaml", (_tiny_text() + "# café\n").encode("latin-1")),
         "is not UTF-8 text (byte 0xe9"),
    Case("-c is a folder", _config_path("{tmp}"), "is a folder, not a file"),
    Case("-c is /dev/null", _config_path("/dev/null"),
         "config file /dev/null is not a regular file"),
    Case("config is a YAML list", _config_file("list.yaml", b"- warmup\n- evaluate\n"),
         "must hold a mapping of sections, not a list"),
    Case("config is binary", _config_file("binary.yaml", bytes(range(256))),
         "is not UTF-8 text"),
    Case("--seed -1 (warmup)",
         _stage_with("warmup", "-c", "{config}", "--data", "{data}", "--seed", "-1",
                     "--out", "{out}"),
         "'seed' (from --set 'seed=-1'): Input should be greater than or equal to 0"),
    Case("--seed too large (prepare-data)",
         _stage_with("prepare-data", "-c", "{config}", "--seed", "99999999999999999999999",
                     "--out", "{out}"),
         "Input should be less than 4294967296"),
    Case("YAML billion laughs", _config_file("laughs.yaml", LAUGHS.encode()),
         "holds more than 100000 values once its YAML aliases are expanded"),
    Case("two warmup sections",
         _config_file("twice.yaml", (_tiny_text() + "warmup:\n  iterations: 3\n").encode()),
         "gives the key 'warmup' twice (lines "
         f"{_tiny_text().splitlines().index('warmup:') + 1} and "
         f"{len(_tiny_text().splitlines()) + 1})"),
    Case("--set into the default selector",
         _stage_with("config", "show", "-c", "{config}",
                     "--set", "generate_pseudo.selector.portion=0.3"),
         "selector:\n    name: cbst\n    portion: 0.3", exit_code=0),
]

# ------------------------------------------------------------------------ images and datasets
# (rows for: decompression bombs on every path that opens an image, a folder dataset edited after
# indexing, two images with one stem, pseudo import's ignored files and fix lines)

def _bomb(path: Path) -> Path:
    """A grey PNG whose header claims 200000×200000 pixels: 70 bytes, nothing allocated."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 65)) + chunk(b"IEND", b""))
    return path


def _folder_dataset(tmp: Path) -> tuple[Path, Path]:
    """A two-class `folder` dataset (train and val, both domains) at the tiny config's size,
    and a config file reading it: (dataset root, config file)."""
    import numpy as np
    from PIL import Image

    root, rng = tmp / "raw", np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(4):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / "images" / f"tgt{i:03d}.png")
            label = np.zeros((32, 64), np.uint8)
            label[16:] = 1
            Image.fromarray(label).save(root / split / "labels" / f"tgt{i:03d}.png")
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["data"]["source"] = {"layout": "folder", "root": str(root), "classes": ["a", "b"],
                             "splits": ["train", "val"]}
    raw["data"]["target"] = json.loads(json.dumps(raw["data"]["source"]))  # no YAML alias
    config = tmp / "folder.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return root, config


def _prepare(tmp: Path, bomb: str | None = None) -> Scenario:
    """prepare-data of a folder dataset; `bomb` replaces that file of it by a bomb."""
    root, config = _folder_dataset(tmp)
    if bomb is not None:
        _bomb(root / bomb)
    return Scenario(["prepare-data", "-c", config, "--out", tmp / "data"],
                    survive=[root], absent=[tmp / "data"])


def _two_images_one_stem(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    scenario = _prepare(tmp)
    image = tmp / "raw" / "train" / "images" / "tgt000.png"
    image.with_suffix(".jpg").write_bytes(image.read_bytes())
    return scenario


def _label_edited(value: int, *extra: str) -> Callable[..., Scenario]:
    """warmup (with `extra` arguments) on a folder dataset whose first source-train label was
    set to `value` (one pixel) after prepare-data indexed it."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        import numpy as np
        from PIL import Image

        from stages import prepare_data

        root, config = _folder_dataset(tmp)
        loaded = Config.model_validate(yaml.safe_load(config.read_text()))
        data = prepare_data.run(loaded, tmp / "data").path
        label = root / "train" / "labels" / "tgt000.png"
        pixels = np.asarray(Image.open(label)).copy()
        pixels[0, 0] = value
        Image.fromarray(pixels).save(label)
        return Scenario(["warmup", "-c", config, "--data", data, "--out", tmp / "warmup",
                         "--device", "cpu", *extra], survive=[root, data],
                        absent=[tmp / "warmup"])
    return setup


def _label_folder(tmp: Path, inputs: dict[str, Path], extra: tuple[str, ...] = (),
                  bomb: bool = False) -> Scenario:
    """`pseudo import` of one zero label PNG per target-train image of the shared index, plus
    `extra` stray PNGs; with `bomb` the last image's PNG is a bomb."""
    import numpy as np
    from PIL import Image

    from stages.data.index import load_dataset_index

    folder = tmp / "labels"
    folder.mkdir()
    ids = [s.id for s in load_dataset_index(inputs["data"]).samples("target", "train")]
    for name in [*ids, *extra]:
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(folder / f"{name}.png")
    if bomb:
        _bomb(folder / f"{ids[-1]}.png")
    return Scenario(["pseudo", "import", folder, "--data", inputs["data"], "--out",
                     tmp / "store"], survive=[folder], absent=[tmp / "store"] if bomb else [])


def _predict_bomb(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    import numpy as np
    from PIL import Image

    folder = tmp / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(folder / "street.png")
    _bomb(folder / "bomb.png")
    return Scenario(["predict", "-c", inputs["config"], "--checkpoint", inputs["checkpoint"],
                     "--images", folder, "--out", tmp / "predictions"],
                    survive=[folder], absent=[tmp / "predictions"])


IMAGE_CASES: list[Case] = [
    Case("bomb: prepare-data image", lambda tmp, inputs, mp: _prepare(
        tmp, bomb="train/images/tgt001.png"), "tgt001.png is larger than the limit of "
        "134,217,728 pixels"),
    Case("bomb: prepare-data label", lambda tmp, inputs, mp: _prepare(
        tmp, bomb="val/labels/tgt002.png"), "tgt002.png is larger than the limit"),
    Case("bomb: pseudo import", lambda tmp, inputs, mp: _label_folder(tmp, inputs, bomb=True),
         "is larger than the limit of 134,217,728 pixels"),
    Case("bomb: predict --images", _predict_bomb, "bomb.png is larger than the limit"),
    Case("folder label edited after indexing: out of range", _label_edited(7),
         "label value out of range (7; the class table has 0..1 and 255 = ignore)"),
    Case("folder label edited after indexing: another valid class", _label_edited(1),
         "tgt000.png changed after the dataset index was built"),
    Case("folder label edited after indexing: read in a loader worker process",
         _label_edited(7, "--set", "warmup.runtime.num_workers=1"),
         "tgt000.png: label value out of range (7;"),
    Case("folder: two images with one stem", _two_images_one_stem,
         "holds two images named tgt000: tgt000.jpg and tgt000.png"),
    Case("pseudo import: stray PNGs are counted, not silently skipped",
         lambda tmp, inputs, mp: _label_folder(tmp, inputs, extra=("notes", "stray")),
         "ignored 2 PNG(s)", exit_code=0),
    Case("pseudo import: a bad label's fix is the import's, not prepare-data's",
         lambda tmp, inputs, mp: _label_folder(tmp, inputs, bomb=True),
         "then rerun `duda pseudo import`"),
]

# ---------------------------------------------------------------- the filesystem under --out
# (rows for: unwritable --out, full disk, --force through a symlink, lock files, dangling
# symlinks, killed --force, what --force removes, disk space checked before a stage runs)

def _stage_args(stage: str, inputs: dict[str, Path], out: Path) -> list[str | Path]:
    common = ["-c", inputs["config"], "--device", "cpu", "--out", out]
    return {
        "prepare-data": ["prepare-data", "-c", inputs["config"], "--out", out],
        "warmup": ["warmup", *common, "--data", inputs["data"]],
        "generate-pseudo": ["generate-pseudo", *common, "--data", inputs["data"],
                            "--checkpoint", inputs["checkpoint"]],
        "evaluate": ["evaluate", *common, "--data", inputs["data"],
                     "--checkpoint", inputs["checkpoint"]],
        "pseudo export": ["pseudo", "export", inputs["pseudo"], out],
    }[stage]


def _lock(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _read_only_out(stage: str) -> Callable[..., Scenario]:
    """An existing empty --out on a read-only mount: its first write (the marker) fails with
    EROFS, as on an immutable folder (root ignores permission bits, so the mount is simulated)."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        out = tmp / "out"
        out.mkdir()
        real = artifact_writer.atomic_write_json

        def refuse(path: Path, data: object) -> None:
            if out in path.parents:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            real(path, data)

        monkeypatch.setattr(artifact_writer, "atomic_write_json", refuse)
        return Scenario(_stage_args(stage, inputs, out), absent=[out / ".duda-artifact",
                                                                 _lock(out)])
    return setup


def _disk_full_midway(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """`pseudo export` into a disk that fills after 4 of its 6 PNGs."""
    out = tmp / "export"
    real, written = pseudo.atomic_open, []

    def fill(path: Path):
        written.append(path)
        if len(written) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path)

    monkeypatch.setattr(pseudo, "atomic_open", fill)
    return Scenario(_stage_args("pseudo export", inputs, out), absent=[out])


def _disk_full_in_torch_save(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """warmup on a full disk: torch.save reports it as `RuntimeError ... unexpected pos`, with
    the OSError as its context (as torch does when its file stops taking bytes)."""
    def save(*args, **kwargs) -> None:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # chained as the context, as torch's writer leaves it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 "
                               "vs 598")

    monkeypatch.setattr(torch, "save", save)
    out = tmp / "warmup"
    return Scenario(_stage_args("warmup", inputs, out),
                    absent=[out / "manifest.json", out / "model.pt", _lock(out)])


def _force_through_link(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    target = _copy(inputs, tmp, "checkpoint")
    link = tmp / "link"
    link.symlink_to(target)
    return Scenario([*_stage_args("evaluate", inputs, link), "--force"], survive=[target],
                    absent=[tmp / ".link.old", tmp / ".link.partial", _lock(link)])


def _old_link_left_by_force(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """The state an older --force through a linked --out left: the new folder in place and the
    link renamed to `.NAME.old`; the next run removes the link, never what it points to."""
    target = _copy(inputs, tmp, "checkpoint")
    out = tmp / "out"
    shutil.copytree(target, out)
    (tmp / ".out.old").symlink_to(target)
    return Scenario(_stage_args("evaluate", inputs, out), survive=[target, out],
                    absent=[tmp / ".out.old", _lock(out)])


def _foreign_out(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    out = tmp / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return Scenario(_stage_args("warmup", inputs, out), survive=[out],
                    absent=[_lock(out), tmp / ".mine.partial", out / ".duda-artifact"])


def _dangling_link(stage: str) -> Callable[..., Scenario]:
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        out = tmp / "out"
        out.symlink_to(tmp / "nowhere")
        return Scenario(_stage_args(stage, inputs, out), absent=[tmp / "nowhere", _lock(out)])
    return setup


def _killed_force(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """A finished warmup whose --force replacement was killed, rerun with another config."""
    out = _copy(inputs, tmp, "checkpoint")
    partial = tmp / ".checkpoint.partial"
    artifact_writer.write_marker(partial, "duda.checkpoint", "warmup")
    (partial / "train_state.pt").write_bytes(b"a checkpoint worth keeping")
    return Scenario([*_stage_args("warmup", inputs, out), "--set", "warmup.iterations=6"],
                    survive=[out, partial], absent=[_lock(out)])


def _little_space(free: int, monkeypatch) -> None:
    usage = shutil.disk_usage(".")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type(usage)(usage.total,
                                                                       usage.used, free))


def _force_with_users_file(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """--force names the file a user put into the artifact it replaces (here the rebuild is
    refused for disk space right after, so the old artifact and the file stay)."""
    out = _copy(inputs, tmp, "checkpoint")
    (out / "notes.txt").write_text("my notes")
    _little_space(1000, monkeypatch)
    return Scenario([*_stage_args("warmup", inputs, out), "--force"], survive=[out],
                    absent=[tmp / ".checkpoint.partial", _lock(out)])


def _no_space_for_store(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    _little_space(1000, monkeypatch)
    out = tmp / "pseudo"
    return Scenario(_stage_args("generate-pseudo", inputs, out), absent=[out, _lock(out)])


def _killed_stage(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """A warmup killed before its manifest: the folder holds its marker, which recorded the
    command line as typed (relative paths, from `tmp`), and a training state."""
    out = tmp / "warmup"
    monkeypatch.chdir(tmp)
    token = artifact_writer.command_line.set(
        ["duda", "warmup", "-c", "tiny.yaml", "--data", "data", "--out", "warmup"])
    try:
        artifact_writer.write_marker(out, "duda.checkpoint", "warmup")
    finally:
        artifact_writer.command_line.reset(token)
    monkeypatch.chdir(inputs["root"])
    (out / "train_state.pt").write_bytes(b"a checkpoint worth keeping")
    return Scenario(_stage_args("warmup", inputs, out), survive=[out], absent=[_lock(out)])


FILESYSTEM_CASES: list[Case] = [
    Case("read-only --out: warmup", _read_only_out("warmup"), "Read-only file system"),
    Case("read-only --out: evaluate", _read_only_out("evaluate"), "is read-only, immutable"),
    Case("read-only --out: prepare-data", _read_only_out("prepare-data"),
         "choose an --out in a place you can write to"),
    Case("read-only --out: pseudo export", _read_only_out("pseudo export"), "cannot write"),
    Case("full disk midway: pseudo export leaves nothing", _disk_full_midway,
         "the disk is full"),
    Case("full disk in torch.save: warmup", _disk_full_in_torch_save, "the disk is full"),
    Case("--force through a symlinked --out", _force_through_link,
         "is a symbolic link (to"),
    Case("a .NAME.old link left by an older --force", _old_link_left_by_force,
         "already holds a finished duda.checkpoint"),
    Case("a refused run leaves no lock file", _foreign_out, "the project did not write"),
    Case("dangling symlink --out: evaluate", _dangling_link("evaluate"), "which does not exist"),
    Case("dangling symlink folder: pseudo export", _dangling_link("pseudo export"),
         "is a symbolic link to"),
    Case("killed --force: the refusal names the .partial", _killed_force,
         "interrupted --force left its unfinished replacement in"),
    Case("--force names a user's file it would remove", _force_with_users_file, "notes.txt"),
    Case("not enough disk space: generate-pseudo refuses first", _no_space_for_store,
         "not enough disk space for the pseudo-label store"),
    Case("killed stage: names the stage and the resume command", _killed_stage,
         "holds an unfinished warmup run (stopped before it wrote its manifest.json)\nfix: "
         "continue it with `cd"),
    Case("killed stage: the command that resumes it", _killed_stage,
         "&& duda warmup -c tiny.yaml --data data --out warmup --resume`"),
]

# --------------------------------------------------------------- artifacts edited or damaged
# (rows for: store array metadata, swapped store chunks, edited manifests, raw HTML in reports)

def _copy(inputs: dict[str, Path], tmp: Path, name: str) -> Path:
    """A copy of the shared input artifact `name`, for a row to damage."""
    return Path(shutil.copytree(inputs[name], tmp / name))


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _store_row(command: str, damage: Callable[[Path], object]) -> Callable[..., Scenario]:
    """A row running `command` (export, show or self-train) on a damaged copy of the store."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        store, out = _copy(inputs, tmp, "pseudo"), tmp / "out"
        damage(store)
        args: list[str | Path] = {
            "export": ["pseudo", "export", store, out], "show": ["pseudo", "show", store],
            "self-train": ["self-train", "-c", inputs["config"], "--data", inputs["data"],
                           "--checkpoint", inputs["checkpoint"], "--pseudo", store,
                           "--out", out, "--device", "cpu"]}[command]
        return Scenario(args, survive=[store], absent=[out])
    return setup


def _int8_labels(store: Path) -> None:
    _edit_json(store / "labels" / "zarr.json", lambda meta: meta.update(data_type="int8"))


def _truncate(file: str) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        text = (store / file).read_text()
        (store / file).write_text(text[:len(text) // 2])
    return damage


def _swap_images_0_and_1(store: Path) -> None:
    """Exchange images 0 and 1 in both arrays, chunk files and digest files alike."""
    for array in ("labels", "confidence"):
        for a, b in (("c/0/0/0", "c/1/0/0"), ("digests/0", "digests/1")):
            first, second = (store / array / a).read_bytes(), (store / array / b).read_bytes()
            (store / array / a).write_bytes(second)
            (store / array / b).write_bytes(first)


def _manifest_row(artifact: str, edit: Callable[[dict], object],
                  command: Callable[[Path, dict[str, Path], Path], list]) -> Callable[..., Scenario]:
    """A row running `command(copy, inputs, out)` on a copy of `artifact` whose manifest was
    edited by `edit`."""
    def setup(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
        copy, out = _copy(inputs, tmp, artifact), tmp / "out"
        _edit_json(copy / "manifest.json", edit)
        return Scenario(command(copy, inputs, out), survive=[copy], absent=[out])
    return setup


def _evaluate_args(checkpoint: Path, inputs: dict[str, Path], out: Path) -> list:
    return ["evaluate", "-c", inputs["config"], "--data", inputs["data"], "--checkpoint",
            checkpoint, "--out", out, "--json", "--device", "cpu"]


def _show_args(store: Path, inputs: dict[str, Path], out: Path) -> list:
    return ["pseudo", "show", store]


def _edited_evaluation(tmp: Path, inputs: dict[str, Path], monkeypatch) -> Scenario:
    """A finished evaluation whose summary.miou was edited, evaluated again (up to date): the
    edited figure must not be printed back as the result."""
    config = Config.model_validate(json.loads(json.dumps(TINY_CONFIG)))
    out = evaluate.run(config, inputs["data"], inputs["checkpoint"], tmp / "evaluate",
                       device="cpu").path
    _edit_json(out / "manifest.json", lambda manifest: manifest["summary"].update(miou=0.777))
    return Scenario(_evaluate_args(inputs["checkpoint"], inputs, out), survive=[out])


INTEGRITY_CASES: list[Case] = [
    Case("store data_type edited (export)", _store_row("export", _int8_labels),
         "is damaged: labels/zarr.json"),
    Case("store zarr.json truncated (export)",
         _store_row("export", _truncate("labels/zarr.json")), "is damaged: labels/zarr.json"),
    Case("store zarr.json truncated (self-train)",
         _store_row("self-train", _truncate("labels/zarr.json")),
         "is damaged: labels/zarr.json"),
    Case("store group zarr.json truncated (show)", _store_row("show", _truncate("zarr.json")),
         "is damaged: zarr.json"),
    Case("swapped store chunks (self-train)", _store_row("self-train", _swap_images_0_and_1),
         "is damaged: image 0"),
    Case("swapped store chunks (export)", _store_row("export", _swap_images_0_and_1),
         "its chunk is not the one written for this image"),
    Case("manifest content emptied", _manifest_row(
        "checkpoint", lambda manifest: manifest.update(content={}), _evaluate_args),
        "manifest.json was edited"),
    Case("manifest summary.miou edited (evaluate --json)", _edited_evaluation,
         "manifest.json was edited"),
    Case("manifest stage edited", _manifest_row(
        "pseudo", lambda manifest: manifest.update(stage="update_offline"), _show_args),
        "manifest.json was edited"),
    Case("manifest round edited", _manifest_row(
        "pseudo", lambda manifest: manifest.update(round=3), _show_args),
        "manifest.json was edited"),
]

CASES = CONFIG_CASES + IMAGE_CASES + FILESYSTEM_CASES + INTEGRITY_CASES


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, inputs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    scenario = case.setup(tmp_path, inputs, monkeypatch)
    before = _digests(scenario.survive)
    result = runner.invoke(app, [str(a) for a in scenario.args])
    output = result.stdout + result.stderr
    assert result.exit_code == case.exit_code, output
    assert "Traceback" not in output, output
    assert case.message in output, output
    after = _digests(scenario.survive)
    assert after == before, "changed or deleted: " + ", ".join(
        str(f) for f in before if after.get(f) != before[f])
    left = [str(p) for p in scenario.absent if p.exists() or p.is_symlink()]
    assert not left, f"left behind: {left}"
