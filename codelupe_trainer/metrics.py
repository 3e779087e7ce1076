"""Every number the daemon reports goes through here, to two sinks that always agree:

- a local JSON-lines file beside the state file (survives a W&B outage; read it with jq), and
- a W&B run (online, offline or disabled), fed from a bounded queue by one worker thread, so a stalled
  upload never blocks a training step.

Only this module imports wandb, psutil and pynvml. Only metrics leave the machine: no artifacts, code,
console output, git state, argv or data.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class WandbOptions:
    mode: str  # online | offline | disabled
    project: str
    entity: str | None
    group: str
    directory: Path
    init_timeout_s: float
    finish_timeout_s: float


def effective_wandb_mode(requested: str, enabled: bool, warn: bool = True) -> str:
    """`online` with no API key degrades to `offline` (upload later with `wandb sync`), with one warning
    (`warn` False: the caller says it its own way, as `doctor`'s wandb line does)."""
    if not enabled or requested == "disabled":
        return "disabled"
    if requested == "online" and wandb_api_key() is None:
        if warn:
            log.warning("W&B mode is online but no API key is configured: logging offline instead (upload later "
                        "with `wandb sync`)")
        return "offline"
    return requested


DEFAULT_WANDB_URL = "https://api.wandb.ai"


def wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL).rstrip("/")


