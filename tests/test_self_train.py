"""self-train and update-offline on the tiny dataset: artifacts, lineage, metrics, resume."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_index, store_labels, tiny
from rich.console import Console
from typer.testing import CliRunner

from duda_cli.app import app
from duda_cli.commands import self_train as self_train_command
from stages import self_train
from stages.artifacts.checkpoint import load_torch
from stages.artifacts.manifest import CHECKPOINT, PSEUDO_LABELS, load_artifact
from stages.method.offline import CHANGES, OfflineChanges
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter, Task
from stages.store.pseudo_store import open_store

runner = CliRunner()


def test_self_train_writes_run_and_its_own_store(prepared, tmp_path) -> None:
    before = store_labels(prepared["pseudo"])
    result = self_train.run(tiny(), prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                            tmp_path / "run", device="cpu")
    manifest = load_artifact(result.path, CHECKPOINT)
    assert manifest.summary["iteration"] == 4
    model = load_torch(result.path / "model.pt")
    assert model["teacher"] is not None and model["iteration"] == 4

    # The input store is never modified; the run's store names it as parent.
    np.testing.assert_array_equal(store_labels(prepared["pseudo"]), before)
    store_manifest = load_artifact(result.path / "pseudo", PSEUDO_LABELS)
    parent_id = load_artifact(prepared["pseudo"], PSEUDO_LABELS).id
    assert store_manifest.inputs["parent"].id == parent_id
    # Offline updates ran from iteration 2 (offline_start) and their counts are recorded.
    changes = manifest.summary["offline_changes"]
    assert set(changes) == {"kept", "added", "dropped"} and sum(changes.values()) > 0
    assert not (result.path / "snapshots").exists()

    records = [json.loads(line) for line in (result.path / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("loss/source_ce", "loss/offline_sce", "loss/consistency", "loss/online_ce",
                "loss/online_entropy", "loss/online_kld", "alpha", "beta", "lr",
                "online/thresholds", "online/coverage", "online/offline_agreement",
                "offline/crop_coverage", "offline/added", "offline/kept", "offline/dropped"):
        assert key in last, key
    assert len(last["online/thresholds"]) == 19


def assert_same_runs(a: Path, b: Path) -> None:
    """Two self-train runs ended with the same student and teacher, and the same store labels."""
    first, second = load_torch(a / "model.pt"), load_torch(b / "model.pt")
    for part in ("student", "teacher"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), f"{part}.{key}"
    np.testing.assert_array_equal(store_labels(a / "pseudo"), store_labels(b / "pseudo"))


class InterruptAt(Reporter):
    """Raise KeyboardInterrupt once the training task reaches `iteration` (a Ctrl-C)."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def task(self, description, total, completed=0, log_every=0) -> Task:
        task = super().task(description, total, completed, log_every)
        original = task.advance
        limit = self.iteration

        def advance(steps: int = 1, **fields) -> None:
            original(steps, **fields)
            if description == "self-train" and task.completed >= limit:
                raise KeyboardInterrupt

        task.advance = advance  # type: ignore[method-assign]
        return task


def test_resume_after_interrupt_is_bit_identical(prepared, tmp_path) -> None:
    config = tiny(self_train__iterations=6, self_train__checkpoint_every=2)
    args = (config, prepared["data"], prepared["checkpoint"], prepared["pseudo"])
    straight = self_train.run(*args, tmp_path / "straight", device="cpu")

    # Interrupted at iteration 3: the checkpoint at 2 is kept, with the store as it was then.
    with pytest.raises(KeyboardInterrupt):
        self_train.run(*args, tmp_path / "resumed", device="cpu", reporter=InterruptAt(3))
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    with pytest.raises(DudaError, match="--resume"):
        self_train.run(*args, tmp_path / "resumed", device="cpu")
    resumed = self_train.run(*args, tmp_path / "resumed", device="cpu", resume=True)

    assert_same_runs(straight.path, resumed.path)
    assert straight.manifest.summary["offline_changes"] == resumed.manifest.summary[
        "offline_changes"]


