"""Shared training helpers: optimizer groups and LR, RNG capture/restore, metrics, resume check."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_CONFIG, tiny

from stages.config import (
    AdamwOptimizerConfig,
    Config,
    SgdOptimizerConfig,
    apply_overrides,
    load_config,
    stage_hash,
)
from stages.engine.training import (
    MetricsLog,
    Progress,
    append_metrics,
    apply_lr_factor,
    build_optimizer,
    capture_rng_state,
    changed_fields,
    check_resume_config,
    learning_rate_factor,
    optimizer_groups,
    restore_rng_state,
    truncate_metrics,
)
from stages.runtime.errors import DudaError


def test_optimizer_is_nesterov_sgd_and_scales_each_group_from_its_base():
    backbone, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    cfg = SgdOptimizerConfig(lr=0.01, weight_decay=1.0e-4)
    optimizer = build_optimizer([{"params": [backbone], "lr": 0.001, "base_lr": 0.001},
                                 {"params": [head], "lr": 0.01, "base_lr": 0.01}], cfg)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1.0e-4, 1.0e-4]
    factor = learning_rate_factor(0, 100, cfg)
    assert factor == pytest.approx(0.2)  # docs/method.md#optimisation: linear warmup starts at 0.2
    assert apply_lr_factor(optimizer, factor) == pytest.approx(0.002)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0002, 0.002])
    apply_lr_factor(optimizer, 0.5)  # factors never compound
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0005, 0.005])


class _Named(torch.nn.Module):
    """A model with MiT-like parameter names: a backbone with norms and a position block, a
    head with a norm of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.ModuleDict({
            "patch_embed1": torch.nn.ModuleDict({"proj": torch.nn.Conv2d(3, 4, 3),
                                                 "norm": torch.nn.LayerNorm(4)}),
            "block1": torch.nn.ModuleDict({"attn": torch.nn.Linear(4, 4),
                                           "norm1": torch.nn.LayerNorm(4)}),
            "pos_block": torch.nn.Conv2d(4, 4, 3, groups=4)})
        self.classifier = torch.nn.ModuleDict({"fuse": torch.nn.Conv2d(4, 4, 1, bias=False),
                                               "norm": torch.nn.BatchNorm2d(4),
                                               "linear_pred": torch.nn.Conv2d(4, 19, 1)})


def _names(model: torch.nn.Module, group: dict) -> set[str]:
    members = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in members}


