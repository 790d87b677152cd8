"""Writes the bad-input corpus (small CSV/Parquet/JSON files) and `cases.json`, its expected outcomes.

Run from the repository root: `python tests/data/bad/make_corpus.py`. The files are committed; this
script documents how each was made. Cases that need a DuckDB log or a run store carry a recipe that
`tests/test_bad_inputs.py` applies to a fresh copy at test time.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

USERS = "user_id,segment,uf_age\n1,new,0.1\n2,core,0.5\n3,power,0.9\n"
REQUESTS = ("request_id,session_id,user_id,step,ts,w_click,w_watch_time,logging_logp\n"
            "1,10,1,0,2026-01-01 10:00:00,0.6,0.4,0.1\n2,10,1,1,2026-01-01 10:01:00,0.5,0.5,0.2\n"
            "3,11,2,0,2026-01-01 11:00:00,0.7,0.3,0.3\n4,12,3,0,2026-01-01 12:00:00,0.2,0.8,0.4\n")
IMPRESSIONS_HEADER = "request_id,item_id,position,s_click,y_click,s_watch_time,y_watch_time\n"
IMPRESSIONS_ROWS = [(r, i, p, 0.1 * i, 1 if (r + i) % 2 else 0, 0.5 * i, 0.3 * i if (r + i) % 2 else 0.0)
                    for r in range(1, 5) for i, p in ((1, 0), (2, 1), (3, "")) ]


def impressions(rows=IMPRESSIONS_ROWS, header=IMPRESSIONS_HEADER, sep=",") -> str:
    return header.replace(",", sep) + "".join(sep.join(str(v) for v in row) + "\n" for row in rows)


TASKS_MAP = {"tasks": [{"name": "click", "kind": "binary"}, {"name": "watch_time", "kind": "continuous"}]}


def edit(rows, index, column, value):
    rows = [list(r) for r in rows]
    rows[index][column] = value
    return rows


def main() -> None:
    files: dict[str, str | bytes] = {
        "users.csv": USERS, "requests.csv": REQUESTS, "impressions.csv": impressions(),
        "mapping_ok.json": json.dumps(TASKS_MAP),
        "empty.csv": "",
        "requests_header_only.csv": REQUESTS.splitlines()[0] + "\n",
        "impressions_semicolon.csv": impressions(sep=";"),
        "requests_text_weight.csv": REQUESTS.replace("0.5,0.5,0.2", "high,0.5,0.2"),
        "impressions_nan.csv": impressions(edit(IMPRESSIONS_ROWS, 2, 3, "NaN")),
        "impressions_inf.csv": impressions(edit(IMPRESSIONS_ROWS, 4, 6, "inf")),
        "impressions_fractional_position.csv": impressions(edit(IMPRESSIONS_ROWS, 1, 2, "0.5")),
        "requests_gzipped.csv.gz": gzip.compress(REQUESTS.encode(), mtime=0),
        "impressions_negative_watch.csv": impressions(edit(IMPRESSIONS_ROWS, 0, 6, -3.5)),
        "impressions_prob_above_one.csv": impressions(edit(IMPRESSIONS_ROWS, 1, 3, 1.7)),
        "users_duplicate_columns.csv": "user_id,segment,segment\n1,new,core\n2,core,new\n3,power,new\n",
        "users_unicode_columns.csv": "user_id,segment,uf_âge,ünïcode\n1,new,0.1,x\n2,core,0.5,y\n3,power,0.9,z\n",
        "users_sql_columns.csv": 'user_id,segment,"x""; drop table users; --"\n1,new,1\n2,core,2\n3,power,3\n',
        "users_missing_id.csv": "id,segment\n1,new\n2,core\n3,power\n",
        "users_duplicate_key.csv": USERS + "2,casual,0.3\n",
        "impressions_orphan.csv": impressions(IMPRESSIONS_ROWS + [(99, 1, 0, 0.1, 1, 0.5, 0.2)]),
        "impressions_duplicate_position.csv": impressions(edit(IMPRESSIONS_ROWS, 1, 2, 0)),
        "users_latin1.csv": "user_id,segment,uf_age\n1,caf\xe9,0.1\n2,core,0.5\n3,power,0.9\n".encode("latin-1"),
        "users.xlsx": b"PK\x03\x04 not really a spreadsheet",
        "mapping_missing_column.json": json.dumps({"tables": {"users": {"no_such_column": "segment"}}, **TASKS_MAP}),
        "mapping_injection.json": json.dumps({"tables": {"users": {"segment": 'x"; drop table users; --'}},
                                              **TASKS_MAP}),
        "mapping_not_json.json": "{tables: users",
        "mapping_unicode.json": json.dumps({"tables": {"users": {"uf_âge": "uf_age"}}, **TASKS_MAP}),
        "reward_unknown_task.json": json.dumps({"coefficients": {"click": 1, "dwell": 2}}),
        "reward_text_coefficient.json": json.dumps({"coefficients": {"click": "lots"}}),
        "reward_all_zero.json": json.dumps({"coefficients": {"click": 0, "like": 0}}),
        "reward_huge.json": json.dumps({"coefficients": {"click": 1e300}}),
        "reward_not_json.json": "coefficients: click=1",
        "reward_normalize_string.json": json.dumps({"coefficients": {"click": 1.0}, "normalize": "no"}),
        "reward_negative_penalty.json": json.dumps({"coefficients": {"click": 1.0}, "share_penalty": -3}),
        "mapping_duplicate_task.json": json.dumps({"tasks": [*TASKS_MAP["tasks"][:1], *TASKS_MAP["tasks"]]}),
    }
    for name, content in files.items():
        path = HERE / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    import duckdb

    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM read_csv('{HERE / 'impressions.csv'}')) TO '{HERE / 'impressions.parquet'}' "
                "(FORMAT parquet)")
    con.close()
    data = (HERE / "impressions.parquet").read_bytes()
    (HERE / "impressions_truncated.parquet").write_bytes(data[: len(data) // 2])

    def imp(name: str, expect: int, match: str, **over: str) -> dict[str, object]:
        args = {"users": "users.csv", "requests": "requests.csv", "impressions": "impressions.csv",
                "mapping": "mapping_ok.json", **over}
        return {"id": name, "kind": "import", "args": args, "exit": expect, "match": match}

    cases = [
        imp("empty-users", 2, r"empty\.csv: the file is empty", users="empty.csv"),
        imp("header-only-requests", 2, "has a header but no rows", requests="requests_header_only.csv"),
        imp("semicolon-delimiter-is-sniffed", 0, "wrote", impressions="impressions_semicolon.csv"),
        imp("text-in-weight-column", 2, r"requests_text_weight\.csv: column 'w_click' must be DOUBLE: row 2 \('high'\)",
            requests="requests_text_weight.csv"),
        imp("nan-score", 2, r"column 's_click' holds NaN or infinite values at rows \[3\]",
            impressions="impressions_nan.csv"),
        imp("infinite-label", 2, r"column 'y_watch_time' holds NaN or infinite", impressions="impressions_inf.csv"),
        imp("fractional-position", 2, r"column 'position' must be INTEGER \(a whole number\): row 2 \('0\.5'\)",
            impressions="impressions_fractional_position.csv"),
        imp("gzipped-requests-are-read", 0, "wrote", requests="requests_gzipped.csv.gz"),
        imp("negative-watch-time", 1, r"impressions\.y_watch_time: 1 labels outside \[0, inf\)",
            impressions="impressions_negative_watch.csv"),
        imp("probability-above-one", 1, r"impressions\.s_click: 1 scores outside \[0, 1\]",
            impressions="impressions_prob_above_one.csv"),
        imp("duplicate-column-names", 2, r"users_duplicate_columns\.csv: duplicate column names \['segment'\]",
            users="users_duplicate_columns.csv"),
        imp("unicode-columns-ignored", 0, "wrote", users="users_unicode_columns.csv"),
        imp("unicode-column-mapped", 0, "wrote", users="users_unicode_columns.csv", mapping="mapping_unicode.json"),
        imp("sql-looking-column-ignored", 0, "wrote", users="users_sql_columns.csv"),
        imp("truncated-parquet", 2, r"impressions_truncated\.parquet: cannot be read as parquet",
            impressions="impressions_truncated.parquet"),
        imp("parquet-ok", 0, "wrote", impressions="impressions.parquet"),
        imp("mapping-missing-column", 2, "the mapping names column 'no_such_column'", mapping="mapping_missing_column.json"),
        imp("mapping-injection", 2, "is not a lowercase identifier", mapping="mapping_injection.json"),
        imp("mapping-not-json", 2, r"mapping_not_json\.json: mapping is not valid JSON", mapping="mapping_not_json.json"),
        imp("missing-user-id", 2, r"users_missing_id\.csv: missing required column 'user_id'", users="users_missing_id.csv"),
        imp("duplicate-user-key", 2, r"users_duplicate_key\.csv: .*duplicate or NULL key", users="users_duplicate_key.csv"),
        imp("orphan-impressions", 1, r"impressions\.request_id: 1 request_id values have no row in requests",
            impressions="impressions_orphan.csv"),
        imp("duplicate-position", 1, "positions are shown twice", impressions="impressions_duplicate_position.csv"),
        imp("latin1-encoding", 2, r"users_latin1\.csv: cannot be read as csv", users="users_latin1.csv"),
        imp("missing-file", 2, r"nope\.csv: no such file", users="nope.csv"),
        imp("unknown-file-type", 2, r"users\.xlsx: unknown file type", users="users.xlsx"),
    ]
    for name, sql, match in [
        ("log-missing-table", "DROP TABLE sessions", r"\[missing_table\] sessions"),
        ("log-missing-column", "ALTER TABLE impressions DROP COLUMN s_like", r"impressions\.s_like"),
        ("log-wrong-type", "ALTER TABLE requests ALTER COLUMN w_click TYPE VARCHAR", r"\[wrong_type\] requests\.w_click"),
        ("log-negative-weight", "UPDATE requests SET w_like = -1 WHERE request_id = 3", r"\[bad_weight\] requests\.w_like.*3"),
        ("log-nan-weight", "UPDATE requests SET w_share = 'NaN'::DOUBLE WHERE request_id = 4", r"\[bad_weight\] requests\.w_share"),
        ("log-orphan-request", "DELETE FROM users WHERE user_id = 1", r"\[orphan\] requests\.user_id"),
        ("log-duplicate-position", "UPDATE impressions SET position = 0 WHERE request_id = 2 AND position = 1",
         r"\[duplicate_position\] impressions\.position"),
        ("log-score-out-of-range", "UPDATE impressions SET s_finish = 2 WHERE request_id = 5", r"\[out_of_range\] impressions\.s_finish"),
        ("log-bad-task-kind", "UPDATE tasks SET kind = 'ordinal' WHERE name = 'like'", r"\[bad_kind\] tasks\.kind"),
        ("log-infinite-logp", "UPDATE requests SET logging_logp = 'Infinity'::DOUBLE WHERE request_id = 6",
         r"requests\.logging_logp"),
    ]:
        cases.append({"id": name, "kind": "validate", "sql": sql, "exit": 1, "match": match})
    cases += [
        {"id": "log-not-a-database", "kind": "validate", "file": "users.csv", "exit": 2, "match": "not a readable DuckDB"},
        {"id": "log-empty-file", "kind": "validate", "file": "empty.csv", "exit": 2, "match": "not a readable DuckDB"},
    ]
    for name, match in [("reward_unknown_task.json", r"unknown tasks \['dwell'\]"),
                        ("reward_text_coefficient.json", "must be a number"),
                        ("reward_all_zero.json", "every coefficient is zero"),
                        ("reward_huge.json", "not a finite number of at most"),
                        ("reward_not_json.json", "not valid JSON")]:
        cases.append({"id": name[:-5].replace("_", "-"), "kind": "reward", "file": name, "exit": 2,
                      "match": name.replace(".", r"\.") + ".*" + match})
    for name, match in [("corrupted-catalogue", "run catalogue is corrupted or unreadable"),
                        ("missing-policy-file", "policy files are missing"),
                        ("tampered-policy-file", "checksum mismatch"),
                        ("pickle-payload", "not a loadable state dict")]:
        cases.append({"id": name, "kind": "runstore", "damage": name, "exit": 2, "match": match})
    # Cases written into cases.json by hand (with their files) stay, in their place; this script's replace
    # theirs by id and new ones go last.
    target = HERE / "cases.json"
    made = {case["id"]: case for case in cases}
    kept = json.loads(target.read_text()) if target.exists() else []
    merged = [made.pop(case["id"], case) for case in kept] + list(made.values())
    target.write_text(json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(merged)} cases")


if __name__ == "__main__":
    main()
