"""The hashing rule for new keys (docs/design.md#configuration), proven on what an older version
recorded: every artifact and training state it made for the shipped synthetic configs and the
tests' tiny config is up to date and resumable today, a key added at its neutral default (a loss
weight of 0, a variant section's `name` tag) leaves them so, and another value does not.

tests/data/before_layers/ holds, written by commit 240094b (before the layers were reorganised
and before worker counts, `inference_precision`, `self_train.gradient_accumulation` and
`self_train.recalibrate_batch_size` changed the hashing), for each config: its YAML as a dict,
and for each stage the config its manifest recorded, the hash it recorded and the config its
training state recorded; and a finished tiny warmup run's manifest and training state identity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny

from stages import self_train
from stages.artifacts.checkpoint import load_torch, save_torch
from stages.artifacts.manifest import artifact_id, read_manifest
from stages.config import (
    NEUTRAL,
    STAGE_SECTIONS,
    UNHASHED,
    Config,
    config_hash,
    hashed_config,
    recorded_hash,
    stage_config,
    stage_hash,
)
from stages.engine.training import TrainState, flatten_config
from stages.runtime.distributed import Ranks
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter, Task

BEFORE = Path(__file__).parent / "data" / "before_layers"
CONFIGS = Path(__file__).parents[1] / "configs"
RECORDS = ("synthetic", "synthetic_hard", "tiny")  # configs/<name>.yaml and TINY_CONFIG

# What 240094b left out of a hash: the keys of its UNHASHED. Warmup and self-train hashed their
# sections without them (`stage_hash`); the other stages hashed the whole recorded section.
OLD_UNHASHED: dict[str, tuple[str, ...]] = {
    "warmup": ("warmup.runtime.prefetch",),
    "self_train": ("model.init", "self_train.reference_batch", "self_train.runtime.prefetch"),
}

# The keys taken out of each stage's hash since 240094b: the worker counts left every stage's
# hash, so no stored hash string equals today's; each differs by exactly these keys.
TAKEN_OUT: dict[str, set[str]] = {
    "prepare_data": {"data.workers"},
    "warmup": {"warmup.runtime.num_workers"},
    "generate_pseudo": {"generate_pseudo.inference.num_workers"},
    "self_train": {"self_train.runtime.num_workers"},
    "update_offline": {"update_offline.inference.num_workers"},
    "evaluate": {"evaluate.inference.num_workers"},
}


def record(name: str) -> dict[str, Any]:
    return json.loads((BEFORE / f"{name}.json").read_text())


def today(name: str) -> Config:
    """The recorded config, read by today's code."""
    return Config.model_validate(record(name)["raw"])


def test_the_records_cover_every_stage_of_the_shipped_synthetic_configs() -> None:
    for name in RECORDS[:2]:
        shipped = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert record(name)["raw"] == json.loads(json.dumps(shipped))
    for name in RECORDS:
        assert set(record(name)["stages"]) == set(STAGE_SECTIONS)


@pytest.mark.parametrize("name", RECORDS)
@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_every_artifact_made_before_is_up_to_date(name: str, stage: str) -> None:
    # ArtifactWriter: a finished artifact is up to date when its recorded config, hashed under
    # today's rule, gives today's hash of the same config.
    recorded = record(name)["stages"][stage]
    assert recorded_hash(recorded["config"], stage) == stage_hash(today(name), stage)


@pytest.mark.parametrize("name", RECORDS)
@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_stored_hashes_differ_from_todays_exactly_by_the_keys_taken_out(name: str,
                                                                        stage: str) -> None:
    recorded = record(name)["stages"][stage]
    # What the old version hashed, re-derived from what it recorded: it gives the stored string.
    old = flatten_config(recorded["config"])
    for key in OLD_UNHASHED.get(stage, ()):
        old.pop(key, None)
    assert config_hash(_unflatten(old)) == recorded["config_hash"]
    current = flatten_config(hashed_config(today(name), stage))
    differing = {key for key in old.keys() | current.keys() if old.get(key) != current.get(key)}
    # Only keys now in UNHASHED differ (a key added since is absent on both sides: at its
    # NEUTRAL value it stays out of today's hash), and dropping them gives today's hash.
    assert differing == TAKEN_OUT[stage] <= set(UNHASHED[stage])
    assert all(key not in current for key in differing)
    kept = {key: value for key, value in old.items() if key not in differing}
    assert config_hash(_unflatten(kept)) == stage_hash(today(name), stage)
    assert (recorded["config_hash"] == stage_hash(today(name), stage)) == (not differing)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """flatten_config's inverse (an empty section is a leaf of {} there, and here again)."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, key = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return nested


def test_a_finished_warmup_run_made_before_is_up_to_date_and_resumable(tmp_path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "manifest.json").write_text(
        (BEFORE / "tiny_warmup_manifest.json").read_text())
    manifest = read_manifest(tmp_path / "warmup")
    assert artifact_id(manifest) == manifest.id  # its id still verifies by its format's rule
    assert manifest.config == record("tiny")["stages"]["warmup"]["config"]
    assert manifest.config_hash != stage_hash(tiny(), "warmup")
    assert recorded_hash(manifest.config, "warmup") == stage_hash(tiny(), "warmup")

    # Its training state: today's comparison accepts the identity it recorded.
    stored = json.loads((BEFORE / "tiny_warmup_train_state.json").read_text())
    save_torch({"identity": stored["identity"], "world_size": stored["world_size"]},
               tmp_path / "train_state.pt")
    identity = {"config": hashed_config(tiny(), "warmup"), "inputs": stored["identity"]["inputs"]}
    state = TrainState(tmp_path / "train_state.pt", "warmup", identity,
                       Ranks(torch.device("cpu")), {})
    state.load(tmp_path)
    changed = {**identity, "config": hashed_config(tiny(warmup__iterations=6), "warmup")}
    with pytest.raises(DudaError, match="warmup.iterations: 4 -> 6"):
        TrainState(tmp_path / "train_state.pt", "warmup", changed,
                   Ranks(torch.device("cpu")), {}).load(tmp_path)


# ------------------------------------------------------------------------- keys added later


def _with(section: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of a recorded stage config with the key at `dotted` set (sections created)."""
    section = json.loads(json.dumps(section))
    *parents, key = dotted.split(".")
    node = section
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return section


