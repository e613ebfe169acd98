"""A user's data is never lost: foreign folders, inputs as outputs, two writers, damaged inputs,
crashes at any moment. Every case goes through the command line and checks the exit code, the
message, and that every file that existed before is still there byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from conftest import TINY_CONFIG, make_index
from PIL import Image
from typer.testing import CliRunner

from duda_cli.app import app
from stages import generate_pseudo, warmup
from stages.artifacts.writer import ArtifactLock
from stages.config import Config, load_config
from stages.runtime.errors import DudaError

runner = CliRunner()
FAULT_RUNNER = Path(__file__).parent / "fault_runner.py"

# Six self-training steps, a checkpoint every two, offline updates from step two.
SELF_TRAIN = {"iterations": 6, "checkpoint_every": 2, "offline_start": 2, "log_every": 1}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (hidden ones included) with the digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_untouched(before: dict[str, str], root: Path) -> None:
    after = snapshot(root)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or deleted: {changed}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """A config file, a dataset index, a warmup checkpoint and its store, built once."""
    root = tmp_path_factory.mktemp("inputs")
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["self_train"].update(SELF_TRAIN)
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = Config.model_validate(raw)
    data = make_index(root / "data")
    checkpoint = warmup.run(config, data, root / "warmup", device="cpu").path
    pseudo = generate_pseudo.run(config, data, checkpoint, root / "pseudo", device="cpu").path
    return {"config": config_file, "data": data, "checkpoint": checkpoint, "pseudo": pseudo,
            "root": root}


def invoke(*arguments: str | Path):
    return runner.invoke(app, [str(a) for a in arguments])


def stage_command(name: str, prepared: dict[str, Path], out: Path) -> list[str | Path]:
    p = prepared
    common = ["-c", p["config"], "--device", "cpu", "--out", out]
    return {
        "prepare-data": ["prepare-data", "-c", p["config"], "--out", out],
        "warmup": ["warmup", *common, "--data", p["data"]],
        "generate-pseudo": ["generate-pseudo", *common, "--data", p["data"],
                            "--checkpoint", p["checkpoint"]],
        "self-train": ["self-train", *common, "--data", p["data"], "--checkpoint",
                       p["checkpoint"], "--pseudo", p["pseudo"]],
        "update-offline": ["update-offline", *common, "--data", p["data"], "--checkpoint",
                           p["checkpoint"], "--pseudo", p["pseudo"]],
        "evaluate": ["evaluate", *common, "--data", p["data"], "--checkpoint",
                     p["checkpoint"]],
    }[name]


# ------------------------------------------------------------------- a user's own folders

STAGES = ["prepare-data", "warmup", "generate-pseudo", "self-train", "update-offline",
          "evaluate"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("stage", STAGES)
def test_a_foreign_out_folder_is_refused_and_kept(prepared, tmp_path, stage, force) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    (folder / "train_notes").mkdir()
    before = snapshot(tmp_path)
    result = invoke(*stage_command(stage, prepared, folder), *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert "did not write" in result.stderr and str(folder) in result.stderr
    assert "--resume" not in result.stderr  # never invite a resume into a user's folder
    assert "choose another --out" in result.stderr
    assert_untouched(before, tmp_path)


def test_pseudo_import_and_run_refuse_a_foreign_out(prepared, tmp_path) -> None:
    labels = label_folder(prepared, tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    before = snapshot(tmp_path)
    result = invoke("pseudo", "import", labels, "--data", prepared["data"], "--out", folder)
    assert result.exit_code == 2 and "did not write" in result.stderr
    # `duda run --out DIR` whose DIR/data is the user's.
    (tmp_path / "root" / "data").mkdir(parents=True)
    (tmp_path / "root" / "data" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = invoke("run", "-c", prepared["config"], "--out", tmp_path / "root", "--device",
                    "cpu")
    assert result.exit_code == 2 and "did not write" in result.stderr
    assert_untouched(before, tmp_path)


def test_an_empty_folder_may_be_the_out(prepared, tmp_path) -> None:
    (tmp_path / "eval").mkdir()
    result = invoke(*stage_command("evaluate", prepared, tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "manifest.json").is_file()


# ---------------------------------------------------------------------- inputs are not outputs


def test_an_out_holding_the_inputs_is_refused_before_anything_is_touched(prepared) -> None:
    root = prepared["root"]
    before = snapshot(root)
    result = invoke("generate-pseudo", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", prepared["checkpoint"], "--out", root, "--device", "cpu")
    assert result.exit_code == 2
    assert f"--out {root} contains the input" in result.stderr
    result = invoke("update-offline", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", prepared["checkpoint"], "--pseudo", prepared["pseudo"],
                    "--out", prepared["pseudo"], "--force", "--device", "cpu")
    assert result.exit_code == 2 and "is the input" in result.stderr
    result = invoke("evaluate", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", prepared["checkpoint"], "--out",
                    prepared["checkpoint"] / "eval", "--device", "cpu")
    assert result.exit_code == 2 and "lies inside the input" in result.stderr
    assert_untouched(before, root)


def test_init_weights_and_dataset_roots_are_inputs_too(prepared, tmp_path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(prepared["checkpoint"], weights)
    before = snapshot(tmp_path)
    result = invoke("warmup", "-c", prepared["config"], "--data", prepared["data"], "--init",
                    weights, "--out", weights / "run", "--device", "cpu")
    assert result.exit_code == 2 and "lies inside the input" in result.stderr
    config = tmp_path / "folder.yaml"
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["data"]["source"] = {"layout": "folder", "root": str(tmp_path / "raw"),
                             "classes": ["a", "b"]}
    raw["data"]["target"] = json.loads(json.dumps(raw["data"]["source"]))  # no YAML alias
    config.write_text(yaml.safe_dump(raw))
    result = invoke("prepare-data", "-c", config, "--out", tmp_path / "raw" / "index")
    assert result.exit_code == 2 and "lies inside the input" in result.stderr
    assert_untouched(before, tmp_path)


# ------------------------------------------------------------------------ one writer at a time


def test_an_artifact_being_written_is_refused_with_its_writer(prepared, tmp_path) -> None:
    out = tmp_path / "eval"
    lock = ArtifactLock(out)
    lock.acquire()  # another process's writer
    try:
        result = invoke(*stage_command("evaluate", prepared, out))
    finally:
        lock.release()
    assert result.exit_code == 2
    assert f"{out} is being written by process {os.getpid()} on" in result.stderr
    assert not out.exists()
    assert invoke(*stage_command("evaluate", prepared, out)).exit_code == 0


# --------------------------------------------------------------------------- --force is safe


def test_a_failed_force_leaves_the_old_artifact_intact(prepared, tmp_path) -> None:
    store = tmp_path / "store"
    shutil.copytree(prepared["pseudo"], store)
    out = tmp_path / "updated"
    arguments = ["update-offline", "-c", prepared["config"], "--data", prepared["data"],
                 "--checkpoint", prepared["checkpoint"], "--pseudo", store, "--out", out,
                 "--device", "cpu"]
    assert invoke(*arguments).exit_code == 0
    before = snapshot(out)
    group = zarr.open_group(store, mode="r+")  # damage the input: the rebuild fails midway
    group["labels"][4] = np.full(group["labels"].shape[1:], 77, np.uint8)
    result = invoke(*arguments, "--force")
    assert result.exit_code == 2 and "image 4" in result.stderr
    assert_untouched(before, out)
    assert snapshot(out).keys() == before.keys()
    assert not (tmp_path / ".updated.partial").exists()


def test_force_rebuilds_beside_and_swaps(prepared, tmp_path) -> None:
    out = tmp_path / "eval"
    first = json.loads(invoke(*stage_command("evaluate", prepared, out), "--json").stdout)
    result = invoke(*stage_command("evaluate", prepared, out), "--force", "--json",
                    "--set", "evaluate.inference.flip=true")
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)
    assert second["artifact"] == str(out) and second["up_to_date"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["evaluate"]["inference"]["flip"] is True
    assert ".partial" not in json.dumps(manifest) and ".partial" not in (out / "report.json"
                                                                         ).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no lock, no .partial left
    assert first["summary"]["images"] == second["summary"]["images"]


# ------------------------------------------------------------------------------ damaged inputs


def damaged_store(prepared, tmp_path, how: str) -> Path:
    store = tmp_path / "store"
    shutil.copytree(prepared["pseudo"], store)
    if how == "garbage":
        (store / "labels" / "c" / "3" / "0" / "0").write_bytes(b"not a zstd frame at all")
    else:  # a valid chunk whose labels are not class ids (written behind the store's back)
        group = zarr.open_group(store, mode="r+")
        group["labels"][3] = np.full(group["labels"].shape[1:], 77, np.uint8)
    return store


@pytest.mark.parametrize("how", ["garbage", "out_of_range"])
def test_a_damaged_store_chunk_stops_self_train_before_anything_is_written(
        prepared, tmp_path, how) -> None:
    store = damaged_store(prepared, tmp_path, how)
    before = snapshot(tmp_path)
    result = invoke("self-train", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", prepared["checkpoint"], "--pseudo", store, "--out",
                    tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "is damaged: image 3 (target_train_0003)" in result.stderr
    assert "rebuild the store" in result.stderr
    assert not (tmp_path / "run").exists()
    assert_untouched(before, tmp_path)
    result = invoke("pseudo", "export", store, tmp_path / "export")
    assert result.exit_code == 2 and "image 3" in result.stderr
    assert not (tmp_path / "export").exists()
    result = invoke("update-offline", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", prepared["checkpoint"], "--pseudo", store, "--out",
                    tmp_path / "updated", "--device", "cpu")
    assert result.exit_code == 2 and "image 3" in result.stderr
    assert not (tmp_path / "updated").exists()
    assert_untouched(before, tmp_path)


def test_export_never_writes_into_a_foreign_folder(prepared, tmp_path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "target_train_0000.png").write_bytes(b"my own file")
    before = snapshot(tmp_path)
    result = invoke("pseudo", "export", prepared["pseudo"], tmp_path / "export")
    assert result.exit_code == 2 and "not an earlier label export" in result.stderr
    assert_untouched(before, tmp_path)
    assert invoke("pseudo", "export", prepared["pseudo"], tmp_path / "new").exit_code == 0
    assert invoke("pseudo", "export", prepared["pseudo"], tmp_path / "new").exit_code == 0


def test_a_text_file_as_weights_is_a_user_error(prepared, tmp_path) -> None:
    text = tmp_path / "weights.pt"
    text.write_text("hello, this is not a checkpoint\n")
    result = invoke("warmup", "-c", prepared["config"], "--data", prepared["data"], "--init",
                    text, "--out", tmp_path / "w", "--device", "cpu")
    assert result.exit_code == 2 and "not a torch file" in result.stderr
    assert not (tmp_path / "w").exists()
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(prepared["checkpoint"], checkpoint)
    (checkpoint / "model.pt").write_text("hello")
    before = snapshot(tmp_path)
    result = invoke("evaluate", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", checkpoint, "--out", tmp_path / "e", "--device", "cpu")
    assert result.exit_code == 2 and "model.pt differs" in result.stderr
    assert_untouched(before, tmp_path)


def test_a_pickle_that_would_run_code_is_refused_and_never_run(prepared, tmp_path) -> None:
    marker = tmp_path / "ran"
    payload = tmp_path / "evil.pt"
    torch.save({"x": Exploit(str(marker))}, payload)
    result = invoke("warmup", "-c", prepared["config"], "--data", prepared["data"], "--init",
                    payload, "--out", tmp_path / "w", "--device", "cpu")
    assert result.exit_code == 2 and "could run code" in result.stderr
    assert not marker.exists()


class Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_an_out_that_cannot_be_created(prepared, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    result = invoke(*stage_command("evaluate", prepared, tmp_path / "file" / "eval"))
    assert result.exit_code == 2 and "cannot be created" in result.stderr
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the read-only case cannot be shown")
    (tmp_path / "locked").mkdir(mode=0o555)
    result = invoke(*stage_command("evaluate", prepared, tmp_path / "locked" / "eval"))
    assert result.exit_code == 2 and "cannot be created" in result.stderr


def label_folder(prepared, tmp_path) -> Path:
    folder = tmp_path / "labels"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.zeros((32, 64), np.uint8), mode="L").save(
            folder / f"target_train_{i:04d}.png")
    return folder


def test_import_refuses_a_corrupt_png_and_a_jpeg_named_png(prepared, tmp_path) -> None:
    folder = label_folder(prepared, tmp_path)
    (folder / "target_train_0002.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    result = invoke("pseudo", "import", folder, "--data", prepared["data"], "--out",
                    tmp_path / "store")
    assert result.exit_code == 2 and "target_train_0002.png is unreadable" in result.stderr
    Image.fromarray(np.zeros((32, 64), np.uint8), mode="L").save(
        folder / "target_train_0002.png", format="JPEG")
    result = invoke("pseudo", "import", folder, "--data", prepared["data"], "--out",
                    tmp_path / "store")
    assert result.exit_code == 2 and "is a JPEG file, not a PNG" in result.stderr
    assert not (tmp_path / "store").exists()


def test_prepare_data_refuses_a_lossy_label(tmp_path) -> None:
    root = tmp_path / "raw"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(
                root / split / "labels" / f"{i}.png", format="JPEG" if i else "PNG")
    raw = {"experiment": "x", "data": {
        "source": {"layout": "folder", "root": str(root), "classes": ["a", "b"],
                   "splits": ["train", "val"]},
        "target": {"layout": "folder", "root": str(root), "classes": ["a", "b"],
                   "splits": ["train", "val"]}}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = invoke("prepare-data", "-c", config, "--out", tmp_path / "index")
    assert result.exit_code == 2 and "1.png is a JPEG file, not a PNG" in result.stderr
    assert not (tmp_path / "index").exists()


# -------------------------------------------------------------------- what is recorded is checked


def test_an_edited_manifest_or_changed_content_is_refused(prepared, tmp_path) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(prepared["checkpoint"], checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["config"]["warmup"]["iterations"] = 99999
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    result = invoke(*stage_command("evaluate", {**prepared, "checkpoint": checkpoint},
                                   tmp_path / "e"))
    assert result.exit_code == 2 and "manifest.json was edited" in result.stderr
    data = tmp_path / "data"
    shutil.copytree(prepared["data"], data)
    index = json.loads((data / "index.json").read_text())
    index["domains"]["target"]["splits"]["val"]["samples"].pop()
    (data / "index.json").write_text(json.dumps(index))
    result = invoke(*stage_command("evaluate", {**prepared, "data": data}, tmp_path / "e"))
    assert result.exit_code == 2 and "index.json differs" in result.stderr


def test_set_merges_a_mapping_and_names_itself_in_errors(prepared) -> None:
    config = load_config(prepared["config"], ["warmup.optimizer={momentum: 0.5}"])
    assert config.warmup.optimizer.momentum == 0.5
    assert config.warmup.optimizer.lr == TINY_CONFIG["warmup"]["optimizer"]["lr"]
    with pytest.raises(DudaError) as error:
        load_config(prepared["config"], ["warmup.optimizer={momentom: 0.5}"])
    assert "invalid --set override" in error.value.message
    assert "from --set 'warmup.optimizer={momentom: 0.5}'" in error.value.message
    assert str(prepared["config"]) not in error.value.message


def test_stale_temporary_files_are_removed_when_the_run_is_next_written(prepared,
                                                                        tmp_path) -> None:
    out = tmp_path / "w"
    result = run_with_fault("checkpoint_tmp", 2, "warmup", "-c", prepared["config"], "--data",
                            prepared["data"], "--out", out, "--device", "cpu")
    assert result.returncode == -9
    assert list(out.glob(".*.tmp-*"))
    result = invoke("warmup", "-c", prepared["config"], "--data", prepared["data"], "--out",
                    out, "--device", "cpu", "--resume")
    assert result.exit_code == 0, result.output
    assert not list(out.glob(".*.tmp-*"))


def test_self_train_leaves_the_input_store_byte_identical(prepared, tmp_path) -> None:
    store = tmp_path / "pseudo"
    shutil.copytree(prepared["pseudo"], store)
    before = snapshot(store)
    result = invoke("self-train", "-c", prepared["config"], "--data", prepared["data"],
                    "--checkpoint", prepared["checkpoint"], "--pseudo", store, "--out",
                    tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    run_store = snapshot(tmp_path / "run" / "pseudo")
    assert any(run_store.get(name) != digest for name, digest in before.items()
               if name.startswith("labels/"))  # the copy was updated ...
    assert_untouched(before, store)  # ... through hard links, without touching the input
    assert snapshot(store).keys() == before.keys()


# ---------------------------------------------------------------------- crashes at any moment


def run_with_fault(point: str, count: int, *arguments: str | Path, wait: bool = True,
                   env: dict[str, str] | None = None):
    command = [sys.executable, str(FAULT_RUNNER), point, str(count), "--",
               *[str(a) for a in arguments]]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=environment)
    return subprocess.run(command, capture_output=True, text=True, env=environment,
                          timeout=300, check=False)


def self_train_args(prepared, out: Path) -> list[str | Path]:
    return ["self-train", "-c", prepared["config"], "--data", prepared["data"],
            "--checkpoint", prepared["checkpoint"], "--pseudo", prepared["pseudo"], "--out",
            out, "--device", "cpu", "--quiet"]


def run_result(path: Path) -> dict[str, object]:
    """What a finished run is: its weights, its store's arrays and its metrics."""
    model = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    group = zarr.open_group(path / "pseudo", mode="r")
    return {"student": model["student"], "teacher": model["teacher"],
            "labels": np.asarray(group["labels"][:]),
            "confidence": np.asarray(group["confidence"][:]),
            "metrics": (path / "metrics.jsonl").read_text()}


