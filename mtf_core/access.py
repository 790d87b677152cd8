"""Who may read what: allowed data folders and upload size limits (configured by environment variables).

- `MTF_DATA_DIRS`: folders (separated by `:`) the app may open logs from; unset means no restriction.
  A path is resolved (symbolic links followed, `..` removed) before the check, so neither escapes.
- `MTF_MAX_UPLOAD_MB`: the largest upload the app accepts (default 200).
"""

from __future__ import annotations

import os
from pathlib import Path

from mtf_core.errors import EXIT_UNUSABLE, LogError

__all__ = ["allowed_dirs", "check_path_allowed", "max_upload_bytes", "check_upload_size"]


def allowed_dirs() -> list[Path]:
    raw = os.environ.get("MTF_DATA_DIRS", "")
    return [Path(p).resolve() for p in raw.split(os.pathsep) if p.strip()]


def check_path_allowed(path: str | os.PathLike[str], dirs: list[Path] | None = None) -> Path:
    """The resolved path if it lies inside an allowed folder (or no folder is configured), else LogError."""
    folders = allowed_dirs() if dirs is None else [Path(d).resolve() for d in dirs]
    resolved = Path(path).expanduser().resolve()
    if folders and not any(resolved == d or d in resolved.parents for d in folders):
        raise LogError(f"{path}: outside the allowed data folders ({', '.join(str(d) for d in folders)}); "
                       "set MTF_DATA_DIRS to allow more", EXIT_UNUSABLE)
    return resolved


def max_upload_bytes() -> int:
    try:
        return int(float(os.environ.get("MTF_MAX_UPLOAD_MB", "200")) * 1024 * 1024)
    except ValueError:
        return 200 * 1024 * 1024


def check_upload_size(name: str, size: int) -> None:
    limit = max_upload_bytes()
    if size > limit:
        raise LogError(f"{name}: {size / 1e6:.1f} MB is above the upload limit of {limit / 1e6:.0f} MB "
                       "(MTF_MAX_UPLOAD_MB)", EXIT_UNUSABLE)
