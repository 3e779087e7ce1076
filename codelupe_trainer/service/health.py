"""Optional HTTP endpoint (`[service] metrics_port`): `/health` as JSON and `/metrics` for Prometheus.

Values are read from the state file at scrape time, so they are right even though cycles run in child
processes. The one counter the daemon adds is of failed cycles the state could not record (a full disk):
without it, the endpoint would say "ok" through exactly the outage that most needs a person.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..errors import StateError
from ..state import load_state


class StateCollector:
    def __init__(self, state_file: Path, unrecorded_failures: Callable[[], int] = lambda: 0):
        self.state_file = state_file
        self.unrecorded_failures = unrecorded_failures

    def collect(self):
        try:
            state = load_state(self.state_file)
        except StateError:
            return  # no figures rather than an error page; /health says what is wrong
        runs = CounterMetricFamily("codelupe_training_runs", "Training runs that saved an adapter")
        runs.add_metric([], state.total_training_runs)
        failures = CounterMetricFamily("codelupe_training_failures", "Training cycles that failed")
        failures.add_metric([], state.total_failures)
        samples = CounterMetricFamily("codelupe_samples_trained", "Samples trained, each row counted once")
        samples.add_metric([], state.total_samples_trained)
        consecutive = GaugeMetricFamily("codelupe_consecutive_failures", "Failed cycles since the last success")
        consecutive.add_metric([], state.consecutive_failures + self.unrecorded_failures())
        watermark = GaugeMetricFamily("codelupe_last_trained_id", "Highest row id consumed")
        watermark.add_metric([], state.last_trained_id)
        last_success = GaugeMetricFamily("codelupe_last_success_timestamp_seconds", "When the last run finished")
        last_success.add_metric([], (state.last_run or {}).get("finished_at", 0.0))
        yield from (runs, failures, samples, consecutive, watermark, last_success)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes every 15 s would flood the journal
        pass


def health_document(state_file: Path, daemon_phase: Callable[[], str], failure_threshold: int = 3,
                    unrecorded_failures: int = 0) -> dict:
    try:
        state = load_state(state_file)
    except StateError as error:  # every cycle fails on it: stuck until someone fixes the file
        return {"status": "stuck", "phase": daemon_phase(), "last_error": str(error), "checked_at": time.time()}
    consecutive = state.consecutive_failures + unrecorded_failures
    last_error = state.last_error
    if unrecorded_failures:
        last_error = (f"{unrecorded_failures} failed cycle(s) in a row could not be recorded in {state_file} (a full "
                      "disk?); the journal has their errors")
    return {
        "status": "ok" if consecutive < failure_threshold else "stuck",
        "phase": daemon_phase(),
        "consecutive_failures": consecutive,
        **({"unrecorded_failures": unrecorded_failures} if unrecorded_failures else {}),
        "last_error": last_error,
        "total_training_runs": state.total_training_runs,
        "last_trained_id": state.last_trained_id,
        "last_success_at": (state.last_run or {}).get("finished_at"),
        "checked_at": time.time(),
    }


def start_health_server(port: int, state_file: Path, daemon_phase: Callable[[], str], host: str = "127.0.0.1",
                        failure_threshold: Callable[[], int] = lambda: 3,
                        unrecorded_failures: Callable[[], int] = lambda: 0) -> WSGIServer:
    """The callables are asked on each request: a reloaded config's service.alert_after_failures applies, and
    the daemon's count of failures the state could not take is current."""
    registry = CollectorRegistry()
    registry.register(StateCollector(state_file, unrecorded_failures))
    metrics_app = make_wsgi_app(registry)

    def application(environ, start_response):
        if environ.get("PATH_INFO") == "/health":
            document = health_document(state_file, daemon_phase, failure_threshold(), unrecorded_failures())
            status = "200 OK" if document["status"] == "ok" else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(document).encode()]
        return metrics_app(environ, start_response)

    server = make_server(host, port, application, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
