"""`duda config show|schema`: the resolved config and the JSON schema of every key."""

from __future__ import annotations

import json

import typer
import yaml

from duda_cli import options
from duda_cli.console import load, user_errors
from stages.config import config_schema

app = typer.Typer(help="Show the resolved config or the config's JSON schema.",
                  no_args_is_help=True)


@app.command("show")
def show(config: options.Config, set_: options.Set = None, seed: options.Seed = None,
         data_root: options.DataRoot = None,
         as_json: options.Json = False) -> None:
    """Print the resolved config (file + --set overrides + defaults) as YAML."""
    with user_errors():
        resolved = load(config, set_, seed, data_root)
    dumped = resolved.model_dump(mode="json")
    print(json.dumps(dumped, indent=2) if as_json else yaml.safe_dump(dumped, sort_keys=False))


@app.command("schema")
def schema() -> None:
    """Print the JSON schema of the config (every section, key, type and default)."""
    print(json.dumps(config_schema(), indent=2))
