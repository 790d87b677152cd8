"""Loading logs into dense arrays, and importing CSV/Parquet sources with a column mapping."""

from __future__ import annotations

import json
import re

import duckdb
import numpy as np
import pytest

from mtf_core.errors import LogError
from mtf_core.schema import validate
from mtf_core.store import import_log, load_log, open_log, read_mapping

RENAMES = {
    "users": {"user_id": "uid", "segment": "cohort"},
    "requests": {"request_id": "rid", "w_click": "weight_click"},
    "impressions": {"request_id": "rid", "y_click": "is_click", "s_click": "p_click"},
}


def _export(src, folder, fmt: str, renames: dict[str, dict[str, str]]) -> dict[str, str]:
    """Write each table of `src` to one file, renaming columns the way a production export might."""
    con = duckdb.connect(str(src), read_only=True)
    paths = {}
    try:
        for table in ("users", "requests", "impressions"):
            cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
            select = ", ".join(f'"{c}" AS "{renames.get(table, {}).get(c, c)}"' for c in cols)
            path = folder / f"{table}.{fmt}"
            option = "(FORMAT parquet)" if fmt == "parquet" else "(HEADER, DELIMITER ',')"
            con.execute(f"COPY (SELECT {select} FROM {table}) TO '{path}' {option}")
            paths[table] = str(path)
    finally:
        con.close()
    return paths


def _mapping(tmp_path, tasks) -> dict[str, object]:
    mapping = {"tables": {t: {new: old for old, new in cols.items()} for t, cols in RENAMES.items()},
               "tasks": [{"name": t.name, "kind": t.kind} for t in tasks]}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    return read_mapping(path)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_import_round_trip_with_mapping(tiny_log_path, tiny_log, tmp_path, fmt):
    sources = _export(tiny_log_path, tmp_path, fmt, RENAMES)
    out = import_log(sources, tmp_path / "imported.duckdb", _mapping(tmp_path, tiny_log.tasks))
    log = load_log(out)
    assert log.n_requests == tiny_log.n_requests
    assert log.task_names == tiny_log.task_names
    np.testing.assert_allclose(log.weights, tiny_log.weights)
    np.testing.assert_allclose(log.logging_logp, tiny_log.logging_logp)
    np.testing.assert_array_equal(log.positions, tiny_log.positions)
    np.testing.assert_allclose(log.scores, tiny_log.scores)
    np.testing.assert_array_equal(np.isnan(log.labels), np.isnan(tiny_log.labels))
    np.testing.assert_allclose(np.nan_to_num(log.labels), np.nan_to_num(tiny_log.labels))
    # sessions were rebuilt from requests, and `returned` is unknown there
    assert np.isnan(log.returned).all()
    np.testing.assert_array_equal(log.continued, tiny_log.continued)


def test_import_refuses_to_overwrite_and_never_touches_sources(tiny_log_path, tiny_log, tmp_path):
    sources = _export(tiny_log_path, tmp_path, "csv", RENAMES)
    before = {t: open(p, "rb").read() for t, p in sources.items()}
    out = tmp_path / "x.duckdb"
    import_log(sources, out, _mapping(tmp_path, tiny_log.tasks))
    with pytest.raises(LogError, match="already exists"):
        import_log(sources, out, _mapping(tmp_path, tiny_log.tasks))
    assert {t: open(p, "rb").read() for t, p in sources.items()} == before


