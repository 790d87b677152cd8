"""The one exception type for bad input, whose message a user can act on."""

from __future__ import annotations

import errno

__all__ = ["LogError", "EXIT_OK", "EXIT_PROBLEMS", "EXIT_UNUSABLE", "is_disk_full"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_UNUSABLE = 2


class LogError(Exception):
    """Bad input: a missing file, a malformed log, a bad reward spec or run store.

    The message names the file, table/column and offending rows where they are known; the CLI prints it
    without a traceback and exits with `exit_code`, the app shows it in `st.error`.
    """

    def __init__(self, message: str, exit_code: int = EXIT_UNUSABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is a full disk (an OSError with ENOSPC, or DuckDB's message for one), which is never
    the fault of the file being read."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left on device" in text or "disk quota exceeded" in text or "disk is full" in text