def wandb_api_key() -> str | None:
    """The key wandb would use: WANDB_API_KEY, else the ~/.netrc (or $NETRC) entry for the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc
    from urllib.parse import urlsplit

    # Named explicitly: netrc checks the default file's ownership and mode, which wandb itself does not.
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(wandb_base_url()).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def check_wandb_key(timeout_s: float) -> tuple[bool | None, str]:
    """Whether the W&B server accepts the API key, asked the way the client asks (GraphQL `viewer`, HTTP basic
    auth as user `api`), for `doctor` only: a run never waits on it. (True, ...) accepted; (None, why) refused
    or unreachable, where every run would log to metrics.jsonl only. wandb's own check reports a refused key
    and an unreachable server as the same AuthenticationError; urllib tells them apart, and goes through the
    HTTPS_PROXY the client would use. The key is never part of the answer."""
    import base64
    import urllib.error
    import urllib.request

    base_url = wandb_base_url()
    key = wandb_api_key()
    if not key:
        return None, f"no API key for {base_url} (WANDB_API_KEY or ~/.netrc)"
    request = urllib.request.Request(
        f"{base_url}/graphql", data=json.dumps({"query": "query { viewer { id } }"}).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()})
    refused = (f"the W&B server ({base_url}) refused the API key{{}}: put the key from https://wandb.ai/authorize "
               "in secrets.env as WANDB_API_KEY; until then each run's metrics go to metrics.jsonl only")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            return None, refused.format(f" (HTTP {error.code})")
        return None, (f"the W&B server ({base_url}) answered HTTP {error.code} {error.reason}: the key could not be "
                      "checked; runs that cannot start W&B log to metrics.jsonl only")
    except (OSError, ValueError) as error:  # URLError, a timeout, a reset, a body that is not JSON
        reason = getattr(error, "reason", None) or error
        return None, (f"the W&B server ({base_url}) cannot be reached ({reason}): each run's metrics go to "
                      "metrics.jsonl only until it can (HTTPS_PROXY is used when set)")
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and body["data"].get("viewer"):
        return True, f"the W&B server ({base_url}) accepts the API key"
    return None, refused.format("")


def import_wandb():
    """wandb, with its own error reporting off. Left on, the SDK and wandb-core send their exceptions' stack
    traces and log records naming the machine (its host name, which `host` below keeps out of the run) to the
    W&B server, and print an ERROR line after each run where that server refuses them: this daemon sends
    metrics only. Set before the import and before wandb-core starts (it reads the same variable). Silent as
    the run's settings are, from the start: its login note is a line outside the journal's format."""
    os.environ["WANDB_ERROR_REPORTING"] = "false"
    os.environ["WANDB_SILENT"] = "true"
    import wandb

    return wandb


def wandb_settings_kwargs(options: WandbOptions) -> dict[str, Any]:
    """Settings that keep everything but metrics on this machine."""
    return {
        "save_code": False,
        "disable_code": True,
        "disable_git": True,
        "disable_job_creation": True,
        "console": "off",
        "x_save_requirements": False,
        "x_disable_meta": True,  # no argv, hostname, program path
        "x_disable_machine_info": True,
        "x_disable_stats": True,  # system metrics are ours, under system/*
        "host": "codelupe-trainer",  # x_disable_meta still records the machine's name unless this is set
        "init_timeout": options.init_timeout_s,
        "silent": True,
    }


LIFETIME_STEP = "lifetime/step"
LIFETIME_CHARTS = ("train/*", "eval/*", "holdout/*", "continuous/*", "batch/*", "performance/*", "progress/*")


def count_starts(jsonl_path: Path, run_number: int) -> int:
    """How many W&B runs were already started for `run_number` (its "start" records in the metrics file)."""
    if not jsonl_path.exists():
        return 0
    marker = '"event": "start"'
    count = 0
    with open(jsonl_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if marker in line:
                try:
                    count += json.loads(line).get("run") == run_number
                except ValueError:
                    continue
    return count


class MetricsRun:
    """One training cycle's metrics: one JSON-lines stream plus one W&B run named run-<n>."""

    def __init__(self, run_number: int, jsonl_path: Path, options: WandbOptions, config: dict[str, Any], queue_size: int = 10_000,
                 attempt: int | None = None, step_offset: int = 0):
        self.run_number = run_number
        # Each attempt at run n is its own W&B run: "run-4", then "run-4-attempt-2" after a failed, killed or
        # interrupted one (counted from this file's start records, so a kill -9 cannot reuse a name).
        attempt = attempt or 1 + count_starts(jsonl_path, run_number)
        self.name = f"run-{run_number}" if attempt <= 1 else f"run-{run_number}-attempt-{attempt}"
        # The daemon's lifetime step before this run: `lifetime/step` = offset + the trainer's step, the x-axis
        # of the train/eval/holdout/continuous charts, so the runs of the group line up as one curve.
        self.step_offset = step_offset
        self.jsonl_path = jsonl_path
        self.options = options
        self.mode = options.mode
        self.dropped = 0
        self.last_step = 0
        self.wandb_run = None
        self.wandb_dir: Path | None = None
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")
        self._jsonl_failing = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()
        # Set once W&B has failed a call (its wandb-core service killed or crashed): every later call would
        # fail the same way, so the rest of the run goes to the local file only, said once.
        self._wandb_failed = threading.Event()
        if self.mode != "disabled":
            self._start_wandb(config)
        self._write_jsonl({"event": "start", "run": run_number, "wandb_mode": self.mode})

    # -- W&B side

    def _start_wandb(self, config: dict[str, Any]) -> None:
        try:
            wandb = import_wandb()
            self.options.directory.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                project=self.options.project,
                entity=self.options.entity,
                group=self.options.group,
                name=self.name,
                job_type="continuous-training",
                config=config,
                mode=self.mode,
                dir=str(self.options.directory),
                reinit="create_new",
                settings=wandb.Settings(**wandb_settings_kwargs(self.options)),
            )
            self.wandb_dir = Path(self.wandb_run.dir).parent
            self.wandb_run.define_metric(LIFETIME_STEP)
            for pattern in LIFETIME_CHARTS:
                self.wandb_run.define_metric(pattern, step_metric=LIFETIME_STEP)
        except Exception as error:  # W&B must never fail a training run
            log.warning("W&B could not start (%s: %s); metrics go to %s only",
                        type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "", self.jsonl_path)
            self.mode = "disabled"
            self.wandb_run = None
            return
        self._worker = threading.Thread(target=self._drain, name="wandb-log", daemon=True)
        self._worker.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._closing.is_set():
                return
            step, metrics = item
            try:
                self.wandb_run.log(metrics, step=step)
            except Exception as error:
                self._give_up_wandb("log", error)
                return

    # -- the one entry point

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics at a step of the trainer's global-step axis. Steps never go backwards."""
        if not metrics:
            return
        step = max(int(step), self.last_step)
        self.last_step = step
        clean = {key: _plain_number(value) for key, value in metrics.items()}
        clean[LIFETIME_STEP] = self.step_offset + step
        self._write_jsonl({"run": self.run_number, "step": step, "time": time.time(), **clean})
        if self._worker is not None and not self._wandb_failed.is_set():
            try:
                self._queue.put_nowait((step, clean))
            except queue.Full:
                self.dropped += 1

    def update_config(self, values: dict[str, Any]) -> None:
        self._write_jsonl({"event": "config", "run": self.run_number, **values})
        if self.wandb_run is not None and not self._wandb_failed.is_set():
            try:
                self.wandb_run.config.update(values, allow_val_change=True)
            except Exception as error:
                self._give_up_wandb("config update", error)

    @property
    def run_id(self) -> str | None:
        return getattr(self.wandb_run, "id", None)

    def rename(self, suffix: str) -> None:
        """Add the outcome to the W&B run's name ("run-4-promoted"), so the group's list says it."""
        self._write_jsonl({"event": "name", "run": self.run_number, "name": f"{self.name}-{suffix}"})
        if self.wandb_run is not None and not self._wandb_failed.is_set():
            try:
                self.wandb_run.name = f"{self.name}-{suffix}"
            except Exception as error:
                self._give_up_wandb("rename", error)

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; never blocks longer than the finish timeout."""
        self._write_jsonl({"event": "finish", "run": self.run_number, "exit_code": exit_code, "dropped": self.dropped})
        try:
            self._jsonl.close()
        except OSError:
            pass  # the last lines could not be flushed (a full disk), as _write_jsonl has already said
        if self._worker is None:
            return
        if self._wandb_failed.is_set():
            self._quiet_teardown()
            return
        # Never a blocking put: with wandb-core stalled the queue stays full and a put would wait forever.
        deadline = time.monotonic() + self.options.finish_timeout_s
        try:
            self._queue.put(_STOP, timeout=self.options.finish_timeout_s)
        except queue.Full:
            self._closing.set()  # the worker stops after the item it is stuck on, if it ever returns
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():
            self._closing.set()
            log.warning("W&B did not take the last metrics within %.0f s; the local metrics file is complete",
                        self.options.finish_timeout_s)
            self._abandon_wandb()
            return
        closer = threading.Thread(target=self._close_wandb, args=(exit_code,), daemon=True)
        closer.start()
        closer.join(self.options.finish_timeout_s)
        if closer.is_alive():
            log.warning("W&B did not finish within %.0f s; the local metrics file is complete", self.options.finish_timeout_s)
            self._abandon_wandb()

    def _abandon_wandb(self) -> None:
        """A stalled wandb-core: wandb's exit hook would wait for it for ever as the process ends (a run-once
        that never returns after its summary, a cycle the daemon's stall watch ends half an hour later).
        Closed here instead, bounded, and nothing more is said of it."""
        self._wandb_failed.set()
        self._quiet_teardown()

    def _close_wandb(self, exit_code: int) -> None:
        try:
            self.wandb_run.finish(exit_code=exit_code)
        except Exception as error:
            self._give_up_wandb("finish", error)
            self._quiet_teardown()

    def _give_up_wandb(self, call: str, error: Exception) -> None:
        if not self._wandb_failed.is_set():
            self._wandb_failed.set()
            log.warning("W&B %s failed (%s: %s): the rest of this run's metrics go to %s only", call,
                        type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "", self.jsonl_path)

    def _quiet_teardown(self) -> None:
        """Close the connection to a failed wandb-core now, where its error can be caught: wandb's own exit
        hook would meet the same error at exit and print its traceback. Bounded: a stalled service must
        not hold the cycle."""
        def teardown() -> None:
            try:
                import_wandb().teardown()
            except Exception:  # the service is gone: nothing to close, and nothing worth a line
                pass

        closer = threading.Thread(target=teardown, name="wandb-teardown", daemon=True)
        closer.start()
        # Its first act, removing wandb's exit hook, takes milliseconds; the rest may wait on the service.
        closer.join(min(self.options.finish_timeout_s, 5.0))

    def _write_jsonl(self, record: dict[str, Any]) -> None:
        # A full disk fails every write of a long run: said once, and again when it recovers, not thousands
        # of times into a journal on the same full disk.
        try:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()
        except (OSError, ValueError) as error:
            if not self._jsonl_failing:
                log.warning("could not write the metrics file %s (said once until it works again; W&B still gets "
                            "the metrics): %s", self.jsonl_path, error)
            self._jsonl_failing = True
            return
        if self._jsonl_failing:
            self._jsonl_failing = False
            log.info("the metrics file %s is written again", self.jsonl_path)


def _plain_number(value: Any) -> float | int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(value)


# ---------------------------------------------------------------- system collector


def nvidia_gpu_names() -> list[str]:
    """The NVIDIA GPUs the driver sees, by name, whatever torch can do with them ([] without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU
        return []
    try:
        return [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index)))
                for index in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []
    finally:
        pynvml.nvmlShutdown()


