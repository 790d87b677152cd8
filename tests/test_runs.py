"""The run store: save/load round trip, statuses, refusal of tampered or pickled policy files."""

from __future__ import annotations

import pickle

import pytest
import torch

from mtf_core.errors import LogError
from mtf_core.policies.train import TrainConfig, train
from mtf_core.reward import RewardSpec
from mtf_core.runs import RunStore

FAST = {"steps": 20, "warm_start_steps": 5, "batch_size": 128}


@pytest.fixture
def finished_run(tiny_log, tmp_path):
    store = RunStore(tmp_path / "runs")
    spec = RewardSpec.default(tiny_log.task_names)
    config = TrainConfig("grade", 1, FAST, validation_share=0.0)
    run_id = store.create_run("grade", config.to_dict(), spec, tiny_log)
    result = train(config, tiny_log, spec)
    store.finish_run(run_id, result.policy, result.history, result.status, result.seconds)
    return store, run_id, result


def test_save_load_round_trip_gives_identical_outputs(tiny_log, finished_run):
    store, run_id, result = finished_run
    loaded = store.load_policy(run_id, tiny_log)
    state = tiny_log.state(slice(0, 300))
    with torch.no_grad():
        torch.testing.assert_close(loaded.act(state), result.policy.act(state), rtol=0, atol=0)
        torch.testing.assert_close(loaded.distribution(state).concentration,
                                   result.policy.distribution(state).concentration, rtol=0, atol=0)


def test_run_record_and_history(finished_run):
    store, run_id, result = finished_run
    run = store.get(run_id)
    assert run.status == "finished" and run.algo == "grade" and run.config["params"]["steps"] == 20
    history = store.history(run_id)
    assert set(history["step"]) == set(range(25)) and "losses/policy" in set(history["name"])


def test_cancelled_run_is_marked_cancelled(tiny_log, tmp_path):
    store = RunStore(tmp_path / "runs")
    spec = RewardSpec.default(tiny_log.task_names)
    config = TrainConfig("grade", 0, FAST)
    run_id = store.create_run("grade", config.to_dict(), spec, tiny_log)
    result = train(config, tiny_log, spec, on_step=lambda info: info.step < 2)
    store.finish_run(run_id, result.policy, result.history, result.status, result.seconds)
    assert store.get(run_id).status == "cancelled"


def test_rename_and_delete(finished_run):
    store, run_id, _ = finished_run
    store.rename(run_id, "best so far")
    assert store.get(run_id).name == "best so far"
    store.delete(run_id)
    assert [r.run_id for r in store.list_runs()] == []
    with pytest.raises(LogError, match="no run"):
        store.get(run_id)


def test_tampered_policy_file_is_refused(finished_run, tiny_log):
    store, run_id, _ = finished_run
    path = store.root / run_id / "policy.pt"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(LogError, match="checksum mismatch"):
        store.load_policy(run_id, tiny_log)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_payload_is_refused_by_weights_only(finished_run, tmp_path):
    from mtf_core.runs import policy_from_files

    store, run_id, _ = finished_run
    folder = store.root / run_id
    with (folder / "policy.pt").open("wb") as f:
        pickle.dump({"net.0.weight": _Payload()}, f)
    with pytest.raises(LogError, match="not a loadable state dict"):
        policy_from_files(folder)


def test_run_left_running_by_a_dead_process_becomes_interrupted(tiny_log, tmp_path):
    store = RunStore(tmp_path / "runs")
    run_id = store.create_run("grade", {}, RewardSpec.default(tiny_log.task_names), tiny_log)
    store._write(lambda con: con.execute("UPDATE runs SET pid = 999999999 WHERE run_id = ?", [run_id]))
    assert store.get(run_id).status == "interrupted"


def test_reader_and_writer_threads_of_one_process_never_collide(tiny_log, tmp_path):
    """Streamlit sessions are threads of one process: listing in one while another records a run must work."""
    import threading
    import time

    store = RunStore(tmp_path / "runs")
    spec = RewardSpec.default(tiny_log.task_names)
    errors: list[BaseException] = []
    stop = threading.Event()
    n_reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                RunStore(store.root).list_runs()
                n_reads[0] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is the test's finding
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 3.0
        created = []
        while time.monotonic() < deadline and not errors:
            run_id = store.create_run("static", {}, spec, tiny_log)
            store.mark(run_id, "finished")
            created.append(run_id)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    assert n_reads[0] > 0 and len(created) > 3
    assert {r.run_id for r in store.list_runs() if r.status == "finished"} == set(created)


def test_run_whose_thread_died_is_recorded_not_left_running(tiny_log, tmp_path):
    from mtf_core.policies.train import train_run

    store = RunStore(tmp_path / "runs")
    spec = RewardSpec.default(tiny_log.task_names)

    def boom(info):  # noqa: ANN001
        raise RuntimeError("the page was closed")

    with pytest.raises(RuntimeError):
        train_run(store, TrainConfig("grade", 0, FAST), tiny_log, spec, on_step=boom)
    (run,) = store.list_runs()
    assert run.status == "failed"
    # A run created by a thread of this process that ended without recording it is recovered.
    import threading

    created: list[str] = []
    t = threading.Thread(target=lambda: created.append(store.create_run("grade", {}, spec, tiny_log)))
    t.start()
    t.join(timeout=30)
    assert store.get(created[0]).status == "interrupted"
    mine = store.create_run("grade", {}, spec, tiny_log)  # this thread lives on: its run is still running
    assert store.get(mine).status == "running"


def test_one_damaged_row_is_named_and_the_other_runs_stay_usable(finished_run, tiny_log):
    store, run_id, _ = finished_run
    spec = RewardSpec.default(tiny_log.task_names)
    other = store.create_run("static", {}, spec, tiny_log)
    store._write(lambda con: con.execute("UPDATE runs SET config = '{not json' WHERE run_id = ?", [other]))
    runs = {r.run_id: r for r in store.list_runs()}
    assert runs[other].status == "damaged" and "config" in runs[other].summary["damaged"]
    assert runs[run_id].status == "finished"
    store.load_policy(run_id, tiny_log)
    with pytest.raises(LogError, match="damaged"):
        store.load_policy(other, tiny_log)


def test_policy_description_is_covered_by_the_checksum(finished_run, tiny_log):
    import json

    store, run_id, _ = finished_run
    path = store.root / run_id / "policy.json"
    spec = json.loads(path.read_text())
    spec["args"]["hidden"] = 300000
    path.write_text(json.dumps(spec))
    with pytest.raises(LogError, match="checksum mismatch"):
        store.load_policy(run_id, tiny_log)


def test_policy_description_out_of_range_is_refused_without_allocating(finished_run):
    import json

    from mtf_core.runs import policy_from_files

    store, run_id, _ = finished_run
    path = store.root / run_id / "policy.json"
    spec = json.loads(path.read_text())
    spec["args"]["hidden"] = 300000
    path.write_text(json.dumps(spec))
    with pytest.raises(LogError, match=r"hidden=300000 is outside"):
        policy_from_files(store.root / run_id)
