"""The README's commands: the shell loop of stage commands runs as written, end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def shell_loop() -> str:
    text = README.read_text()
    match = re.search(r"<!-- pipeline-loop:[^>]*-->\s*```bash\n(.*?)```", text, re.DOTALL)
    assert match, "README.md lost its pipeline-loop block"
    return match.group(1)


@pytest.mark.slow
def test_readme_shell_loop_runs_every_stage(tiny_config_file, tmp_path) -> None:
    out = tmp_path / "loop"
    env = dict(os.environ, CONFIG=str(tiny_config_file), OUT=str(out), ROUNDS="2",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", shell_loop()], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["artifact"] == str(out / "evaluate")
    assert 0.0 <= report["summary"]["miou"] <= 1.0
    for name in ("data", "warmup", "pseudo", "round1", "round1/pseudo", "round1-offline",
                 "round2", "round2/pseudo", "round2-offline", "evaluate"):
        assert (out / name / "manifest.json").is_file(), name
    # Round 2 starts from round 1's checkpoint and its offline-updated store (the lineage).
    round2 = json.loads((out / "round2" / "manifest.json").read_text())
    assert round2["inputs"]["checkpoint"]["path"] == str((out / "round1").resolve())
    assert round2["inputs"]["pseudo"]["path"] == str((out / "round1-offline").resolve())
