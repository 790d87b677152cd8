"""Streamed evaluation over a Parquet lake, shard by shard: the same figures as the in-memory evaluation of
the whole log, to 1e-9 (values and bootstrap intervals)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtf_core.errors import LogError
from mtf_core.evaluate import evaluate_policy, prepare, target_actions
from mtf_core.lake import export_lake
from mtf_core.policies.static import parse_static
from mtf_core.policies.train import TrainConfig, train
from mtf_core.reward import RewardSpec
from mtf_core.store import LogData, load_log
from mtf_core.stream import streamed_evaluation

ROOT = Path(__file__).resolve().parent.parent
KUAIRAND = ROOT.parent / "shared" / "data" / "kuairand"


def _assert_equal_figures(log: LogData, lake: Path, policy, spec: RewardSpec, n_boot: int = 100):  # type: ignore[no-untyped-def]
    """Every figure the streamed evaluation gives equals the in-memory one. A deterministic target's kernel
    estimates (IPS, SNIPS, NCIS, DR) are only compared where both chose the same concentration (the choice
    rests on each one's own draws; `test_a_deterministic_targets_kernel_estimates_stream` fixes it)."""
    in_memory = evaluate_policy(prepare(log, spec, outcome_model="linear"),
                                target_actions(policy, log, "p", stochastic=False), n_boot=n_boot)
    streamed = streamed_evaluation(lake, policy, "p", spec, n_boot=n_boot)
    same_kernel = (streamed.ratios or {}).get("concentration") == (in_memory.ratio_info or {}).get("concentration")
    compared = {"dm"} | ({"ips", "snips", "ncis", "dr"} if same_kernel else set())
    expected = [row for row in in_memory.ope if row["estimator"] in compared]
    got = [row for row in streamed.ope if row["estimator"] in compared]
    assert len(streamed.metrics) == len(in_memory.metrics) > 0 and len(got) == len(expected) > 1
    expected.sort(key=lambda row: row["estimator"])
    got.sort(key=lambda row: row["estimator"])
    for a, b in [*zip(in_memory.metrics, streamed.metrics), *zip(expected, got)]:
        assert (a.get("name"), a.get("task"), a["segment"]) == (b.get("name"), b.get("task"), b["segment"])
        # A kernel ratio is a density at the target's weights, which a policy's network computes in float32
        # (their last bit depends on the batch they were computed in); rankings, and so the rest, do not move.
        tolerance = {"rel": 1e-6} if a.get("estimator") in ("ips", "snips", "ncis", "dr") else {"abs": 1e-9}
        for key in ("value", "ci_low", "ci_high"):
            if a[key] is None:
                assert b[key] is None, (a, b)
            else:
                assert b[key] == pytest.approx(a[key], **tolerance), (key, a, b)
    assert streamed.n_requests == log.n_requests
    return streamed


@pytest.fixture(scope="module")
def tiny_lake(tiny_log_path, tmp_path_factory) -> Path:
    return export_lake(tiny_log_path, tmp_path_factory.mktemp("stream") / "lake", shards=3)


def test_streamed_figures_equal_the_in_memory_ones_for_a_static_and_a_trained_policy(tiny_log, tiny_lake):
    spec = RewardSpec.default(tiny_log.task_names)
    static = parse_static("click=0.5,like=0.1,finish=0.1,share=0.1,watch_time=0.2", tiny_log.task_names,
                          tiny_log.segments)
    _assert_equal_figures(tiny_log, tiny_lake, static, spec)
    grade = train(TrainConfig("grade", 0, {"steps": 4, "warm_start_steps": 2, "batch_size": 64}), tiny_log, spec)
    _assert_equal_figures(tiny_log, tiny_lake, grade.policy, spec)


def test_streamed_intervals_equal_the_in_memory_ones_when_the_bag_of_little_bootstraps_takes_over(
        tiny_log, tiny_lake, monkeypatch):
    import mtf_core.evaluate.direct as direct

    monkeypatch.setattr(direct, "BLB_THRESHOLD", 20)  # the large-log branch, on a small log
    spec = RewardSpec.default(tiny_log.task_names)
    static = parse_static("click=0.2,like=0.2,finish=0.2,share=0.2,watch_time=0.2", tiny_log.task_names,
                          tiny_log.segments)
    _assert_equal_figures(tiny_log, tiny_lake, static, spec)


@pytest.mark.skipif(not KUAIRAND.exists(), reason="the shared KuaiRand sample is not beside the checkout")
def test_streamed_figures_on_real_data_with_a_fitted_position_curve_and_median_thresholds(tmp_path):
    from mtf_core.kuairand import import_kuairand

    path = tmp_path / "kuairand.duckdb"
    import_kuairand([KUAIRAND / "log_random_4_22_to_5_08_1k.head.csv"], KUAIRAND / "user_features_pure.csv",
                    KUAIRAND / "video_features_basic_pure.csv", path)
    log = load_log(path)
    lake = export_lake(path, tmp_path / "lake", shards=4)
    policy = parse_static("click=0.2,long_view=0.3,play_time=0.5", log.task_names, log.segments)
    streamed = _assert_equal_figures(log, lake, policy, RewardSpec.default(log.task_names))
    # Random exposure logged no fusion weights: nothing to reweight, and the note says why, not "try in memory".
    assert {row["estimator"] for row in streamed.ope} == {"dm"} and streamed.ratios is None
    assert "records no fusion weights" in streamed.notes[0]


def test_evaluate_stream_from_the_command_line_and_its_refusals(tiny_log_path, tiny_lake):
    policy = "static:click=0.5,like=0.1,finish=0.1,share=0.1,watch_time=0.2"
    done = subprocess.run([sys.executable, "-m", "mtf_core", "evaluate", str(tiny_lake), "--stream", "--policy",
                           policy, "--n-boot", "50", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n_shards"] == 3 and {"dm", "ips", "dr"} <= {row["estimator"] for row in result["ope"]}
    assert result["ratios"]["kind"] == "kernel" and all(row["verdict"] for row in result["ope"])
    refused = subprocess.run([sys.executable, "-m", "mtf_core", "evaluate", str(tiny_log_path), "--stream",
                              "--policy", policy], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert refused.returncode == 2 and "streamed evaluation reads a Parquet lake" in refused.stderr
    with pytest.raises(LogError, match="reads a Parquet lake"):
        streamed_evaluation(tiny_log_path, None, "p", RewardSpec.default(("click",)))  # type: ignore[arg-type]


def test_ray_workers_and_threads_give_the_local_numbers_exactly(tiny_log, tiny_lake):
    pytest.importorskip("ray")
    spec = RewardSpec.default(tiny_log.task_names)
    grade = train(TrainConfig("grade", 2, {"steps": 4, "warm_start_steps": 2, "batch_size": 64}), tiny_log, spec)
    # A stochastic policy: re-ranking metrics, DM, the importance-weighted estimates and their diagnostics.
    local = streamed_evaluation(tiny_lake, grade.policy, "p", spec, n_boot=100, stochastic=True, workers=1)
    on_ray = streamed_evaluation(tiny_lake, grade.policy, "p", spec, n_boot=100, engine="ray",  # 2 local workers
                                 stochastic=True)
    assert on_ray.engine == "ray" and on_ray.n_shards == local.n_shards == 3
    assert on_ray.metrics == local.metrics and on_ray.ope == local.ope  # exactly, not approximately
    assert on_ray.diagnostics == local.diagnostics and on_ray.diagnostics_by_segment == local.diagnostics_by_segment
    assert {r["estimator"] for r in local.ope} == {"ips", "snips", "ncis", "dm", "dr"}
    threads = streamed_evaluation(tiny_lake, grade.policy, "p", spec, n_boot=100, stochastic=True, workers=3)
    assert threads.metrics == local.metrics and threads.ope == local.ope and threads.diagnostics == local.diagnostics
    import ray

    assert not ray.is_initialized()  # the cluster it started is shut down
    # The policy's deterministic action: its kernel's per-user sums at every concentration travel back from the
    # workers; on a cluster the caller started, which the evaluation leaves running.
    deterministic = streamed_evaluation(tiny_lake, grade.policy, "p", spec, n_boot=100, workers=1)
    ray.init(num_cpus=2, object_store_memory=256 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        on_ray = streamed_evaluation(tiny_lake, grade.policy, "p", spec, n_boot=100, engine="ray")
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert deterministic.ratios is not None and on_ray.ratios == deterministic.ratios
    assert on_ray.ope == deterministic.ope and on_ray.diagnostics == deterministic.diagnostics


def test_importance_weighted_estimates_of_a_stochastic_policy_stream_exactly(tiny_log, tiny_lake):
    spec = RewardSpec.default(tiny_log.task_names)
    grade = train(TrainConfig("grade", 1, {"steps": 4, "warm_start_steps": 2, "batch_size": 64}), tiny_log, spec)
    in_memory = evaluate_policy(prepare(tiny_log, spec, outcome_model="linear"),
                                target_actions(grade.policy, tiny_log, "p", stochastic=True), n_boot=100)
    streamed = streamed_evaluation(tiny_lake, grade.policy, "p", spec, n_boot=100, stochastic=True)
    for name in ("ips", "snips", "ncis"):
        a = [r for r in in_memory.ope if r["estimator"] == name]
        b = [r for r in streamed.ope if r["estimator"] == name]
        assert len(a) == len(b) == 1 + len(tiny_log.segments)
        for x, y in zip(a, b):
            assert x["segment"] == y["segment"]
            for key in ("value", "ci_low", "ci_high"):
                # To float32 precision: the policy's network computes a request's density in float32, and its
                # last bit depends on the batch it was computed in (a shard's, or the whole log's chunk).
                assert y[key] == pytest.approx(x[key], rel=1e-6), (name, key, x, y)
    # The overlap diagnostics from the shards' ratio sums are the in-memory ones; the support coverage, from
    # each shard's own draws from the target, is the in-memory one to Monte-Carlo error; so are the verdicts.
    scopes = [(in_memory.diagnostics, streamed.diagnostics),
              *zip(in_memory.diagnostics_by_segment, streamed.diagnostics_by_segment)]
    assert len(scopes) == 1 + len(tiny_log.segments)
    for x, y in scopes:
        assert x["segment"] == y["segment"] and x["n"] == y["n"]
        for key in ("ess", "ess_share", "mean_ratio", "max_ratio", "clipped_mass_share"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-12), (key, x, y)
        assert y["p99_ratio"] is None
        assert y["support_coverage"] == pytest.approx(x["support_coverage"], abs=0.05), (x, y)
        assert y["verdicts"] == x["verdicts"], (x, y)
    assert all(r["verdict"] for r in streamed.ope)
    # DM and DR of the stochastic target average its own draws: each shard's, not the in-memory ones, so the
    # same figures to Monte-Carlo error (4 draws a request), well inside the intervals.
    for name in ("dm", "dr"):
        for x, y in zip([r for r in in_memory.ope if r["estimator"] == name],
                        [r for r in streamed.ope if r["estimator"] == name], strict=True):
            assert x["segment"] == y["segment"]
            assert abs(y["value"] - x["value"]) <= 0.1 * (x["ci_high"] - x["ci_low"]), (name, x, y)
            assert y["ci_high"] - y["ci_low"] == pytest.approx(x["ci_high"] - x["ci_low"], rel=0.15), (name, x, y)
    static = parse_static("click=1,like=0,finish=0,share=0,watch_time=0", tiny_log.task_names, tiny_log.segments)
    with pytest.raises(LogError, match="draws its fusion weights from a density"):
        streamed_evaluation(tiny_lake, static, "p", spec, stochastic=True)


def test_a_deterministic_targets_kernel_estimates_stream(tiny_log, tiny_lake, monkeypatch):
    """A fixed weight vector's IPS, SNIPS, NCIS and DR rest on Dirichlet-kernel ratios whose concentration is
    chosen over the whole log. With the concentration fixed, every estimate, interval and overlap figure
    equals the in-memory one; the support coverage, from each shard's own kernel draws, to Monte-Carlo
    error. With the grid, the standard error the choice rests on is the in-memory formula's."""
    import numpy as np

    import mtf_core.evaluate.ratios as ratios

    spec = RewardSpec.default(tiny_log.task_names)
    static = parse_static("click=0.6,like=0.1,finish=0.1,share=0.1,watch_time=0.1", tiny_log.task_names,
                          tiny_log.segments)
    ctx = prepare(tiny_log, spec, outcome_model="linear")
    actions = target_actions(static, tiny_log, "p", stochastic=False)
    free = streamed_evaluation(tiny_lake, static, "p", spec, n_boot=50)
    grid = ratios.concentration_grid(len(tiny_log.tasks))
    assert free.ratios is not None and free.ratios["concentration"] in grid
    rho = np.exp(ratios.dirichlet_kernel_logp(ratios.log_interior(tiny_log.weights), actions.weights,
                                              free.ratios["concentration"]) - tiny_log.logging_logp)
    assert free.ratios["standard_error"] == pytest.approx(ratios._clustered_se(rho * ctx.logged.total, ctx.unit),
                                                          rel=1e-9)
    # grid[0] with a third of the requests estimating the smoothing bias (as on a log of 200k requests).
    for c, bias_requests in ((grid[0], tiny_log.n_requests // 3), (grid[3], ratios.KERNEL_BIAS_REQUESTS)):
        monkeypatch.setattr(ratios, "concentration_grid", lambda k, c=c: np.array([c]))
        monkeypatch.setattr(ratios, "KERNEL_BIAS_REQUESTS", bias_requests)
        in_memory = evaluate_policy(ctx, actions, n_boot=100)
        streamed = streamed_evaluation(tiny_lake, static, "p", spec, n_boot=100)
        assert streamed.ratios["concentration"] == in_memory.ratio_info["concentration"] == c
        assert streamed.ratios["standard_error"] == pytest.approx(in_memory.ratio_info["standard_error"], rel=1e-9)
        # The smoothing bias from one draw per request (in memory four): Monte-Carlo error, small beside the SE.
        assert abs(streamed.ratios["smoothing_bias"] - in_memory.ratio_info["smoothing_bias"]) <= (
            0.2 * in_memory.ratio_info["standard_error"])
        assert len(streamed.ope) == len(in_memory.ope) == 5 * (1 + len(tiny_log.segments))
        for a in in_memory.ope:
            (b,) = [r for r in streamed.ope if (r["estimator"], r["segment"]) == (a["estimator"], a["segment"])]
            for key in ("value", "ci_low", "ci_high"):
                assert b[key] == pytest.approx(a[key], abs=1e-9), (key, a, b)
            assert b["verdict"] == a["verdict"], (a, b)
        for x, y in [(in_memory.diagnostics, streamed.diagnostics),
                     *zip(in_memory.diagnostics_by_segment, streamed.diagnostics_by_segment, strict=True)]:
            for key in ("n", "ess", "ess_share", "mean_ratio", "max_ratio", "clipped_mass_share"):
                assert y[key] == pytest.approx(x[key], rel=1e-9), (key, x, y)
            assert y["support_coverage"] == pytest.approx(x["support_coverage"], abs=0.05), (x, y)
    threads = streamed_evaluation(tiny_lake, static, "p", spec, n_boot=100, workers=3)
    one = streamed_evaluation(tiny_lake, static, "p", spec, n_boot=100, workers=1)
    assert threads.ope == one.ope and threads.diagnostics == one.diagnostics and threads.ratios == one.ratios


def test_the_requests_that_estimate_a_kernels_bias_are_the_same_whole_or_by_shard(monkeypatch):
    """About KERNEL_BIAS_REQUESTS of a large log, all of a small one, and a request is kept or not by its id
    alone, so that every shard keeps what the whole log keeps."""
    import numpy as np

    import mtf_core.evaluate.ratios as ratios

    ids = np.arange(10**6, dtype=np.int64) * 7 + 3
    kept = ratios.kernel_bias_rows(ids, len(ids))
    expected = ratios.KERNEL_BIAS_REQUESTS
    assert abs(int(kept.sum()) - expected) < 4 * np.sqrt(expected)
    shard = ids % 5 == 2
    assert np.array_equal(ratios.kernel_bias_rows(ids[shard], len(ids)), kept[shard])
    assert ratios.kernel_bias_rows(ids[:1000], 1000).all()
    # spread over the ids, not a run of them: a tenth of the log holds about a tenth of the kept requests
    assert abs(int(kept[:10**5].sum()) - expected / 10) < 4 * np.sqrt(expected / 10)


def test_a_full_spool_folder_is_named_with_what_to_do(tiny_log, tiny_lake, monkeypatch):
    import errno

    import numpy as np

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    static = parse_static("click=0.6,like=0.1,finish=0.1,share=0.1,watch_time=0.1", tiny_log.task_names,
                          tiny_log.segments)
    with pytest.raises(LogError, match="cannot keep the kernel's per-user sums.*No space left.*set TMPDIR"):
        streamed_evaluation(tiny_lake, static, "p", RewardSpec.default(tiny_log.task_names), n_boot=20)


def test_a_lake_that_splits_a_user_or_has_no_shards_is_refused(tiny_log, tiny_lake, tmp_path):
    """A shard must hold whole users (each shard's per-user sums are final); a user in two shards would have
    had one shard's sums overwrite the other's, silently. A lake without shard folders is named too."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = RewardSpec.default(tiny_log.task_names)
    static = parse_static("click=0.5,like=0.1,finish=0.1,share=0.1,watch_time=0.2", tiny_log.task_names,
                          tiny_log.segments)
    split = tmp_path / "split"
    shutil.copytree(tiny_lake, split)
    # One request of a shard-1 user, with its candidates, user and session rows, filed under shard 0 as well:
    # each shard is a valid log of its own, and only the whole lake shows the user twice.
    moved = pq.read_table(split / "requests" / "shard=1").slice(0, 1)
    user, session, request = (moved.column(c)[0].as_py() for c in ("user_id", "session_id", "request_id"))
    for table, key, value in (("requests", "request_id", request), ("impressions", "request_id", request),
                              ("users", "user_id", user), ("sessions", "session_id", session)):
        rows = pq.read_table(split / table / "shard=1").to_pandas()
        pq.write_table(pa.Table.from_pandas(rows[rows[key] == value], preserve_index=False),
                       split / table / "shard=0" / "moved.parquet")
    with pytest.raises(LogError, match=f"user {user} has requests in more than one shard"):
        streamed_evaluation(split, static, "p", spec, n_boot=20)
    flat = tmp_path / "flat"
    shutil.copytree(tiny_lake, flat)
    for table in ("users", "sessions", "requests", "impressions"):
        shutil.rmtree(flat / table)
    with pytest.raises(LogError, match="no shards with requests"):
        streamed_evaluation(flat, static, "p", spec, n_boot=20)


def test_a_lake_whose_shown_rankings_a_later_stage_reordered_streams_the_in_memory_figures(reordered_log_path,
                                                                                           tmp_path):
    """The fusion agreement is counted shard by shard, each shard values its logged actions by their fusion
    (`profile.action_positions`) as the whole log does, and the figures and note are the in-memory ones."""
    log = load_log(reordered_log_path)
    lake = export_lake(reordered_log_path, tmp_path / "lake", shards=2)
    spec = RewardSpec.default(log.task_names)
    static = parse_static("click=0.6,like=0.1,finish=0.1,share=0.1,watch_time=0.1", log.task_names, log.segments)
    streamed = _assert_equal_figures(log, lake, static, spec, n_boot=50)
    assert any("reproduces the shown ranking in only" in note for note in streamed.notes)
    assert streamed.fusion_agreement is not None and streamed.fusion_agreement < 0.05


def test_a_lake_whose_requests_show_different_numbers_of_candidates_streams_the_in_memory_figures(corrupt,
                                                                                                   tmp_path):
    """Half the requests cut to their top 2-4 shown candidates: every shard values each ranking down to its own
    request's depth (`rerank.slate_depth`), as the whole log does, and the position curve pooled over the
    shards is the whole log's."""
    from tests.conftest import TINY

    labels = ", ".join(f"y_{t} = NULL" for t in TINY.tasks)
    path = corrupt(f"UPDATE impressions SET position = NULL, {labels} WHERE request_id % 2 = 0 "
                   "AND position >= 2 + request_id % 3")
    log = load_log(path)
    assert log.shown.sum(1).min() == 2
    lake = export_lake(path, tmp_path / "lake", shards=3)
    spec = RewardSpec.default(log.task_names)
    static = parse_static("click=0.2,like=0.3,finish=0.2,share=0.1,watch_time=0.2", log.task_names, log.segments)
    _assert_equal_figures(log, lake, static, spec, n_boot=50)
