"""Shared training helpers: optimizer groups and LR, RNG capture/restore, metrics, resume check."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from stages.config import OptimizerConfig
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
    restore_rng_state,
    truncate_metrics,
)
from stages.runtime.errors import DudaError


def test_optimizer_is_nesterov_sgd_and_scales_each_group_from_its_base():
    backbone, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    cfg = OptimizerConfig(lr=0.01, weight_decay=1.0e-4)
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