def test_import_names_the_file_and_column_of_a_bad_value(tiny_log_path, tiny_log, tmp_path):
    sources = _export(tiny_log_path, tmp_path, "csv", {})
    lines = open(sources["requests"]).read().splitlines()
    header = lines[0].split(",")
    cells = lines[3].split(",")
    cells[header.index("w_like")] = "lots"
    lines[3] = ",".join(cells)
    open(sources["requests"], "w").write("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=r"requests\.csv.*'w_like'.*row 3.*'lots'"):
        import_log(sources, tmp_path / "y.duckdb")
    assert not (tmp_path / "y.duckdb").exists()


def test_mapping_naming_a_missing_column_is_refused(tiny_log_path, tmp_path):
    sources = _export(tiny_log_path, tmp_path, "csv", {})
    mapping = {"tables": {"users": {"no_such_column": "segment"}}}
    with pytest.raises(LogError, match="no_such_column"):
        import_log(sources, tmp_path / "z.duckdb", mapping)


def test_loaded_log_is_dense_and_consistent(tiny_log):
    r, n, k = tiny_log.scores.shape
    assert (r, k) == (tiny_log.n_requests, len(tiny_log.tasks))
    assert n == 20
    shown = tiny_log.shown
    assert (shown.sum(1) == 6).all()
    assert np.isnan(tiny_log.labels[~shown]).all() and not np.isnan(tiny_log.labels[shown]).any()
    np.testing.assert_allclose(tiny_log.weights.sum(1), 1.0, atol=1e-9)
    # context: step 0 has no previous feedback; later steps carry the previous request's mean feedback
    first = tiny_log.step == 0
    assert (tiny_log.context[first, 1:] == 0).all()


def _same_arrays(a, b) -> None:
    for name in ("scores", "labels", "positions", "mask", "item_features", "segment", "context", "weights",
                 "user_features", "request_id", "returned"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.segments == b.segments


def test_loading_does_not_depend_on_the_physical_row_order(corrupt, tiny_log):
    shuffled = load_log(corrupt(
        "CREATE TABLE shuffled AS SELECT * FROM impressions ORDER BY hash(item_id * 7919 + request_id)",
        "DROP TABLE impressions", "ALTER TABLE shuffled RENAME TO impressions"))
    _same_arrays(shuffled, tiny_log)


def test_ragged_requests_missing_items_and_missing_segments_load_as_padding_and_zeros(corrupt, tiny_log):
    first = int(tiny_log.request_id[0])
    path = corrupt(
        # the item shown first in the second request leaves the items table
        f"DELETE FROM items WHERE item_id = (SELECT item_id FROM impressions WHERE request_id = "
        f"{int(tiny_log.request_id[1])} AND position = 0)",
        # the first request keeps its shown candidates and 4 of the others
        f"DELETE FROM impressions WHERE request_id = {first} AND position IS NULL AND item_id NOT IN "
        f"(SELECT item_id FROM impressions WHERE request_id = {first} AND position IS NULL ORDER BY item_id LIMIT 4)",
        f"UPDATE users SET segment = NULL WHERE user_id = (SELECT user_id FROM requests WHERE request_id = {first})",
    )
    with pytest.raises(LogError, match="2 validation problem.*NULL segment.*no row in items"):
        load_log(path)  # the gate every command and the app go through
    log = load_log(path, check=False)
    assert log.mask[0].sum() == 10 and log.mask[1:].all()
    assert (log.scores[0][~log.mask[0]] == 0).all() and np.isnan(log.labels[0][~log.mask[0]]).all()
    assert (log.positions[0][~log.mask[0]] == -1).all()
    np.testing.assert_array_equal(log.scores[1:], tiny_log.scores[1:])
    np.testing.assert_array_equal(log.scores[0, :10], tiny_log.scores[0, :10])
    assert "(missing)" in log.segments
    assert log.segments[log.segment[0]] == "(missing)"
    assert (log.item_features[1, 0] == 0).all() and (tiny_log.item_features[1, 0] != 0).any()
    changed = (log.item_features[1:] != tiny_log.item_features[1:]).any(-1)
    con = duckdb.connect(str(path), read_only=True)
    try:
        n_rows = con.execute(f"SELECT count(*) FROM impressions WHERE request_id > {first} AND item_id NOT IN "
                             "(SELECT item_id FROM items)").fetchone()[0]
    finally:
        con.close()
    assert changed.sum() == n_rows and (log.item_features[1:][changed] == 0).all()


def test_a_log_without_tasks_is_refused_with_a_clear_message(corrupt):
    with pytest.raises(LogError, match="declares no tasks"):
        load_log(corrupt("DELETE FROM tasks"))


def test_overview_correlations_are_the_exact_pearson_correlations_of_shown_labels(tiny_log_path, tiny_log):
    import pandas as pd

    from mtf_core.overview import log_overview

    shown = tiny_log.labels[tiny_log.shown]  # (shown items, K)
    expected = pd.DataFrame(shown.astype(float), columns=list(tiny_log.task_names)).corr()
    got = log_overview(tiny_log_path).label_correlation
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-6)
    assert list(got.columns) == list(tiny_log.task_names)


def test_import_without_declared_tasks_infers_continuous_ones_and_validates(tiny_log_path, tiny_log, tmp_path):
    from mtf_core.schema import validate
    from mtf_core.store import open_log

    paths = _export(tiny_log_path, tmp_path, "csv", {})
    out = import_log(paths, tmp_path / "plain.duckdb")
    con = open_log(out)
    try:
        assert validate(con) == []
    finally:
        con.close()
    kinds = {t.name: t.kind for t in load_log(out).tasks}
    assert kinds == {t.name: t.kind for t in tiny_log.tasks}
    assert kinds["watch_time"] == "continuous" and kinds["click"] == "binary"


def test_import_of_a_feed_that_logged_no_weights_and_of_one_that_logged_some(tiny_log_path, tmp_path):
    """No w_ column at all: a log whose requests record no fusion weights (NULL), which the schema allows.
    Some of them missing: refused, naming the file and the columns."""
    paths = _export(tiny_log_path, tmp_path, "csv", {})
    con = duckdb.connect()
    try:
        for name, keep in (("none", "NOT LIKE 'w\\_%' ESCAPE '\\'"), ("some", "<> 'w_like'")):
            cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_csv('{paths['requests']}')").fetchall()]
            chosen = ", ".join(f'"{c}"' for c in cols if con.execute(f"SELECT '{c}' {keep}").fetchone()[0])
            con.execute(f"COPY (SELECT {chosen} FROM read_csv('{paths['requests']}')) TO "
                        f"'{tmp_path / (name + '.csv')}' (HEADER)")
    finally:
        con.close()
    out = import_log({**paths, "requests": str(tmp_path / "none.csv")}, tmp_path / "none.duckdb")
    log = load_log(out)
    assert np.isnan(log.weights).all() and not log.weights_known
    with pytest.raises(LogError, match=r"some\.csv: missing columns \['w_like'\].*all its fusion weights or none"):
        import_log({**paths, "requests": str(tmp_path / "some.csv")}, tmp_path / "some.duckdb")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_text_ids_are_numbered_the_same_in_every_file_and_their_keys_kept(tiny_log_path, tiny_log, tmp_path, fmt):
    """Production logs key users, requests and items by text (a hash, 'u_17'). Such ids are numbered in
    every file alike (a Parquet string column too), `id_keys` keeps each number's key, and the log is the
    same log: the same requests of the same users, the same candidates."""
    paths = _export(tiny_log_path, tmp_path, fmt, {})
    texts = {"users": {"user_id": "'u_' || user_id"},
             "requests": {"user_id": "'u_' || user_id", "request_id": "'r-' || request_id"},
             "impressions": {"request_id": "'r-' || request_id", "item_id": "md5(item_id::VARCHAR)"}}
    reader = "read_parquet" if fmt == "parquet" else "read_csv"
    option = "(FORMAT parquet)" if fmt == "parquet" else "(HEADER)"
    con = duckdb.connect()
    try:
        for table, exprs in texts.items():
            out = tmp_path / f"text_{table}.{fmt}"
            con.execute(f"COPY (SELECT * REPLACE ({', '.join(f'{e} AS {c}' for c, e in exprs.items())}) "
                        f"FROM {reader}('{paths[table]}')) TO '{out}' {option}")
            paths[table] = str(out)
    finally:
        con.close()
    out = import_log(paths, tmp_path / "text.duckdb")
    log = load_log(out)
    con = duckdb.connect(str(out), read_only=True)
    try:
        assert dict(con.execute("SELECT key, value FROM meta").fetchall())["numbered_ids"] == (
            "user_id,request_id,item_id")  # session ids stayed numbers
        # Each request's user, read back through the keys, is the original one.
        pairs = con.execute("SELECT rk.key, uk.key FROM requests r "
                            "JOIN id_keys rk ON rk.id_column = 'request_id' AND rk.id = r.request_id "
                            "JOIN id_keys uk ON uk.id_column = 'user_id' AND uk.id = r.user_id").fetchall()
        n_item_keys = con.execute("SELECT count(*) FROM id_keys WHERE id_column = 'item_id'").fetchone()[0]
        keys = con.execute("SELECT * FROM id_keys ORDER BY id_column, id").fetchall()
        assert validate(con) == []
    finally:
        con.close()
    con = duckdb.connect(str(tiny_log_path), read_only=True)
    try:
        assert n_item_keys == con.execute("SELECT count(DISTINCT item_id) FROM impressions").fetchone()[0]
    finally:
        con.close()
    original = dict(zip(tiny_log.request_id.tolist(), tiny_log.user_id.tolist()))
    # A lake of the log keeps the keys too.
    from mtf_core.lake import export_lake

    con = open_log(export_lake(out, tmp_path / "text_lake", shards=2))
    try:
        assert con.execute("SELECT * FROM id_keys ORDER BY id_column, id").fetchall() == keys
    finally:
        con.close()
    # A file whose keys do not match the others' (pandas wrote 'u_17.0'): the orphans are named by their keys.
    con = duckdb.connect()
    try:
        odd = tmp_path / f"odd_users.{fmt}"
        first = f"u_{tiny_log.user_id.min()}"
        con.execute(f"COPY (SELECT * REPLACE (CASE WHEN user_id = '{first}' THEN '{first}.0' ELSE user_id END AS "
                    f"user_id) FROM {reader}('{paths['users']}')) TO '{odd}' {option}")
    finally:
        con.close()
    con = open_log(import_log({**paths, "users": str(odd)}, tmp_path / "odd.duckdb"))
    try:
        problems = [str(p) for p in validate(con) if p.kind == "orphan"]
    finally:
        con.close()
    assert len(problems) == 1 and re.fullmatch(r"\[orphan\] requests\.user_id: 1 user_id values have no row in "
                                               rf"users \(e\.g\. user_id=\d+ key={first}\)", problems[0]), problems
    assert len(pairs) == tiny_log.n_requests
    assert all(original[int(r[2:])] == int(u[2:]) for r, u in pairs)
    assert log.n_requests == tiny_log.n_requests and log.segments == tiny_log.segments
    for name in ("scores", "labels"):
        a, b = getattr(tiny_log, name), getattr(log, name)
        assert np.nansum(a, dtype=np.float64) == pytest.approx(np.nansum(b, dtype=np.float64), rel=1e-12)


def test_times_with_an_offset_import_as_the_utc_times_they_name(tiny_log_path, tiny_log, tmp_path):
    """ISO 8601 with an offset (an export from a service abroad): 10:00+02:00 is 08:00 UTC, not 10:00."""
    paths = _export(tiny_log_path, tmp_path, "csv", {})
    con = duckdb.connect()
    try:
        local = "strftime(ts + INTERVAL 2 HOUR, '%Y-%m-%dT%H:%M:%S.%f') || '+02:00'"
        con.execute(f"COPY (SELECT * REPLACE ({local} AS ts) FROM read_csv('{paths['requests']}')) "
                    f"TO '{tmp_path / 'offset.csv'}' (HEADER)")
    finally:
        con.close()
    log = load_log(import_log({**paths, "requests": str(tmp_path / "offset.csv")}, tmp_path / "offset.duckdb"))
    assert np.array_equal(log.ts, tiny_log.ts)


@pytest.mark.parametrize("unit", ["epoch(ts)", "epoch_ms(ts)", "epoch_us(ts)", "epoch_ns(ts)"])
def test_unix_times_import_as_timestamps_whatever_their_unit(tiny_log_path, tiny_log, tmp_path, unit):
    """Logs often keep time as a Unix number (KuaiRand's time_ms). A ts column of numbers alone is read in
    the unit its magnitude says; text that is neither a date nor a number is refused by row, and so is a
    column that mixes dates and numbers."""
    paths = _export(tiny_log_path, tmp_path, "csv", {})
    con = duckdb.connect()
    try:
        con.execute(f"COPY (SELECT * REPLACE ({unit} AS ts) FROM read_csv('{paths['requests']}')) TO "
                    f"'{tmp_path / 'epoch.csv'}' (HEADER)")
        for name, other in (("mixed", "'soon'"), ("dates", "ts::VARCHAR")):
            con.execute(f"COPY (SELECT * REPLACE (CASE WHEN request_id = 3 THEN {other} ELSE epoch(ts)::VARCHAR "
                        f"END AS ts) FROM read_csv('{paths['requests']}')) TO '{tmp_path / name}.csv' (HEADER)")
    finally:
        con.close()
    log = load_log(import_log({**paths, "requests": str(tmp_path / "epoch.csv")}, tmp_path / "epoch.duckdb"))
    within = np.timedelta64(1000 if unit == "epoch_ms(ts)" else 1, "us")  # milliseconds drop the microseconds
    assert (np.abs(log.ts - tiny_log.ts) < within).all()
    with pytest.raises(LogError, match=r"mixed\.csv: column 'ts' must be TIMESTAMP or a Unix time: row \d+ "
                                       r"\('soon'\)$"):
        import_log({**paths, "requests": str(tmp_path / "mixed.csv")}, tmp_path / "mixed.duckdb")
    with pytest.raises(LogError, match=r"dates\.csv: column 'ts' mixes dates \(1 rows\) and Unix times"):
        import_log({**paths, "requests": str(tmp_path / "dates.csv")}, tmp_path / "dates.duckdb")


def test_force_replaces_a_log_beside_a_stale_wal_and_cleans_dead_leftovers(tmp_path):
    """A crashed writer leaves `log.duckdb.wal`; --force must give a readable new log, not 'WAL does not match'."""
    import shutil
    from pathlib import Path

    from mtf_core.simulate import SimConfig, generate
    from mtf_core.store import load_log

    out = tmp_path / "log.duckdb"
    config = SimConfig(n_users=40, sessions_per_user=2, n_items=200, seed=5)
    generate(config, str(out))
    # A WAL that does not belong to the new file: another database's, left beside ours.
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("PRAGMA disable_checkpoint_on_shutdown")
    con.execute("CREATE TABLE t AS SELECT range AS x FROM range(1000)")
    shutil.copy(str(other) + ".wal", str(out) + ".wal")
    con.close()
    assert Path(str(out) + ".wal").stat().st_size > 0
    (tmp_path / ".log.duckdb.tmp-999999999").write_bytes(b"half-written by a killed process")
    generate(config, str(out), force=True)
    assert load_log(out).n_requests > 0
    assert not Path(str(out) + ".wal").exists()
    assert not (tmp_path / ".log.duckdb.tmp-999999999").exists()


def test_force_refuses_to_replace_a_log_open_in_another_process(tmp_path):
    import subprocess
    import sys
    import time

    from mtf_core.errors import LogError
    from mtf_core.simulate import SimConfig, generate

    out = tmp_path / "log.duckdb"
    config = SimConfig(n_users=40, sessions_per_user=2, n_items=200, seed=5)
    generate(config, str(out))
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(out)!r}); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(LogError, match="open in another process"):
            generate(config, str(out), force=True)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    time.sleep(0.1)
    generate(config, str(out), force=True)  # once closed, --force replaces it