def test_offline_only_ablation_skips_the_teacher(prepared, tmp_path) -> None:
    config = tiny(self_train__loss={"consistency": 0.0, "online": 0.0, "online_entropy": 0.0,
                                    "online_kld": 0.0},
                  self_train__offline_start=1000)
    result = self_train.run(config, prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                            tmp_path / "offline_only", device="cpu")
    last = json.loads((result.path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss/offline_sce" in last and "loss/online_ce" not in last
    assert result.manifest.summary["offline_changes"] == {"kept": 0, "added": 0, "dropped": 0}
    np.testing.assert_array_equal(store_labels(result.path / "pseudo"),
                                  store_labels(prepared["pseudo"]))


def test_self_train_refuses_a_store_of_another_index(prepared, tmp_path) -> None:
    other = make_index(tmp_path / "other", seed=5)
    result = runner.invoke(app, ["self-train", "-c", str(_config_file(tmp_path)), "--data",
                                 str(other), "--checkpoint", str(prepared["checkpoint"]),
                                 "--pseudo", str(prepared["pseudo"]), "--out",
                                 str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "was made for dataset index" in result.stderr
    assert not (tmp_path / "run").exists()


def _config_file(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    return path


def test_evaluate_reproduces_the_runs_last_periodic_evaluation(prepared, tmp_path) -> None:
    from stages import evaluate

    config = tiny(self_train__iterations=4, self_train__eval_every=4,
                  self_train__recalibrate_batches=2, self_train__target_batch_size=2,
                  evaluate__recalibration={"enabled": True, "batches": 2, "batch_size": 2},
                  evaluate__inference={"batch_size": 1, "num_workers": 0})
    run = self_train.run(config, prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                         tmp_path / "run", device="cpu").path
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if "val/miou" in line][-1]
    assert logged["iteration"] == 4
    report = evaluate.run(config, prepared["data"], run, tmp_path / "eval", device="cpu")
    assert report.manifest.summary["miou"] == pytest.approx(logged["val/miou"], abs=1e-6)
    # The recalibration protocol shapes the outputs (so the check above can fail): other crops
    # give other BN statistics and other confidences.
    confidences = []
    for name, batches, batch_size in (("same", 2, 2), ("other", 1, 1)):
        variant = tiny(evaluate__recalibration={"enabled": True, "batches": batches,
                                                "batch_size": batch_size},
                       evaluate__inference={"batch_size": 1, "num_workers": 0},
                       evaluate__save_predictions=["confidence"])
        path = evaluate.run(variant, prepared["data"], run, tmp_path / name, device="cpu").path
        confidences.append((path / "predictions" / "confidence" / "target_val_0000.png")
                           .read_bytes())
    assert confidences[0] != confidences[1]


class Messages(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_the_student_as_teacher_ablation_saves_no_teacher(prepared, tmp_path) -> None:
    config = tiny(self_train__teacher={"name": "student"})
    result = self_train.run(config, prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                            tmp_path / "run", device="cpu")
    model = load_torch(result.path / "model.pt")
    assert model["teacher"] is None and result.manifest.summary["teacher"] == "student"
    assert sum(result.manifest.summary["offline_changes"].values()) > 0  # from the student
    mean = self_train.run(tiny(), prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                          tmp_path / "mean", device="cpu")
    assert not all(torch.equal(a, b) for a, b in zip(
        model["student"].values(), load_torch(mean.path / "model.pt")["student"].values()))


def test_offline_update_false_never_rewrites_the_stored_labels(prepared, tmp_path) -> None:
    result = self_train.run(tiny(self_train__offline_update=False), prepared["data"],
                            prepared["checkpoint"], prepared["pseudo"], tmp_path / "run",
                            device="cpu")
    assert result.manifest.summary["offline_changes"] == {"kept": 0, "added": 0, "dropped": 0}
    np.testing.assert_array_equal(store_labels(result.path / "pseudo"),
                                  store_labels(prepared["pseudo"]))


def test_the_step_batch_is_the_configs_whatever_the_launch(prepared, tmp_path) -> None:
    messages = Messages()
    config = tiny(self_train__source_batch_size=4, self_train__target_batch_size=4,
                  self_train__gradient_accumulation=2)
    result = self_train.run(config, prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                            tmp_path / "run", device="cpu", reporter=messages)
    assert result.manifest.summary["batch"] == {
        "source_per_step": 4, "target_per_step": 4, "processes": 1, "micro_batches": 2,
        "source_per_process": 2, "target_per_process": 2}
    assert any("4 source + 4 target crops per step: 2 + 2 per process in 2 micro-batch(es)"
               in line for line in messages.lines)
    # The step's batch changes training: a run with another one is not up to date.
    other = self_train.run(tiny(), prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                           tmp_path / "other", device="cpu")
    assert other.manifest.config_hash != result.manifest.config_hash


def test_a_batch_the_micro_batches_cannot_share_is_refused(prepared, tmp_path) -> None:
    config = tiny(self_train__target_batch_size=3, self_train__gradient_accumulation=2)
    with pytest.raises(DudaError, match=r"self_train.target_batch_size is 3 crops per step.*"
                                        r"1 process\(es\) × 2 micro-batch"):
        self_train.run(config, prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                       tmp_path / "run", device="cpu")


def test_the_old_reference_batch_key_names_its_replacement(tmp_path) -> None:
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["self_train"]["reference_batch"] = [4, 4]
    path = tmp_path / "old.yaml"
    path.write_text(json.dumps(raw))
    result = CliRunner().invoke(app, ["config", "show", "-c", str(path)])
    assert result.exit_code == 2
    assert "'self_train.reference_batch' is now 'self_train.source_batch_size" in result.stderr


def test_prefetching_changes_nothing_over_several_target_epochs(prepared, tmp_path) -> None:
    # 6 target images in batches of 2: an epoch is 3 steps, so 9 steps are 3 epochs, and the
    # offline update from step 1 rewrites images the next epoch reads again at its start.
    results = {}
    for prefetch in (True, False):
        config = tiny(self_train__iterations=9, self_train__offline_start=1,
                      self_train__checkpoint_every=4,
                      self_train__runtime={"num_workers": 0, "prefetch": prefetch})
        results[prefetch] = self_train.run(config, prepared["data"], prepared["checkpoint"],
                                           prepared["pseudo"], tmp_path / f"run-{prefetch}",
                                           device="cpu").path
    assert_same_runs(results[True], results[False])
    levels = [np.stack([open_store(results[p] / "pseudo").read_levels(i) for i in range(6)])
              for p in (True, False)]
    np.testing.assert_array_equal(*levels)
    assert (store_labels(results[True] / "pseudo") != store_labels(prepared["pseudo"])).any()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_label_quality_is_logged_against_the_ground_truth(prepared, tmp_path) -> None:
    # A store holding the ground truth itself: every offline label it gives is right.
    from stages import pseudo
    from stages.data.index import load_dataset_index

    folder = tmp_path / "truth"
    folder.mkdir()
    for sample in load_dataset_index(prepared["data"]).samples("target", "train"):
        shutil.copy(sample.label, folder / f"{sample.id}.png")
    truth = pseudo.run(folder, prepared["data"], tmp_path / "truth_store").path
    config = tiny(self_train__offline_start=1000)
    result = self_train.run(config, prepared["data"], prepared["checkpoint"], truth,
                            tmp_path / "run", device="cpu")
    records = _records(result.path)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["offline/label_accuracy"] == 1.0
        assert record["offline/label_coverage"] == 1.0
        per_class = record["offline/class_accuracy"]
        assert len(per_class) == 19 and {a for a in per_class if a is not None} == {1.0}
        assert 0.0 <= record["online/label_accuracy"] <= 1.0
        assert 0.0 <= record["online/label_coverage"] <= 1.0
        assert len(record["online/class_coverage"]) == 19


def test_logging_changes_no_weight_and_no_artifact_hash(prepared, tmp_path) -> None:
    runs = {}
    for on in (False, True):
        config = tiny(logging={"label_quality": on, "tensorboard": on})
        runs[on] = self_train.run(config, prepared["data"], prepared["checkpoint"],
                                  prepared["pseudo"], tmp_path / f"run-{on}", device="cpu").path
    assert_same_runs(runs[True], runs[False])
    assert "offline/label_accuracy" in _records(runs[True])[-1]
    assert "offline/label_accuracy" not in _records(runs[False])[-1]
    assert not (runs[False] / "tensorboard").exists()
    # Switching logging on does not make the finished run out of date.
    again = self_train.run(tiny(logging={"tensorboard": True}), prepared["data"],
                           prepared["checkpoint"], prepared["pseudo"], runs[False], device="cpu")
    assert again.up_to_date


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_events_match_the_metrics_across_a_resume(prepared, tmp_path) -> None:
    def config(label_quality: bool):
        return tiny(self_train__iterations=6, self_train__checkpoint_every=2,
                    logging={"tensorboard": True, "label_quality": label_quality})

    inputs = (prepared["data"], prepared["checkpoint"], prepared["pseudo"])
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # after logging step 3, checkpoint at 2
        self_train.run(config(False), *inputs, out, device="cpu", reporter=InterruptAt(3))
    # Another logging setting does not refuse the resume.
    self_train.run(config(True), *inputs, out, device="cpu", resume=True)

    scalars = _scalars(out / "tensorboard")
    records = _records(out)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss/source_ce", "loss/offline_sce", "lr", "alpha", "online/coverage",
                "online/label_accuracy"):
        logged = [(r["iteration"], r[key]) for r in records if key in r]
        assert [step for step, _ in scalars[key]] == [step for step, _ in logged], key
        np.testing.assert_allclose([v for _, v in scalars[key]], [v for _, v in logged],
                                   rtol=1e-6, err_msg=key)
    # logged from the resume at the checkpoint (iteration 2) on
    assert [step for step, _ in scalars["online/label_accuracy"]] == [3, 4, 5, 6]
    # Per-class lists become one scalar per class, named by the class.
    assert [step for step, _ in scalars["online/thresholds/road"]] == [1, 2, 3, 4, 5, 6]


def test_change_counts_saved_before_a_category_existed_resume_with_zeros() -> None:
    # A train state written when the offline update counted only some categories: the
    # missing one counted nothing, and the run goes on counting it from there.
    changes = OfflineChanges(3)
    changes.load_state_dict({"kept": [4, 0, 1], "dropped": [0, 2, 0]})
    assert changes.per_class() == {"kept": [4, 0, 1], "added": [0, 0, 0], "dropped": [0, 2, 0]}
    changes.add({"kept": np.array([1, 1, 1]), "added": np.array([0, 3, 0]),
                 "dropped": np.array([0, 0, 1])})
    assert changes.totals() == {"kept": 8, "added": 3, "dropped": 3}
    assert list(changes.state_dict()) == list(CHANGES)


@pytest.mark.parametrize("state, message", [
    ({"kept": [1, 2, 3], "added": [0, 0, 0], "dropped": [0, 0, 0], "relabelled": [1, 0, 0]},
     "counts offline changes this version of duda does not know (relabelled)"),
    ({"kept": [1, 2], "added": [0, 0], "dropped": [0, 0]},
     "for another number of classes than the run's 3"),
    ([1, 2, 3], "records its offline change counts as list"),
])
def test_change_counts_a_resume_cannot_use_are_one_message(state, message) -> None:
    with pytest.raises(DudaError, match=re.escape(message)) as raised:
        OfflineChanges(3).load_state_dict(state)
    assert "train_state.pt" in raised.value.message and "--force" in raised.value.fix


def test_the_cli_table_shows_a_category_an_older_run_did_not_count_as_zero(tmp_path) -> None:
    older = {"iteration": 40, "teacher": "mean", "offline_changes": {"kept": 9, "dropped": 4}}
    console = Console(file=io.StringIO(), width=120)

    console.print(self_train_command._table(tmp_path / "run", older))

    text = console.file.getvalue()
    for key, value in (("kept", 9), ("added", 0), ("dropped", 4)):
        assert re.search(rf"offline update: pixels {key}\W+{value}\b", text), text