@pytest.mark.parametrize("dotted", ["self_train.loss.adversarial",
                                    "self_train.domain_loss.weight"])
def test_a_zero_weight_term_added_leaves_old_artifacts_up_to_date(monkeypatch,
                                                                  dotted: str) -> None:
    # A new loss weight inside `self_train.loss`, or in a section added with it, at 0: the
    # behaviour of every run made before. A section left empty by its neutral keys hashes as
    # the config without it.
    monkeypatch.setitem(NEUTRAL, dotted, 0.0)
    old = record("tiny")["stages"]["self_train"]
    current = stage_config(tiny(), "self_train")
    assert recorded_hash(_with(current, dotted, 0.0), "self_train") == recorded_hash(
        old["config"], "self_train") == stage_hash(tiny(), "self_train")
    assert recorded_hash(_with(current, dotted, 0.5), "self_train") != recorded_hash(
        old["config"], "self_train")


def test_a_variant_section_gaining_its_name_tag_keeps_old_hashes(monkeypatch) -> None:
    # `model: {name: deeplabv2, ...}` as the next model family will write it: today's only
    # variant is the tag's neutral value.
    monkeypatch.setitem(NEUTRAL, "model.name", "deeplabv2")
    for stage in ("warmup", "self_train"):
        old = record("tiny")["stages"][stage]["config"]
        assert "name" not in old["model"]
        current = stage_config(tiny(), stage)
        assert recorded_hash(_with(current, "model.name", "deeplabv2"), stage) == recorded_hash(
            old, stage) == stage_hash(tiny(), stage)
        assert recorded_hash(_with(current, "model.name", "segformer"), stage) != recorded_hash(
            old, stage)


def test_a_neutral_key_inside_a_variant_or_under_an_empty_section(monkeypatch) -> None:
    # A key of one teacher variant applies where that variant is chosen; a key under a section
    # that is null (or absent) is simply not there.
    monkeypatch.setitem(NEUTRAL, "self_train.teacher.warm_start", 0)
    monkeypatch.setitem(NEUTRAL, "self_train.recalibrate_batch_size.per_rank", 0)
    old = record("tiny")["stages"]["self_train"]["config"]
    current = stage_config(tiny(), "self_train")
    assert current["self_train"]["teacher"] == {"name": "mean"}
    assert current["self_train"]["recalibrate_batch_size"] is None
    teacher = {"name": "mean", "warm_start": 0}
    assert recorded_hash(_with(current, "self_train.teacher", teacher), "self_train") == (
        recorded_hash(old, "self_train"))
    teacher["warm_start"] = 100
    assert recorded_hash(_with(current, "self_train.teacher", teacher), "self_train") != (
        recorded_hash(old, "self_train"))


# ------------------------------------------------------------------ resuming an older run


class Interrupt(Reporter):
    """Ctrl-C once self-train reaches `iteration`; records where each self-train task began."""

    def __init__(self, iteration: int | None = None) -> None:
        self.iteration = iteration
        self.started_at: list[int] = []

    def task(self, description, total, completed=0, log_every=0) -> Task:
        task = super().task(description, total, completed, log_every)
        if description != "self-train":
            return task
        self.started_at.append(completed)
        original, limit = task.advance, self.iteration

        def advance(steps: int = 1, **fields) -> None:
            original(steps, **fields)
            if limit is not None and task.completed >= limit:
                raise KeyboardInterrupt

        task.advance = advance  # type: ignore[method-assign]
        return task


def test_a_self_train_run_saved_by_the_older_version_resumes(prepared, tmp_path) -> None:
    # Its training state recorded no inference_precision, gradient_accumulation or
    # recalibrate_batch_size (added since at their neutral defaults) and still the worker count.
    config = tiny()
    args = (config, prepared["data"], prepared["checkpoint"], prepared["pseudo"])
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        self_train.run(*args, out, device="cpu", reporter=Interrupt(3))
    state = load_torch(out / "train_state.pt")
    old = record("tiny")["stages"]["self_train"]["train_state_config"]
    for key in ("inference_precision", "self_train.gradient_accumulation",
                "self_train.recalibrate_batch_size"):
        assert key in flatten_config(stage_config(config, "self_train"))
        assert key not in flatten_config(old)

    # The same recorded config with a changed weight is refused, naming the key.
    edited = _with(old, "self_train.loss.online", 0.3)
    save_torch({**state, "identity": {**state["identity"], "config": edited}},
               out / "train_state.pt")
    with pytest.raises(DudaError, match=r"self_train.loss.online: 0.3 -> 0.5"):
        self_train.run(*args, out, device="cpu", resume=True)

    save_torch({**state, "identity": {**state["identity"], "config": old}},
               out / "train_state.pt")
    reporter = Interrupt()
    result = self_train.run(*args, out, device="cpu", resume=True, reporter=reporter)
    assert reporter.started_at == [2]  # continued from its checkpoint, not started over
    assert result.manifest.summary["iteration"] == 4
