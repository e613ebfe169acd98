"""Each command hands its options to its stage's `run()` (monkeypatched: nothing trains) and
prints the `--json` object every command shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import stages
from duda_cli.app import app
from stages.artifacts.manifest import Environment, Manifest, StageResult

runner = CliRunner()


def fake_result(path: Path, summary: dict[str, Any] | None = None) -> StageResult:
    manifest = Manifest(schema="duda.checkpoint/1", id="0123456789abcdef",
                        created="2026-01-01T00:00:00+00:00", stage="fake", config={},
                        config_hash="h", environment=Environment(python="3", packages={},
                                                                 device="cpu"),
                        summary=summary or {"miou": 0.5})
    return StageResult(Path(path), manifest)


@pytest.fixture
def calls(monkeypatch) -> dict[str, dict[str, Any]]:
    """Replace every stage's run() by a recorder of its arguments."""
    recorded: dict[str, dict[str, Any]] = {}

    def recorder(name: str, out_argument: int):
        def run(*args, **kwargs):
            recorded[name] = {"args": args, "kwargs": kwargs}
            return fake_result(args[out_argument])
        return run

    import stages.evaluate
    import stages.generate_pseudo
    import stages.prepare_data
    import stages.pseudo
    import stages.self_train
    import stages.update_offline
    import stages.warmup

    for module, out_argument in ((stages.prepare_data, 1), (stages.warmup, 2),
                                 (stages.generate_pseudo, 3), (stages.self_train, 4),
                                 (stages.update_offline, 4), (stages.evaluate, 3),
                                 (stages.pseudo, 2)):
        monkeypatch.setattr(module, "run", recorder(module.__name__.split(".")[-1],
                                                    out_argument))
    return recorded


def invoke(*arguments: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in arguments])


def test_warmup_options_reach_run(calls, tiny_config_file, tmp_path) -> None:
    result = invoke("warmup", "-c", tiny_config_file, "--data", tmp_path / "d", "--init",
                    tmp_path / "w.pt", "--out", tmp_path / "o", "--resume", "--force",
                    "--device", "cpu", "--seed", "7", "--set", "warmup.iterations=9", "--json")
    assert result.exit_code == 0, result.output
    args, kwargs = calls["warmup"]["args"], calls["warmup"]["kwargs"]
    config = args[0]
    assert (config.seed, config.warmup.iterations) == (7, 9)
    assert args[1:] == (tmp_path / "d", tmp_path / "o")
    assert kwargs["init"] == tmp_path / "w.pt"
    assert (kwargs["resume"], kwargs["force"], kwargs["device"]) == (True, True, "cpu")
    assert json.loads(result.stdout) == {"artifact": str(tmp_path / "o"),
                                         "up_to_date": False, "summary": {"miou": 0.5}}


def test_defaults_name_the_artifacts_as_duda_run_does(calls, tiny_config_file) -> None:
    assert invoke("self-train", "-c", tiny_config_file, "--checkpoint", "c", "--pseudo",
                  "p").exit_code == 0
    args = calls["self_train"]["args"]
    assert args[1] == Path("runs/tiny/data") and args[4] == Path("runs/tiny/round1")
    assert invoke("update-offline", "-c", tiny_config_file, "--checkpoint", "c", "--pseudo",
                  "p").exit_code == 0
    assert calls["update_offline"]["args"][4] == Path("runs/tiny/round1_offline")
    assert invoke("generate-pseudo", "-c", tiny_config_file, "--checkpoint",
                  "c").exit_code == 0
    assert calls["generate_pseudo"]["args"][3] == Path("runs/tiny/pseudo")


