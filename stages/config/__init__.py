"""The experiment configuration: the whole config, loading, `--set` overrides, hashing.

One YAML per experiment (`configs/`), no inheritance; the section models live in
`stages.config.models` (and are importable from here). Errors name the file or the `--set`
override, the key and the fix; a key that moved when the config was regrouped is refused with its
new path. Each stage hashes only the sections it depends on (`STAGE_SECTIONS`), so changing the
evaluate section does not invalidate a trained checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from stages.config.models import (
    AdamwOptimizerConfig,
    AdversarialConfig,
    AlphaSchedule,
    BetaSchedule,
    CbstSelectorConfig,
    DataConfig,
    DeepLabV2Config,
    DomainConfig,
    EmaTeacherConfig,
    EvaluateConfig,
    FixedSelectorConfig,
    GeneratePseudoConfig,
    IastSelectorConfig,
    InferenceConfig,
    InputConfig,
    LossWeights,
    MeanTeacherConfig,
    MIT_ENCODERS,
    MODEL_CONFIGS,
    ModelConfig,
    OptimizerConfig,
    Precision,
    RareClassSamplingConfig,
    Recalibration,
    Schedule,
    Section,
    SegFormerConfig,
    SelectorConfig,
    SelfTrainConfig,
    SgdOptimizerConfig,
    Size,
    StudentTeacherConfig,
    SyntheticConfig,
    TrainingRuntime,
    UpdateOfflineConfig,
    WarmupConfig,
)
from stages.runtime.errors import DudaError

__all__ = [
    "STAGE_SECTIONS",
    "AdamwOptimizerConfig",
    "AdversarialConfig",
    "AlphaSchedule",
    "BetaSchedule",
    "CbstSelectorConfig",
    "Config",
    "DataConfig",
    "DeepLabV2Config",
    "DomainConfig",
    "EmaTeacherConfig",
    "EvaluateConfig",
    "FixedSelectorConfig",
    "GeneratePseudoConfig",
    "IastSelectorConfig",
    "InferenceConfig",
    "InputConfig",
    "LoggingConfig",
    "LossWeights",
    "MIT_ENCODERS",
    "MODEL_CONFIGS",
    "MeanTeacherConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "Precision",
    "RareClassSamplingConfig",
    "Recalibration",
    "Schedule",
    "Section",
    "SegFormerConfig",
    "SelectorConfig",
    "SelfTrainConfig",
    "SgdOptimizerConfig",
    "Size",
    "StudentTeacherConfig",
    "SyntheticConfig",
    "TrainingRuntime",
    "UpdateOfflineConfig",
    "WarmupConfig",
    "config_hash",
    "config_schema",
    "hashed_config",
    "load_config",
    "parse_model_config",
    "stage_config",
    "stage_hash",
]


# The range of every seed: numpy's generators refuse a negative seed and torch's one of 2**64 or
# more; 2**32 is numpy's legacy range and leaves room for the offsets the stages add to it
# (`seed + 1`, `seed + 2`) (docs/method.md#optimisation).
SEED_LIMIT = 2**32


class LoggingConfig(Section):
    """What warmup and self-train log besides `metrics.jsonl`. No stage depends on this section:
    changing it never makes an artifact out of date or refuses a resume."""

    tensorboard: bool = Field(default=False, description="also write TensorBoard event files "
                              "to <run>/tensorboard (needs the [report] extra)")
    label_quality: bool = Field(default=True, description="self-train: log the per-class "
                                "accuracy and coverage of the online and offline labels against "
                                "target-train ground truth where the index has it (never used "
                                "for training)")


class PipelineConfig(Section):
    """`duda run`: how many self-train → update-offline rounds."""

    rounds: int = Field(default=1, ge=1)


class Config(Section):
    experiment: str
    seed: int = Field(default=888, ge=0, lt=SEED_LIMIT,
                      description="seeds python, numpy and torch: 0 <= seed < 2**32")
    inference_precision: Precision = Field(
        default="fp32", description="autocast of every inference pass on GPUs: generate-pseudo, "
        "update-offline, evaluate, predict, BN recalibration and the periodic evaluation of "
        "warmup and self-train (the CPU always runs fp32)")
    data: DataConfig
    input: InputConfig = InputConfig()
    model: ModelConfig = DeepLabV2Config()
    warmup: WarmupConfig = WarmupConfig()
    generate_pseudo: GeneratePseudoConfig = GeneratePseudoConfig()
    self_train: SelfTrainConfig = SelfTrainConfig()
    update_offline: UpdateOfflineConfig = UpdateOfflineConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pipeline: PipelineConfig = PipelineConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check_mit_input(self) -> Config:
        # A MiT's stage-1 attention reduces its 1/4-size tokens by an 8×8 conv: a crop under
        # 32 pixels fails inside the encoder.
        if isinstance(self.model, SegFormerConfig) and min(self.input.crop_size) < MIT_MIN_SIZE:
            raise ValueError(f"input.crop_size {self.input.crop_size} is too small for a MiT "
                             f"encoder, which needs at least {MIT_MIN_SIZE} pixels each way "
                             "(a multiple of 32 wastes none)")
        return self


# Which sections each stage depends on: the part of the config its artifact records and hashes.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare_data": ("data",),
    "warmup": ("seed", "inference_precision", "input", "model", "warmup"),
    "generate_pseudo": ("seed", "inference_precision", "input", "generate_pseudo"),
    "self_train": ("seed", "inference_precision", "input", "model", "self_train"),
    "update_offline": ("inference_precision", "input", "update_offline"),
    "evaluate": ("seed", "inference_precision", "input", "evaluate"),
}


# Keys a stage records that do not change what it computes: they stay out of its hash and its
# resume check, so setting them never makes an artifact out of date or refuses a resume.
# Worker counts are among them: the same run resumes on a machine with other cores. A key that
# left the config stays listed while older manifests record it: `self_train.reference_batch`
# (only ever a note on the run, kept out of its hash) is in every self-train manifest written
# before it was replaced by the batch sizes per step (tests/test_config_hashing.py).
UNHASHED: dict[str, tuple[str, ...]] = {
    "prepare_data": ("data.workers",),
    "warmup": ("warmup.runtime.prefetch", "warmup.runtime.num_workers"),
    "generate_pseudo": ("generate_pseudo.inference.num_workers",),
    "self_train": ("model.init", "model.init_weights", "self_train.runtime.prefetch", "self_train.runtime.num_workers",
                   "self_train.reference_batch"),
    "update_offline": ("update_offline.inference.num_workers",),
    "evaluate": ("evaluate.inference.num_workers",),
    "predict": ("evaluate.inference.num_workers",),
}

# Keys added after artifacts were made with the behaviour of their default: a key at this value
# stays out of the hash, so adding it left every finished artifact up to date
# (docs/design.md#configuration). A key of a variant section names no variant: it applies to
# whichever variant holds it, and a variant section gaining its `name` tag lists the tag with
# today's only variant (`"model.name": "deeplabv2"`).
NEUTRAL: dict[str, Any] = {
    "inference_precision": "fp32",
    "data.headline_protocol": None,
    "self_train.gradient_accumulation": 1,
    "self_train.recalibrate_batch_size": None,
    # the optimizer choice: sgd is the optimizer of every run made before it
    # (docs/method.md#optimisation)
    # the model family: deeplabv2 is the model of every run made before the choice
    "model.name": "deeplabv2",
    "warmup.optimizer.name": "sgd",
    "self_train.optimizer.name": "sgd",
    # rare-class sampling, off unless enabled (docs/method.md#rare-class-sampling)
    "input.rare_class_sampling.enabled": False,
    "input.rare_class_sampling.temperature": 0.01,
    "input.rare_class_sampling.min_pixels": 3000,
    "input.rare_class_sampling.min_crop_ratio": 0.5,
}


MIT_MIN_SIZE = 32


class _ModelSection(Section):
    model: ModelConfig


def parse_model_config(data: Any) -> DeepLabV2Config | SegFormerConfig:
    """A recorded `model` section (a checkpoint's, a manifest's) as its family's model; one
    without a `name` is a DeepLabV2, as every section written before the choice. Raises
    pydantic's ValidationError, whose locations start with `model`."""
    return _ModelSection.model_validate({"model": data}).model


