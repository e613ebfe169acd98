"""benchmarks/generate_scaling.py at a tiny size: it runs both layouts and prints the ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_scaling.py"


@pytest.mark.slow
def test_generate_scaling_prints_rates_and_the_ratio() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--images", "8", "--size", "32", "64",
                             "--width", "0.25", "--repeats", "1", "--threads", "2"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = re.findall(r"x \d thread\(s\): +([\d.]+) images/s", result.stdout)
    assert len(rates) == 3 and all(float(rate) > 0 for rate in rates), result.stdout
    ratio = re.search(r"scaling ratio 2 processes / 1: ([\d.]+) \(efficiency ([\d.]+)\)",
                      result.stdout)
    assert ratio, result.stdout
    assert float(ratio.group(1)) == pytest.approx(float(rates[1]) / float(rates[0]), rel=0.02)
