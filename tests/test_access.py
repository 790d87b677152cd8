"""Access: allowed data folders (no escape through `..` or symbolic links) and the upload size limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from mtf_core.access import check_path_allowed, check_upload_size
from mtf_core.errors import LogError

ROOT = Path(__file__).resolve().parent.parent


def test_paths_inside_allowed_folders_pass(tmp_path):
    inside = tmp_path / "data" / "log.duckdb"
    assert check_path_allowed(inside, [tmp_path / "data"]) == inside.resolve()


@pytest.mark.parametrize("trick", ["../secret.duckdb", "./../secret.duckdb", "sub/../../secret.duckdb"])
def test_dotdot_tricks_are_refused(tmp_path, trick):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    with pytest.raises(LogError, match="outside the allowed data folders"):
        check_path_allowed(tmp_path / "data" / trick, [tmp_path / "data"])


def test_symbolic_links_out_of_the_folder_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.duckdb").write_bytes(b"")
    link = tmp_path / "data" / "innocent.duckdb"
    link.symlink_to(tmp_path / "secret.duckdb")
    with pytest.raises(LogError, match="outside the allowed data folders"):
        check_path_allowed(link, [tmp_path / "data"])


def test_no_configured_folder_means_no_restriction(tmp_path, monkeypatch):
    monkeypatch.delenv("MTF_DATA_DIRS", raising=False)
    assert check_path_allowed(tmp_path / "anything.duckdb") == (tmp_path / "anything.duckdb").resolve()


def test_upload_limit_is_configurable(monkeypatch):
    monkeypatch.setenv("MTF_MAX_UPLOAD_MB", "1")
    check_upload_size("small.csv", 1024)
    with pytest.raises(LogError, match=r"big\.csv: .* above the upload limit"):
        check_upload_size("big.csv", 5 * 1024 * 1024)


def test_the_app_refuses_a_path_outside_the_allowed_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MTF_DATA_DIRS", str(tmp_path / "allowed"))
    at = AppTest.from_file(str(ROOT / "pages" / "data.py"), default_timeout=240)
    at.run()
    at.radio[0].set_value("DuckDB file on this machine").run()
    at.text_input[0].set_value(str(tmp_path / "allowed" / ".." / "other.duckdb"))
    at.button[0].click().run()
    assert not at.exception
    assert any("outside the allowed data folders" in e.value for e in at.error)