def stage_config(config: Config, stage: str) -> dict[str, Any]:
    """The JSON-ready sections of `config` that `stage` depends on (recorded in its artifact)."""
    dumped = config.model_dump(mode="json")
    return {key: dumped[key] for key in STAGE_SECTIONS[stage]}


def hashed_config(config: Config, stage: str) -> dict[str, Any]:
    """`stage_config` without the keys that do not change the stage's result: what its hash and
    its resume check compare."""
    return hashed_section(stage_config(config, stage), stage)


def hashed_section(recorded: dict[str, Any], stage: str) -> dict[str, Any]:
    """A recorded stage config (`stage_config`, as a manifest keeps it) under today's hashing
    rule: unhashed keys removed, neutral defaults removed. Applied to what an older version
    recorded, it tells whether that artifact is still up to date."""
    section = json.loads(json.dumps(recorded))
    for dotted in UNHASHED.get(stage, ()):
        _pop(section, dotted)
    for dotted, neutral in NEUTRAL.items():
        if _get(section, dotted, neutral) == neutral:
            _pop(section, dotted)
    return section


def recorded_hash(recorded: dict[str, Any], stage: str) -> str:
    """The hash of a recorded stage config under today's rule."""
    return config_hash(hashed_section(recorded, stage))


def _get(node: Any, dotted: str, default: Any) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _pop(node: Any, dotted: str) -> None:
    """Remove the key at `dotted`, and each section that removing it left empty: a section added
    whole, every key at its neutral value, then hashes as the config without it did."""
    *parents, key = dotted.split(".")
    path = [node]
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        path.append(node)
    if not isinstance(node, dict) or key not in node:
        return
    node.pop(key)
    for parent, part in zip(reversed(path[:-1]), reversed(parents)):
        if parent[part]:
            break
        del parent[part]


