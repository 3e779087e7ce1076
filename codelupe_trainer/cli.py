"""Command line: `codelupe-trainer run | run-once | status | show-config | doctor | demo`.

Exit codes: 0 success or nothing to do; 1 the run failed; 2 bad configuration or usage; 3 another cycle
holds the trainer lock. Heavy imports (torch, transformers) happen only in the commands that train.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import ConfigError, Settings, load_settings, public_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


class RedactingFilter(logging.Filter):
    """Replaces every known secret in a log record with '***' before any handler sees it."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [secret for secret in secrets if secret and len(secret) >= 3]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


def secrets_of(settings: Settings) -> list[str]:
    import os
    from urllib.parse import urlsplit

    found = []
    url = settings.database.url.get_secret_value()
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found.append(password)
    found.append(url)
    if os.environ.get("WANDB_API_KEY"):
        found.append(os.environ["WANDB_API_KEY"])
    return found


def setup_logging(settings: Settings | None, verbose: bool = False) -> None:
    import warnings

    # Library deprecation notices are for us, not for the operator reading the journal.
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if settings is not None:
        handler.addFilter(RedactingFilter(secrets_of(settings)))
    handler._codelupe = True  # replaced, not stacked, when set up again in the same process
    root = logging.getLogger()
    root.handlers[:] = [existing for existing in root.handlers if not getattr(existing, "_codelupe", False)]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "urllib3", "wandb", "filelock", "apscheduler.executors.default"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codelupe-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", help="TOML file (default: $CODELUPE_CONFIG, else config/codelupe.toml)")
        return command

    run_once = with_config("run-once", "train once on the new rows, then exit")
    run_once.add_argument("--force", action="store_true", help="train even below schedule.min_new_samples")
    with_config("run", "the daemon: a cycle every schedule.interval_minutes")
    status = with_config("status", "the persisted state")
    status.add_argument("--json", action="store_true")
    with_config("show-config", "the effective configuration, secrets redacted")
    with_config("doctor", "check config, database, table, model path, output directory and W&B mode")
    demo = commands.add_parser("demo", help="fill a throwaway PostgreSQL with real code and train a tiny model")
    demo.add_argument("--dir", default="demo-run")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        setup_logging(None, arguments.verbose)
        from .demo import run_demo

        return run_demo(Path(arguments.dir))
    try:
        settings = load_settings(arguments.config)
    except ConfigError as error:
        print(f"codelupe-trainer: configuration error: {error}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings, arguments.verbose)
    handler = {
        "run-once": command_run_once,
        "run": command_run,
        "status": command_status,
        "show-config": command_show_config,
        "doctor": command_doctor,
    }[arguments.command]
    return handler(settings, arguments)


def command_show_config(settings: Settings, arguments) -> int:
    print(json.dumps(public_settings(settings), indent=2))
    return EXIT_OK


def command_status(settings: Settings, arguments) -> int:
    from .state import load_state
    from .status import read_cycle_progress, read_live_status

    state = load_state(settings.paths.state_file)
    view = {
        "state_file": str(settings.paths.state_file),
        "total_training_runs": state.total_training_runs,
        "last_trained_id": state.last_trained_id,
        "total_samples_trained": state.total_samples_trained,
        "uptime_hours": round(state.uptime_hours, 3),
        "first_started_at": state.first_started_at,
        "consecutive_failures": state.consecutive_failures,
        "total_failures": state.total_failures,
        "last_error": state.last_error,
        "last_error_at": state.last_error_at,
        "latest_adapter": state.latest_adapter,
        "last_run": state.last_run,
        "pending_gaps": len(state.pending_gaps),
        "live": read_live_status(settings.paths.state_file),
        "cycle": read_cycle_progress(settings.paths.state_file),
    }
    if arguments.json:
        print(json.dumps(view, indent=2))
        return EXIT_OK
    print(f"state file:            {view['state_file']}")
    print(f"training runs:         {state.total_training_runs}")
    print(f"last trained id:       {state.last_trained_id}")
    print(f"samples trained:       {state.total_samples_trained}")
    print(f"uptime:                {state.uptime_hours:.2f} h")
    print(f"latest adapter:        {state.latest_adapter or '-'}")
    print(f"failures:              {state.consecutive_failures} in a row, {state.total_failures} in all")
    if state.last_error:
        print(f"last error:            {time.ctime(state.last_error_at or 0)}: {state.last_error}")
    if state.last_run:
        print(f"last run:              run {state.last_run.get('run_number')}, {state.last_run.get('samples_trained')} samples, "
              f"eval loss {state.last_run.get('eval_loss')}")
    live, cycle = view["live"], view["cycle"]
    if live:
        print(f"daemon:                {live.get('phase')} (pid {live.get('pid')}), next run {live.get('next_run') or '-'}")
    else:
        print("daemon:                not running")
    if cycle:
        details = ", ".join(f"{key} {value}" for key, value in cycle.items() if key not in ("pid", "phase", "updated_at"))
        print(f"running cycle:         {cycle['phase']} ({details})")
    return EXIT_OK


def command_run_once(settings: Settings, arguments) -> int:
    from .cycle import AlreadyRunning, describe_outcome, run_cycle
    from .source import SourceError

    log = logging.getLogger("codelupe_trainer")
    try:
        outcome = run_cycle(settings, force=arguments.force)
    except AlreadyRunning as busy:
        print(f"codelupe-trainer: {busy}", file=sys.stderr)
        return EXIT_BUSY
    except SourceError as error:
        log.error("database: %s", error)
        return EXIT_FAILED
    except Exception as error:
        log.error("run failed: %s: %s", type(error).__name__, error)
        return EXIT_FAILED
    print(describe_outcome(outcome, settings))
    return EXIT_OK


def command_run(settings: Settings, arguments) -> int:
    from .doctor import fatal_startup_problems
    from .scheduler import run_daemon

    problems = fatal_startup_problems(settings)
    if problems:
        # Exit 2 is listed in the unit's RestartPreventExitStatus: systemd does not restart into the same error.
        for problem in problems:
            print(f"codelupe-trainer: cannot start: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return run_daemon(settings)


def command_doctor(settings: Settings, arguments) -> int:
    from .doctor import run_checks

    problems = 0
    for name, ok, detail in run_checks(settings):
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        problems += not ok
    return EXIT_OK if problems == 0 else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
