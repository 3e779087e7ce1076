"""The PostgreSQL reader against a real server: skipped rows counted, keyset pages, late commits not skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from codelupe_trainer.config import DatabaseSettings, DataSettings
from codelupe_trainer.state import advance_state, give_up_gaps, load_state, remove_ids
from codelupe_trainer.data.records import FetchResult
from codelupe_trainer.data.source import (SchemaError, SourceError, check_table, count_new_samples, fetch_new_samples,
                                          id_index_problem, open_connection)
from codelupe_trainer.state import TrainerState

GOOD = "def f(x):\n    return x + 1\n" * 4

# A user table with other column names, and the NULLs the crawler's NOT NULLs would not allow.
CREATE_LOOSE = "CREATE TABLE snippets (sid bigserial PRIMARY KEY, body text, lang text, score int)"
LOOSE_ROWS = [
    (GOOD, "Python", 90),            # passes (language is lower-cased)
    (None, "python", 90),            # null_content
    ("   \n\t  ", "python", 90),     # empty_content
    (GOOD, "python", None),          # not scored yet: waits for its score (a pending gap)
    (GOOD, "python", 250),           # bad_quality
    (GOOD, "python", 10),            # low_quality
    (GOOD, None, 90),                # null_language
    ("x = 1", "python", 90),         # too_short
    ("y" * 9000, "python", 90),      # too_long
    (GOOD + "# \u202e\u0000\U0001f600 tail", "python", 90),  # unicode oddities, NUL is stripped below
    ("a" * 50, "python", 90),        # exactly min_chars: passes
    ("b" * 8000, "python", 90),      # exactly max_chars: passes
    (("z" * 3000 + "\n") * 2, "python", 90),  # very long lines: passes
]


@pytest.fixture
def loose_table(db_url):
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(CREATE_LOOSE)
        for body, lang, score in LOOSE_ROWS:
            connection.execute("INSERT INTO snippets (body, lang, score) VALUES (%s, %s, %s)",
                               (body.replace("\u0000", "") if body else body, lang, score))
    return DatabaseSettings(url=db_url, table="snippets", id_column="sid", content_column="body",
                            language_column="lang", quality_column="score", page_size=3)


def fetch_all(database, data, after_id=0, gaps=None, limit=None):
    result = FetchResult(last_examined_id=after_id)
    with open_connection(database) as connection:
        samples = list(fetch_new_samples(connection, database, data, after_id, result, gaps, limit))
    return samples, result


def test_bad_rows_are_skipped_and_counted_by_reason(loose_table):
    samples, result = fetch_all(loose_table, DataSettings())
    assert [sample.id for sample in samples] == [1, 10, 11, 12, 13]
    assert samples[0].language == "python"
    assert dict(result.skipped) == {
        "null_content": 1, "empty_content": 1, "bad_quality": 1, "low_quality": 1,
        "null_language": 1, "too_short": 1, "too_long": 1,
    }
    assert (result.waiting_for_score, result.new_gaps) == (1, [(4, 4)])
    assert result.rows_examined == len(LOOSE_ROWS)
    assert result.last_examined_id == len(LOOSE_ROWS)
    with open_connection(loose_table) as connection:
        assert count_new_samples(connection, loose_table, DataSettings(), 0) == 5


def test_language_filter_and_limit(loose_table):
    samples, passed = fetch_all(loose_table, DataSettings(languages=["go"]))
    assert samples == []
    # Another language's rows are skipped, counted, and passed over for good (README: data.languages); one
    # not scored yet too: no score would make it eligible.
    assert passed.skipped["language"] == 6 and passed.last_examined_id == len(LOOSE_ROWS)
    assert passed.waiting_for_score == 0 and passed.new_gaps == []
    samples, result = fetch_all(loose_table, DataSettings(), limit=2)
    assert [sample.id for sample in samples] == [1, 10]
    assert result.last_examined_id == 10  # rows past the limit stay for the next run


def test_a_row_not_scored_yet_waits_for_its_score_then_trains_or_is_given_up_after_the_commit_lag(loose_table):
    """A scorer that fills the quality column after the crawler's insert: a row read while its score is
    NULL is neither trained nor skipped for good. Its id is watched like a late commit's: read again each
    cycle, taken once scored, and given up only by a read after database.max_commit_lag_minutes."""
    samples, first = fetch_all(loose_table, DataSettings())
    assert 4 not in [sample.id for sample in samples] and first.waiting_for_score == 1
    state = advance_state(TrainerState(), first, len(samples), None, None)
    assert state.last_trained_id == len(LOOSE_ROWS) and state.gap_ranges() == [(4, 4)]

    samples, again = fetch_all(loose_table, DataSettings(), after_id=state.last_trained_id, gaps=state.gap_ranges())
    assert samples == [] and again.waiting_for_score == 1 and again.filled_gaps == []
    state = advance_state(state, again, 0, None, None)
    assert state.gap_ranges() == [(4, 4)], "still unscored: still watched"

    with psycopg.connect(loose_table.url.get_secret_value(), autocommit=True) as connection:
        connection.execute("UPDATE snippets SET score = 90 WHERE sid = 4")
    samples, scored = fetch_all(loose_table, DataSettings(), after_id=state.last_trained_id, gaps=state.gap_ranges())
    assert [sample.id for sample in samples] == [4] and scored.waiting_for_score == 0
    assert advance_state(state, scored, 1, None, None).gap_ranges() == []

    # Scored too low, it is skipped like any low-quality row; never scored, it is given up with the lag.
    with psycopg.connect(loose_table.url.get_secret_value(), autocommit=True) as connection:
        connection.execute("UPDATE snippets SET score = 5 WHERE sid = 4")
    samples, low = fetch_all(loose_table, DataSettings(), after_id=state.last_trained_id, gaps=state.gap_ranges())
    assert samples == [] and low.skipped["low_quality"] == 1 and advance_state(state, low, 0, None, None).gap_ranges() == []
    # Still unscored when a read comes after its window ran out: given up.
    again.give_up_seen_before = state.pending_gaps[0][2] + 1
    assert advance_state(state, again, 0, None, None).gap_ranges() == []


def test_rows_past_the_gap_ranges_one_read_can_watch_are_left_for_the_next_read_not_consumed(db_url):
    """A scorer that finishes out of order (every other row still unscored) or a crawler that deletes every
    other row makes a range per row: past the 10,000 ranges one read records, the read stops, so the
    unscored rows and a transaction committing late behind those holes are read by the next cycle instead of
    being passed over for good."""
    from codelupe_trainer.data.source import MAX_NEW_GAP_RANGES

    pairs = MAX_NEW_GAP_RANGES // 2 + 3  # each part alone fits; together they make 10,006 ranges
    late_id = 4 * pairs + 1
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE snippets (sid bigint PRIMARY KEY, body text, lang text, score int)")
        # ids 1..2n: the odd ones deleted; ids 2n+1..4n: the odd ones not scored yet.
        connection.execute("INSERT INTO snippets SELECT i, %s || i, 'python', 90 FROM generate_series(2, %s::bigint, 2) AS i",
                           (GOOD, 2 * pairs))
        connection.execute("INSERT INTO snippets SELECT i, %s || i, 'python', CASE WHEN i %% 2 = 0 THEN 90 END "
                           "FROM generate_series(%s::bigint, %s::bigint) AS i", (GOOD, 2 * pairs + 1, 4 * pairs))
        connection.execute("INSERT INTO snippets VALUES (%s, %s, 'python', 90)", (late_id + 1, GOOD + "after"))
    late = psycopg.connect(db_url)  # a crawler transaction holding an id behind the holes, not committed yet
    late.execute("INSERT INTO snippets VALUES (%s, %s, 'python', 90)", (late_id, GOOD + "late"))
    database = DatabaseSettings(url=db_url, table="snippets", id_column="sid", content_column="body",
                                language_column="lang", quality_column="score")
    data = DataSettings(max_samples_per_run=10**6)

    state, trained = TrainerState(), []
    for cycle in range(4):
        samples, result = fetch_all(database, data, after_id=state.last_trained_id, gaps=state.gap_ranges())
        assert len(result.new_gaps) <= MAX_NEW_GAP_RANGES
        trained += [sample.id for sample in samples]
        state = advance_state(state, result, len(samples), None, None)
        if cycle == 0:
            late.commit()
            with psycopg.connect(db_url, autocommit=True) as connection:
                connection.execute("UPDATE snippets SET score = 90 WHERE score IS NULL")
    late.close()
    assert len(trained) == len(set(trained)), "no row is read twice"
    with psycopg.connect(db_url) as connection:
        every_row = [row[0] for row in connection.execute("SELECT sid FROM snippets ORDER BY sid")]
    missed = sorted(set(every_row) - set(trained))
    assert missed == [], f"{len(missed)} rows passed over for good, such as {missed[:5]}"
    assert state.last_trained_id == late_id + 1


def test_a_language_with_stray_whitespace_or_capitals_is_one_language_everywhere(db_url):
    """"Python\n", " python " and "PYTHON\t" are python to the language filter, the samples and the holdout's
    strata alike: none is skipped as another language, and none becomes a holdout language of its own (which
    would add min_per_language rows to the holdout at every run)."""
    from codelupe_trainer.data.source import select_holdout

    languages = ["Python\n", " python ", "PYTHON\t", "python", "\tGo\r\n", "go"] * 4
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(CREATE_LOOSE)
        for lang in languages:
            connection.execute("INSERT INTO snippets (body, lang, score) VALUES (%s, %s, 90)", (GOOD, lang))
    database = DatabaseSettings(url=db_url, table="snippets", id_column="sid", content_column="body",
                                language_column="lang", quality_column="score")
    samples, result = fetch_all(database, DataSettings(languages=["Python ", "GO"]))
    assert len(samples) == len(languages) and dict(result.skipped) == {}
    assert {sample.language for sample in samples} == {"python", "go"}
    samples, result = fetch_all(database, DataSettings(languages=["python"]))
    assert {sample.language for sample in samples} == {"python"} and result.skipped["language"] == 8
    with open_connection(database) as connection:
        picked = select_holdout(connection, database, DataSettings(), after_id=0, window=1000, held={},
                                size=6, min_per_language=2)
        assert {language for _, language in picked} == {"python", "go"}
        assert select_holdout(connection, database, DataSettings(), after_id=0, window=1000,
                              held={"python": 2, "go": 2}, size=0, min_per_language=2) == []


def test_missing_columns_are_named(loose_table):
    broken = loose_table.model_copy(update={"quality_column": "quality_score"})
    with open_connection(broken) as connection, pytest.raises(SourceError, match="database.quality_column='quality_score'"):
        check_table(connection, broken)


@pytest.mark.parametrize(("columns", "expected"), [
    ("id uuid PRIMARY KEY DEFAULT gen_random_uuid(), content text, language text, quality_score int",
     "database.id_column='id' is uuid; it must be an integer column whose values grow with each new row"),
    ("id bigserial PRIMARY KEY, content bytea, language text, quality_score int",
     "database.content_column='content' is bytea; it must be a text column"),
    ("id bigserial PRIMARY KEY, content text, language text, quality_score text",
     "database.quality_column='quality_score' is text; it must be a numeric column"),
])
def test_a_column_of_a_type_the_queries_cannot_use_is_named_in_one_line(db_url, tmp_path, columns, expected):
    """A table with every column present but one of the wrong type (a uuid id cannot carry a watermark):
    one line naming the setting and the type, exit 2 from run-once, instead of an SQL error and a traceback
    every cycle. varchar, numeric and the like pass."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE processed_files ({columns})")
    database = DatabaseSettings(url=db_url)
    with open_connection(database) as connection, pytest.raises(SchemaError) as raised:
        check_table(connection, database)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    config = tmp_path / "codelupe.toml"
    config.write_text(f'[paths]\nstate_file = "{tmp_path / "state.json"}"\noutput_dir = "{tmp_path / "adapters"}"\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith("CODELUPE_")}
    completed = subprocess.run([sys.executable, "-m", "codelupe_trainer.cli", "run-once", "--config", str(config)],
                               env={**env, "CODELUPE_DATABASE__URL": db_url}, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and expected in completed.stderr, completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1 and "Traceback" not in completed.stderr
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("DROP TABLE processed_files")
        connection.execute("CREATE TABLE processed_files (id integer PRIMARY KEY, content varchar(9000), "
                           "language character varying, quality_score numeric(5, 2))")
    with open_connection(database) as connection:
        check_table(connection, database)  # every accepted kind of type


def test_unreachable_database_error_hides_the_password():
    database = DatabaseSettings(url="postgresql://u:TopSecret99@127.0.0.1:1/d", connect_timeout_s=1)
    with pytest.raises(SourceError) as raised:
        with open_connection(database):
            pass
    assert "TopSecret99" not in str(raised.value)
    assert "cannot connect" in str(raised.value)


def test_a_row_committed_late_below_the_watermark_is_not_skipped(crawler_table):
    """Transaction A takes id 2 and stays open while B commits ids 3 and 4: the watermark passes 2,
    but 2 is remembered as a gap and trained once A commits."""
    database = DatabaseSettings(url=crawler_table, page_size=100)
    data = DataSettings(min_quality=0)
    insert = ("INSERT INTO processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score)"
              " VALUES (%s, %s, 'python', 4, 100, %s, 'r', 80)")
    with psycopg.connect(crawler_table, autocommit=True) as committed:
        committed.execute(insert, ("a.py", GOOD + "#1", "h1"))
    slow = psycopg.connect(crawler_table)  # not autocommit: its transaction stays open
    slow.execute(insert, ("b.py", GOOD + "#2", "h2"))
    with psycopg.connect(crawler_table, autocommit=True) as committed:
        committed.execute(insert, ("c.py", GOOD + "#3", "h3"))
        committed.execute(insert, ("d.py", GOOD + "#4", "h4"))

    samples, result = fetch_all(database, data)
    assert [sample.id for sample in samples] == [1, 3, 4]
    state = advance_state(TrainerState(), result, len(samples), adapter_path=None, summary=None)
    assert state.last_trained_id == 4 and state.gap_ranges() == [(2, 2)]

    slow.commit()
    slow.close()
    gaps = state.gap_ranges()
    with open_connection(database) as connection:
        assert count_new_samples(connection, database, data, state.last_trained_id, gaps) == 1
    samples, result = fetch_all(database, data, after_id=state.last_trained_id, gaps=gaps)
    assert [sample.id for sample in samples] == [2]
    state = advance_state(state, result, len(samples), adapter_path=None, summary=None)
    assert state.pending_gaps == [] and state.last_trained_id == 4


def test_a_bulk_insert_wider_than_1000_ids_committed_late_is_trained_exactly_once(crawler_table):
    """A crawler transaction allocates ids 1..1500 and commits after ids 1501..1503 were trained: every
    eligible row in it is read exactly once afterwards (gaps are id ranges, with no width limit)."""
    database = DatabaseSettings(url=crawler_table, page_size=400)
    data = DataSettings(min_quality=70)
    insert = ("INSERT INTO processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score)"
              " VALUES (%s, %s, 'python', 4, 100, %s, 'r', %s)")
    bulk = psycopg.connect(crawler_table)  # one open transaction holding 1,500 ids
    with bulk.cursor() as cursor:
        cursor.executemany(insert, [(f"bulk{i}.py", GOOD + f"#{i}", f"b{i}", 80 if i % 3 else 10) for i in range(1500)])
    with psycopg.connect(crawler_table, autocommit=True) as committed:
        for i in range(3):
            committed.execute(insert, (f"late{i}.py", GOOD + f"#late{i}", f"l{i}", 80))

    samples, result = fetch_all(database, data)
    assert [sample.id for sample in samples] == [1501, 1502, 1503]
    state = advance_state(TrainerState(), result, len(samples), adapter_path=None, summary=None)
    assert state.last_trained_id == 1503 and state.gap_ranges() == [(1, 1500)]
    assert len(json.dumps(state.pending_gaps)) < 100  # one range, not 1,500 ids

    bulk.commit()
    bulk.close()
    eligible_in_bulk = [i + 1 for i in range(1500) if i % 3]
    with open_connection(database) as connection:
        assert count_new_samples(connection, database, data, state.last_trained_id, state.gap_ranges()) == len(eligible_in_bulk)
    samples, result = fetch_all(database, data, after_id=state.last_trained_id, gaps=state.gap_ranges())
    assert [sample.id for sample in samples] == eligible_in_bulk
    assert sum(result.skipped.values()) == 500
    state = advance_state(state, result, len(samples), adapter_path=None, summary=None)
    assert state.pending_gaps == [] and state.last_trained_id == 1503
    samples, _ = fetch_all(database, data, after_id=state.last_trained_id, gaps=state.gap_ranges())
    assert samples == []  # nothing is read twice


@pytest.mark.parametrize(("gaps", "read", "left"), [
    ([[1, 10, 5.0]], [1, 10], [[2, 9, 5.0]]),
    ([[1, 10, 5.0]], [4, 5, 8], [[1, 3, 5.0], [6, 7, 5.0], [9, 10, 5.0]]),
    ([[1, 3, 5.0], [7, 7, 6.0]], [1, 2, 3, 7], []),
    ([[1, 3, 5.0]], [], [[1, 3, 5.0]]),
])
def test_read_ids_split_the_gap_ranges(gaps, read, left):
    assert remove_ids(gaps, read) == left


def test_gaps_are_given_up_after_the_commit_lag_window_once_a_fetch_has_read_through_them():
    gaps = [[5, 5, 1000.0], [6, 900, 5000.0], [950, 960, 1000.0]]
    # First seen before the deadline and read through: given up; seen after it, or past where the read
    # stopped (a step budget): kept.
    assert give_up_gaps(gaps, seen_before=5000.0 - 60, read_through=940) == [[6, 900, 5000.0], [950, 960, 1000.0]]
    assert give_up_gaps(gaps, seen_before=5000.0 - 60, read_through=4) == gaps


def test_pending_ranges_above_a_watermark_set_back_by_hand_are_dropped_as_the_state_loads(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"last_trained_id": 20,
                                                     "pending_gaps": [[5, 8, 1.0], [15, 40, 2.0], [30, 40, 3.0]]}))
    assert load_state(tmp_path / "state.json").pending_gaps == [[5, 8, 1.0], [15, 20, 2.0]]


