"""Import KuaiRand (Kuaishou, CIKM 2022, CC BY-SA 4.0) into the session-log schema, with MTL scores.

KuaiRand logs one row per impression: who saw which video when, and twelve feedback signals. The importer
turns that into requests and sessions: a user's impressions in time order are cut into sessions at gaps
longer than `session_gap_minutes`, and each session into requests of `slate_size` consecutive impressions
(positions in time order). A session's `returned` is whether the user's next session starts within a day
of its end (unknown when the data end first). Segments come from a user attribute (`user_active_degree` by
default), user and video features from the feature files (their numeric columns, as they are).

Tasks are the signals with enough positives (binary ones with fewer than `min_positives`, continuous ones
with fewer non-zero values, are dropped, and the report says so). Continuous tasks are measured in units of
their standard deviation (`task_scale = "standardised"`, the default) so that a sum fusion with equal
weights does not rank by play time in seconds alone; `raw` keeps seconds. Their GAUC threshold is the
median over shown items.

No fusion policy was logged (random exposure replaced a feed slot with a uniformly drawn video), so the
logged weights are NULL: what such a log supports is the direct model and re-ranking metrics on the
random-exposure labels, never importance weighting. Scores come from the MTL scoring step
(`mtf_core.scoring`): cross-fitted over users, or trained on `train_logs` (the standard, production logs)
and applied to the random log, as xMTF did.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import duckdb
import numpy as np

from mtf_core.errors import LogError
from mtf_core.schema import IDENTIFIER, Task, quote_ident
from mtf_core.scoring import ScoringConfig, score_log
from mtf_core.store import write_log

__all__ = ["SIGNALS", "KuaiRandConfig", "ImportReport", "import_kuairand", "NOTICE"]

# KuaiRand column -> (task name, kind, divisor to the task's unit, description)
SIGNALS: dict[str, tuple[str, str, float, str]] = {
    "is_click": ("click", "binary", 1.0, "clicked the video"),
    "long_view": ("long_view", "binary", 1.0, "long view (KuaiRand's rule on play time against duration)"),
    "is_like": ("like", "binary", 1.0, "liked the video"),
    "is_follow": ("follow", "binary", 1.0, "followed the author"),
    "is_comment": ("comment", "binary", 1.0, "commented"),
    "is_forward": ("forward", "binary", 1.0, "forwarded (shared)"),
    "is_hate": ("hate", "binary", 1.0, "marked 'not interested' (a negative signal)"),
    "is_profile_enter": ("profile_enter", "binary", 1.0, "entered the author's profile"),
    "play_time_ms": ("play_time", "continuous", 1000.0, "play time"),
    "profile_stay_time": ("profile_stay", "continuous", 1.0, "time on the author's profile"),
    "comment_stay_time": ("comment_stay", "continuous", 1.0, "time in the comments"),
}
REQUIRED = ("user_id", "video_id", "time_ms")
TASK_SCALES = ("standardised", "raw")
NOTICE = ("Derived from KuaiRand (Kuaishou): \"KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly "
          "Exposed Videos\", Chongming Gao, Shijun Li, Yuan Zhang, Jiawei Chen, Biao Li, Wenqiang Lei, Peng Jiang, "
          "Xiangnan He, CIKM 2022. Licence: Creative Commons Attribution-ShareAlike 4.0 (CC BY-SA 4.0); data "
          "derived from it (this log, its scores) stays under CC BY-SA 4.0 and must keep this notice.")


@dataclass(frozen=True)
class KuaiRandConfig:
    segment_by: str = "user_active_degree"
    session_gap_minutes: float = 30.0
    slate_size: int = 6
    min_positives: int = 20
    task_scale: str = "standardised"
    return_window_hours: float = 24.0
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def __post_init__(self) -> None:
        if self.slate_size < 1 or self.session_gap_minutes <= 0 or self.min_positives < 1:
            raise LogError("need slate_size >= 1, session_gap_minutes > 0 and min_positives >= 1")
        if self.task_scale not in TASK_SCALES:
            raise LogError(f"task scale {self.task_scale!r}: expected one of {', '.join(TASK_SCALES)}")


@dataclass(frozen=True)
class ImportReport:
    out: str
    n_impressions: int
    n_requests: int
    n_sessions: int
    n_users: int
    n_items: int
    tasks: list[dict[str, object]]
    dropped: list[str]
    segments: dict[str, int]
    random_exposure: bool
    scoring: dict[str, object]
    notes: list[str]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _read_csvs(con: duckdb.DuckDBPyConnection, name: str, files: Sequence[Path], required: Sequence[str],
               as_text: bool = False) -> list[str]:
    """Read CSV files into table `name` (same columns in each; `as_text`: every column as text, to be cast and
    checked per row), naming the file of any problem."""
    columns: list[str] | None = None
    options = "header = true, null_padding = true" + (", all_varchar = true" if as_text else "")
    for i, path in enumerate(files):
        if not path.exists():
            raise LogError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise LogError(f"{path}: the file is empty")
        try:
            rel = con.execute(f"SELECT * FROM read_csv(?, {options}) LIMIT 0", [str(path)])
            cols = [d[0] for d in rel.description]
        except duckdb.Error as exc:
            raise LogError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") from exc
        missing = [c for c in required if c not in cols]
        if missing:
            raise LogError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(cols[:25])})")
        if columns is not None and set(cols) != set(columns):
            raise LogError(f"{path}: its columns differ from {files[0]}'s ({sorted(set(cols) ^ set(columns))})")
        columns = cols
        select = f"SELECT *, {i} AS __file, row_number() OVER () AS __row FROM read_csv(?, {options})"
        try:
            into = f"INSERT INTO {quote_ident(name)} BY NAME" if i else f"CREATE TABLE {quote_ident(name)} AS"
            con.execute(f"{into} {select}", [str(path)])
        except duckdb.Error as exc:
            raise LogError(f"{path}: cannot be read as CSV ({str(exc).splitlines()[0]})") from exc
    assert columns is not None
    empty = con.execute(f"SELECT count(*) FROM {quote_ident(name)}").fetchone()[0] == 0  # type: ignore[index]
    if empty:
        raise LogError(f"{files[0]}: has a header but no rows")
    _check_numbers(con, name, files, required, "BIGINT", allow_empty=False)
    return columns


def _check_numbers(con: duckdb.DuckDBPyConnection, name: str, files: Sequence[Path], columns: Sequence[str],
                   dtype: str, allow_empty: bool = True) -> None:
    """Refuse, naming the file, column and rows, values of `columns` that are not numbers of `dtype`."""
    for col in columns:
        value = f"nullif(trim({quote_ident(col)}::VARCHAR), '')"
        bad_if = f"TRY_CAST({value} AS {dtype}) IS NULL" + (f" AND {value} IS NOT NULL" if allow_empty else "")
        bad = con.execute(f"SELECT __file, __row, {quote_ident(col)}::VARCHAR FROM {quote_ident(name)} "
                          f"WHERE {bad_if} ORDER BY __file, __row LIMIT 3").fetchall()
        if bad:
            rows = ", ".join(f"row {r} ({v!r})" for _, r, v in bad)
            what = "an integer" if dtype == "BIGINT" else "a number"
            raise LogError(f"{files[bad[0][0]]}: column {col!r} must be {what}: {rows}")


def _grouped(con: duckdb.DuckDBPyConnection, source: str, signals: list[str], config: KuaiRandConfig
             ) -> dict[str, np.ndarray]:
    """Impressions of `source` with their session, request and position (one SQL pass, no Python loop)."""
    gap_ms = int(config.session_gap_minutes * 60_000)
    sig = ", ".join(f"TRY_CAST(nullif(trim({quote_ident(s)}::VARCHAR), '') AS DOUBLE) AS {quote_ident(s)}"
                    for s in signals)
    rand = ("coalesce(TRY_CAST(is_rand AS INTEGER), 0)" if "is_rand" in _columns(con, source)
            else "NULL::INTEGER")
    sql = f"""
        WITH raw AS (
            SELECT user_id::BIGINT AS user_id, video_id::BIGINT AS video_id, time_ms::BIGINT AS time_ms,
                   {rand} AS is_rand, {sig}
            FROM {quote_ident(source)}),
        ordered AS (
            SELECT *, time_ms - lag(time_ms) OVER (PARTITION BY user_id ORDER BY time_ms, video_id) AS gap FROM raw),
        sessions AS (
            SELECT *, sum(CASE WHEN gap IS NULL OR gap > $gap THEN 1 ELSE 0 END)
                      OVER (PARTITION BY user_id ORDER BY time_ms, video_id ROWS UNBOUNDED PRECEDING) AS session_no
            FROM ordered),
        slots AS (
            SELECT *, row_number() OVER (PARTITION BY user_id, session_no ORDER BY time_ms, video_id) - 1 AS k
            FROM sessions)
        SELECT *, k // $slate AS step, k % $slate AS position,
               dense_rank() OVER (ORDER BY user_id, session_no) - 1 AS session_id,
               dense_rank() OVER (ORDER BY user_id, session_no, k // $slate) - 1 AS request_id
        FROM slots ORDER BY request_id, position"""
    return con.execute(sql, {"gap": gap_ms, "slate": config.slate_size}).fetchnumpy()


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE {quote_ident(table)}").fetchall()]


def _feature_name(column: str) -> str | None:
    name = column.strip().lower()
    return name if IDENTIFIER.match(name) and len(name) <= 60 else None


def _features(con: duckdb.DuckDBPyConnection, table: str, key: str, ids: np.ndarray, skip: set[str]
              ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Numeric feature columns of `table` for `ids` (absent ids: zeros): names, values `[n, F]`, found `[n]`."""
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {quote_ident(table)})").fetchall())
    numeric = [c for c, t in types.items()
               if c != key and c not in skip and not c.endswith("_id") and c not in ("__file", "__row")
               and t in ("BIGINT", "INTEGER", "DOUBLE", "FLOAT", "SMALLINT", "TINYINT", "HUGEINT")
               and _feature_name(c)]
    con.execute("CREATE OR REPLACE TEMP TABLE __ids AS SELECT unnest(?::BIGINT[]) AS id", [ids.tolist()])
    cols = ", ".join(f"t.{quote_ident(c)}::DOUBLE AS {quote_ident(c)}" for c in numeric)
    sql = (f"SELECT i.id, t.{quote_ident(key)} IS NOT NULL AS found{', ' + cols if cols else ''} FROM __ids i "
           f"LEFT JOIN (SELECT DISTINCT ON ({quote_ident(key)}) * FROM {quote_ident(table)}) t "
           f"ON t.{quote_ident(key)} = i.id ORDER BY i.id")
    out = con.execute(sql).fetchnumpy()
    values = np.stack([np.nan_to_num(np.asarray(out[c], dtype=np.float64)) for c in numeric], 1) if numeric \
        else np.zeros((len(ids), 0))
    return [_feature_name(c) for c in numeric], values, np.asarray(out["found"], dtype=bool)  # type: ignore[misc]