def test_uploaded_files_are_named_in_messages_not_their_scratch_copies(tmp_path):
    from mtf_core.store import import_uploads

    users = ("my users.csv", b"user_id,segment\n1,a\n")
    impressions = ("clicks.csv", b"request_id,item_id,position,s_click,y_click\n1,7,0,0.5,1\n")
    bad_requests = ("reqs.csv", b"request_id,session_id,user_id,step,ts,w_click\n1,1,1,0,2024-01-01,lots\n")
    with pytest.raises(LogError) as caught:
        import_uploads({"users": users, "requests": bad_requests, "impressions": impressions}, tmp_path / "a.duckdb")
    message = str(caught.value)
    assert "uploaded file 'reqs.csv' (requests)" in message and "w_click" in message
    assert "mtf-upload-" not in message and "/tmp" not in message
    # A tasks file uploaded beside the tables declares the tasks (here: watch time, continuous).
    good_requests = ("reqs.csv", b"request_id,session_id,user_id,step,ts,w_watch\n1,1,1,0,2024-01-01,1\n")
    watch = ("w.csv", b"request_id,item_id,position,s_watch,y_watch\n1,7,0,3.5,12\n")
    tasks = ("tasks.csv", b"name,kind,description\nwatch,continuous,seconds watched\n")
    out = import_uploads({"users": users, "requests": good_requests, "impressions": watch, "tasks": tasks},
                         tmp_path / "b.duckdb")
    con = open_log(out)
    try:
        assert con.execute("SELECT name, kind FROM tasks").fetchall() == [("watch", "continuous")]
    finally:
        con.close()