def test_adamw_groups_exempt_norms_and_position_blocks_from_decay_and_give_the_head_ten_times():
    model = _Named()
    cfg = AdamwOptimizerConfig(name="adamw")
    groups = optimizer_groups(model, cfg)
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    # DAFormer's rule by name: `norm` and `pos_block` get no decay, biases are decayed.
    assert _names(model, by_name["backbone_no_decay"]) == {
        "backbone.patch_embed1.norm.weight", "backbone.patch_embed1.norm.bias",
        "backbone.block1.norm1.weight", "backbone.block1.norm1.bias",
        "backbone.pos_block.weight", "backbone.pos_block.bias"}
    assert _names(model, by_name["backbone"]) == {
        "backbone.patch_embed1.proj.weight", "backbone.patch_embed1.proj.bias",
        "backbone.block1.attn.weight", "backbone.block1.attn.bias"}
    assert _names(model, by_name["head_no_decay"]) == {"classifier.norm.weight",
                                                       "classifier.norm.bias"}
    assert _names(model, by_name["head"]) == {"classifier.fuse.weight",
                                              "classifier.linear_pred.weight",
                                              "classifier.linear_pred.bias"}
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    assert [g["base_lr"] for g in groups] == pytest.approx([6e-5, 6e-5, 6e-4, 6e-4])

    optimizer = build_optimizer(groups, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx(
        [6e-5, 6e-5, 6e-4, 6e-4])
    # The head's lr is the largest: the one a run logs.
    assert apply_lr_factor(optimizer, 0.5) == pytest.approx(3e-4)


def test_sgd_groups_are_todays_backbone_and_head():
    model = _Named()
    groups = optimizer_groups(model, SgdOptimizerConfig())
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert [g["base_lr"] for g in groups] == pytest.approx([2e-4, 2e-3])
    assert [g["weight_decay"] for g in groups] == [2e-4, 2e-4]  # norms decayed, as before
    assert isinstance(build_optimizer(groups, SgdOptimizerConfig()), torch.optim.SGD)


def test_adamw_warms_up_from_an_absolute_lr_then_decays_linearly():
    cfg = AdamwOptimizerConfig(name="adamw")
    optimizer = build_optimizer(optimizer_groups(_Named(), cfg), cfg)
    total = 40000

    def lrs(t: int) -> list[float]:
        apply_lr_factor(optimizer, learning_rate_factor(t, total, cfg))
        return [optimizer.param_groups[0]["lr"], optimizer.param_groups[2]["lr"]]

    # The backbone starts at 1e-6 (the head at 10×) and rises linearly over 1500 steps.
    assert lrs(0) == pytest.approx([1e-6, 1e-5])
    start = 1e-6 / 6e-5
    assert lrs(1499) == pytest.approx([6e-5 * (start + (1 - start) * 1499 / 1500),
                                       6e-4 * (start + (1 - start) * 1499 / 1500)])
    # Then poly with power 1 on the global step: 1 − 1500/40000 at the end of the warm-up.
    assert lrs(1500) == pytest.approx([6e-5 * 0.9625, 6e-4 * 0.9625])
    assert lrs(39999) == pytest.approx([6e-5 / 40000, 6e-4 / 40000])
    assert lrs(40000) == [0.0, 0.0]


def test_adamw_state_resumes_from_a_weights_only_round_trip():
    def optimizer_of(model: torch.nn.Module) -> torch.optim.Optimizer:
        cfg = AdamwOptimizerConfig(name="adamw", lr=1e-3, warmup_start_lr=1e-4)
        return build_optimizer(optimizer_groups(model, cfg), cfg)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        torch.manual_seed(seed)
        optimizer.zero_grad()
        model.classifier["linear_pred"](model.backbone["patch_embed1"]["proj"](
            torch.randn(1, 3, 5, 5))).square().mean().backward()
        optimizer.step()

    torch.manual_seed(0)
    straight = _Named()
    resumed = _Named()
    resumed.load_state_dict(straight.state_dict())
    optimizer = optimizer_of(straight)
    for seed in (1, 2):
        step(straight, optimizer, seed)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    step(straight, optimizer, 3)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(state["model"])
    again = optimizer_of(resumed)
    again.load_state_dict(state["optimizer"])
    assert again.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    step(resumed, again, 3)
    for (name, expected), got in zip(straight.state_dict().items(),
                                     resumed.state_dict().values(), strict=True):
        assert torch.equal(expected, got), name


# The stage hashes of the shipped configs and the tests' tiny config, computed before the
# optimizer became a choice, from the root directory (a relative model.init resolves against the
# working directory): sgd, the variant they all hold, keeps every artifact up to date.
HASHES_BEFORE_THE_CHOICE = {
    "gta5_to_cityscapes": ("0b7f3e417188fc7c", "df770ed651c7419f"),
    "synthetic": ("1ae034373e9964b8", "874b3bed9472b040"),
    "synthetic_hard": ("1ae034373e9964b8", "9d92da10f968c665"),
    "synthia_to_cityscapes": ("d4dacb5d1c934210", "49f1b97fd00ff894"),
}
CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(HASHES_BEFORE_THE_CHOICE))
def test_shipped_configs_hash_as_before_the_optimizer_choice(name, monkeypatch):
    monkeypatch.chdir("/")
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.warmup.optimizer.name == config.self_train.optimizer.name == "sgd"
    assert (stage_hash(config, "warmup"), stage_hash(config, "self_train")) == (
        HASHES_BEFORE_THE_CHOICE[name])
    # An lr set on the command line merges into the sgd section, as it did.
    config = load_config(CONFIGS / f"{name}.yaml", ["self_train.optimizer.lr=3.0e-3"])
    assert config.self_train.optimizer.name == "sgd"
    if name == "gta5_to_cityscapes":
        assert stage_hash(config, "self_train") == "8a2d53a8709227a5"


def test_tiny_config_hashes_as_before_and_adamw_changes_the_hash():
    assert (stage_hash(tiny(), "warmup"), stage_hash(tiny(), "self_train")) == (
        "e35a0efb718ae101", "afb06693a527eaca")
    adamw = Config.model_validate(apply_overrides(TINY_CONFIG, ["warmup.optimizer=adamw"]))
    assert stage_hash(adamw, "warmup") != stage_hash(tiny(), "warmup")
    assert stage_hash(adamw, "self_train") == stage_hash(tiny(), "self_train")


def test_a_config_without_an_optimizer_section_takes_sgd_and_the_adamw_shorthand(tmp_path):
    raw = {"experiment": "x", "data": TINY_CONFIG["data"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, ["self_train.optimizer.lr=3.0e-3"])
    assert config.self_train.optimizer == SgdOptimizerConfig(lr=3.0e-3)
    assert config.warmup.optimizer == SgdOptimizerConfig(lr=2.5e-4)
    config = load_config(path, ["warmup.optimizer=adamw", "warmup.optimizer.lr=1.0e-4"])
    assert config.warmup.optimizer == AdamwOptimizerConfig(name="adamw", lr=1.0e-4)
    path.write_text(yaml.safe_dump({**raw, "self_train": {"optimizer": "adamw"}}))
    assert load_config(path).self_train.optimizer == AdamwOptimizerConfig(name="adamw")


@pytest.mark.parametrize(("overrides", "message"), [
    (["warmup.optimizer=adam"], "does not match any of the expected tags: 'sgd', 'adamw'"),
    # sgd's keys are named where they were before the choice, without the variant.
    (["warmup.optimizer.foo=1"],
     (r"unknown key 'warmup.optimizer.foo' \(from --set 'warmup.optimizer.foo=1'\); "
      "allowed keys: name, lr, backbone_lr_multiplier")),
    (["self_train.optimizer.lr=1e-3"], "'self_train.optimizer.lr' .* must be a number"),
    (["warmup.optimizer=adamw", "warmup.optimizer.momentum=0.5"],
     "unknown key 'warmup.optimizer.adamw.momentum'.*allowed keys of optimizer 'adamw'"),
    (["warmup.optimizer=adamw", "warmup.optimizer.warmup_start_lr=1.0e-3"],
     "warmup_start_lr .* must not exceed optimizer.lr"),
    (["warmup.optimizer=adamw", "warmup.optimizer.betas=[0.9]"], r"\[β1, β2\]"),
])
def test_a_bad_optimizer_setting_is_refused_naming_the_key(overrides, message):
    with pytest.raises(DudaError, match=message):
        load_config(CONFIGS / "synthetic.yaml", overrides)


def test_rng_state_survives_a_weights_only_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_metrics_lines_after_the_resume_point_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for iteration in (1, 2, 3):
        append_metrics(path, {"iteration": iteration, "loss/source_ce": 1.0 / iteration})
    truncate_metrics(path, 2)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2]