def assert_same_run(got: dict[str, object], want: dict[str, object], what: str) -> None:
    for role in ("student", "teacher"):
        for key, tensor in want[role].items():
            assert torch.equal(got[role][key], tensor), f"{what}: {role} {key}"
    np.testing.assert_array_equal(got["labels"], want["labels"], err_msg=what)
    np.testing.assert_array_equal(got["confidence"], want["confidence"], err_msg=what)
    assert got["metrics"] == want["metrics"], what


@pytest.mark.slow
def test_a_killed_self_train_resumes_bit_identical(prepared, tmp_path) -> None:
    reference = run_with_fault("step", 10**6, *self_train_args(prepared, tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr
    want = run_result(tmp_path / "ref")
    seed = 20261130
    rng = random.Random(seed)
    moments = [("step", rng.randint(1, SELF_TRAIN["iterations"])),
               ("step", rng.randint(1, SELF_TRAIN["iterations"])),
               ("store_write", rng.randint(1, 8)),
               ("store_write", rng.randint(1, 8)),
               ("checkpoint_tmp", rng.randint(2, 3)),  # a checkpoint after the first
               ("snapshot", 30)]  # inside the second snapshot (22 files in the first)
    print(f"fault moments from seed {seed}: {moments}")
    for number, (point, count) in enumerate(moments):
        out = tmp_path / f"run{number}"
        killed = run_with_fault(point, count, *self_train_args(prepared, out))
        assert killed.returncode == -9, (point, count, killed.stderr[-2000:])
        assert not (out / "manifest.json").exists()
        resumed = run_with_fault("step", 10**6, *self_train_args(prepared, out), "--resume")
        assert resumed.returncode == 0, (point, count, resumed.stderr[-2000:])
        assert_same_run(run_result(out), want, f"killed at {point} #{count}")


@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_first_is_unharmed(prepared, tmp_path) -> None:
    reference = tmp_path / "ref"
    assert run_with_fault("step", 10**6, *self_train_args(prepared, reference)).returncode == 0
    out = tmp_path / "run"
    paused, go = tmp_path / "paused", tmp_path / "go"
    first = run_with_fault("pause", 3, *self_train_args(prepared, out), wait=False,
                           env={"FAULT_PAUSED": str(paused), "FAULT_GO": str(go)})
    try:
        deadline = time.monotonic() + 120
        while not paused.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = run_with_fault("step", 10**6, *self_train_args(prepared, out), "--resume")
        assert second.returncode == 2
        assert f"is being written by process {first.pid} on" in second.stderr
    finally:
        go.write_text("go")
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert_same_run(run_result(out), run_result(reference), "the first writer")


@pytest.mark.slow
def test_resume_after_an_interrupted_force_continues_beside_the_old_run(prepared,
                                                                        tmp_path) -> None:
    out = tmp_path / "run"
    assert run_with_fault("step", 10**6, *self_train_args(prepared, out)).returncode == 0
    before = snapshot(out)
    arguments = [*self_train_args(prepared, out), "--force", "--seed", "5"]
    killed = run_with_fault("step", 4, *arguments)
    assert killed.returncode == -9
    assert_untouched(before, out)  # the old run is intact while its replacement is unfinished
    partial = tmp_path / ".run.partial"
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    resumed = run_with_fault("step", 10**6, *arguments, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 5
    fresh = tmp_path / "fresh"
    assert run_with_fault("step", 10**6, *self_train_args(prepared, fresh), "--seed",
                          "5").returncode == 0
    assert_same_run(run_result(out), run_result(fresh), "resumed --force")


# ------------------------------------------------------------------ a killed stage is named


def test_a_killed_warmup_prints_the_command_that_resumes_it(prepared, tmp_path, monkeypatch,
                                                              capsys) -> None:
    from duda_cli import app as cli
    from stages import warmup as warmup_stage

    def killed(config, index, out, **kwargs):
        (out / "train_state.pt").write_bytes(b"the last checkpoint")
        raise KeyboardInterrupt

    monkeypatch.chdir(prepared["root"])
    command = ["duda", "warmup", "-c", "tiny.yaml", "--data", "data", "--out",
               str(tmp_path / "run"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", command)
    with monkeypatch.context() as patched:
        patched.setattr(warmup_stage, "_train", killed)
        with pytest.raises(SystemExit) as interrupted:
            cli.main()
    assert interrupted.value.code == 130
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli.main()  # the same command again, without --resume
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'} holds an unfinished warmup run" in err
    assert f"`{' '.join(command)} --resume`" in err