def test_gzipped_csv_and_boolean_labels_import_as_their_plain_equivalents(tiny_log_path, tiny_log, tmp_path):
    """Feeds export gzipped text and labels as booleans (a BOOLEAN Parquet column, true/false in a CSV)."""
    paths = _export(tiny_log_path, tmp_path, "csv", {})
    binary = [t.name for t in tiny_log.tasks if t.kind == "binary"]
    assert binary
    as_text = ", ".join(f"CASE y_{t} WHEN 1 THEN 'true' WHEN 0 THEN 'FALSE' END AS y_{t}" for t in binary)
    as_boolean = ", ".join(f"(y_{t} = 1) AS y_{t}" for t in binary)  # NULL stays NULL
    source = f"read_csv('{paths['impressions']}')"
    con = duckdb.connect()
    try:
        con.execute(f"COPY (SELECT * REPLACE ({as_text}) FROM {source}) TO '{tmp_path / 'impressions.csv.gz'}' "
                    "(HEADER, COMPRESSION gzip)")
        con.execute(f"COPY (SELECT * REPLACE ({as_boolean}) FROM {source}) TO '{tmp_path / 'impressions.parquet'}' "
                    "(FORMAT parquet)")
    finally:
        con.close()
    for name in ("impressions.csv.gz", "impressions.parquet"):
        log = load_log(import_log({**paths, "impressions": str(tmp_path / name)}, tmp_path / f"{name}.duckdb"))
        np.testing.assert_array_equal(np.isnan(log.labels), np.isnan(tiny_log.labels))
        np.testing.assert_allclose(np.nan_to_num(log.labels), np.nan_to_num(tiny_log.labels))
        np.testing.assert_allclose(log.scores, tiny_log.scores)
    with pytest.raises(LogError, match=r"impressions\.parquet\.gz: unknown file type '\.parquet\.gz'"):
        (tmp_path / "impressions.parquet.gz").write_bytes(b"")
        import_log({**paths, "impressions": str(tmp_path / "impressions.parquet.gz")}, tmp_path / "x.duckdb")