def _returned(session_user: np.ndarray, start: np.ndarray, end: np.ndarray, data_end: int, window_ms: float
              ) -> np.ndarray:
    """Per session (ordered by user, then time): the next session of the user starts within the window of this
    one's end (1.0), does not (0.0), or the data end first (NaN)."""
    nxt_same = np.r_[session_user[1:] == session_user[:-1], False]
    nxt_start = np.r_[start[1:], 0]
    came_back = nxt_same & (nxt_start - end <= window_ms)
    unknown = ~nxt_same & (data_end - end < window_ms)
    return np.where(unknown, np.nan, came_back.astype(np.float64))


def _tables(rows: dict[str, np.ndarray], label: np.ndarray, tasks: list[Task], features: tuple, logged_by: str,
            config: KuaiRandConfig) -> dict[str, dict[str, np.ndarray]]:
    """The log's tables (scores NULL: the scoring step fills them) from grouped impressions `rows` (ordered
    by request, then position), their labels `[n, K]` and the users' and videos' features."""
    users_u, segment, uf_names, uf, items_u, if_names, itf = features
    _, request_id = np.unique(np.asarray(rows["request_id"], np.int64), return_inverse=True)
    _, session_of_row = np.unique(np.asarray(rows["session_id"], np.int64), return_inverse=True)
    user_id, time_ms = np.asarray(rows["user_id"], np.int64), np.asarray(rows["time_ms"], np.int64)
    first = np.r_[True, request_id[1:] != request_id[:-1]]
    r_session, r_user, r_time = session_of_row[first], user_id[first], time_ms[first]
    n_req, n_sessions = int(first.sum()), int(session_of_row.max()) + 1
    s_first = np.r_[True, r_session[1:] != r_session[:-1]]
    last_time = np.zeros(n_sessions, dtype=np.int64)
    np.maximum.at(last_time, session_of_row, time_ms)
    returned = _returned(r_user[s_first], r_time[s_first], last_time, int(time_ms.max()),
                         config.return_window_hours * 3_600_000)
    nan = np.full(n_req, np.nan)
    return {
        "users": {"user_id": users_u, "segment": segment, **{f"uf_{f}": uf[:, k] for k, f in enumerate(uf_names)}},
        "items": {"item_id": items_u, **{f"if_{f}": itf[:, k] for k, f in enumerate(if_names)}},
        "requests": {"request_id": np.arange(n_req, dtype=np.int64), "session_id": r_session, "user_id": r_user,
                     "step": np.asarray(rows["step"], np.int64)[first].astype(np.int32),
                     "ts": r_time.astype("datetime64[ms]").astype("datetime64[us]"),
                     **{f"w_{t.name}": nan for t in tasks}, "logging_logp": nan,
                     "logging_policy": np.full(n_req, logged_by, dtype=object)},
        "impressions": {"request_id": request_id.astype(np.int64), "item_id": np.asarray(rows["video_id"], np.int64),
                        "position": np.asarray(rows["position"], np.int64).astype(np.int32),
                        **{f"s_{t.name}": np.full(len(request_id), np.nan) for t in tasks},
                        **{f"y_{t.name}": label[:, j] for j, t in enumerate(tasks)}},
        "sessions": {"session_id": np.arange(n_sessions, dtype=np.int64), "user_id": r_user[s_first],
                     "n_requests": np.bincount(r_session, minlength=n_sessions).astype(np.int32),
                     "returned": returned},
    }


