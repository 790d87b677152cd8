"""The quick benchmark runs every figure's code path; timings are reported, never asserted (CI is noisy)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
NAMES = {"generate", "load", "evaluate", "bootstrap", "train", "memory", "app"}


def _spinners() -> int:
    """Processes running the bench's spinner, from /proc (Linux)."""
    count = 0
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            count += b"while True: pass" in entry.read_bytes()
        except OSError:
            continue
    return count


def test_quick_bench_reports_every_figure_quiet_and_with_a_busy_core():
    before = _spinners()
    proc = subprocess.run([sys.executable, "-m", "mtf_core", "bench", "--quick", "--busy-core", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert {f["name"] for f in doc["figures"]} == NAMES
    for f in doc["figures"]:
        assert set(f) >= {"name", "value", "unit", "reference", "ratio", "target", "met", "busy"}
        assert math.isfinite(f["value"]) and f["value"] > 0 and math.isfinite(f["ratio"]) and isinstance(f["met"], bool)
        busy = f["busy"]
        assert math.isfinite(busy["value"]) and busy["value"] > 0 and isinstance(busy["met"], bool)
    assert doc["machine"]["quick"] is True and doc["machine"]["busy_core"] is True
    assert _spinners() == before  # the bench stopped the process it started


def test_pandas_reference_computes_the_same_metrics_as_rerank_core():
    """The evaluate figure's ratio means something only if both sides compute the same thing."""
    import numpy as np
    import torch

    from benchmarks.pandas_reference import pandas_rerank
    from mtf_core.evaluate import rerank_core

    gen = torch.Generator().manual_seed(4)
    r, n, k = 300, 12, 3
    scores = torch.rand(r, n, k, generator=gen)
    shown = torch.zeros(r, n, dtype=torch.bool)
    shown[:, :5] = True
    labels = (torch.rand(r, n, k, generator=gen) < 0.3).float() * shown[..., None]
    weights = torch.rand(r, k, dtype=torch.float64, generator=gen)
    curve = torch.tensor([1.0, 0.6, 0.4])
    ndcg, _, expected, _ = rerank_core(scores, labels, shown, torch.ones(r, n, dtype=torch.bool), weights, 4, curve,
                                       torch.ones(k, dtype=torch.float64))
    ref_ndcg, ref_expected = pandas_rerank(scores.numpy(), labels.numpy(), shown.numpy(), weights.numpy(), 4,
                                           curve.numpy())
    np.testing.assert_allclose(np.nanmean(ndcg.numpy(), 0), ref_ndcg, rtol=1e-5)
    np.testing.assert_allclose(expected.mean(0).numpy(), ref_expected, rtol=1e-5)


def test_the_streamed_figure_measures_every_size_and_ray_on_the_same_figures(tmp_path):
    from benchmarks.bench import bench_streamed

    figure = bench_streamed(tmp_path, 0.01, (2_000_000, 4_000_000))  # lakes of 20k and 40k requests
    assert figure.name == "streamed" and figure.value > 0 and math.isfinite(figure.ratio)
    assert "20,000 requests (1 shards)" in figure.detail and "40,000 requests (1 shards)" in figure.detail
    assert figure.detail.count("reading the lake alone: duckdb") == 2 and figure.detail.count(", pyarrow ") == 2
    if "Ray" in figure.detail:  # where Ray is installed (the test set-up installs it)
        assert "the same figures" in figure.detail
    assert not list(tmp_path.glob("lake*"))  # each lake removed once measured
