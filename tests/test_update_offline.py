"""The update-offline stage: a new store version whose changes follow the four-case merge."""

from __future__ import annotations

import json

import numpy as np
from conftest import store_labels, tiny
from typer.testing import CliRunner

from duda_cli.app import app
from stages import update_offline
from stages.artifacts.manifest import PSEUDO_LABELS, load_artifact
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