def _id_features(con: duckdb.DuckDBPyConnection, user_id: np.ndarray, item_id: np.ndarray, segment_by: str
                 ) -> tuple[tuple, np.ndarray, np.ndarray]:
    """Segments and features of the users and videos of some impressions: ((users, segment, user feature
    names, user features, videos, video feature names, video features), users found, videos found)."""
    users_u, items_u = np.unique(user_id), np.unique(item_id)
    uf_names, uf, user_found = _features(con, "users", "user_id", users_u, {segment_by})
    seg_rows = dict(con.execute(
        f"SELECT user_id::BIGINT, coalesce({quote_ident(segment_by)}::VARCHAR, 'unknown') FROM users "
        "WHERE user_id::BIGINT IN (SELECT unnest(?::BIGINT[]))", [users_u.tolist()]).fetchall())
    segment = np.array([str(seg_rows.get(int(u), "unknown")) or "unknown" for u in users_u.tolist()], dtype=object)
    if_names, itf, item_found = _features(con, "videos", "video_id", items_u, set())
    return (users_u, segment, uf_names, uf, items_u, if_names, itf), user_found, item_found


def import_kuairand(logs: Sequence[str | Path], users: str | Path, videos: str | Path, out: str | Path,
                    train_logs: Sequence[str | Path] = (), config: KuaiRandConfig = KuaiRandConfig(),
                    force: bool = False, progress: Callable[[str], None] | None = None) -> ImportReport:
    """Build a session log at `out` from KuaiRand CSV files (module docstring); returns what it did."""
    say = progress or (lambda _: None)
    log_paths, train_paths = [Path(p) for p in logs], [Path(p) for p in train_logs]
    if not log_paths:
        raise LogError("import-kuairand needs at least one --log file")
    same = {p.resolve() for p in log_paths} & {p.resolve() for p in train_paths}
    if same:
        raise LogError(f"{sorted(same)[0]}: given as --log and as --train-log; the scoring network must be trained "
                       "on other traffic, or its scores would have seen their own labels")
    if Path(out).exists() and not force:
        raise LogError(f"{out}: already exists; pass --force to replace it")
    con = duckdb.connect()
    try:
        columns = _read_csvs(con, "log", log_paths, REQUIRED, as_text=True)
        if train_paths:
            train_columns = _read_csvs(con, "train_log", train_paths, REQUIRED, as_text=True)
        _read_csvs(con, "users", [Path(users)], ["user_id"])
        _read_csvs(con, "videos", [Path(videos)], ["video_id"])
        user_columns = _columns(con, "users")
        if config.segment_by not in user_columns:
            raise LogError(f"{users}: no column {config.segment_by!r} to take segments from (columns: "
                           f"{', '.join(user_columns[:25])})")
        present = [c for c in SIGNALS if c in columns]
        if not present:
            raise LogError(f"{log_paths[0]}: none of KuaiRand's signal columns ({', '.join(SIGNALS)})")
        _check_numbers(con, "log", log_paths, present, "DOUBLE")
        say("grouping impressions into requests and sessions")
        rows = _grouped(con, "log", present, config)
        n = len(rows["request_id"])
        tasks, dropped, labels, scales = [], [], [], []
        for col in present:
            name, kind, divisor, description = SIGNALS[col]
            values = np.asarray(rows[col], dtype=np.float64) / divisor
            positives = int((values > 0).sum())
            if positives < config.min_positives:
                dropped.append(f"{name} ({col}): {positives} of {n} impressions positive, fewer than "
                               f"{config.min_positives}")
                continue
            tasks.append((col, name, kind, description))
            labels.append(values)
        if not tasks:
            raise LogError(f"{log_paths[0]}: no signal has {config.min_positives} positives; dropped: "
                           + "; ".join(dropped))
        label = np.stack(labels, 1)
        user_id, item_id = np.asarray(rows["user_id"], np.int64), np.asarray(rows["video_id"], np.int64)

        say("reading user and video features")
        features, user_found, item_found = _id_features(con, user_id, item_id, config.segment_by)
        users_u, items_u = features[0], features[4]
        notes = []
        if not user_found.all():
            notes.append(f"{int((~user_found).sum())} of {len(users_u)} users have no row in {users}: segment "
                         "'unknown', features 0")
        if not item_found.all():
            notes.append(f"{int((~item_found).sum())} of {len(items_u)} videos have no row in {videos}: features 0")
        task_objects = []
        for j, (col, name, kind, description) in enumerate(tasks):
            unit = "seconds" if col == "play_time_ms" else "units of the file"
            threshold, scale = None, 1.0
            if kind == "continuous":
                if config.task_scale == "standardised":
                    scale = float(label[:, j].std()) or 1.0
                    description += f", in standard deviations ({scale:.3g} {unit})"
                else:
                    description += f", in {unit}"
                label[:, j] /= scale
                threshold = float(np.median(label[:, j]))
            task_objects.append(Task(name, kind, description, threshold))
            scales.append(scale)
        random_exposure = bool(np.all(np.asarray(rows["is_rand"], dtype=np.float64) == 1))
        meta = {
            "source": "KuaiRand (Kuaishou, CIKM 2022): " + ", ".join(
                p.name for p in [*log_paths, *train_paths, Path(users), Path(videos)]),
            "licence": "CC BY-SA 4.0",
            "attribution": NOTICE,
            "random_exposure": "true" if random_exposure else "false",
            "logged_weights": "unknown",
            "importer": json.dumps({"command": "import-kuairand", **{k: v for k, v in asdict(config).items()
                                                                     if k != "scoring"},
                                    "train_logs": [p.name for p in train_paths]}),
            "dropped_tasks": json.dumps(dropped),
        }
        logged_by = "random exposure (no fusion weights)" if random_exposure else "KuaiRand feed (weights not logged)"
        tables = _tables(rows, label, task_objects, features, logged_by, config)
        train_tables = None
        if train_paths:
            say("grouping the training traffic")
            absent = [c for c, *_ in tasks if c not in train_columns]
            if absent:
                raise LogError(f"{train_paths[0]}: missing the signal column(s) {', '.join(absent)} of the log's tasks")
            _check_numbers(con, "train_log", train_paths, [c for c, *_ in tasks], "DOUBLE")
            t_rows = _grouped(con, "train_log", [t[0] for t in tasks], config)
            t_features, _, _ = _id_features(con, np.asarray(t_rows["user_id"], np.int64),
                                            np.asarray(t_rows["video_id"], np.int64), config.segment_by)
            t_label = np.stack([np.asarray(t_rows[c], np.float64) / SIGNALS[c][2] / scales[j]
                                for j, (c, *_) in enumerate(tasks)], 1)
            train_tables = _tables(t_rows, t_label, task_objects, t_features, "KuaiRand feed (weights not logged)",
                                   config)
    except duckdb.Error as exc:
        raise LogError(f"import-kuairand: {str(exc).splitlines()[0]}") from exc
    finally:
        con.close()
    out_path = Path(out)
    with tempfile.TemporaryDirectory(prefix="mtf-kuairand-", dir=out_path.parent if out_path.parent.exists()
                                     else None) as tmp:
        unscored = write_log(Path(tmp) / "unscored.duckdb", tables, tuple(task_objects), meta)
        train_log = None
        if train_tables is not None:
            train_log = write_log(Path(tmp) / "train.duckdb", train_tables, tuple(task_objects), meta)
        say(f"scoring {len(task_objects)} tasks with the MTL scoring step")
        scoring = score_log(unscored, out_path, config.scoring, force=force, train_log=train_log)
    Path(str(out_path) + ".NOTICE.md").write_text(f"# {out_path.name}\n\n{NOTICE}\n", encoding="utf-8")
    n_req = len(tables["requests"]["request_id"])
    seg_names, seg_counts = np.unique(features[1].astype(str), return_counts=True)
    return ImportReport(str(out_path), n, n_req, len(tables["sessions"]["session_id"]), len(users_u), len(items_u),
                        [{"name": t.name, "kind": t.kind, "description": t.description, "threshold": t.threshold}
                         for t in task_objects], dropped, {str(s): int(c) for s, c in zip(seg_names, seg_counts)},
                        random_exposure, scoring.to_json(), notes)

