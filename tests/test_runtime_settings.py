"""Settings of how a run executes rather than what it computes: the inference precision reaching
every inference path, worker counts (`auto`, and never part of a hash), the headline protocol,
and keys added with a neutral default leaving finished artifacts up to date."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import tiny

from stages import evaluate, generate_pseudo, predict, self_train, update_offline, warmup
from stages.config import load_config, recorded_hash, stage_config, stage_hash
from stages.data.classes import cityscapes_table
from stages.engine.metrics import ConfusionMatrix
from stages.runtime.devices import MAX_AUTO_WORKERS, worker_count

ROOT = Path(__file__).resolve().parent.parent


def test_the_inference_precision_reaches_every_inference_path(prepared, tmp_path,
                                                              monkeypatch) -> None:
    # On the CPU autocast never changes a result, so what is checked is the setting each
    # inference pass asks autocast for: the stages' model passes and the BN recalibration.
    import stages.engine.inference
    import stages.nn.teacher

    asked: list[str] = []

    def recording(device, precision):
        asked.append(precision)
        return contextlib.nullcontext()

    monkeypatch.setattr(stages.engine.inference, "autocast", recording)
    monkeypatch.setattr(stages.nn.teacher, "autocast", recording)
    recalibrate = {"enabled": True, "batches": 1}
    config = tiny(inference_precision="bf16", warmup__eval_every=2,
                  self_train__eval_every=2, self_train__recalibrate_batches=1,
                  generate_pseudo__recalibration=recalibrate,
                  evaluate__recalibration=recalibrate)
    data, root = prepared["data"], tmp_path
    paths = {
        "warmup": lambda: warmup.run(config, data, root / "warmup", device="cpu"),
        "generate-pseudo": lambda: generate_pseudo.run(
            config, data, prepared["checkpoint"], root / "pseudo", device="cpu"),
        "self-train": lambda: self_train.run(
            config, data, prepared["checkpoint"], prepared["pseudo"], root / "run",
            device="cpu"),
        "update-offline": lambda: update_offline.run(
            config, data, root / "run", root / "run" / "pseudo", root / "pseudo2",
            device="cpu"),
        "evaluate": lambda: evaluate.run(config, data, root / "run", root / "eval",
                                         device="cpu"),
        "predict": lambda: predict.run(config, root / "run", root / "predict", data=data,
                                       split="val", device="cpu"),
    }
    for name, run in paths.items():
        asked.clear()
        run()
        assert asked and set(asked) == {"bf16"}, (name, asked)


def test_auto_workers_follow_the_cores_and_the_processes_on_the_machine(monkeypatch) -> None:
    import stages.runtime.devices

    monkeypatch.setattr(stages.runtime.devices, "available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert worker_count("auto") == MAX_AUTO_WORKERS  # 15 spare cores, capped
    assert worker_count("auto", loaders=2) == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two GPU processes share the 16 cores
    assert worker_count("auto", loaders=2) == 3
    assert worker_count(5, loaders=2) == 5  # an explicit number wins
    monkeypatch.setattr(stages.runtime.devices, "available_cores", lambda: 2)
    assert worker_count("auto", loaders=2) == 0  # decoding on a thread


def test_worker_counts_are_in_no_hash_and_a_run_resumes_with_others(prepared, tmp_path) -> None:
    for stage in ("prepare_data", "warmup", "generate_pseudo", "self_train", "update_offline",
                  "evaluate"):
        assert stage_hash(tiny(), stage) == stage_hash(tiny(
            data__workers=7, warmup__runtime__num_workers=3,
            self_train__runtime__num_workers=3,
            generate_pseudo__inference__num_workers=5,
            update_offline__inference__num_workers=5,
            evaluate__inference__num_workers="auto"), stage), stage
    first = self_train.run(tiny(self_train__runtime__num_workers=0), prepared["data"],
                           prepared["checkpoint"], prepared["pseudo"], tmp_path / "run",
                           device="cpu")
    again = self_train.run(tiny(self_train__runtime__num_workers=1), prepared["data"],
                           prepared["checkpoint"], prepared["pseudo"], tmp_path / "run",
                           device="cpu")
    assert again.up_to_date and again.manifest.id == first.manifest.id


def test_what_older_versions_recorded_is_still_up_to_date() -> None:
    # Before the worker counts left the hash and before the inference precision existed, a
    # stage recorded its sections with the workers and without the precision. Hashed under
    # today's rule that record equals today's config: the artifact stays up to date.
    config = tiny()
    for stage in ("warmup", "generate_pseudo", "self_train", "update_offline", "evaluate"):
        recorded = json.loads(json.dumps(stage_config(config, stage)))
        recorded.pop("inference_precision")
        for section in recorded.values():
            if isinstance(section, dict):
                for holder in (section, section.get("runtime"), section.get("inference")):
                    if isinstance(holder, dict) and "num_workers" in holder:
                        holder["num_workers"] = 2
        assert recorded_hash(recorded, stage) == stage_hash(config, stage), stage
    # A neutral default written out changes nothing either; another value does.
    assert stage_hash(tiny(self_train__gradient_accumulation=1), "self_train") == stage_hash(
        config, "self_train")
    assert stage_hash(tiny(inference_precision="bf16"), "evaluate") != stage_hash(
        config, "evaluate")


def test_synthia_headlines_the_16_class_protocol() -> None:
    config = load_config(ROOT / "configs" / "synthia_to_cityscapes.yaml")
    assert config.data.ordered_protocols() == (16, 19, 13)
    table = cityscapes_table(config.data.ordered_protocols())
    assert table.primary_protocol[0] == 16
    matrix = ConfusionMatrix(19)
    matrix.matrix += 1
    report = evaluate._report(matrix, table, {})
    assert report["primary_protocol"] == "16" and list(report["miou_by_protocol"]) == [
        "16", "19", "13"]
    assert report["miou"] == report["miou_by_protocol"]["16"]


def test_a_headline_outside_the_protocols_is_refused() -> None:
    with pytest.raises(Exception, match="headline_protocol 16 is not among data.protocols"):
        tiny(data__protocols=[19], data__headline_protocol=16)