def test_a_state_file_with_the_old_gap_format_loads(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"last_trained_id": 9, "pending_gaps": {"5": 1000.0}}))
    assert load_state(tmp_path / "state.json").gap_ranges() == [(5, 5)]


def test_uptime_counts_each_second_once_across_processes():
    from codelupe_trainer.state import account_uptime

    state = TrainerState()
    account_uptime(state, process_started=100.0, now=160.0)       # first process: 60 s
    account_uptime(state, process_started=100.0, now=190.0)       # same process, later: +30 s
    account_uptime(state, process_started=1000.0, now=1010.0)     # a later process: only its own 10 s
    assert state.uptime_seconds == 100.0 and state.uptime_accounted_at == 1010.0


def test_a_connection_dropped_mid_fetch_raises_without_the_password(crawler_table, server_url):
    from conftest import insert_stdlib_rows

    insert_stdlib_rows(crawler_table, start=0, count=30)
    database = DatabaseSettings(url=crawler_table, page_size=5)
    result = FetchResult(last_examined_id=0)
    with open_connection(database) as connection:
        stream = fetch_new_samples(connection, database, DataSettings(min_quality=0, max_chars=10**6), 0, result)
        next(stream)
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
        # An outage to retry in one line (SourceError: no traceback kept), not a crash of ours.
        with pytest.raises(SourceError, match="the database connection failed during a query: ") as raised:
            list(stream)
    assert "Sup3rSecretPw" not in str(raised.value)


