"""Artifacts: manifest written last, validation on load, up-to-date no-op, cleanup on error."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil

import pytest

from stages.artifacts.manifest import (
    CHECKPOINT,
    DATASET_INDEX,
    MANIFEST,
    load_artifact,
    read_manifest,
)
from stages.artifacts.writer import ArtifactLock, ArtifactWriter
from stages.runtime.errors import DudaError


def build(path, config_hash="h", inputs=None, **kwargs):
    with ArtifactWriter(path, kind=DATASET_INDEX, stage="prepare_data", config={"a": 1},
                        config_hash=config_hash, inputs=inputs, **kwargs) as writer:
        if writer.up_to_date:
            return writer.result()
        (writer.work / "payload.txt").write_text("x")
        writer.finish({"pairs": 3}, content=["payload.txt"])
    return writer.result()


def test_manifest_round_trip(tmp_path) -> None:
    result = build(tmp_path / "a")
    manifest = load_artifact(tmp_path / "a", DATASET_INDEX)
    assert manifest == result.manifest
    assert manifest.schema_id == "duda.dataset_index/1"
    assert manifest.summary == {"pairs": 3}
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["schema"] == manifest.schema_id


def test_same_config_is_up_to_date_and_force_rebuilds(tmp_path) -> None:
    first = build(tmp_path / "a")
    again = build(tmp_path / "a")
    assert again.up_to_date and again.manifest.id == first.manifest.id
    forced = build(tmp_path / "a", force=True)
    assert not forced.up_to_date


def test_other_config_is_refused_without_force(tmp_path) -> None:
    build(tmp_path / "a")
    with pytest.raises(DudaError, match="--force"):
        build(tmp_path / "a", config_hash="other")


def test_error_leaves_nothing_behind(tmp_path) -> None:
    with pytest.raises(DudaError), ArtifactWriter(tmp_path / "a", kind=DATASET_INDEX,
                                                  stage="s", config={}, config_hash="h"):
        (tmp_path / "a" / "half.txt").write_text("x")
        raise DudaError("bad input")
    assert not (tmp_path / "a").exists()


def test_resumable_output_keeps_its_state_and_needs_resume(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt), ArtifactWriter(
            tmp_path / "r", kind=CHECKPOINT, stage="warmup", config={}, config_hash="h",
            resumable=True):
        (tmp_path / "r" / "train_state.pt").write_text("x")
        raise KeyboardInterrupt
    assert (tmp_path / "r" / "train_state.pt").exists()
    with pytest.raises(DudaError, match="--resume"):
        ArtifactWriter(tmp_path / "r", kind=CHECKPOINT, stage="warmup", config={},
                       config_hash="h", resumable=True).__enter__()
    writer = ArtifactWriter(tmp_path / "r", kind=CHECKPOINT, stage="warmup", config={},
                            config_hash="h", resumable=True, resume=True).__enter__()
    assert writer.resuming


def test_unfinished_and_wrong_kind_are_refused(tmp_path) -> None:
    (tmp_path / "u").mkdir()
    with pytest.raises(DudaError, match="unfinished"):
        read_manifest(tmp_path / "u")
    build(tmp_path / "a")
    with pytest.raises(DudaError, match="expected a duda.checkpoint"):
        load_artifact(tmp_path / "a", CHECKPOINT)
    with pytest.raises(DudaError, match="does not exist"):
        read_manifest(tmp_path / "missing")


def test_corrupt_manifest_is_refused(tmp_path) -> None:
    build(tmp_path / "a")
    (tmp_path / "a" / MANIFEST).write_text("{not json")
    with pytest.raises(DudaError, match="corrupt"):
        read_manifest(tmp_path / "a")


def test_future_version_is_refused(tmp_path) -> None:
    build(tmp_path / "a")
    path = tmp_path / "a" / MANIFEST
    data = json.loads(path.read_text())
    data["schema"] = "duda.dataset_index/9"
    path.write_text(json.dumps(data))
    with pytest.raises(DudaError, match="reads duda.dataset_index/1"):
        load_artifact(tmp_path / "a", DATASET_INDEX)


# ------------------------------------------------------------------ manifest formats


def as_format_1(path) -> dict:
    """Rewrite the manifest at `path` as duda wrote it before manifest format 2: no format
    field, no digest, the id by the format-1 rule (kind, config, its hash, sorted input ids,
    content digests)."""
    data = json.loads((path / MANIFEST).read_text())
    del data["manifest_format"], data["digest"]
    identity = {"kind": data["schema"].split("/")[0], "config": data["config"],
                "config_hash": data["config_hash"], "content": data["content"],
                "inputs": sorted(ref["id"] for ref in data["inputs"].values())}
    data["id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    (path / MANIFEST).write_text(json.dumps(data, indent=2))
    return data


def test_a_format_1_manifest_still_verifies_and_stays_up_to_date(tmp_path) -> None:
    build(tmp_path / "a")
    old = as_format_1(tmp_path / "a")
    manifest = load_artifact(tmp_path / "a", DATASET_INDEX)
    assert manifest.manifest_format == 1 and manifest.id == old["id"]
    again = build(tmp_path / "a")
    assert again.up_to_date and again.manifest.id == old["id"]
    # Its consumers, which recorded the old id, stay up to date too.
    ref = manifest.ref(tmp_path / "a")
    build(tmp_path / "b", inputs={"data": ref})
    assert build(tmp_path / "b", inputs={"data": ref}).up_to_date
    # An old manifest whose content digests were removed is refused, not waved through.
    data = json.loads((tmp_path / "a" / MANIFEST).read_text())
    (tmp_path / "a" / MANIFEST).write_text(json.dumps({**data, "content": {}}))
    with pytest.raises(DudaError, match="records no content digests"):
        load_artifact(tmp_path / "a", DATASET_INDEX)


@pytest.mark.parametrize("edit", [
    lambda m: m["summary"].update(pairs=4),
    lambda m: m.update(stage="update_offline"),
    lambda m: m.update(round=2),
    lambda m: m.update(content={}),
    lambda m: m.update(created="2020-01-01T00:00:00+00:00"),
    lambda m: m["environment"].update(device="cuda"),
    lambda m: m["inputs"]["data"].update(path="/elsewhere"),
    lambda m: m.pop("manifest_format"),  # posing as format 1: the old rule gives another id
    lambda m: m.pop("digest"),
], ids=["summary", "stage", "round", "content emptied", "created", "environment",
        "input path", "format removed", "digest removed"])
def test_an_edit_to_any_field_of_a_format_2_manifest_is_refused(tmp_path, edit) -> None:
    base = build(tmp_path / "base").manifest
    build(tmp_path / "a", inputs={"data": base.ref(tmp_path / "base")})
    assert load_artifact(tmp_path / "a", DATASET_INDEX).manifest_format == 2
    data = json.loads((tmp_path / "a" / MANIFEST).read_text())
    edit(data)
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(DudaError, match="was edited|records no content"):
        load_artifact(tmp_path / "a", DATASET_INDEX)
    with pytest.raises(DudaError):  # an up-to-date rerun checks it too
        build(tmp_path / "a", inputs={"data": base.ref(tmp_path / "base")})


def test_ids_stay_content_derived_and_a_summary_nan_reads_back(tmp_path) -> None:
    first = build(tmp_path / "a").manifest
    second = build(tmp_path / "b").manifest  # another time and place, same content
    assert first.id == second.id
    with ArtifactWriter(tmp_path / "c", kind=DATASET_INDEX, stage="prepare_data",
                        config={"a": 1}, config_hash="h") as writer:
        (writer.work / "payload.txt").write_text("x")
        writer.finish({"miou": float("nan")}, content=["payload.txt"])
    assert load_artifact(tmp_path / "c", DATASET_INDEX).summary == {"miou": None}


# ------------------------------------------------------------- the lock, and a place that is full


def test_the_lock_file_exists_only_while_held(tmp_path) -> None:
    lock = ArtifactLock(tmp_path / "a")
    lock.acquire()
    assert lock.path.is_file()
    lock.release()
    assert sorted(tmp_path.iterdir()) == []
    build(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_lock_on_a_removed_lock_file_is_taken_again_on_the_new_one(tmp_path) -> None:
    holder = ArtifactLock(tmp_path / "a")
    holder.acquire()
    opened_before = os.open(holder.path, os.O_RDWR)  # a second process, just before the release
    holder.release()  # removes the file, then unlocks
    fcntl.flock(opened_before, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it locked a file no one sees
    late = ArtifactLock(tmp_path / "a")
    late.acquire()  # the path's file, not the orphan: a third writer would be refused on it
    with pytest.raises(DudaError, match="is being written by process"):
        ArtifactLock(tmp_path / "a").acquire()
    late.release()
    os.close(opened_before)


def test_a_full_disk_midway_leaves_nothing_and_says_so(tmp_path) -> None:
    with pytest.raises(DudaError, match="the disk is full") as raised, ArtifactWriter(
            tmp_path / "a", kind=DATASET_INDEX, stage="s", config={}, config_hash="h") as writer:
        (writer.work / "half.txt").write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(writer.work / "b.txt"))
    assert str(tmp_path / "a" / "b.txt") in raised.value.message
    assert sorted(tmp_path.iterdir()) == []


def test_torch_saves_runtime_error_on_a_full_disk_is_the_same_user_error(tmp_path) -> None:
    def torch_save() -> None:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(DudaError, match="the disk is full"), ArtifactWriter(
            tmp_path / "a", kind=CHECKPOINT, stage="warmup", config={}, config_hash="h",
            resumable=True):
        torch_save()
    assert sorted(tmp_path.iterdir()) == []  # nothing worth keeping for --resume was written


def test_a_resumable_run_refused_at_its_start_leaves_a_users_empty_folder_empty(
        tmp_path, monkeypatch) -> None:
    (tmp_path / "r").mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type(usage)(10**9, 10**9, 5000))
    with pytest.raises(DudaError, match=r"needs about 2\.0 MB, and the filesystem holding .* "
                                        r"has 5\.0 kB free"), ArtifactWriter(
            tmp_path / "r", kind=CHECKPOINT, stage="warmup", config={}, config_hash="h",
            resumable=True) as writer:
        writer.require_space(lambda: 2_000_000, "the checkpoints")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert list((tmp_path / "r").iterdir()) == []


def test_a_killed_run_from_before_markers_recorded_commands_is_still_named(tmp_path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / ".duda-artifact").write_text(json.dumps({"kind": CHECKPOINT, "stage": "self_train",
                                                    "created": "2025-01-01T00:00:00+00:00"}))
    (out / "train_state.pt").write_text("x")
    with pytest.raises(DudaError) as raised, ArtifactWriter(
            out, kind=CHECKPOINT, stage="self_train", config={}, config_hash="h",
            resumable=True):
        pass
    assert "holds an unfinished self_train run" in raised.value.message
    assert f"duda self-train -c CONFIG ... --out {out} --resume" in raised.value.fix
