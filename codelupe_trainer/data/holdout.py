"""The fixed holdout: the ids of the samples every run is evaluated on and none is trained on.

Kept by id (and language) in the daemon's own SQLite store beside the state, never as a copy of the code:
each run re-reads the rows from PostgreSQL. Ids are only ever added (a language the holdout lacks joins it
when it first appears; rows deleted from the table are topped up from new ones: continual.load_holdout),
never removed, so holdout losses are comparable across runs while the rows stay.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from ..errors import StoreError



class HoldoutStore:
    def __init__(self, path: Path):
        from .filters import describe_store_problem

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connection = sqlite3.connect(path, isolation_level=None, timeout=30)
            self._connection.execute("PRAGMA journal_mode=DELETE")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS holdout (id INTEGER PRIMARY KEY, language TEXT NOT NULL, "
                "added_by_run INTEGER NOT NULL, added_at REAL NOT NULL)")
        except sqlite3.DatabaseError as error:  # not an SQLite file: one line, not a traceback per cycle
            raise StoreError(describe_store_problem(path, str(error))) from None

    def ids(self) -> list[int]:
        return [row[0] for row in self._connection.execute("SELECT id FROM holdout ORDER BY id")]

    def add(self, rows: list[tuple[int, str]], run_number: int) -> None:
        """Committed at once, before the run trains: a sample chosen for the holdout is never trained, even if
        this run fails and the next one reads it again."""
        if not rows:
            return
        now = time.time()
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.executemany(
                "INSERT OR IGNORE INTO holdout (id, language, added_by_run, added_at) VALUES (?, ?, ?, ?)",
                [(row_id, language, run_number, now) for row_id, language in rows])

    def __len__(self) -> int:
        return self._connection.execute("SELECT count(*) FROM holdout").fetchone()[0]

    def close(self) -> None:
        self._connection.close()


def holdout_store(store_dir: Path) -> HoldoutStore:
    from .filters import DEDUP_STORE_FILE  # one store file: the exact and near duplicates live there too

    return HoldoutStore(store_dir / DEDUP_STORE_FILE)
