"""Config loading: validation messages, overrides, hashing, the shipped configs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from duda_cli.app import app
from stages.config import config_hash, load_config, stage_config
from stages.errors import DudaError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
runner = CliRunner()


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    config = load_config(path, data_root="/datasets")
    assert config.experiment == path.stem
    if config.data.source.root:
        assert config.data.source.root.startswith("/datasets/")


def test_typo_names_key_file_and_allowed_keys(tmp_path, tiny_config_file) -> None:
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["warmup"]["iteratons"] = 5
    path = write(tmp_path, raw)
    with pytest.raises(DudaError) as error:
        load_config(path)
    text = str(error.value)
    assert "unknown key 'warmup.iteratons'" in text
    assert str(path) in text
    assert "iterations" in text  # the allowed keys are listed


def test_float_read_as_string_is_explained(tmp_path, tiny_config_file) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(tiny_config_file.read_text().replace("lr: 0.01", "lr: 1e-3", 1))
    assert yaml.safe_load(path.read_text())["warmup"]["optimizer"]["lr"] == "1e-3"
    with pytest.raises(DudaError) as error:
        load_config(path)
    text = str(error.value)
    assert "'warmup.optimizer.lr' must be a number, got the string '1e-3'" in text
    assert "1.0e-3" in text


def test_overrides_parse_yaml_values(tiny_config_file) -> None:
    config = load_config(tiny_config_file, ["warmup.iterations=7", "warmup.optimizer.lr=1.0e-3",
                                            "input.crop_size=[16, 32]", "seed=5"])
    assert config.warmup.iterations == 7
    assert config.warmup.optimizer.lr == pytest.approx(1e-3)
    assert config.input.crop_size == [16, 32]
    assert config.seed == 5


def test_override_without_equals_is_refused(tiny_config_file) -> None:
    with pytest.raises(DudaError, match="section.key=value"):
        load_config(tiny_config_file, ["warmup.iterations"])


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(DudaError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_stage_hash_depends_only_on_its_sections(tiny_config_file) -> None:
    base = load_config(tiny_config_file)
    other = load_config(tiny_config_file, ["evaluate.inference.flip=true"])
    assert config_hash(stage_config(base, "warmup")) == config_hash(stage_config(other, "warmup"))
    assert config_hash(stage_config(base, "evaluate")) != config_hash(
        stage_config(other, "evaluate"))


def test_config_show_and_schema_cli(tiny_config_file) -> None:
    shown = runner.invoke(app, ["config", "show", "-c", str(tiny_config_file), "--json",
                                "--set", "warmup.iterations=9"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["warmup"]["iterations"] == 9
    schema = runner.invoke(app, ["config", "schema"])
    assert "self_train" in json.loads(schema.stdout)["properties"]


def test_cli_config_typo_exits_2_without_traceback(tmp_path, tiny_config_file) -> None:
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["model"]["backbon"] = "resnet18"
    result = runner.invoke(app, ["config", "show", "-c", str(write(tmp_path, raw))])
    assert result.exit_code == 2
    assert "unknown key 'model.backbon'" in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("duda ")


def test_ctrl_c_exits_130_with_a_resume_hint(monkeypatch, tiny_config_file) -> None:
    import stages.config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.config.Config, "model_validate", interrupted)
    result = runner.invoke(app, ["config", "show", "-c", str(tiny_config_file)])
    assert result.exit_code == 130
    assert "--resume" in result.stderr and "Traceback" not in result.stderr
