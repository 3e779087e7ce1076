"""Command line: `codelupe-trainer run | run-once | status | adapters | rollback | show-config | doctor | join | demo`.

Exit codes: 0 success or nothing to do (a stopped run-once or daemon too); 1 the run failed; 2 bad
configuration or usage; 3 another cycle holds the trainer lock; 130 interrupted by Ctrl-C (the other
commands). Heavy imports (torch, transformers) happen only in the commands that train.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, Settings, load_settings, public_settings
from .logs import setup_logging

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


# What a bug report needs to know, read from the installed packages' metadata (nothing is imported).
STACK = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "wandb", "psycopg")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return (f"codelupe-trainer {installed('codelupe-trainer')} (Python {sys.version.split()[0]}; "
            + ", ".join(f"{package} {installed(package)}" for package in STACK) + ")")


def build_parser() -> argparse.ArgumentParser:
    # Raw: the version line is one line (argparse would wrap it), easy to paste into a bug report.
    parser = argparse.ArgumentParser(prog="codelupe-trainer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-V", "--version", action="version", version=versions(),
                        help="this program's version and the training stack's (for a bug report)")
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
    adapters = with_config("adapters", "every adapter trained: promoted or rejected, and why")
    adapters.add_argument("--json", action="store_true")
    rollback = with_config("rollback", "put an earlier promoted adapter back in use")
    rollback.add_argument("run", type=int, help="the run number, as `adapters` lists it")
    with_config("show-config", "the effective configuration, secrets redacted")
    with_config("doctor", "check config, database, table, model path, output directory and W&B mode")
    join = with_config("join", "on another machine of a multi-node group: train in node 0's cycles")
    join.add_argument("--node-rank", type=int, required=True, help="this machine's place: 1 .. training.num_nodes - 1")
    demo = commands.add_parser("demo", help="fill a throwaway PostgreSQL with real code and train a tiny model")
    demo.add_argument("--dir", default="demo-run")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        setup_logging(None, arguments.verbose)
        from .demo.demo import run_demo

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
        "adapters": command_adapters,
        "rollback": command_rollback,
        "show-config": command_show_config,
        "doctor": command_doctor,
        "join": command_join,
    }[arguments.command]
    from .errors import StateError

    try:
        return handler(settings, arguments)
    except StateError as error:  # a hand edit gone wrong: nothing can run until the file is fixed
        print(f"codelupe-trainer: {error}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as error:  # a person running a command on files that belong to the service's user
        from .service.doctor import not_permitted

        print(f"codelupe-trainer: {not_permitted(error.filename, arguments.command)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C in a command without its own stop handling (status, doctor, ...)
        print("codelupe-trainer: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def command_show_config(settings: Settings, arguments) -> int:
    print(json.dumps(public_settings(settings), indent=2))
    return EXIT_OK


def command_status(settings: Settings, arguments) -> int:
    from .service.status import print_status

    try:
        return print_status(settings, as_json=arguments.json)
    except (IsADirectoryError, ValueError) as error:
        print(f"codelupe-trainer: cannot read {settings.paths.state_file}: {type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
        return EXIT_USAGE


def command_adapters(settings: Settings, arguments) -> int:
    from .service.lineage import print_adapters

    return print_adapters(settings, as_json=arguments.json)


# A cycle that publishes writes the state it started from plus its own run: a rollback recorded meanwhile would
# be lost, so it waits for the lock. A cycle on the shipped settings can train for hours, hence the other way.
ROLLBACK_WHILE_BUSY = ("try again when it has finished, or stop it first to roll back now: the service with "
                       "`systemctl stop codelupe-trainer` (the cycle ends within seconds; its rows train at a later "
                       "cycle), then this rollback, then `systemctl start codelupe-trainer`")


def _running_cycle(settings: Settings) -> str:
    """What the cycle holding the lock is doing, from its progress file: ": run 44, training, 13 %, ETA 95 min"."""
    from .progress import read_cycle_progress

    cycle = read_cycle_progress(settings.paths.state_file) or {}
    said = [f"run {cycle['run']}"] if "run" in cycle else []
    said += [str(cycle["phase"])] if "phase" in cycle else []
    said += [f"{cycle['percent']:g} %"] if "percent" in cycle else []
    said += [f"ETA {cycle['eta_minutes']:g} min"] if "eta_minutes" in cycle else []
    return f": {', '.join(said)}" if said else ""


def command_rollback(settings: Settings, arguments) -> int:
    from . import stop
    from .errors import TrainingInterrupted
    from .lock import AlreadyRunning
    from .service.lineage import RollbackError, rollback

    stop.CURRENT.install()  # a Ctrl-C lets a recorded rollback's hand-off finish (lineage.py)
    try:
        adapter = rollback(settings, arguments.run)
    except TrainingInterrupted as interruption:
        print(f"codelupe-trainer: {interruption} before the rollback was recorded; nothing changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AlreadyRunning as busy:
        print(f"codelupe-trainer: {busy}{_running_cycle(settings)}; {ROLLBACK_WHILE_BUSY}", file=sys.stderr)
        return EXIT_BUSY
    except RollbackError as error:
        print(f"codelupe-trainer: cannot roll back: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"the adapter in use is now run {arguments.run} ({adapter}); the next run continues from it")
    return EXIT_OK


def command_run_once(settings: Settings, arguments) -> int:
    from . import stop
    from .errors import TrainingInterrupted

    stop.CURRENT.install()  # first, before the heavy imports: a Ctrl-C at any moment is one line, exit 0
    try:
        return _run_once(settings, arguments)
    except TrainingInterrupted as interruption:
        print(f"codelupe-trainer: {interruption}; nothing was saved", file=sys.stderr)
        return EXIT_OK


def _run_once(settings: Settings, arguments) -> int:
    from .data.source import SchemaError, SourceError, check_table, open_connection
    from .errors import StateError
    from .service.doctor import adapter_problems, state_problems, unwritable_paths
    from .training.model_files import model_problems

    log = logging.getLogger("codelupe_trainer")
    # As `run` checks at start: settings to fix (exit 2), not a failed cycle to record and retry. A hub id not
    # in the cache is not one of them: the cycle downloads it.
    problems = (unwritable_paths(settings) + state_problems(settings) + adapter_problems(settings)
                + model_problems(settings.model, settings.training.loss, probe_hub=False))
    if problems:
        for problem in problems:
            print(f"codelupe-trainer: cannot run: {problem}", file=sys.stderr)
        return EXIT_USAGE
    # The table is checked before torch is imported: a misspelt table or column is one line in a second.
    try:
        with open_connection(settings.database) as connection:
            check_table(connection, settings.database)
    except SchemaError as error:
        log.error("database: %s", error)
        return EXIT_USAGE
    except SourceError:
        pass  # an outage: the cycle below reports it and records the failure

    from .cycle import run_cycle
    from .failures import describe as describe_failure
    from .lock import AlreadyRunning
    from .outcome import describe_outcome

    try:
        outcome = run_cycle(settings, force=arguments.force)
    except AlreadyRunning as busy:
        print(f"codelupe-trainer: {busy}", file=sys.stderr)
        return EXIT_BUSY
    except SchemaError as error:
        # Like `run`: a missing table or column is a setting to fix (exit 2), not a failure to retry.
        log.error("database: %s", error)
        return EXIT_USAGE
    except SourceError as error:
        log.error("database: %s", error)
        return EXIT_FAILED
    except StateError:
        raise  # main() says it in one line, exit 2
    except Exception as error:
        log.error("run failed: %s", describe_failure(error))
        return EXIT_FAILED
    if outcome.status == "interrupted":
        print(f"codelupe-trainer: {outcome.message}; nothing was saved", file=sys.stderr)
        return EXIT_OK
    message = describe_outcome(outcome, settings)
    if outcome.status == "nothing_to_do" and outcome.new_samples and not arguments.force:
        message += " (run-once --force trains on them anyway)"  # a hint for a person; the daemon has no --force
    print(message)
    return EXIT_OK


def command_run(settings: Settings, arguments) -> int:
    import signal
    import threading

    from . import stop
    from .errors import TrainingInterrupted

    # First, before the start-up checks (on a GPU box torch's import and CUDA's start take seconds): a stop
    # then (`systemctl stop`, Ctrl-C) is one line and exit 0, as in a cycle, not a silent death by SIGTERM;
    # a SIGHUP (`systemctl reload`) is kept for the daemon, not its default death either.
    stop.CURRENT.install()
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
    log = logging.getLogger("codelupe_trainer")
    try:
        return _run_daemon(settings, reload_requested)
    except TrainingInterrupted as interruption:
        log.info("daemon %s before its first cycle", interruption)
        return EXIT_OK


def _run_daemon(settings: Settings, reload_requested) -> int:
    from .faults import crash_point
    from .service.doctor import startup_problems
    from .service.scheduler import run_daemon

    crash_point("startup")
    problems, warnings = startup_problems(settings)
    if problems:
        # Exit 2 is listed in the unit's RestartPreventExitStatus: systemd does not restart into the same error.
        for problem in problems:
            print(f"codelupe-trainer: cannot start: {problem}", file=sys.stderr)
        return EXIT_USAGE
    for warning in warnings:
        logging.getLogger("codelupe_trainer").warning("%s", warning)
    return run_daemon(settings, reload_requested)


def command_doctor(settings: Settings, arguments) -> int:
    from .service.doctor import run_checks

    problems = 0
    for name, ok, detail in run_checks(settings):
        print(f"{'ok  ' if ok else 'warn' if ok is None else 'FAIL'} {name}: {detail}")
        problems += ok is False
    return EXIT_OK if problems == 0 else EXIT_FAILED


def command_join(settings: Settings, arguments) -> int:
    from . import stop
    from .errors import TrainingInterrupted

    nodes = settings.training.num_nodes
    if not 1 <= arguments.node_rank < nodes:
        print(f"codelupe-trainer: --node-rank must be 1..{nodes - 1} (training.num_nodes = {nodes}; node 0 is the "
              "machine running the daemon)" if nodes > 1 else "codelupe-trainer: join needs training.num_nodes > 1 "
              "and training.rendezvous_endpoint, set as on node 0", file=sys.stderr)
        return EXIT_USAGE
    from .faults import crash_point
    from .service.doctor import model_and_gpu_problems

    stop.CURRENT.install()  # before the checks, which import torch: a stop then is one line and exit 0 too
    try:
        crash_point("startup")
        problems = model_and_gpu_problems(settings)
        if problems:
            # Every cycle would fail on this machine the same way: exit 2, which the unit does not restart into.
            for problem in problems:
                print(f"codelupe-trainer: cannot join: {problem}", file=sys.stderr)
            return EXIT_USAGE
        from .service.node import serve_node

        serve_node(settings, arguments.node_rank)  # until a stop
    except TrainingInterrupted as interruption:
        logging.getLogger("codelupe_trainer").info("join %s", interruption)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
