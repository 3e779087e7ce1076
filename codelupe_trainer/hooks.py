"""The hand-off to the server that uses the adapter: `promotion.on_promote`, run after each promotion and
rollback. The only module that starts a user's command.

The command gets the adapter's path, the run number and the holdout losses in its environment; its output
goes to our log; it is killed after `promotion.on_promote_timeout_s`. A failure is recorded and logged, and
never undoes the promotion: the adapter is already `latest` on disk.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from .config import SECRET_VARIABLES, PromotionSettings

log = logging.getLogger(__name__)
OUTPUT_LIMIT = 4000  # characters of the command's output kept in the log


def run_on_promote(settings: PromotionSettings, event: str, adapter_path: Path, run_number: int,
                   candidate_loss: float | None = None, in_use_loss: float | None = None) -> str | None:
    """Run the command; returns None when none is configured, else "ok" or what went wrong (one line)."""
    if not settings.on_promote:
        return None
    environment = dict(os.environ)
    environment.update({
        "CODELUPE_EVENT": event,  # "promote" or "rollback"
        "CODELUPE_ADAPTER_PATH": str(adapter_path.resolve()),
        "CODELUPE_ADAPTER_NAME": adapter_path.name,
        "CODELUPE_RUN_NUMBER": str(run_number),
        "CODELUPE_HOLDOUT_LOSS": "" if candidate_loss is None else f"{candidate_loss:.6f}",
        "CODELUPE_PREVIOUS_HOLDOUT_LOSS": "" if in_use_loss is None else f"{in_use_loss:.6f}",
    })
    # Never hand the database password or an API key to a command that only needs to reload an adapter.
    for name in ("CODELUPE_DATABASE__URL", *SECRET_VARIABLES):
        environment.pop(name, None)
    try:
        outcome, output = _run_bounded(settings.on_promote, environment, settings.on_promote_timeout_s)
    except OSError as error:
        outcome, output = f"could not start {settings.on_promote[0]!r}: {error.strerror or error}", ""
    if output:
        log.info("on_promote output: %s", output[-OUTPUT_LIMIT:])
    if outcome == "ok":
        log.info("on_promote ran for run %d (%s)", run_number, event)
    else:
        log.warning("on_promote for run %d (%s) failed: %s; the adapter stays promoted", run_number, event, outcome)
    return outcome


def _run_bounded(command: list[str], environment: dict[str, str], timeout_s: float) -> tuple[str, str]:
    """Run the command in its own session, its output in a file (not a pipe: a process it leaves running in
    the background, a server it restarts, would hold a pipe open and keep us waiting for it). Past the
    timeout its whole process group is killed. Returns the outcome and the output.

    Its own session also keeps a Ctrl-C at run-once's terminal (SIGINT to the whole foreground group) from
    killing the hand-off half-way; the cycle lets it finish (cycle.py) and the timeout still bounds it."""
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            outcome = f"killed after promotion.on_promote_timeout_s = {timeout_s:g} s"
        else:
            outcome = "ok" if returncode == 0 else f"exited with status {returncode}"
        output.seek(0)
        return outcome, output.read().decode("utf-8", errors="replace").strip()