def config_hash(section: dict[str, Any]) -> str:
    """A short stable hash of a JSON-ready config dict."""
    text = json.dumps(section, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_hash(config: Config, stage: str) -> str:
    return config_hash(hashed_config(config, stage))


# ------------------------------------------------------------------------------ loading


def _format_validation_error(error: ValidationError, source: str,
                              overrides: list[str] | None = None) -> str:
    lines, from_file = [], False
    for item in error.errors():
        key = "'" + (".".join(str(part) for part in item["loc"]) or "(top level)") + "'"
        setting = _overridden(item["loc"], overrides or [])
        if setting is not None:
            key = f"{key} (from --set {setting!r})"
        else:
            from_file = True
        lines.append(_describe_error(item, key))
    where = f"config {source}" if from_file else "--set override"
    return f"invalid {where}:\n  " + "\n  ".join(lines)


def _describe_error(item: Any, key: str) -> str:
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key}{_allowed_keys(item['loc'])}"
    if kind in ("float_type", "int_type", "bool_type") and isinstance(item["input"], str):
        hint = ""
        if kind == "float_type":
            hint = (" (YAML reads 1e-3 as a string: write it with a dot and a signed "
                    "exponent, 1.0e-3)")
        elif kind == "bool_type":
            hint = " (write true or false)"
        expected = {"float_type": "a number", "int_type": "an integer",
                    "bool_type": "true or false"}[kind]
        return f"{key} must be {expected}, got the string {item['input']!r}{hint}"
    if kind == "missing":
        return f"missing key {key}"
    if kind == "union_tag_not_found":
        tag = item["ctx"]["discriminator"].strip("'")
        return f"{key} must say which variant it is with its '{tag}' key (got {item['input']!r})"
    return f"{key}: {item['msg']} (got {item['input']!r})"