def test_counting_stops_at_what_the_schedule_needs(crawler_table):
    """count_new_samples(up_to=n) reads no more than n eligible rows of a large backlog."""
    database = DatabaseSettings(url=crawler_table)
    data = DataSettings(min_quality=0)
    with psycopg.connect(crawler_table, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score)"
            " SELECT 'f' || i, %s || i, 'python', 4, 100, 'h' || i, 'r', 80 FROM generate_series(1, 3000) AS i", (GOOD,))
    with open_connection(database) as connection:
        assert count_new_samples(connection, database, data, 0) == 3000
        assert count_new_samples(connection, database, data, 0, up_to=1000) == 1000


def replay_table(db_url: str, ids: list[int]) -> DatabaseSettings:
    """Rows at these ids: three Python rows to one C row, every fifth one ineligible (quality 10)."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(CREATE_LOOSE)
        with connection.cursor() as cursor:
            cursor.executemany("INSERT INTO snippets (sid, body, lang, score) VALUES (%s, %s, %s, %s)",
                               [(row_id, GOOD, "c" if row_id % 4 == 0 else "python", 10 if row_id % 5 == 0 else 90)
                                for row_id in ids])
    return DatabaseSettings(url=db_url, table="snippets", id_column="sid", content_column="body",
                            language_column="lang", quality_column="score")


def test_the_replay_draw_is_eligible_trained_rows_in_proportion_and_new_each_run(db_url):
    from codelupe_trainer.data.source import fetch_replay_samples

    database = replay_table(db_url, list(range(1, 2001)))
    holdout = list(range(1, 2001, 7))
    with open_connection(database) as connection:
        first = fetch_replay_samples(connection, database, DataSettings(), 1600, 400, holdout, salt=1)
        again = fetch_replay_samples(connection, database, DataSettings(), 1600, 400, holdout, salt=1)
        other = fetch_replay_samples(connection, database, DataSettings(), 1600, 400, holdout, salt=2)
    ids = [sample.id for sample in first]
    assert len(ids) == len(set(ids)) == 400
    assert max(ids) <= 1600 and not set(ids) & set(holdout)  # trained rows only, never the holdout
    assert all(row_id % 5 for row_id in ids)  # eligible rows only
    assert ids == [sample.id for sample in again] and set(ids) != {sample.id for sample in other}
    # Drawn uniformly: C is a quarter of the eligible rows (binomial: 100 expected, 4 sd either side).
    c_rows = sum(sample.language == "c" for sample in first)
    assert 65 <= c_rows <= 135, c_rows


def test_the_replay_draw_survives_a_round_that_draws_only_ids_it_already_tried(db_url):
    """A young table whose trained range is mostly the holdout (the first hour): a round of random ids can
    land on tried ones only. That round once divided by its zero candidates and failed the whole cycle."""
    from codelupe_trainer.data.source import fetch_replay_samples

    database = replay_table(db_url, list(range(1, 1001)))
    left = {101, 202, 303, 404, 606, 707, 808, 909}  # eligible (no multiple of 5), the only ids not held out
    holdout = [row_id for row_id in range(1, 1001) if row_id not in left]
    with open_connection(database) as connection:
        for salt in range(1, 6):
            ids = [sample.id for sample in fetch_replay_samples(connection, database, DataSettings(), 1000, 3,
                                                                holdout, salt=salt)]
            assert len(ids) == len(set(ids)) == 3 and set(ids) <= left, (salt, ids)


def test_the_replay_draw_finds_rows_in_a_sparse_id_range_and_stops_at_what_exists(db_url):
    from codelupe_trainer.data.source import fetch_replay_samples

    # 300 rows spread over ids up to 3 million (deleted rows, another sequence): a few lookups still find them.
    database = replay_table(db_url, list(range(1, 3_000_001, 10_000)))
    with open_connection(database) as connection:
        found = fetch_replay_samples(connection, database, DataSettings(), 3_000_000, 50, [], salt=3)
        everything = fetch_replay_samples(connection, database, DataSettings(), 50_000, 100, [], salt=3)
    assert len(found) == 50
    assert sorted(sample.id for sample in everything) == [1, 10_001, 20_001, 30_001, 40_001]  # all there is


def test_an_id_column_without_an_index_is_named_with_the_statement_that_adds_one(db_url):
    """The README's own advice for a table without an integer id (`ADD COLUMN seq bigserial`) makes a column
    with no index: every count and fetch would then read the whole table. `doctor` and the daemon's start
    say so; a plain index (or the primary key) silences it, a partial one does not, a view is not judged."""
    from codelupe_trainer.data.source import id_index_problem

    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE files (uid uuid DEFAULT gen_random_uuid(), body text, lang text, score int)")
        connection.execute("ALTER TABLE files ADD COLUMN seq bigserial")
        connection.execute("CREATE VIEW recent_files AS SELECT * FROM files")
    database = DatabaseSettings(url=db_url, table="files", id_column="seq", content_column="body",
                                language_column="lang", quality_column="score")
    with open_connection(database) as connection:
        check_table(connection, database)
        assert id_index_problem(connection, database) == (
            "table 'files' has no index on database.id_column='seq': every cycle reads the whole table to find the "
            "new rows; add one: CREATE UNIQUE INDEX ON files (seq)")
        connection.execute("CREATE INDEX ON files (seq) WHERE score >= 70")
        assert id_index_problem(connection, database) is not None, "a partial index does not serve the fetch"
        assert id_index_problem(connection, database.model_copy(update={"table": "recent_files"})) is None
        connection.execute("CREATE UNIQUE INDEX ON files (seq)")
        assert id_index_problem(connection, database) is None
        connection.commit()


def test_a_table_in_a_schema_is_named_schema_table_and_a_missing_grant_is_named_as_one(db_url):
    """`database.table = "crawl.processed_files"` reads a table outside the search path (the unqualified name
    says how to reach it), and a database user without SELECT hears that a GRANT is missing, with the
    statement, rather than "does not exist" (information_schema hides what a user may not read)."""
    import uuid
    from urllib.parse import urlsplit

    role = f"codelupe_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE SCHEMA crawl")
        connection.execute(CREATE_LOOSE.replace("TABLE snippets", "TABLE crawl.snippets"))
        for body, lang, score in LOOSE_ROWS[:3]:
            connection.execute("INSERT INTO crawl.snippets (body, lang, score) VALUES (%s, %s, %s)", (body, lang, score))
        connection.execute(f"CREATE ROLE {role} LOGIN")
        connection.execute(f"GRANT USAGE ON SCHEMA crawl TO {role}")
    columns = dict(id_column="sid", content_column="body", language_column="lang", quality_column="score")
    database = DatabaseSettings(url=db_url, table="crawl.snippets", **columns)
    try:
        with open_connection(database) as connection:
            check_table(connection, database)
            assert id_index_problem(connection, database) is None  # the primary key, found in its schema
        samples, result = fetch_all(database, DataSettings())
        assert [sample.id for sample in samples] == [1] and result.skipped["null_content"] == 1
        unqualified = DatabaseSettings(url=db_url, table="snippets", **columns)
        with open_connection(unqualified) as connection, pytest.raises(SchemaError, match=r"is named schema\.table"):
            check_table(connection, unqualified)

        parts = urlsplit(db_url)
        host = parts.netloc.rpartition("@")[2]  # empty for the throwaway server's socket (?host=/dir)
        reader = DatabaseSettings(url=db_url.replace(parts.netloc, f"{role}@{host}", 1),
                                  table="crawl.snippets", **columns)
        grant = f'GRANT SELECT ON "crawl"."snippets" TO "{role}"'
        with open_connection(reader) as connection:
            with pytest.raises(SchemaError) as refused:
                check_table(connection, reader)
            assert str(refused.value) == f"table 'crawl.snippets' exists, but the database user '{role}' may not read it: {grant}"
        with psycopg.connect(db_url, autocommit=True) as connection:
            connection.execute(f"GRANT SELECT (sid, lang) ON crawl.snippets TO {role}")
        with open_connection(reader) as connection:
            with pytest.raises(SchemaError) as refused:
                check_table(connection, reader)
            assert str(refused.value) == (f"table 'crawl.snippets': the database user '{role}' may not read "
                                          f"database.content_column='body', database.quality_column='score': {grant}")
        with psycopg.connect(db_url, autocommit=True) as connection:
            connection.execute(f"GRANT SELECT ON crawl.snippets TO {role}")
        with open_connection(reader) as connection:
            check_table(connection, reader)
    finally:
        with psycopg.connect(db_url, autocommit=True) as connection:
            connection.execute(f"DROP OWNED BY {role}")
            connection.execute(f"DROP ROLE {role}")


def test_a_sql_ascii_database_is_read_as_utf8_and_a_row_that_is_not_is_skipped_and_counted(server_url):
    """A database created with ENCODING 'SQL_ASCII' (older installations; crawlers that store files' raw bytes)
    vouches for no encoding, so psycopg hands its text over as bytes. Those bytes are the crawler's UTF-8 text:
    every read (new rows, the holdout's choice and re-read, replay) gives text and languages as in any other
    database, and a row whose content is not UTF-8 (a Latin-1 file) is skipped and counted as `not_utf8`
    instead of failing every cycle at the same row."""
    from codelupe_trainer.data.source import fetch_samples_by_id, select_holdout
    from conftest import with_database

    name = f"codelupe_ascii_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    url = with_database(server_url, name)
    unicode_text = GOOD + "# caf\u00e9 \u4e16\u754c \U0001f600\n"
    rows = [(unicode_text.encode(), b"Python\n"), (GOOD.encode("latin-1") + b"# caf\xe9\n", b"python"),
            (GOOD.encode(), b"C++")]
    try:
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute(CREATE_LOOSE)
            for body, lang in rows:  # the bytes as the crawler stored them, unchecked by the server
                connection.execute("INSERT INTO snippets (body, lang, score) VALUES (convert_from(%s::bytea, "
                                   "'SQL_ASCII'), convert_from(%s::bytea, 'SQL_ASCII'), 90)", (body, lang))
        database = DatabaseSettings(url=url, table="snippets", id_column="sid", content_column="body",
                                    language_column="lang", quality_column="score")
        samples, result = fetch_all(database, DataSettings(max_chars=100_000))
        assert [(sample.id, sample.content, sample.language) for sample in samples] == [
            (1, unicode_text, "python"), (3, GOOD, "c++")]
        assert dict(result.skipped) == {"not_utf8": 1} and result.last_examined_id == 3
        with open_connection(database) as connection:
            check_table(connection, database)  # the catalog's names come over as bytes too
            assert id_index_problem(connection, database) is None
            assert [(sample.id, sample.content) for sample in fetch_samples_by_id(
                connection, database, DataSettings(max_chars=100_000), [1, 2, 3])] == [(1, unicode_text), (3, GOOD)]
            # python's two rows give it one holdout row; c++'s one row stays to train.
            picked = select_holdout(connection, database, DataSettings(max_chars=100_000), after_id=0, window=100,
                                    held={}, size=0, min_per_language=1)
            assert [language for _, language in picked] == ["python"]
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_language_column_of_an_enum_type_is_read_like_text(db_url):
    """A crawler may keep its languages in an enum type. `doctor` and the start-up check accept it (a
    user-defined type, as citext is), so every query must too: the language filter, the holdout's strata and
    the eligibility test cast it to text instead of failing each cycle on `function btrim(lang) does not exist`."""
    from codelupe_trainer.data.source import select_holdout

    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE TYPE lang AS ENUM ('Python', 'go', ' ')")
        connection.execute("CREATE TABLE snippets (sid bigserial PRIMARY KEY, body text, lang lang, score int)")
        for lang in ["Python", "go", "Python", " ", "go", "Python"]:
            connection.execute("INSERT INTO snippets (body, lang, score) VALUES (%s, %s, 90)", (GOOD, lang))
    database = DatabaseSettings(url=db_url, table="snippets", id_column="sid", content_column="body",
                                language_column="lang", quality_column="score")
    with open_connection(database) as connection:
        check_table(connection, database)
        assert count_new_samples(connection, database, DataSettings(), 0) == 5
        picked = select_holdout(connection, database, DataSettings(), after_id=0, window=100, held={},
                                size=0, min_per_language=1)
        assert sorted(language for _, language in picked) == ["go", "python"]
    samples, result = fetch_all(database, DataSettings())
    assert [sample.language for sample in samples] == ["python", "go", "python", "go", "python"]
    assert dict(result.skipped) == {"null_language": 1}
    samples, result = fetch_all(database, DataSettings(languages=["python"]))
    assert [sample.id for sample in samples] == [1, 3, 6] and result.skipped["language"] == 2


def test_a_table_or_column_named_in_other_capitals_or_outside_the_search_path_is_pointed_at(db_url):
    """PostgreSQL folds an unquoted `CREATE TABLE ProcessedFiles (Content text ...)` to lower case, and psql
    finds `SELECT Content FROM ProcessedFiles` all the same; a setting names the table and columns exactly.
    The one-line error names what is there instead of leaving the user to wonder why an existing table
    'does not exist'."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE ProcessedFiles (id bigserial PRIMARY KEY, Content text, language text, "
                           "quality_score int)")
        connection.execute("CREATE SCHEMA crawl")
        connection.execute("CREATE TABLE crawl.snippets (id bigserial PRIMARY KEY, content text, language text, "
                           "quality_score int)")
    cases = [
        ({"table": "ProcessedFiles"}, "table 'ProcessedFiles' does not exist, but 'processedfiles' does"),
        ({"table": "snippets"}, "table 'snippets' does not exist, but 'crawl.snippets' does"),
        ({"table": "crawl.Snippets"}, "table 'crawl.Snippets' does not exist, but 'crawl.snippets' does"),
        ({"table": "processedfiles", "content_column": "Content"},
         "has no column database.content_column='Content' (there is 'content': column names are matched exactly)"),
        ({"table": "nothing_like_it"}, "table 'nothing_like_it' does not exist (database.table; a table in another"),
    ]
    for update, expected in cases:
        database = DatabaseSettings(url=db_url, **update)
        with open_connection(database) as connection, pytest.raises(SchemaError) as raised:
            check_table(connection, database)
        assert expected in str(raised.value), (update, str(raised.value))
    database = DatabaseSettings(url=db_url, table="processedfiles")
    with open_connection(database) as connection:
        check_table(connection, database)  # named exactly, it is fine


def test_an_id_column_that_is_not_unique_fails_the_fetch_instead_of_passing_rows_over(db_url):
    """database.id_column pointed at a column rows share (a crawler's job_id): keyset pages continue after
    the last id read, so the rest of a group cut by a page's end would be passed over for good. The fetch
    stops with one line naming the setting before anything is consumed."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE jobs (job_id int, body text, lang text, score int)")
        for job in [1, 2, 2, 2, 3]:
            connection.execute("INSERT INTO jobs VALUES (%s, %s, 'python', 90)", (job, GOOD))
    database = DatabaseSettings(url=db_url, table="jobs", id_column="job_id", content_column="body",
                                language_column="lang", quality_column="score", page_size=2)
    # A group cut by a page's end, one inside a page, one where the run's sample limit stops.
    for page_size, limit in [(2, None), (100, None), (100, 2)]:
        with pytest.raises(SchemaError, match=r"database.id_column='job_id' holds 2 in more than one row; the "
                                              r"watermark needs an id unique to each row \(the primary key\)"):
            fetch_all(database.model_copy(update={"page_size": page_size}), DataSettings(), limit=limit)
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("DELETE FROM jobs WHERE job_id = 2")
        connection.execute("INSERT INTO jobs VALUES (2, %s, 'python', 90)", (GOOD,))
    samples, result = fetch_all(database, DataSettings())
    assert [sample.id for sample in samples] == [1, 2, 3] and result.last_examined_id == 3


@pytest.fixture
def pooled_url(server_url, db_url, tmp_path):
    """db_url's database through a real PgBouncer in transaction mode, as managed PostgreSQL services and
    many installations put in front of the server: each transaction may get another server connection, and
    `server_reset_query_always` resets it in between (so a prepared statement never survives). Skipped where
    pgbouncer is not installed (.ci/run installs it)."""
    import shutil
    import socket
    from urllib.parse import urlsplit

    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        pytest.skip("pgbouncer is not installed")
    server = urlsplit(server_url)
    if not server.hostname:  # the throwaway server's socket, which PgBouncer's user may not reach
        pytest.skip("the test server is reached through a Unix socket; this test puts PgBouncer on TCP")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "pgbouncer.ini"
    config.write_text(
        "[databases]\n"
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432} user={server.username or 'postgres'}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = any\npool_mode = transaction\n"
        "server_reset_query_always = 1\nunix_socket_dir =\n")
    # PgBouncer refuses to run as root; it reads its config before dropping to nobody.
    bouncer = subprocess.Popen([binary, str(config)] + (["-u", "nobody"] if os.geteuid() == 0 else []),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"postgresql://{server.username or 'postgres'}@127.0.0.1:{port}/{urlsplit(db_url).path.lstrip('/')}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if bouncer.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer did not start: {bouncer.stderr.read() if bouncer.poll() is not None else ''}")
                time.sleep(0.2)
        yield url
    finally:
        bouncer.terminate()
        bouncer.wait(10)


def test_every_read_works_through_pgbouncer_in_transaction_mode_and_keeps_its_statement_timeout(db_url, pooled_url):
    """Through PgBouncer the daemon could not even connect (it refuses the `options` startup parameter that set
    the statement timeout), and past that every query run a sixth time on the connection failed (psycopg
    prepares it then, and the statement is gone on the next server connection). Now: every read, pages and
    all, and a locked table still ends at database.statement_timeout_s instead of hanging the cycle."""
    from codelupe_trainer.data.source import fetch_samples_by_id, ineligible_new_rows, select_holdout

    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(CREATE_LOOSE)
        for body, lang, score in LOOSE_ROWS * 3:
            connection.execute("INSERT INTO snippets (body, lang, score) VALUES (%s, %s, %s)",
                               (body.replace("\u0000", "") if body else body, lang, score))
    database = DatabaseSettings(url=pooled_url, table="snippets", id_column="sid", content_column="body",
                                language_column="lang", quality_column="score", page_size=2, statement_timeout_s=2)
    with open_connection(database) as connection:
        check_table(connection, database)
        assert count_new_samples(connection, database, DataSettings(), 0) == 15
        assert select_holdout(connection, database, DataSettings(), after_id=0, window=100, held={},
                              size=4, min_per_language=2)
        assert len(fetch_samples_by_id(connection, database, DataSettings(), list(range(1, 40)))) == 15
        new = ineligible_new_rows(connection, database, DataSettings(), 0)
        assert new.rows == 3 * len(LOOSE_ROWS) and new.rows - sum(new.reasons.values()) == 15
    samples, result = fetch_all(database, DataSettings())  # ~20 pages: the page query runs far past five times
    assert len(samples) == 15 and result.last_examined_id == 3 * len(LOOSE_ROWS)

    locker = psycopg.connect(db_url)
    locker.execute("LOCK TABLE snippets IN ACCESS EXCLUSIVE MODE")  # held until rollback
    try:
        started = time.monotonic()
        with open_connection(database) as connection, pytest.raises(SourceError, match="ran past database.statement_timeout_s"):
            count_new_samples(connection, database, DataSettings(), 0)
        assert time.monotonic() - started < 15
    finally:
        locker.rollback()
        locker.close()


def test_a_query_the_server_cannot_run_now_is_an_outage_not_a_bug(db_url):
    """A hot standby cancels a query that conflicts with what it replays (SQLSTATE 40001), a full disk or
    memory (class 53) stops a query: the server is up, and says why. They fail the cycle as an outage (one
    line, retried with back-off) and are said as what they are, not as "the database connection failed"; an
    error in the SQL itself stays a bug. Raised here by the real server, from a view whose rows call a
    function that fails with that SQLSTATE."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute(CREATE_LOOSE)
        connection.execute("INSERT INTO snippets (body, lang, score) VALUES (%s, 'python', 90)", (GOOD,))
        for name, state in (("conflict", "40001"), ("full", "53100"), ("ours", "42883")):
            connection.execute(f"CREATE FUNCTION {name}() RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
                               f"'{name} happened' USING ERRCODE = '{state}'; END $$")
            connection.execute(f"CREATE VIEW snippets_{name} AS SELECT * FROM snippets WHERE {name}()")
    for name, expected in (("conflict", "hot_standby_feedback"), ("full", "$")):
        database = DatabaseSettings(url=db_url, table=f"snippets_{name}", id_column="sid", content_column="body",
                                    language_column="lang", quality_column="score")
        with pytest.raises(SourceError, match=f"the database could not run a query on 'snippets_{name}': "
                                              f"{name} happened.*{expected}"):
            fetch_all(database, DataSettings())
    database = DatabaseSettings(url=db_url, table="snippets_ours", id_column="sid", content_column="body",
                                language_column="lang", quality_column="score")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        fetch_all(database, DataSettings())


@pytest.mark.parametrize(("highest", "min_quality", "hint"), [
    (0.85, 70, "their quality_score is at most 0.85: if the crawler scores 0-1, set data.min_quality on that scale, "
               "such as 0.7"),
    (8.5, 70, "their quality_score is at most 8.5: if the crawler scores 0-10, set data.min_quality on that scale, "
              "such as 7"),
    (55, 70, "their quality_score is at most 55"),       # on the right scale, just low: no other scale suggested
    (0.85, 0.9, "their quality_score is at most 0.85"),  # already on 0-1
    (95, 70, None),                                       # some rows pass: nothing to say about the scale
])
def test_rows_no_score_lets_through_are_said_with_the_scale_the_scores_seem_to_be_on(highest, min_quality, hint):
    from collections import Counter

    from codelupe_trainer.data.source import describe_ineligible

    from codelupe_trainer.data.source import NewRows

    text = describe_ineligible(NewRows(30, Counter(low_quality=20, too_long=2), highest, []),
                               DataSettings(min_quality=min_quality), after_id=100)
    assert text.startswith(f"of the 30 rows past id 100: 20 below data.min_quality = {min_quality:g}, 2 longer than "
                           "data.max_chars = 8000")
    if hint is None:
        assert "quality_score" not in text
    else:
        assert text.endswith(hint)
    assert describe_ineligible(NewRows(30, Counter(), highest, []), DataSettings(min_quality=min_quality),
                               after_id=100) is None


def test_rows_data_languages_leaves_out_are_said_with_the_labels_the_table_gives_them(db_url):
    """`data.languages = ["py"]` against a crawler that writes "Python": every row skipped as "not in
    data.languages", and the idle line says how the table labels them, so the fix is in the line."""
    from codelupe_trainer.data.source import describe_ineligible, ineligible_new_rows

    with psycopg.connect(db_url, autocommit=True) as connection:
        connection.execute("CREATE TABLE files (id bigserial PRIMARY KEY, content text, language text, quality_score int)")
        for index in range(12):
            connection.execute("INSERT INTO files (content, language, quality_score) VALUES (%s, %s, 80)",
                               (f"value_{index} = {index} * 2\n" * 5, ("Python", "JavaScript", "python")[index % 3]))
    database = DatabaseSettings(url=db_url, table="files")
    data = DataSettings(languages=["py"])
    with open_connection(database) as connection:
        new = ineligible_new_rows(connection, database, data, 0)
    assert new.rows == 12 and new.reasons == {"language": 12}
    said = describe_ineligible(new, data, 0)
    assert said.startswith("of the 12 rows past id 0: 12 not in data.languages (labelled ") and said.endswith(")")
    # In the server's collation order, which varies: the labels as a set.
    assert set(said.removeprefix("of the 12 rows past id 0: 12 not in data.languages (labelled ")[:-1].split(", ")) \
        == {"'JavaScript'", "'Python'", "'python'"}
