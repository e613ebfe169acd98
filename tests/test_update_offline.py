"""The update-offline stage: a new store version whose changes follow the four-case merge."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from conftest import store_labels, tiny
from rich.console import Console
from typer.testing import CliRunner

from duda_cli.app import app
from duda_cli.commands import update_offline as command
from stages import update_offline
from stages.artifacts.manifest import PSEUDO_LABELS, load_artifact
from stages.config.models import OfflineRuleConfig, UpdateOfflineConfig
from stages.method.offline import CHANGES
from stages.runtime.errors import DudaError
from stages.store.pseudo_store import open_store

runner = CliRunner()


def test_update_offline_makes_a_new_version_with_change_statistics(prepared, tmp_path) -> None:
    before = store_labels(prepared["pseudo"])
    result = update_offline.run(tiny(), prepared["data"], prepared["checkpoint"],
                                prepared["pseudo"], tmp_path / "updated", device="cpu")
    summary = result.manifest.summary
    assert result.manifest.inputs["parent"].id == load_artifact(prepared["pseudo"],
                                                                PSEUDO_LABELS).id
    after = store_labels(result.path)
    np.testing.assert_array_equal(store_labels(prepared["pseudo"]), before)
    # docs/method.md#the-four-case-merge: a pixel keeps its stored class or becomes ignore; an
    # ignored pixel may be filled.
    labelled = before != 255
    assert np.all((after[labelled] == before[labelled]) | (after[labelled] == 255))
    assert summary["changes"]["kept"] == int((after[labelled] == before[labelled]).sum())
    assert summary["changes"]["dropped"] == int((after[labelled] == 255).sum())
    assert summary["changes"]["added"] == int((after[~labelled] != 255).sum())
    assert "before" in summary["diagnostics"] and "after" in summary["diagnostics"]


def test_batches_share_their_thresholds_and_the_summary_counts_every_class(prepared,
                                                                           tmp_path) -> None:
    one = update_offline.run(tiny(update_offline__inference={"batch_size": 1, "num_workers": 0}),
                             prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                             tmp_path / "one", device="cpu").manifest.summary
    three = update_offline.run(tiny(update_offline__inference={"batch_size": 3,
                                                               "num_workers": 0}),
                               prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                               tmp_path / "three", device="cpu").manifest.summary
    for summary in (one, three):
        per_class = summary["per_class"]
        assert {key: sum(row[key] for row in per_class.values())
                for key in ("kept", "added", "dropped")} == summary["changes"]
    # τ^β is computed over each batch jointly: other batches, other thresholds, other labels
    assert one["changes"] != three["changes"]
    assert store_labels(tmp_path / "one").shape == store_labels(tmp_path / "three").shape


def test_cli_table_and_json(prepared, tmp_path, tiny_config_file) -> None:
    result = runner.invoke(app, ["update-offline", "-c", str(tiny_config_file), "--data",
                                 str(prepared["data"]), "--checkpoint",
                                 str(prepared["checkpoint"]), "--pseudo",
                                 str(prepared["pseudo"]), "--out", str(tmp_path / "u"),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    output = json.loads(result.stdout)
    assert output["artifact"] == str(tmp_path / "u")
    assert set(output["summary"]["changes"]) == {"kept", "added", "dropped"}
    assert len(open_store(tmp_path / "u")) == len(open_store(prepared["pseudo"]))


def test_both_stages_build_one_offline_rule_from_their_own_keys() -> None:
    looped = tiny(self_train__offline_cap=0.9, self_train__agree_requires_confidence=True)
    whole = tiny(update_offline__cap=0.9, update_offline__agree_requires_confidence=True)
    rule = OfflineRuleConfig(cap=0.9, agree_requires_confidence=True)
    assert looped.self_train.offline_rule == rule == whole.update_offline.offline_rule
    assert tiny().self_train.offline_rule == tiny().update_offline.offline_rule
    # The schema says they are the same rule under two names.
    fields = UpdateOfflineConfig.model_fields
    assert "self_train.offline_cap" in fields["cap"].description
    assert "self_train.agree_requires_confidence" in fields[
        "agree_requires_confidence"].description


def test_update_offline_applies_its_sections_rule(prepared, tmp_path) -> None:
    # Same thresholds, stricter agreement: agreeing but unconfident labels are dropped instead
    # of kept (docs/method.md#the-four-case-merge); the store records the rule it applied. A
    # small β sets τ^β high enough that some agreeing stored labels fall under it.
    default = update_offline.run(tiny(update_offline__beta=0.1), prepared["data"],
                                 prepared["checkpoint"], prepared["pseudo"],
                                 tmp_path / "default", device="cpu")
    strict = update_offline.run(tiny(update_offline__beta=0.1,
                                     update_offline__agree_requires_confidence=True),
                                prepared["data"], prepared["checkpoint"], prepared["pseudo"],
                                tmp_path / "strict", device="cpu")
    before, after = default.manifest.summary["changes"], strict.manifest.summary["changes"]
    assert after["added"] == before["added"]
    assert after["kept"] < before["kept"]
    assert after["kept"] + after["dropped"] == before["kept"] + before["dropped"]
    selector = open_store(tmp_path / "strict").selector
    assert selector["agree_requires_confidence"] is True and selector["cap"] == 0.99


def _rows(table) -> dict[str, list[str]]:
    """A rendered rich table's rows, by their first cell (the box drawing left out)."""
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    rows = (re.findall(r"[\w,]+", line) for line in console.file.getvalue().splitlines())
    return {row[0]: row[1:] for row in rows if row}


def test_the_cli_table_shows_a_category_an_older_store_did_not_count_as_zero(tmp_path) -> None:
    older = {"changes": {"kept": 7, "dropped": 2},
             "per_class": {"road": {"kept": 7, "dropped": 2}, "sky": {"kept": 0, "dropped": 0}}}

    lines = _rows(command._table(tmp_path / "u", older))

    assert lines["class"] == list(CHANGES)
    assert lines["road"] == ["7", "0", "2"] and lines["all"] == ["7", "0", "2"]
    assert "sky" not in lines  # a class the update did not touch


def test_a_cli_table_of_change_counts_that_are_not_counts_names_the_store(tmp_path) -> None:
    with pytest.raises(DudaError, match=f"pseudo-label store {tmp_path / 'u'} records its "
                       "offline change counts as int"):
        command._table(tmp_path / "u", {"changes": 9, "per_class": {}})