@pytest.mark.parametrize("command, name, extra", [
    ("generate-pseudo", "generate_pseudo", ["--checkpoint", "a", "--checkpoint", "b"]),
    ("self-train", "self_train", ["--checkpoint", "a", "--pseudo", "p", "--resume"]),
    ("update-offline", "update_offline", ["--checkpoint", "a", "--pseudo", "p"]),
    ("evaluate", "evaluate", ["--checkpoint", "a"]),
])
def test_stage_options_reach_run(calls, tiny_config_file, tmp_path, command, name,
                                 extra) -> None:
    result = invoke(command, "-c", tiny_config_file, "--data", tmp_path / "d", "--out",
                    tmp_path / "o", "--force", "--device", "cpu", "--json", *extra)
    assert result.exit_code == 0, result.output
    args, kwargs = calls[name]["args"], calls[name]["kwargs"]
    assert args[1] == tmp_path / "d" and args[-1] == tmp_path / "o"
    assert (kwargs["force"], kwargs["device"]) == (True, "cpu")
    if command == "generate-pseudo":
        assert args[2] == [Path("a"), Path("b")]
    if command == "self-train":
        assert kwargs["resume"] is True and args[2:4] == (Path("a"), Path("p"))
    assert json.loads(result.stdout)["artifact"] == str(tmp_path / "o")


def test_prepare_data_and_pseudo_import(calls, tiny_config_file, tmp_path) -> None:
    result = invoke("prepare-data", "-c", tiny_config_file, "--out", tmp_path / "d", "--json")
    assert result.exit_code == 0, result.output
    assert calls["prepare_data"]["args"][1] == tmp_path / "d"
    result = invoke("pseudo", "import", tmp_path / "labels", "--data", tmp_path / "d",
                    "--out", tmp_path / "s", "--force", "--json")
    assert result.exit_code == 0, result.output
    args, kwargs = calls["pseudo"]["args"], calls["pseudo"]["kwargs"]
    assert args == (tmp_path / "labels", tmp_path / "d", tmp_path / "s") and kwargs["force"]
    assert json.loads(result.stdout)["summary"] == {"miou": 0.5}


def test_quiet_prints_nothing_and_human_output_names_the_artifact(calls, tiny_config_file,
                                                                   tmp_path) -> None:
    quiet = invoke("evaluate", "-c", tiny_config_file, "--checkpoint", "a", "--out",
                   tmp_path / "o", "--quiet")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    loud = invoke("evaluate", "-c", tiny_config_file, "--checkpoint", "a", "--out",
                  tmp_path / "o")
    assert f"wrote evaluation: {tmp_path / 'o'}" in loud.stderr and loud.stdout == ""


def test_run_options_reach_the_pipeline(monkeypatch, tiny_config_file, tmp_path) -> None:
    import stages.pipeline

    seen: dict[str, Any] = {}

    def pipeline_run(config, root, **kwargs):
        seen.update(config=config, root=root, **kwargs)
        result = fake_result(root / "evaluate", {"miou": 0.5, "miou_by_protocol": {"19": 0.5},
                                                 "per_class": {}})
        return stages.pipeline.PipelineResult({"evaluate_warmup": result,
                                               "evaluate_adabn": result, "evaluate": result})

    monkeypatch.setattr(stages.pipeline, "run", pipeline_run)
    result = invoke("run", "-c", tiny_config_file, "--out", tmp_path / "r", "--init",
                    tmp_path / "w.pt", "--force", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert seen["root"] == tmp_path / "r" and seen["init"] == tmp_path / "w.pt"
    assert (seen["force"], seen["device"]) == (True, "cpu")
    output = json.loads(result.stdout)
    assert output["artifact"] == str(tmp_path / "r" / "evaluate")


def test_a_config_error_is_exit_2_naming_the_key(tiny_config_file) -> None:
    result = invoke("warmup", "-c", tiny_config_file, "--set", "warmup.iterationz=3")
    assert result.exit_code == 2
    assert "unknown key 'warmup.iterationz'" in result.stderr
    assert "from --set 'warmup.iterationz=3'" in result.stderr


def test_every_command_has_help() -> None:
    for command in ("prepare-data", "warmup", "generate-pseudo", "self-train", "update-offline",
                    "evaluate", "run", "report", "pseudo", "config"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout, command
    assert stages.__version__
