"""The daemon: an APScheduler interval job that runs each cycle in a child process.

A child per cycle means a crash, a CUDA out-of-memory error or leaked GPU memory cannot take the daemon
down, and every run starts with a clean GPU. The main thread is the liveness loop: it pings the systemd
watchdog and writes the live status; if it is stuck, the pings stop and systemd restarts the service.
Only this module installs signal handlers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

from datetime import datetime, timedelta, timezone
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from ..config import Settings
from ..errors import StateError
from ..lock import AlreadyRunning, lock_path, trainer_lock
from ..progress import read_cycle_progress, write_live_status
from ..state import TrainerState, load_state, record_failure

log = logging.getLogger(__name__)

JOB_ID = "training-cycle"
# Settings the daemon itself holds for its whole life: a reload keeps them as they were and says so.
RESTART_ONLY = ("paths.state_file", "service.metrics_port", "service.metrics_host")
CHILD_EXIT_INTERRUPTED = 4
# Another cycle held the trainer lock (a `run-once` by hand, as README "Train now, by hand" shows): no cycle ran.
CHILD_EXIT_BUSY = 3
BACKOFF_BASE_S = 30.0


def describe_death(code: int | None) -> str:
    """A cycle process that ended without reporting, in words: a negative exit code is the signal that
    killed it, and SIGKILL out of nowhere is almost always the kernel's out-of-memory killer."""
    if code is None or code >= 0:
        return f"cycle process died with exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return (f"cycle process was killed by {name}: usually the kernel's out-of-memory killer (host RAM, not "
                "GPU memory; `journalctl -k | grep -i oom` says); a stall or a stop would have been named")
    return f"cycle process was killed by {name}"


def _child_main(settings: Settings, force: bool, daemon_started: float) -> None:
    """Runs in the child: honour SIGTERM at the next step boundary, report the outcome by exit code."""
    import sys

    import os

    from .. import stop
    from ..cycle import run_cycle
    from ..failures import describe as describe_failure
    from ..faults import crash_point
    from ..logs import setup_logging

    setup_logging(settings)
    crash_point("cycle-start")  # SIGINT is still ignored here, as the daemon started this process
    stop.CURRENT.install()  # SIGTERM from the daemon (and a terminal's SIGINT from now on): end the cycle
    code = 1
    try:
        outcome = run_cycle(settings, force=force, process_started=daemon_started)
        log.info("cycle: %s: %s", outcome.status, outcome.message)
        code = CHILD_EXIT_INTERRUPTED if outcome.status == "interrupted" else 0
    except AlreadyRunning:
        code = CHILD_EXIT_BUSY  # the daemon says it (a skipped tick, not a failure)
    except Exception as error:
        log.error("cycle failed: %s", describe_failure(error))
    finally:
        # Straight out: library exit hooks (a stalled W&B service) must not keep a finished cycle alive.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def committed(before: TrainerState, after: TrainerState | None) -> bool:
    """Whether a cycle finished between the two states: the watermark or the training runs moved."""
    return after is not None and (after.last_trained_id, after.total_training_runs) != (
        before.last_trained_id, before.total_training_runs)


def backoff_seconds(consecutive_failures: int, interval_s: float) -> float:
    """30 s, 60 s, 120 s ... capped at the interval."""
    if consecutive_failures <= 0:
        return interval_s
    return min(interval_s, BACKOFF_BASE_S * 2 ** (consecutive_failures - 1))