def test_resume_check_lists_every_changed_field(tmp_path):
    stored = {"seed": 0, "warmup": {"iterations": 4, "optimizer": {"lr": 0.01}}}
    current = {"seed": 0, "warmup": {"iterations": 8, "optimizer": {"lr": 0.01, "new": True}}}
    assert changed_fields(stored, current) == ["warmup.iterations: 4 -> 8",
                                               "warmup.optimizer.new: (absent) -> true"]
    check_resume_config(stored, stored, tmp_path)
    with pytest.raises(DudaError, match="warmup.iterations: 4 -> 8") as error:
        check_resume_config(stored, current, tmp_path)
    assert "--force" in error.value.fix


def test_check_finite_names_the_diverged_terms_and_the_fix() -> None:
    from stages.engine.training import check_finite

    check_finite({"loss/source_ce": 1.0, "online/offline_agreement": float("nan")}, 5,
                 "self-training", "self_train")
    with pytest.raises(DudaError) as error:
        check_finite({"loss/source_ce": float("nan"), "loss/online_ce": 0.1}, 7, "warmup",
                     "warmup")
    assert "warmup diverged at iteration 7: loss/source_ce is not finite" in str(error.value)
    assert "warmup.optimizer.lr" in str(error.value)


class Counter:
    """Any object with state_dict/load_state_dict can be an entry (a loader's position)."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def test_train_state_round_trips_every_entry(tmp_path) -> None:
    from stages.engine.training import MetricsLog, Progress, RandomState, TrainState
    from stages.runtime.distributed import Ranks

    def objects():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        progress = Progress()
        return {"model": model, "optimizer": optimizer, "loader": Counter(),
                "scaler": torch.amp.GradScaler("cuda", enabled=False), "progress": progress,
                "metrics": MetricsLog(tmp_path / "metrics.jsonl", progress, writer=True),
                "rng": RandomState(Ranks(torch.device("cpu")))}

    identity = {"config": {"seed": 0}, "inputs": {"data": "abc"}}
    saved = objects()
    saved["model"](torch.ones(4, 3)).sum().backward()
    saved["optimizer"].step()  # momentum buffers exist
    saved["loader"].position = 7
    saved["progress"].iteration = 5
    saved["progress"].record_evaluation(0.4)
    saved["metrics"].start()
    for iteration in (4, 5):
        saved["metrics"].append({"iteration": iteration})
    state = TrainState(tmp_path / "train_state.pt", "self_train", identity, saved["rng"].ranks,
                       saved)
    state.save()
    expected_draw = torch.rand(3)
    saved["metrics"].append({"iteration": 6})  # logged after the checkpoint: dropped on resume

    restored = objects()
    TrainState(tmp_path / "train_state.pt", "self_train", identity, restored["rng"].ranks,
               restored).load(tmp_path)
    assert torch.equal(restored["model"].weight, saved["model"].weight)
    momentum = restored["optimizer"].state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, saved["optimizer"].state_dict()["state"][0]["momentum_buffer"])
    assert restored["loader"].position == 7
    assert restored["progress"] == saved["progress"]
    assert (restored["progress"].miou_best, restored["progress"].best_iteration) == (0.4, 5)
    assert [json.loads(line)["iteration"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()] == [4, 5]
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved

    with pytest.raises(DudaError, match="the config differs"):
        TrainState(tmp_path / "train_state.pt", "self_train", {**identity, "config": {"seed": 1}},
                   restored["rng"].ranks, objects()).load(tmp_path)
    with pytest.raises(DudaError, match="lacks extra"):
        TrainState(tmp_path / "train_state.pt", "self_train", identity, restored["rng"].ranks,
                   {**objects(), "extra": Counter()}).load(tmp_path)


def test_a_new_run_removes_only_the_event_files_of_the_run_it_replaces(tmp_path) -> None:
    events = tmp_path / "tensorboard"
    events.mkdir()
    (events / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"old run")
    (events / "notes.txt").write_text("the user's")
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 50}\n')
    MetricsLog(tmp_path / "metrics.jsonl", Progress(), writer=True).start()
    assert [p.name for p in events.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "metrics.jsonl").exists()