def _allowed_keys(location: tuple[Any, ...]) -> str:
    """'; allowed keys: …' for the model holding the last key of `location` (a discriminated
    union's variant named in the location included)."""
    model: type[BaseModel] = Config
    parts = [str(part) for part in location[:-1]]
    while parts:
        part = parts.pop(0)
        field = model.model_fields.get(part)
        variants = _models_of(field.annotation) if field else []
        if len(variants) == 1:
            model = variants[0]
        elif variants and parts:  # a union: the next part is the variant's name
            name = parts.pop(0)
            chosen = [v for v in variants if _variant_name(v) == name]
            if not chosen:
                return ""
            model = chosen[0]
        elif variants and type(field.default) in variants:
            # a default variant validated without its tag in the location (the sgd optimizer)
            model = type(field.default)
        else:
            return ""
    variant = _variant_name(model)
    # pydantic names a union's variant in the location: [..., section, variant tag, key]
    owner = (f" of {location[-3]} '{variant}'" if variant and len(location) > 2
             and location[-2] == variant else "")
    return f"; allowed keys{owner}: " + ", ".join(model.model_fields)


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation names (one, or a union's members)."""
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in list(candidates):
        candidates.extend(typing.get_args(candidate))
    return [c for c in dict.fromkeys(candidates)
            if isinstance(c, type) and issubclass(c, BaseModel)]


def _variant_name(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("name")
    args = typing.get_args(field.annotation) if field else ()
    return str(args[0]) if len(args) == 1 else None


# Keys that moved when the config was regrouped: old dotted path -> new one.
MOVED_KEYS: dict[str, str] = {
    **{f"{section}.{key}": f"{section}.runtime.{key}"
       for section in ("warmup", "self_train")
       for key in ("precision", "sync_batchnorm", "num_workers")},
    **{f"self_train.alpha_{key}": f"self_train.alpha.{new}"
       for key, new in (("start", "start"), ("end", "end"), ("ramp_start", "offset"),
                        ("power", "power"))},
    **{f"self_train.beta_{key}": f"self_train.beta.{key}"
       for key in ("start", "end", "offset", "power")},
    "self_train.ema_decay": "self_train.teacher.decay (with teacher: {name: ema})",
    "self_train.reference_batch": "self_train.source_batch_size and target_batch_size, now "
                                  "the crops per step over all processes",
    **{f"generate_pseudo.{key}": f"generate_pseudo.selector.{key} (with selector: "
                                 "{name: iast})"
       for key in ("alpha", "beta", "gamma", "theta0", "group_size")},
    **{f"generate_pseudo.{key}": f"generate_pseudo.selector.{key} (with selector: "
                                 "{name: cbst})" for key in ("portion", "histogram_bins")},
    "generate_pseudo.threshold": "generate_pseudo.selector.threshold (with selector: "
                                 "{name: fixed})",
    **{f"{section}.{key}": f"{section}.inference.{key}"
       for section, keys in (
           ("generate_pseudo", ("size", "flip", "model", "batch_size", "num_workers")),
           ("update_offline", ("model", "flip", "batch_size", "num_workers")),
           ("evaluate", ("size", "sliding_window", "window", "window_overlap", "flip", "model",
                         "batch_size", "num_workers")))
       for key in keys},
    **{f"{section}.recalibrate_bn": f"{section}.recalibration.enabled"
       for section in ("generate_pseudo", "evaluate")},
    **{f"{section}.recalibrate_batches": f"{section}.recalibration.batches"
       for section in ("generate_pseudo", "evaluate")},
}


def _moved_keys(raw: dict[str, Any], source: str, overrides: list[str]) -> None:
    """Refuse keys of the flat config layout, naming each one's new path."""
    lines = []
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".", 1)
        node = raw.get(section)
        if isinstance(node, dict) and key in node:
            setting = _overridden(tuple(old.split(".")), overrides)
            where = f" (from --set {setting!r})" if setting else ""
            lines.append(f"'{old}'{where} is now '{new}'")
    if lines:
        raise DudaError(f"config {source} uses keys that have moved:\n  " + "\n  ".join(lines),
                        "write them at their new paths (`duda config show -c "
                        "configs/synthetic.yaml` shows the layout)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise DudaError(f"--set {text!r} is not of the form section.key=value",
                        "write for example --set warmup.iterations=200")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise DudaError(f"--set {text!r} has an empty key", "write --set section.key=value")
    try:
        value = read_yaml(raw, f"--set {text!r}") if raw.strip() else None
    except yaml.YAMLError as error:
        raise DudaError(f"--set {text!r}: the value is not valid YAML ({error})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config dict with every `--set` override applied.

    A mapping value merges into the section it names (`--set 'warmup.optimizer={lr: 0.1}'`
    changes only `lr`), any other value replaces the key. A variant section the config leaves
    out (the selector, the teacher) is the default variant, so a key set inside it merges into
    that variant (docs/design.md#configuration)."""
    result = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node: dict[str, Any] = result
        model: type[BaseModel] | None = Config
        for part in path[:-1]:
            child = _section(node, part, model)
            if not isinstance(child, dict):
                raise DudaError(f"--set {text!r}: '{part}' is not a section",
                                "check the key path with `duda config show`")
            node, model = child, _child_model(model, part, child)
        _merge(node, path[-1], value, model)
    return result


def _merge(node: dict[str, Any], key: str, value: Any, model: type[BaseModel] | None) -> None:
    """Set `node[key]` to `value`; a mapping merges key by key into the section there."""
    section = _section(node, key, model) if isinstance(value, dict) else None
    if not isinstance(section, dict):
        node[key] = value
        return
    child_model = _child_model(model, key, {**section, **value})
    for child_key, child_value in value.items():
        _merge(section, str(child_key), child_value, child_model)


def _section(node: dict[str, Any], key: str, model: type[BaseModel] | None) -> Any:
    """`node[key]` ready to be written into: a section the config leaves out is created (a
    variant section holding its default variant's tag), a variant's shorthand name
    (`selector: cbst`) is spelt out as the validator reads it."""
    field = model.model_fields.get(key) if model is not None else None
    tag = field.discriminator if field is not None else None
    child = node.get(key)
    if child is None:
        default = field.default if field is not None else None
        seeded = isinstance(tag, str) and isinstance(default, BaseModel)
        child = node[key] = {tag: getattr(default, tag)} if seeded else {}
    elif isinstance(tag, str) and isinstance(child, str):
        child = node[key] = {tag: child}
    return child


def _child_model(model: type[BaseModel] | None, key: str,
                 section: dict[str, Any]) -> type[BaseModel] | None:
    """The model of section `key` of `model` (for a union, the variant `section` names), or
    None where that is unknown (an unknown key, which validation then reports)."""
    field = model.model_fields.get(key) if model is not None else None
    variants = _models_of(field.annotation) if field is not None else []
    if len(variants) == 1:
        return variants[0]
    tag = field.discriminator if field is not None else None
    named = [v for v in variants if isinstance(tag, str) and _variant_name(v) == section.get(tag)]
    return named[0] if len(named) == 1 else None


def _overridden(location: tuple[Any, ...], overrides: list[str]) -> str | None:
    """The `--set` text that set the key at `location` (or a section holding it), if any."""
    keys = [str(part) for part in location]
    for text in reversed(overrides):
        path, _ = parse_override(text)
        if keys[:len(path)] == path or path[:len(keys)] == keys:
            return text
    return None


# ------------------------------------------------------------------------- reading the YAML


class _Refused(Exception):
    """A YAML document that parses but is not accepted as a config: the problem and its fix."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


# A config holds a few hundred values. YAML aliases repeat a value without writing it out, and
# the config's JSON round trip (`apply_overrides`) writes every repeat in full, so a few hundred
# bytes of nested aliases would become gigabytes: the values a document may hold once its aliases
# are expanded (docs/design.md#configuration).
MAX_CONFIG_VALUES = 100_000


def read_yaml(text: str, source: str) -> Any:
    """Parse one YAML document as `yaml.safe_load` does, refusing what would make it a
    different or unbounded config: aliases expanding past `MAX_CONFIG_VALUES` or into
    themselves, a key given twice in one mapping, values JSON cannot hold (dates, binary).
    `source` names the text in messages. Every check runs on the composed document, before a
    value is built."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as error:  # a control character, found before parsing
        error.name = source
        raise
    loader.name = source  # marks in parse errors then name the file, not "<unicode string>"
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        _refuse_duplicates(node, ())
        data = loader.construct_document(node)
        _refuse_non_json(data, ())
        return data
    except _Refused as refused:
        raise DudaError(f"{source} {refused.problem}", refused.fix) from None
    except RecursionError:
        raise DudaError(f"{source} nests too deeply to be a config",
                        "start from one of the files in configs/") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The number of values in `node` with every alias written out, counted without writing
    any out: an alias is the very node its anchor names, so each node's size is counted once."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_nodes:
        raise _Refused(f"has a YAML alias inside its own anchor (the value on line "
                       f"{node.start_mark.line + 1})", "write the value out without the alias")
    open_nodes.add(id(node))
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_CONFIG_VALUES:
        raise _Refused(f"holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are "
                       "expanded", "write the config out without nested aliases (configs/ has "
                       "complete examples)")
    sizes[id(node)] = size
    return size


def _refuse_duplicates(node: yaml.Node, path: tuple[str, ...]) -> None:
    """A key given twice in a mapping: YAML keeps the last silently, and a second `warmup:`
    section would drop every key of the first back to its default."""
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, value_node in node.value:
            mark = key_node.start_mark
            if isinstance(key_node, yaml.ScalarNode) and not key_node.tag.endswith(":merge"):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    dotted = ".".join((*path, key_node.value))
                    raise _Refused(f"gives the key '{dotted}' twice ({_places(seen[key], mark)})",
                                   "keep one of them, with every setting it needs")
                seen[key] = mark
            children.append((str(getattr(key_node, "value", "?")), value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(str(index), item) for index, item in enumerate(node.value)]
    for name, child in children:
        _refuse_duplicates(child, (*path, name))


def _places(first: yaml.Mark, second: yaml.Mark) -> str:
    """'lines 3 and 12', or the columns of a one-line document (a --set value)."""
    if first.line != second.line:
        return f"lines {first.line + 1} and {second.line + 1}"
    return f"line {first.line + 1}, columns {first.column + 1} and {second.column + 1}"


def _refuse_non_json(value: Any, path: tuple[str, ...]) -> None:
    """Every value must be one JSON holds (the config is hashed as JSON): YAML also builds
    dates from unquoted `2024-01-01`, bytes from `!!binary`, sets from `!!set`."""
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise _Refused(f"has the key {key!r} under '{'.'.join(path) or '(top level)'}'"
                               ", which is not text", "quote the key")
            _refuse_non_json(child, (*path, str(key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            _refuse_non_json(child, (*path, str(index)))
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise _Refused(f"sets '{'.'.join(path) or '(top level)'}' to a YAML "
                       f"{type(value).__name__} ({value!r}), not a plain value",
                       "quote it if it is meant as text")


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of the config file at `path`; anything else is a user error naming the
    file: not a regular file, unreadable, not UTF-8, not YAML, not a mapping."""
    _check_config_path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DudaError(f"config file {path} cannot be read ({error.strerror})",
                        "check its permissions, or pass another file with --config") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DudaError(f"config file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} "
                        f"on line {line})", "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 "
                        f"{path} > fixed.yaml`)") from None
    source = f"config file {path}"
    try:
        raw = read_yaml(text, source)
    except yaml.YAMLError as error:
        raise DudaError(f"{source} is not valid YAML: {error}",
                        "fix the line it names (configs/ has complete examples)") from None
    if raw is None:
        raise DudaError(f"{source} is empty", "start from one of the files in configs/")
    if not isinstance(raw, dict):
        raise DudaError(f"{source} must hold a mapping of sections, not a "
                        f"{type(raw).__name__}", "start from one of the files in configs/")
    return raw


def _check_config_path(path: Path) -> None:
    """Say what `path` is when it is not a config file one can read."""
    if path.is_dir():
        found = sorted(path.glob("*.yaml"))[:3]
        example = f" (in it: {', '.join(str(p) for p in found)})" if found else ""
        raise DudaError(f"config file {path} is a folder, not a file",
                        f"pass the YAML file itself with --config{example}")
    if path.is_symlink() and not path.exists():
        raise DudaError(f"config file {path} is a symbolic link to {os.readlink(path)}, "
                        "which does not exist", "pass an existing YAML file with --config")
    if not path.exists():
        raise DudaError(f"config file {path} does not exist",
                        "pass an existing YAML file with --config (see configs/)")
    if not path.is_file():
        raise DudaError(f"config file {path} is not a regular file (a device, pipe or socket)",
                        "save the config to a file and pass that with --config")


def load_config(path: str | Path, overrides: list[str] | None = None,
                data_root: str | Path | None = None) -> Config:
    """Read, override, validate a YAML config; resolve relative dataset roots.

    `data_root` (from --data-root or DUDA_DATA_ROOT, read by the CLI) anchors relative roots.
    """
    path = Path(path)
    raw = read_config_file(path)
    raw = apply_overrides(raw, overrides or [])
    _moved_keys(raw, str(path), overrides or [])
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise DudaError(_format_validation_error(error, str(path), overrides),
                        "fix the key or value; `duda config schema` lists every key") from None
    return resolve_roots(config, data_root)


def resolve_roots(config: Config, data_root: str | Path | None) -> Config:
    """Make relative dataset roots absolute, against `data_root` or the working directory, and
    a relative `model.init` file absolute, against the working directory."""
    data = config.data
    domains = {}
    for name in ("source", "target"):
        domain: DomainConfig = getattr(data, name)
        if domain.root is None:
            domains[name] = domain
            continue
        root = Path(os.path.expanduser(domain.root))
        if not root.is_absolute():
            root = (Path(data_root) if data_root else Path.cwd()) / root
        domains[name] = domain.model_copy(update={"root": str(root.resolve())})
    new_data = data.model_copy(update=domains)
    model = config.model
    if model.init not in ("none", "imagenet"):
        model = model.model_copy(update={
            "init": str(Path(os.path.expanduser(model.init)).resolve())})
    return config.model_copy(update={"data": new_data, "model": model})


def config_schema() -> dict[str, Any]:
    """The JSON schema of the whole config."""
    return Config.model_json_schema()