class Daemon:
    def __init__(self, settings: Settings, reload_requested: threading.Event | None = None):
        self.settings = settings
        self.stopping = threading.Event()
        self.cycle_done = threading.Event()
        self.cycle_done.set()
        self.child: multiprocessing.Process | None = None
        # A cycle process a scheduler thread asks the main loop to start (start_requested_child), and the event
        # that wakes the loop for it or for a stop.
        self._start_request: tuple[multiprocessing.Process, threading.Event] | None = None
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        # Why the running cycle was ended by the stall watch (None: it was not).
        self.stall_reason: str | None = None
        self._progress_seen: tuple[object, float] = (None, time.monotonic())
        self.phase = "idle"
        self.live_status_failing = False
        # The config file as the daemon read it: an edit is noticed and said until a reload (SIGHUP) applies it.
        self.config_read = file_stamp(settings.config_file)
        self.config_changed = False
        # A SIGHUP that came during the start-up checks (cli.command_run) is one for the daemon to apply.
        self.reload_requested = reload_requested or threading.Event()
        self.needs_restart: list[str] = []  # settings a reload read but keeps as they were (RESTART_ONLY)
        self.started_at = time.time()
        # The back-off counts this daemon's own failed cycles: failures a manual run-once left in the state
        # (a bad config tried by hand) must not make the daemon's first real failure wait minutes.
        self.failures_in_a_row = 0
        self.busy_in_a_row = 0  # ticks in a row another cycle (a hand-run one) held the lock
        # Failed cycles in a row the state file did not take (a full disk): /health and `status` count them.
        self.unrecorded_failures = 0
        self.context = multiprocessing.get_context("spawn")
        # UTC: an interval needs no time zone, and APScheduler's look-up of the local one (tzlocal) raises for a
        # TZ in libc's POSIX form ("JST-9") or an /etc/timezone that disagrees with /etc/localtime.
        self.scheduler = BackgroundScheduler(timezone=timezone.utc, job_defaults={
            "max_instances": 1,
            "coalesce": True,
            "misfire_grace_time": int(settings.schedule.misfire_grace_minutes * 60),
        })

    @property
    def interval_s(self) -> float:
        return self.settings.schedule.interval_minutes * 60

    def interval_trigger(self) -> IntervalTrigger:
        # In UTC, as the scheduler: without a zone the trigger asks tzlocal for the local one too.
        return IntervalTrigger(seconds=self.interval_s, timezone=timezone.utc)

    def run_one_cycle(self) -> None:
        if self.stopping.is_set():
            return
        self.cycle_done.clear()
        before = self._read_state()
        recorded_before = None if before is None else before.consecutive_failures
        try:
            code = self._run_child()
        finally:
            self.phase = "idle"
            self.cycle_done.set()
        if self.stopping.is_set() or code == CHILD_EXIT_INTERRUPTED:
            return
        if code not in (0, 1, CHILD_EXIT_BUSY) and before is not None and committed(before, self._read_state()):
            # The cycle saved its state and then died on its way out (a process group's teardown, a library's
            # exit): what it trained is published and recorded. A failure here would count against a cycle
            # that succeeded and make the next one wait out a back-off.
            log.warning("%s after it saved its state; the cycle counts as done",
                        self.stall_reason or describe_death(code))
            code = 0
        if code == 0:
            self.failures_in_a_row = self.unrecorded_failures = self.busy_in_a_row = 0
            self._reschedule(self.interval_s)
            return
        if code == CHILD_EXIT_BUSY:
            # Nothing failed and nothing is recorded: try again soon (30 s, doubling up to the interval), so the
            # daemon takes over shortly after the hand-run cycle ends.
            self.busy_in_a_row += 1
            delay = backoff_seconds(self.busy_in_a_row, self.interval_s)
            log.info("cycle skipped: another codelupe-trainer cycle holds the trainer lock (%s); next try in %.0f s",
                     lock_path(self.settings.paths.state_file), delay)
            self._reschedule(delay)
            return
        self.busy_in_a_row = 0
        self.failures_in_a_row += 1
        if self.stall_reason is not None:
            self._record_failure(self.stall_reason)
        elif code != 1:
            # Killed by a signal or died without reporting (OOM killer, segfault): record it here.
            self._record_failure(describe_death(code))
        self._count_if_unrecorded(recorded_before)
        delay = backoff_seconds(self.failures_in_a_row, self.interval_s)
        log.warning("cycle failed (exit %s, %d in a row); retrying in %.0f s", code, self.failures_in_a_row, delay)
        self._reschedule(delay)

    def _record_failure(self, message: str) -> None:
        # Under the trainer lock: a run-once saving its state at this moment must not be overwritten.
        try:
            with trainer_lock(self.settings.paths.state_file):
                record_failure(self.settings.paths.state_file, message, self.started_at)
        except AlreadyRunning:
            log.warning("%s; not recorded in the state (another cycle holds the lock)", message)
        except (StateError, OSError) as error:  # edited by hand while the daemon ran, or a full disk: the next cycle says so too
            log.error("%s; not recorded: %s", message, error)

    def _read_state(self) -> TrainerState | None:
        """The state, or None where it cannot be read (/health says so on its own)."""
        try:
            return load_state(self.settings.paths.state_file)
        except (StateError, OSError):
            return None

    def _count_if_unrecorded(self, recorded_before: int | None) -> None:
        """A failed cycle the state did not count (its write failed: a full disk) would leave /health saying
        "ok" and the stuck alert silent through every failure that follows; the daemon counts it instead."""
        after = self._read_state()
        recorded_after = None if after is None else after.consecutive_failures
        if recorded_before is None or recorded_after is None or recorded_after > recorded_before:
            self.unrecorded_failures = 0
            return
        self.unrecorded_failures += 1
        if self.unrecorded_failures == 1:
            log.error("this failure could not be recorded in %s (the journal above says why); the daemon counts "
                      "failures the state cannot take, for /health and `status`", self.settings.paths.state_file)

    def _run_child(self) -> int | None:
        self.phase = "training"
        self.stall_reason = None
        self._progress_seen = (None, time.monotonic())
        child = self.context.Process(target=_child_main, args=(self.settings, False, self.started_at), name="codelupe-cycle")
        started = threading.Event()
        with self._start_lock:
            self._start_request = (child, started)
        self._wake.set()
        while not started.wait(0.2):  # the main loop starts it (start_requested_child) within a moment
            with self._start_lock:
                if self.stopping.is_set() and self._start_request is not None:  # it will not: withdraw it
                    self._start_request = None
                    return None
        if self.child is not child:  # not started: the daemon is stopping
            return None
        if self.stopping.is_set():  # the stop arrived while the child was being started
            child.terminate()
        child.join()
        self.child = None
        return child.exitcode

    def start_requested_child(self) -> None:
        """Start the cycle process a scheduler thread asked for, here in the main thread, the only one that may
        set a signal's disposition: the child starts with SIGINT ignored. A Ctrl-C on a terminal reaches the
        whole process group, and a child still importing (a second at each cycle's start) would die of it with
        a KeyboardInterrupt traceback; the daemon passes the stop on itself (request_stop), and the child
        handles SIGINT again once its own stop handler is in place (_child_main)."""
        with self._start_lock:
            request, self._start_request = self._start_request, None
        if request is None:
            return
        child, started = request
        if not self.stopping.is_set():
            # For the few milliseconds of the fork and exec the daemon ignores SIGINT too (a Ctrl-C then is lost).
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                child.start()
            finally:
                signal.signal(signal.SIGINT, handler)
            self.child = child
        started.set()

    def _reschedule(self, delay_s: float) -> None:
        # Never touch the scheduler once stopping: its shutdown holds the job-store lock.
        if self.stopping.is_set():
            return
        job = self.scheduler.get_job(JOB_ID)
        if job is not None:
            job.modify(next_run_time=datetime.now(timezone.utc) + timedelta(seconds=delay_s))

    def watch_for_a_stalled_cycle(self) -> None:
        """A cycle whose progress file has not changed for service.cycle_stall_minutes is stuck (a dead
        connection, a CUDA hang, a stalled library): end it and record why; the schedule carries on."""
        child = self.child
        if child is None or not child.is_alive() or self.stall_reason is not None:
            return
        progress = read_cycle_progress(self.settings.paths.state_file)
        marker = (progress or {}).get("updated_at")
        now = time.monotonic()
        if marker != self._progress_seen[0]:
            self._progress_seen = (marker, now)
            return
        stalled_s = now - self._progress_seen[1]
        limit_s = self.settings.service.cycle_stall_minutes * 60
        if stalled_s > limit_s:
            phase = (progress or {}).get("phase", "starting")
            step = f" at step {progress['step']}" if progress and "step" in progress else ""
            self.stall_reason = f"cycle stalled: no progress for {stalled_s / 60:.1f} min in phase '{phase}'{step}; ended it"
            log.error("%s", self.stall_reason)
            self._kill_child("stalled")

    def _kill_child(self, why: str) -> None:
        """SIGTERM, then SIGKILL after a grace period: the state is safe either way."""
        child = self.child
        if child is None or not child.is_alive():
            return
        log.warning("ending the cycle process (%s)", why)
        child.terminate()
        child.join(10)
        if child.is_alive():
            child.kill()

    def next_run(self) -> str | None:
        job = self.scheduler.get_job(JOB_ID)
        # In this machine's local time (libc's, which reads any TZ), as a person reading `status` expects.
        return job.next_run_time.astimezone().isoformat() if job is not None and job.next_run_time else None

    def request_stop(self, *_: object) -> None:
        self.stopping.set()
        self._wake.set()
        child = self.child
        if child is not None and child.is_alive():
            child.terminate()  # SIGTERM: the child stops at the next step boundary

    def serve(self, notify=None) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # `systemctl reload` (the unit's ExecReload) and a closed terminal: read the config again, never die.
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        self.scheduler.add_job(
            self.run_one_cycle, self.interval_trigger(), id=JOB_ID,
            next_run_time=datetime.now(timezone.utc),
        )
        health = None
        if self.settings.service.metrics_port:  # before the first cycle starts: a taken port ends the start cleanly
            from .health import start_health_server

            service = self.settings.service
            try:
                health = start_health_server(service.metrics_port, self.settings.paths.state_file, lambda: self.phase,
                                             host=service.metrics_host,
                                             failure_threshold=lambda: self.settings.service.alert_after_failures,
                                             unrecorded_failures=lambda: self.unrecorded_failures)
            except OSError as error:  # taken since the start-up check (cli.command_run)
                log.error("cannot start: service.metrics_port: %s:%d cannot be served (%s)", service.metrics_host,
                          service.metrics_port, error.strerror or error)
                return 2  # a setting to change: the unit (RestartPreventExitStatus=2) does not restart into it
        self.scheduler.start()
        if notify:
            notify("READY=1")
        log.info("daemon started: a cycle every %g min; config: %s", self.settings.schedule.interval_minutes,
                 self.settings.config_source())
        while True:
            self._wake.wait(1.0)  # a second, or at once for a stop or a cycle process to start
            self._wake.clear()
            if self.stopping.is_set():
                break
            self.start_requested_child()
            if notify:
                notify("WATCHDOG=1")
            self.watch_for_a_stalled_cycle()
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                try:
                    self.reload_config()
                except Exception as error:  # a reload must never end the daemon: it goes on as it was
                    log.error("config reload failed; the daemon keeps the settings it has: %s: %s",
                              type(error).__name__, error)
            self.notice_a_changed_config()
            self._publish_live_status(phase=self.phase, next_run=self.next_run(),
                                      **({"config_changed": True} if self.config_changed else {}),
                                      **({"needs_restart": self.needs_restart} if self.needs_restart else {}),
                                      **({"unrecorded_failures": self.unrecorded_failures}
                                         if self.unrecorded_failures else {}))
        self.start_requested_child()  # one asked for meanwhile is not started, and its thread goes on
        if notify:
            notify("STOPPING=1")
        # shutdown(wait=True) would hold the job-store lock while the cycle's job still needs it; wait ourselves.
        self.scheduler.shutdown(wait=False)
        if not self.cycle_done.is_set():
            log.info("stopping: the running cycle was asked to stop")
            if not self.cycle_done.wait(self.settings.service.stop_timeout_s):
                self._kill_child(f"did not stop within service.stop_timeout_s ({self.settings.service.stop_timeout_s:.0f} s)")
                self.cycle_done.wait()
        if health is not None:
            health.shutdown()
        self._publish_live_status(phase="stopped", next_run=None)
        log.info("daemon stopped")  # the journal's last word: a stop that ended, not one that hangs
        return 0

    def notice_a_changed_config(self) -> None:
        """The daemon keeps the settings it has until told to read the file again (its cycles get them from
        it): an edit would otherwise look applied while it is not. Said once, and shown by `status`, until a
        reload or a restart."""
        if self.config_changed or self.settings.config_file is None:
            return
        if file_stamp(self.settings.config_file) != self.config_read:
            self.config_changed = True
            log.warning("%s changed since the daemon read it; it keeps the settings it has until it is reloaded: "
                        "`systemctl reload codelupe-trainer` (or `kill -HUP %d`) applies them from the next cycle, "
                        "without stopping a running one", self.settings.config_file, os.getpid())

    def reload_config(self) -> None:
        """SIGHUP: read the config file again and use it from the next cycle (the running one keeps what it
        started with). A file that does not load, or settings every cycle would fail on, change nothing: the
        daemon goes on with the settings it has and says why in one line. The environment (secrets.env) is
        the process's own and is not read again: changing it needs a restart."""
        from ..config import ConfigError, changed_settings, load_settings
        from ..logs import redact_also
        from .doctor import settings_problems

        path = self.settings.config_file
        stamp = file_stamp(path)  # before reading: an edit made while it is read is noticed again
        try:
            settings = load_settings(path)
        except ConfigError as error:
            log.error("config reload failed; the daemon keeps the settings it has: %s", error)
            return
        redact_also(settings)  # before anything below can name the new connection
        changed = changed_settings(self.settings, settings)
        held = [name for name in changed if name in RESTART_ONLY]
        changed = [name for name in changed if name not in RESTART_ONLY]
        for name in held:
            section, key = name.split(".")
            setattr(getattr(settings, section), key, getattr(getattr(self.settings, section), key))
        problems, warnings = settings_problems(settings)
        if problems:
            log.error("config reload refused; the daemon keeps the settings it has: %s", "; ".join(problems))
            return
        for warning in warnings:
            log.warning("%s", warning)
        previous, self.settings = self.settings, settings
        self.config_read, self.config_changed, self.needs_restart = stamp, False, held
        if previous.schedule.interval_minutes != settings.schedule.interval_minutes:
            self.scheduler.reschedule_job(JOB_ID, trigger=self.interval_trigger())
        if previous.schedule.misfire_grace_minutes != settings.schedule.misfire_grace_minutes:
            self.scheduler.modify_job(JOB_ID, misfire_grace_time=int(settings.schedule.misfire_grace_minutes * 60))
        running = " (the running cycle keeps the settings it started with)" if not self.cycle_done.is_set() else ""
        if changed:
            log.info("config reloaded from %s: %s changed; the next cycle uses %s%s, next run %s",
                     settings.config_source(), ", ".join(changed), "it" if len(changed) == 1 else "them", running,
                     self.next_run() or "-")
        else:
            log.info("config reloaded from %s: no setting changed", settings.config_source())
        if held:
            log.warning("%s changed too, but the daemon holds %s until a restart (`systemctl restart "
                        "codelupe-trainer`): kept as %s", ", ".join(held), *(("it", "it was") if len(held) == 1
                                                                                else ("them", "they were")))

    def _publish_live_status(self, **fields) -> None:
        """A courtesy for `status`, written every second: a full disk must not stop the daemon, nor fill the
        journal with a warning a second. Said once when it starts failing and once when it works again."""
        try:
            write_live_status(self.settings.paths.state_file, **fields)
        except OSError as error:
            if not self.live_status_failing:
                log.warning("could not write the live status (said once until it works again): %s", error)
            self.live_status_failing = True
        else:
            if self.live_status_failing:
                log.info("the live status is written again")
            self.live_status_failing = False


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    """What tells an edited file from the one read: its modification time and size (None: no file)."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size


def systemd_notifier():
    """A function sending sd_notify messages when run under systemd (NOTIFY_SOCKET set), else None."""
    import os

    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    import sdnotify

    notifier = sdnotify.SystemdNotifier()
    return notifier.notify


def run_daemon(settings: Settings, reload_requested: threading.Event | None = None) -> int:
    return Daemon(settings, reload_requested).serve(systemd_notifier())