class SystemMonitor:
    """CPU, RAM, disk and NVML GPU readings. Never blocks: cpu_percent is measured since the previous call."""

    def __init__(self, disk_path: Path):
        self.disk_path = disk_path
        self._nvml_handles: list[Any] = []
        self._nvml = None
        psutil.cpu_percent(interval=None)  # primes the counter; the first real reading covers the interval since
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._nvml_handles = [pynvml.nvmlDeviceGetHandleByIndex(index) for index in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no driver, no GPU: the GPU keys are simply absent
            self._nvml = None

    def read(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        metrics: dict[str, float] = {
            "system/cpu_percent": psutil.cpu_percent(interval=None),
            "system/cpu_count": psutil.cpu_count() or 0,
            "system/memory_used_gb": (memory.total - memory.available) / 1e9,
            "system/memory_available_gb": memory.available / 1e9,
            "system/memory_percent": memory.percent,
            "system/process_rss_gb": psutil.Process().memory_info().rss / 1e9,
        }
        disk_path = self.disk_path
        while not disk_path.exists() and disk_path != disk_path.parent:
            disk_path = disk_path.parent
        disk = psutil.disk_usage(str(disk_path))
        metrics.update({
            "system/disk_used_gb": disk.used / 1e9,
            "system/disk_free_gb": disk.free / 1e9,
            "system/disk_percent": disk.percent,
        })
        if self._nvml is not None:
            metrics.update(self._read_gpus())
        return metrics

    def _read_gpus(self) -> dict[str, float]:
        nvml = self._nvml
        metrics = {}
        for index, handle in enumerate(self._nvml_handles):
            prefix = f"system/gpu_{index}_"
            try:
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
                metrics[prefix + "utilization"] = utilization.gpu
                metrics[prefix + "memory_utilization"] = utilization.memory
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                metrics[prefix + "memory_used_gb"] = memory.used / 1e9
                metrics[prefix + "temperature_c"] = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                metrics[prefix + "power_watts"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
            except Exception:
                continue
        return metrics

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def send_alert(options: WandbOptions, jsonl_path: Path, title: str, text: str) -> None:
    """One W&B alert (routable to Slack or email in the W&B settings), from a short run of its own; offline or
    disabled, it is recorded in the local metrics file and the log instead. Counts only, never data."""
    log.warning("ALERT: %s: %s", title, text)
    try:
        with open(jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": "alert", "time": time.time(), "title": title, "text": text}) + "\n")
    except OSError as error:
        log.warning("could not record the alert in %s (%s)", jsonl_path, error)
    if options.mode == "disabled":
        return

    def deliver() -> None:
        try:
            wandb = import_wandb()
            options.directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=options.project, entity=options.entity, group=options.group, job_type="alert",
                             name=f"alert-{int(time.time())}", mode=options.mode, dir=str(options.directory),
                             reinit="create_new", settings=wandb.Settings(**wandb_settings_kwargs(options)))
            run.alert(title=title, text=text, level=wandb.AlertLevel.ERROR)
            run.finish()
        except Exception as error:  # an alert must never fail the daemon
            log.warning("W&B alert not sent (%s)", type(error).__name__)

    # Bounded: a stalled W&B must not keep a failed cycle alive.
    sender = threading.Thread(target=deliver, name="wandb-alert", daemon=True)
    sender.start()
    sender.join(options.init_timeout_s + options.finish_timeout_s)


def rotate_metrics_file(path: Path, max_bytes: int = 64 * 1024 * 1024) -> bool:
    """Retention for the local metrics file: past `max_bytes` it becomes `metrics.jsonl.1` (replacing the
    previous one), so the pair never exceeds twice the limit."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    os.replace(path, path.with_name(path.name + ".1"))
    return True


def prune_wandb_runs(wandb_root: Path, max_age_days: float, now: float | None = None) -> list[Path]:
    """Retention for W&B's local files: remove offline run folders that were synced (`wandb sync` leaves a
    .synced marker), and offline or online run folders older than `max_age_days` (an online run's local
    folder is a copy of what the server already has)."""
    folder = wandb_root / "wandb"
    if not folder.exists():
        return []
    now = time.time() if now is None else now
    removed = []
    for run_dir in [*folder.glob("offline-run-*"), *folder.glob("run-*")]:
        if not run_dir.is_dir() or run_dir.is_symlink():
            continue
        synced = any(run_dir.glob("*.wandb.synced"))
        too_old = now - run_dir.stat().st_mtime > max_age_days * 86400
        if synced or too_old:
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(run_dir)
    return removed
