"""What an unexpected failure leaves for a bug report: its traceback, with every secret redacted, in a file
beside the state. The log keeps its one line per failure (a traceback there is noise to an operator whose
cycle failed for a reason the line already names); the line points at the file when there is one.

Expected failures (a TrainingError or a database error, whose messages say what to change) write nothing:
the cycle decides which is which. The file is overwritten by the next unexpected failure.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import traceback
from pathlib import Path

from .config import Settings
from .logs import redact_secrets, secrets_of

log = logging.getLogger(__name__)
FILE_NAME = "last-failure.txt"
_ATTRIBUTE = "_codelupe_traceback_file"


def failure_file(settings: Settings) -> Path:
    return settings.paths.state_file.with_name(FILE_NAME)


def save_traceback(settings: Settings, error: BaseException) -> Path | None:
    """Write the error's traceback (redacted) next to the state file, owner-readable only, and remember the
    path on the error for `describe`. A failure to write (the disk that failed the cycle is full) is logged
    and returns None: the cycle's own failure is what matters."""
    path = failure_file(settings)
    text = (f"codelupe-trainer: unexpected failure at {time.strftime('%Y-%m-%d %H:%M:%S %z')} (pid {os.getpid()})\n"
            + "".join(traceback.format_exception(error)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:  # mkstemp: mode 0600
            stream.write(redact_secrets(text, secrets_of(settings)))
        os.replace(temporary, path)
    except OSError as problem:
        log.warning("could not write the failure's traceback to %s: %s", path, problem)
        return None
    setattr(error, _ATTRIBUTE, path)
    return path


def describe(error: BaseException) -> str:
    """The failure's one line: its type and message, and where its traceback is when one was saved."""
    saved = getattr(error, _ATTRIBUTE, None)
    return f"{type(error).__name__}: {error}" + (f" (traceback in {saved})" if saved else "")
