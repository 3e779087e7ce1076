"""A throwaway local PostgreSQL server for the demo and the tests, and the crawler's table.

The server binaries refuse to run as root; as root they run as the `postgres` user in a data directory
that user owns. The server listens on loopback only, with fsync off: it holds nothing worth keeping.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The crawler's table exactly as users have it; the daemon only ever reads it.
CREATE_PROCESSED_FILES = """
CREATE TABLE IF NOT EXISTS processed_files (
    id serial PRIMARY KEY,
    job_id int,
    file_path text,
    relative_path text NOT NULL,
    content text NOT NULL,
    language text NOT NULL,
    lines int NOT NULL,
    size bigint NOT NULL,
    hash text NOT NULL UNIQUE,
    repo_name text NOT NULL,
    processed_at timestamp,
    quality_score integer DEFAULT 0
)
"""


def find_server_binaries() -> Path:
    override = os.environ.get("CODELUPE_PG_BIN")
    candidates = [override] if override else []
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; set CODELUPE_PG_BIN")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ThrowawayPostgres:
    directory: Path
    port: int
    bin_dir: Path
    run_as: str | None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *arguments: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return prefix + list(arguments)

    def start(self) -> None:
        log_file = self.directory / "server.log"
        subprocess.run(
            self._command(str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / "data"), "-l", str(log_file),
                          "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.directory}",
                          "-w", "start"),
            check=True, capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            self._command(str(self.bin_dir / "pg_ctl"), "-D", str(self.directory / "data"), "-m", mode, "-w", "stop"),
            capture_output=True,
        )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def start_throwaway_postgres() -> ThrowawayPostgres:
    """initdb + start on a free loopback port; about a second."""
    bin_dir = find_server_binaries()
    run_as = "postgres" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="codelupe-pg-"))
    if run_as:
        shutil.chown(directory, user=run_as)
    server = ThrowawayPostgres(directory=directory, port=free_port(), bin_dir=bin_dir, run_as=run_as)
    subprocess.run(
        server._command(str(bin_dir / "initdb"), "-D", str(directory / "data"), "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8"),
        check=True, capture_output=True,
    )
    server.start()
    return server


def wait_for_postgres(url: str, timeout_s: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
