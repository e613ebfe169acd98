"""The warmup stage and `duda warmup`: artifacts, exact resume, refusals, adversarial warmup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from duda_cli.app import app
from stages import warmup
from stages.artifacts.checkpoint import load_torch
from stages.artifacts.manifest import read_manifest
from stages.config import Config, apply_overrides, load_config
from stages.nn.discriminator import OutputDiscriminator, adversarial_loss, discriminator_loss
from stages.nn.model import build_model
from stages.runtime.errors import DudaError
from stages.runtime.progress import Reporter, Task
from stages.runtime.seeding import seed_everything
from tests.conftest import TINY_CONFIG, make_index


class Interrupt(Exception):
    """Stands for Ctrl-C in the middle of a run."""


class InterruptingReporter(Reporter):
    """Raises after `after` iterations, as an interrupted run would stop."""

    def __init__(self, after: int) -> None:
        self.after = after

    def task(self, description, total, completed=0, log_every=0) -> Task:
        reporter = self

        class _Task(Task):
            def advance(self, steps=1, **fields):
                super().advance(steps, **fields)
                if self.completed >= reporter.after:
                    raise Interrupt

        return _Task(description, total, completed, log_every)


def _config(adversarial: bool = False, **warmup_overrides) -> Config:
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["warmup"].update(warmup_overrides)
    if adversarial:
        raw["warmup"]["adversarial"] = {"enabled": True, "weight": 0.1}
        raw["input"]["crop_size"] = [32, 64]  # the discriminator needs at least 31 pixels
    return Config.model_validate(raw)


def _tensors(data, prefix=""):
    """Every tensor in a nested dict/list, by path."""
    if isinstance(data, torch.Tensor):
        return {prefix: data}
    items = data.items() if isinstance(data, dict) else enumerate(data) \
        if isinstance(data, list | tuple) else []
    found = {}
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}"))
    return found


def assert_same_checkpoints(straight: Path, resumed: Path) -> None:
    """Every tensor of `model.pt` and `train_state.pt` equal in two runs (bit for bit)."""
    for name in ("model.pt", "train_state.pt"):
        expected, got = _tensors(load_torch(straight / name)), _tensors(load_torch(resumed / name))
        assert expected.keys() == got.keys() and len(expected) > 10
        assert [key for key in expected if not torch.equal(expected[key], got[key])] == []


def _invoke(*args: str):
    return CliRunner().invoke(app, ["warmup", *args, "--device", "cpu"])


def test_warmup_writes_the_checkpoint_artifact(tiny_index, tmp_path):
    result = warmup.run(_config(), tiny_index, tmp_path / "w", device="cpu")
    out = result.path
    assert {p.name for p in out.iterdir()} == {".duda-artifact", "manifest.json", "model.pt",
                                               "train_state.pt", "metrics.jsonl"}
    manifest = read_manifest(out)
    assert manifest.kind == "duda.checkpoint" and manifest.stage == "warmup"
    assert manifest.inputs["data"].path == str(tiny_index.resolve())
    summary = manifest.summary
    assert summary["iteration"] == 4 and summary["backbone"] == "resnet18"
    assert summary["num_classes"] == 19
    model = load_torch(out / "model.pt")
    assert model["teacher"] is None and model["iteration"] == 4
    assert len(model["class_names"]) == 19 and model["model_config"]["width_multiplier"] == 0.25
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4]
    assert set(lines[0]) == {"iteration", "loss/source_ce", "lr"}
    # Linear warmup from 0.2·lr (docs/method.md#optimisation), then poly decay.
    assert lines[0]["lr"] == pytest.approx(0.2 * 0.01)
    assert lines[1]["lr"] == pytest.approx(0.01 * (1 - 1 / 4) ** 0.9)
    assert summary["final_loss"]["loss/source_ce"] == pytest.approx(lines[-1]["loss/source_ce"])
    # The source CE falls on a tiny set of flat-coloured scenes.
    assert lines[-1]["loss/source_ce"] < lines[0]["loss/source_ce"]


@pytest.mark.parametrize("adversarial", [False, True])
def test_resume_reaches_bit_identical_weights(tiny_index, tmp_path, adversarial):
    config = _config(adversarial)
    straight = warmup.run(config, tiny_index, tmp_path / "straight", device="cpu").path
    # Interrupted after iteration 3: the last checkpoint is at 2, iteration 3 was logged.
    with pytest.raises(Interrupt):
        warmup.run(config, tiny_index, tmp_path / "resumed", device="cpu",
                   reporter=InterruptingReporter(after=3))
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert load_torch(tmp_path / "resumed" / "train_state.pt")["progress"]["iteration"] == 2
    resumed = warmup.run(config, tiny_index, tmp_path / "resumed", resume=True,
                         device="cpu").path
    assert_same_checkpoints(straight, resumed)
    if adversarial:
        assert "/discriminator/classifier.weight" in _tensors(
            load_torch(resumed / "train_state.pt"))
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert read_manifest(resumed).id == read_manifest(straight).id


def test_adversarial_step_trains_the_discriminator(tiny_index, tmp_path):
    config = _config(adversarial=True, iterations=1, checkpoint_every=1)
    out = warmup.run(config, tiny_index, tmp_path / "w", device="cpu").path
    # The discriminator as initialised in the stage: same seed, built after the model.
    seed_everything(config.seed)
    build_model(config.model, 19)
    initial = OutputDiscriminator(19).state_dict()
    trained = load_torch(out / "train_state.pt")["discriminator"]
    assert any(not torch.equal(initial[key], trained[key]) for key in initial)
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(line) == {"iteration", "loss/source_ce", "loss/adv", "loss/discriminator", "lr"}
    assert read_manifest(out).summary["adversarial"] is True


def test_adversarial_warmup_refuses_crops_too_small_for_the_discriminator(tiny_index, tmp_path):
    raw = json.loads(json.dumps(TINY_CONFIG))
    raw["warmup"]["adversarial"] = {"enabled": True}
    with pytest.raises(DudaError, match=r"input.crop_size \[24, 48\] is too small"):
        warmup.run(Config.model_validate(raw), tiny_index, tmp_path / "w", device="cpu")
    assert not (tmp_path / "w").exists()


def test_discriminator_architecture_and_losses():
    discriminator = OutputDiscriminator(19)
    kernels = [m.kernel_size for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert kernels == [(3, 3)] + [(4, 4)] * 4  # docs/method.md#the-warmup
    scores = discriminator(torch.softmax(torch.randn(2, 19, 64, 128), 1))
    assert scores.shape == (2, 1, 2, 4)
    zeros, ones = torch.zeros(2, 1, 2, 4), torch.ones(2, 1, 2, 4)
    assert discriminator_loss(zeros, ones).item() == 0.0
    assert discriminator_loss(ones, zeros).item() == 1.0
    assert adversarial_loss(ones).item() == 1.0 and adversarial_loss(zeros).item() == 0.0


def test_periodic_evaluation_keeps_the_best_checkpoint(tiny_index, tmp_path):
    out = warmup.run(_config(eval_every=2), tiny_index, tmp_path / "w", device="cpu").path
    summary = read_manifest(out).summary
    assert 0.0 <= summary["miou_last"] <= summary["miou_best"] <= 1.0
    assert summary["best_iteration"] in (2, 4)
    assert summary["best_protocol"] == ("target-val mIoU-19 (model selection on the "
                                        "evaluation split)")
    assert load_torch(out / "best.pt")["iteration"] == summary["best_iteration"]
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "val/miou" in line]
    assert [e["iteration"] for e in evaluations] == [2, 4]
    assert evaluations[-1]["val/miou"] == pytest.approx(summary["miou_last"])


def test_cli_prints_the_path_and_is_up_to_date_on_rerun(tiny_index, tiny_config_file, tmp_path):
    out = tmp_path / "w"
    args = ["-c", str(tiny_config_file), "--data", str(tiny_index), "--out", str(out)]
    first = _invoke(*args, "--json")
    assert first.exit_code == 0, first.output
    payload = json.loads(first.stdout)
    assert payload["artifact"] == str(out) and payload["up_to_date"] is False
    assert payload["summary"]["iteration"] == 4
    again = _invoke(*args)
    assert again.exit_code == 0
    assert "up to date" in again.stderr and str(out) in again.stderr


def test_cli_set_and_seed_reach_the_stage(tiny_index, tiny_config_file, tmp_path):
    out = tmp_path / "w"
    result = _invoke("-c", str(tiny_config_file), "--data", str(tiny_index), "--out", str(out),
                     "--set", "warmup.iterations=2", "--seed", "5", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.summary["iteration"] == 2 and manifest.config["seed"] == 5


def _interrupted_run(tiny_index, out: Path) -> None:
    with pytest.raises(Interrupt):
        warmup.run(_config(), tiny_index, out, device="cpu", reporter=InterruptingReporter(3))


def test_resume_with_a_changed_config_names_the_fields(tiny_index, tiny_config_file, tmp_path):
    out = tmp_path / "w"
    _interrupted_run(tiny_index, out)
    result = _invoke("-c", str(tiny_config_file), "--data", str(tiny_index), "--out", str(out),
                     "--resume", "--set", "warmup.optimizer.lr=0.02",
                     "--set", "input.flip_probability=0.0")
    assert result.exit_code == 2
    assert "warmup.optimizer.lr: 0.01 -> 0.02" in result.stderr
    assert "input.flip_probability: 0.5 -> 0.0" in result.stderr
    assert "--force" in result.stderr
    assert (out / "train_state.pt").is_file()  # the refused resume keeps the checkpoint


def test_unfinished_run_without_resume_is_refused(tiny_index, tiny_config_file, tmp_path):
    out = tmp_path / "w"
    _interrupted_run(tiny_index, out)
    args = ["-c", str(tiny_config_file), "--data", str(tiny_index), "--out", str(out)]
    refused = _invoke(*args)
    assert refused.exit_code == 2
    assert "unfinished warmup run" in refused.stderr and "--resume" in refused.stderr
    resumed = _invoke(*args, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["summary"]["iteration"] == 4


def test_init_weights_from_a_checkpoint_artifact(tiny_index, tmp_path):
    first = warmup.run(_config(), tiny_index, tmp_path / "first", device="cpu")
    second = warmup.run(_config(), tiny_index, tmp_path / "second", init=first.path,
                        device="cpu")
    assert second.manifest.inputs["init"].id == first.manifest.id
    assert second.manifest.summary["init"]["weights"] == str(first.path.resolve())
    assert second.manifest.config["model"]["init"] == str(first.path.resolve())
    assert "tensors" in second.manifest.summary["init"]["loaded"]

    def first_loss(path):
        return json.loads((path / "metrics.jsonl").read_text().splitlines()[0])["loss/source_ce"]

    # Starting from trained weights, the first loss is already below the fresh start's.
    assert first_loss(second.path) < first_loss(first.path) - 0.5


def test_missing_init_weights_are_a_user_error(tiny_index, tiny_config_file, tmp_path):
    result = _invoke("-c", str(tiny_config_file), "--data", str(tiny_index),
                     "--out", str(tmp_path / "w"), "--init", str(tmp_path / "nope.pth"))
    assert result.exit_code == 2
    assert "nope.pth" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "w").exists()


def test_init_is_part_of_the_config_and_resolved_against_the_working_directory(
        tiny_index, tmp_path, monkeypatch):
    first = warmup.run(_config(), tiny_index, tmp_path / "weights", device="cpu")
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(TINY_CONFIG))
    monkeypatch.chdir(tmp_path)
    config = load_config(config_file, ["model.init=weights"])
    assert config.model.init == str((tmp_path / "weights").resolve())
    result = warmup.run(config, tiny_index, tmp_path / "from_config", device="cpu")
    assert result.manifest.inputs["init"].id == first.manifest.id
    # a different init file is another run: the stage hash changes
    assert result.manifest.config_hash != first.manifest.config_hash


def test_a_paper_config_names_its_init_file_and_says_which_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(Path(__file__).parents[1] / "configs" / "gta5_to_cityscapes.yaml")
    assert config.model.style == "caffe" and config.model.normalization == "caffe_bgr"
    assert config.model.init.endswith("DeepLab_resnet_pretrained_init-f81d91e8.pth")
    index = make_index(tmp_path / "data")
    with pytest.raises(DudaError) as error:
        warmup.run(config, index, tmp_path / "w", device="cpu")
    assert "DeepLab_resnet_pretrained_init-f81d91e8.pth" in error.value.message
    assert "model.init=none" in error.value.fix
    assert not (tmp_path / "w").exists()


def test_tensorboard_events_beside_the_metrics(tiny_index, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config().model_copy(update={"logging": _config().logging.model_copy(
        update={"tensorboard": True})})
    out = warmup.run(config, tiny_index, tmp_path / "w", device="cpu").path
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = events.Scalars("loss/source_ce")
    assert [e.step for e in scalars] == [line["iteration"] for line in lines]
    assert [e.value for e in scalars] == pytest.approx([line["loss/source_ce"] for line in lines])


def test_adamw_warmup_trains_and_resumes_bit_identically(tiny_index, tmp_path):
    # DAFormer's recipe chosen on the command line's shorthand; the tiny config's own lr and
    # warm-up length merge into it.
    raw = apply_overrides(TINY_CONFIG, ["warmup.optimizer={name: adamw, warmup_start_lr: 1.0e-3}",
                                        "warmup.iterations=2", "warmup.checkpoint_every=1"])
    config = Config.model_validate(raw)
    assert config.warmup.optimizer.name == "adamw"
    straight = warmup.run(config, tiny_index, tmp_path / "straight", device="cpu").path
    lines = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    # The head's lr is logged: 10 × the backbone's absolute start, then poly with power 1.
    assert [line["lr"] for line in lines] == pytest.approx([10 * 1.0e-3, 10 * 0.01 * (1 - 1 / 2)])
    state = load_torch(straight / "train_state.pt")
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["backbone", "head"]
    assert {"exp_avg", "exp_avg_sq"} <= set(state["optimizer"]["state"][0])
    seed_everything(config.seed)  # the model as the stage initialises it
    initial = build_model(config.model, 19).state_dict()
    trained = load_torch(straight / "model.pt")["student"]
    assert not torch.equal(trained["classifier.branches.0.weight"],
                           initial["classifier.branches.0.weight"])

    # Interrupted during the second step: the checkpoint after the first is resumed.
    with pytest.raises(Interrupt):
        warmup.run(config, tiny_index, tmp_path / "resumed", device="cpu",
                   reporter=InterruptingReporter(after=2))
    assert load_torch(tmp_path / "resumed" / "train_state.pt")["progress"]["iteration"] == 1
    resumed = warmup.run(config, tiny_index, tmp_path / "resumed", resume=True,
                         device="cpu").path
    assert_same_checkpoints(straight, resumed)
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert read_manifest(resumed).id == read_manifest(straight).id
