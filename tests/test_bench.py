"""The quick benchmark runs every figure's code path; timings are reported, never asserted (CI is noisy)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
NAMES = {"generate", "load", "evaluate", "bootstrap", "train", "memory", "app"}


def test_quick_bench_reports_every_figure():
    proc = subprocess.run([sys.executable, "-m", "mtf_core", "bench", "--quick", "--json"], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert {f["name"] for f in doc["figures"]} == NAMES
    for f in doc["figures"]:
        assert set(f) >= {"name", "value", "unit", "reference", "ratio", "target", "met"}
        assert math.isfinite(f["value"]) and f["value"] > 0 and math.isfinite(f["ratio"]) and isinstance(f["met"], bool)
    assert doc["machine"]["quick"] is True
