"""Config loading: validation messages, overrides, hashing, the shipped configs, the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from duda_cli.app import app
from stages.config import config_hash, load_config, parse_override, read_yaml, stage_config
from stages.runtime.errors import DudaError

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


# ------------------------------------------------------------------ files that are not a config


def test_config_not_utf8_names_file_and_fix(tmp_path, tiny_config_file) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(tiny_config_file.read_bytes() + "experiment: café\n".encode("latin-1"))
    with pytest.raises(DudaError) as error:
        load_config(path)
    assert f"config file {path} is not UTF-8 text (byte 0xe9" in str(error.value)
    assert "save it as UTF-8" in str(error.value)


def test_config_path_that_is_not_a_regular_file(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("experiment: a\n")
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    for path, said in [(tmp_path, "is a folder, not a file"),
                       (Path("/dev/null"), "is not a regular file"),
                       (tmp_path / "empty.yaml", "is empty")]:
        with pytest.raises(DudaError) as error:
            load_config(path)
        assert f"config file {path} {said}" in str(error.value)
    with pytest.raises(DudaError, match=r"in it: .*a\.yaml"):
        load_config(tmp_path)  # a folder: the fix names the YAML files inside it


@pytest.mark.parametrize("content, said", [
    (b"- warmup\n- evaluate\n", "must hold a mapping of sections, not a list"),
    (bytes(range(128, 256)), "is not UTF-8 text"),
    (b"experiment: \x00\x01\n", 'special characters are not allowed\n  in "config file'),
    (b"experiment: 2024-01-01\n", "sets 'experiment' to a YAML date"),
    (b"experiment: !!binary aGk=\n", "sets 'experiment' to a YAML bytes"),
    (b"a: 1\n---\nb: 2\n", "expected a single document"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests too deeply"),
], ids=["list", "binary", "control-character", "date", "bytes", "two-documents", "deep"])
def test_config_that_does_not_parse_names_the_file(tmp_path, content: bytes, said: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(DudaError) as error:
        load_config(path)
    assert str(path) in str(error.value) and said in str(error.value)


# -------------------------------------------------------------------- what YAML allows, refused


# Nine levels of nine aliases: 9**9 strings (gigabytes of JSON) from under 1 kB of YAML.
BILLION_LAUGHS = "experiment: lol\na0: &a0 [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
    f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]\n" for level in range(1, 9))


def test_billion_laughs_is_refused_before_any_expansion() -> None:
    started = time.monotonic()
    with pytest.raises(DudaError) as error:
        read_yaml(BILLION_LAUGHS, "config file laughs.yaml")
    assert time.monotonic() - started < 5
    assert ("config file laughs.yaml holds more than 100000 values once its YAML aliases are "
            "expanded" in str(error.value))
    with pytest.raises(DudaError, match=r"--set .* holds more than 100000 values"):
        parse_override("warmup=" + BILLION_LAUGHS.replace("\n", ", ").join("{}"))
    with pytest.raises(DudaError, match=r"has a YAML alias inside its own anchor \(the value "
                                        r"on line 2\)"):
        read_yaml("experiment: x\nloop: &loop [1, *loop]\n", "config file loop.yaml")


def test_aliases_within_the_bound_load_as_written(tmp_path, tiny_config_file) -> None:
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["data"]["target"] = raw["data"]["source"] = dict(raw["data"]["source"])
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(raw))  # PyYAML writes the shared domain as &id001 / *id001
    assert "*id001" in path.read_text()
    config = load_config(path)
    assert config.data.target == config.data.source


@pytest.mark.parametrize("text, said", [
    ("experiment: x\nwarmup:\n  iterations: 3\nmodel: {}\nwarmup:\n  iterations: 4\n",
     "gives the key 'warmup' twice (lines 2 and 5)"),
    ("experiment: x\nwarmup:\n  optimizer:\n    lr: 0.01\n    momentum: 0.9\n    lr: 0.02\n",
     "gives the key 'warmup.optimizer.lr' twice (lines 4 and 6)"),
], ids=["section", "nested"])
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text: str, said: str) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(DudaError) as error:
        load_config(path)
    assert said in str(error.value) and "keep one of them" in str(error.value)


def test_duplicate_key_in_a_set_value_names_its_columns() -> None:
    with pytest.raises(DudaError, match=r"gives the key 'lr' twice \(line 1, columns 2 and 9\)"):
        parse_override("warmup.optimizer={lr: 1, lr: 2}")


@pytest.mark.parametrize("override", ["seed=-1", "seed=4294967296",
                                      "seed=99999999999999999999999", "data.synthetic.seed=-1"])
def test_seed_out_of_range_is_refused_at_load(tiny_config_file, override: str) -> None:
    with pytest.raises(DudaError) as error:
        load_config(tiny_config_file, [override])
    assert f"from --set {override!r}" in str(error.value)


def test_largest_seed_is_accepted(tiny_config_file) -> None:
    config = load_config(tiny_config_file, ["seed=4294967295", "data.synthetic.seed=4294967295"])
    assert config.seed == 2**32 - 1 and config.data.synthetic.seed == 2**32 - 1


# --------------------------------------------------------- --set into a section left at default


@pytest.mark.parametrize("overrides, selector", [
    (["generate_pseudo.selector.portion=0.3"], {"name": "cbst", "portion": 0.3}),
    (["generate_pseudo={selector: {portion: 0.2}}"], {"name": "cbst", "portion": 0.2}),
    (["generate_pseudo.selector.name=fixed", "generate_pseudo.selector.threshold=0.5"],
     {"name": "fixed", "threshold": 0.5}),
    (["generate_pseudo.selector=fixed", "generate_pseudo.selector.threshold=0.5"],
     {"name": "fixed", "threshold": 0.5}),
], ids=["key", "mapping", "other-variant", "shorthand"])
def test_set_into_a_variant_the_config_leaves_out(tiny_config_file, overrides: list[str],
                                                  selector: dict) -> None:
    assert "selector" not in yaml.safe_load(tiny_config_file.read_text())["generate_pseudo"]
    config = load_config(tiny_config_file, overrides)
    assert config.generate_pseudo.selector.model_dump() == selector


def test_set_into_the_default_teacher(tmp_path, tiny_config_file) -> None:
    raw = yaml.safe_load(tiny_config_file.read_text())
    raw["self_train"].pop("teacher", None)
    config = load_config(write(tmp_path, raw), ["self_train.teacher.name=ema",
                                                "self_train.teacher.decay=0.99"])
    assert config.self_train.teacher.model_dump() == {"name": "ema", "decay": 0.99}
    with pytest.raises(DudaError, match="allowed keys of teacher 'mean': name"):
        load_config(write(tmp_path, raw), ["self_train.teacher.decay=0.99"])
