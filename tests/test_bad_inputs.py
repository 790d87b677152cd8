"""The bad-input corpus (tests/data/bad/cases.json): every case gives its documented exit code and a message
naming the file and the problem, never a traceback. Inputs are never modified."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import duckdb
import pytest

from mtf_core.cli import main

BAD = Path(__file__).resolve().parent / "data" / "bad"
CASES = json.loads((BAD / "cases.json").read_text())


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "" for p in paths]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


@pytest.fixture(scope="module")
def static_run(tiny_log_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    assert main(["train", str(tiny_log_path), "--algo", "static", "--runs", str(folder / "runs"),
                 "--json", "--validation-share", "0"]) == 0
    return folder / "runs"


def _damage(store: Path, kind: str) -> str:
    run_id = next(p.name for p in store.iterdir() if p.is_dir())
    policy = store / run_id / "policy.pt"
    if kind == "corrupted-catalogue":
        (store / "catalogue.duckdb").write_bytes(b"\x00garbage" * 1000)
    elif kind == "missing-policy-file":
        policy.unlink()
    elif kind == "tampered-policy-file":
        policy.write_bytes(policy.read_bytes()[:-4] + b"evil")
    elif kind == "pickle-payload":
        class Payload:
            def __reduce__(self):  # noqa: D105 - what an attacker's file would carry
                return (shutil.rmtree, (str(store),))

        policy.write_bytes(pickle.dumps({"weights": Payload()}))
        con = duckdb.connect(str(store / "catalogue.duckdb"))
        con.execute("UPDATE runs SET policy_sha256 = ?", [hashlib.sha256(policy.read_bytes()).hexdigest()])
        con.close()
    return run_id


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_case(case, capsys, tmp_path, tiny_log_path, static_run):
    kind = case["kind"]
    if kind == "import":
        sources = {t: BAD / f for t, f in case["args"].items() if t != "mapping"}
        before = _digest(list(sources.values()))
        out = tmp_path / "out.duckdb"
        argv = ["import", *[x for t, p in sources.items() for x in (f"--{t}", str(p))],
                "--mapping", str(BAD / case["args"]["mapping"]), "--out", str(out)]
        code, text = _cli(capsys, *argv)
        assert _digest(list(sources.values())) == before, "an import source was modified"
        if code == 2:
            assert not out.exists(), "a failed import left a file in place of the output"
    elif kind == "validate":
        if "sql" in case:
            path = tmp_path / "log.duckdb"
            shutil.copy(tiny_log_path, path)
            con = duckdb.connect(str(path))
            con.execute(case["sql"])
            con.close()
        else:
            path = BAD / case["file"]
        code, text = _cli(capsys, "validate", str(path))
    elif kind == "gate":  # train and evaluate refuse what validate refuses, with its message
        path = tmp_path / "log.duckdb"
        shutil.copy(tiny_log_path, path)
        con = duckdb.connect(str(path))
        con.execute(case["sql"])
        con.close()
        extra = (["--algo", "static", "--runs", str(tmp_path / "runs")] if case["command"] == "train"
                 else ["--policy", "logging", "--n-boot", "10"])
        code, text = _cli(capsys, case["command"], str(path), *extra)
    elif kind == "cli":  # settings and arguments out of range: one line, their allowed range, no traceback
        deep = tmp_path / "deep.json"
        deep.write_text("[" * 100_000 + "]" * 100_000)
        argv = [a.format(log=tiny_log_path, tmp=tmp_path, deep=deep) for a in case["args"]]
        code, text = _cli(capsys, *argv)
    elif kind == "reward":
        code, text = _cli(capsys, "evaluate", str(tiny_log_path), "--policy", "logging", "--reward",
                          str(BAD / case["file"]), "--n-boot", "10")
    else:
        store = tmp_path / "runs"
        shutil.copytree(static_run, store)
        run_id = _damage(store, case["damage"])
        code, text = _cli(capsys, "evaluate", str(tiny_log_path), "--policy", f"run:{run_id}", "--runs", str(store),
                          "--n-boot", "10")
        assert store.exists(), "the pickle payload ran"
    assert code == case["exit"], text
    assert re.search(case["match"], text), f"expected /{case['match']}/ in: {text[:600]}"


def test_sql_looking_column_leaves_every_table_intact(tmp_path, capsys):
    out = tmp_path / "x.duckdb"
    code, _ = _cli(capsys, "import", "--users", str(BAD / "users_sql_columns.csv"), "--requests",
                   str(BAD / "requests.csv"), "--impressions", str(BAD / "impressions.csv"), "--mapping",
                   str(BAD / "mapping_ok.json"), "--out", str(out))
    assert code == 0
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT count(*) FROM users").fetchone()[0] == 3
    con.close()


def test_corpus_has_at_least_thirty_cases():
    assert len(CASES) >= 30
