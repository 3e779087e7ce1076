"""The PostgreSQL reader: checking the table, counting and streaming new samples. Never writes.

Rows are read in keyset pages (`WHERE id > last ORDER BY id LIMIT n`) on an autocommit connection, so
memory does not grow with the table and no transaction stays open between pages. The eligibility test
runs on the server and only eligible rows carry their content over the wire; the others come back as
(id, reason) so they can be counted as skipped.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.adapt import Loader

from ..config import DataSettings, DatabaseSettings
from .languages import LANGUAGE_SQL, normal_language
from .records import FetchResult, Sample

log = logging.getLogger(__name__)

# Gap ranges one fetch records (ids missing, rows waiting for a score); far more than in-flight transactions
# make, but deleted rows and a scorer finishing out of order can make one per row: the fetch stops there.
MAX_NEW_GAP_RANGES = 10_000
# The skip reason of a row whose quality column is NULL: not scored yet, so it waits (_wait_for_score).
UNSCORED = "null_quality"


class SourceError(Exception):
    """The database cannot be read as configured; the message never contains the password."""


class SchemaError(SourceError):
    """The table or a configured column does not exist: a configuration problem no retry fixes."""


@contextmanager
def open_connection(database: DatabaseSettings) -> Iterator[psycopg.Connection]:
    try:
        connection = psycopg.connect(
            database.url.get_secret_value(),
            autocommit=True,
            connect_timeout=database.connect_timeout_s,
            application_name="codelupe-trainer",
            # A server that vanished without closing the socket is noticed in ~1 min, not after hours of TCP
            # retransmissions; a query that waits on a lock or a stuck server fails instead of hanging the cycle.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
            # Through a pooler (PgBouncer in transaction mode) consecutive statements may run on different
            # server connections, or on one reset in between: a statement psycopg prepared after its fifth run
            # would then be missing ("prepared statement _pg3_0 does not exist"). A cycle runs a few dozen
            # queries, so preparing saves nothing worth that.
            prepare_threshold=None,
        )
    except psycopg.Error as error:
        raise SourceError(f"cannot connect to the database: {describe_database_error(error)}") from None
    if connection.info.encoding == "ascii":
        _read_text_as_utf8(connection)
    try:
        yield connection
    finally:
        connection.close()


class NotUtf8(str):
    """Text from a SQL_ASCII database whose bytes were not UTF-8, kept as lone surrogates (surrogateescape):
    _classify skips such content as `not_utf8`. Marked by its type, so no other text is checked again."""


class _Utf8Loader(Loader):
    """Text from a SQL_ASCII database. Such a database vouches for no encoding (it stores the bytes it is
    given), so psycopg hands its text over as bytes, names and catalog answers included. The bytes are the
    crawler's UTF-8; a value that is not valid becomes NotUtf8 and its row is skipped instead of failing every
    cycle on the same row."""

    def load(self, data) -> str:
        data = bytes(data)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return NotUtf8(data.decode("utf-8", "surrogateescape"))


def _read_text_as_utf8(connection: psycopg.Connection) -> None:
    # 0: the types psycopg has no loader of its own for (an enum, citext), which it reads as text too.
    for text_type in (0, "text", "varchar", "bpchar", "name", '"char"'):
        connection.adapters.register_loader(text_type, _Utf8Loader)


def _run(connection: psycopg.Connection, database: DatabaseSettings, query, parameters=None) -> psycopg.Cursor:
    """Execute, turning what the database's state causes into one clear SourceError: a statement timeout, a
    connection lost mid-cycle (a server restart, a failover, an administrator's kill), a privilege revoked.
    These are outages to retry, not bugs: no traceback is kept. Other errors (our SQL) pass unchanged."""
    try:
        # The statement timeout is set for each query's own transaction (SET LOCAL), not for the session: a
        # pooler refuses the startup parameter that would set it (PgBouncer: "unsupported startup parameter:
        # options"), and a session setting would not follow the query to another server connection.
        with connection.transaction():
            connection.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                sql.Literal(int(database.statement_timeout_s * 1000))))
            return connection.execute(query, parameters)
    except psycopg.errors.QueryCanceled:
        raise SourceError(
            f"a query on {database.table!r} ran past database.statement_timeout_s ({database.statement_timeout_s:.0f} s): "
            "is the table locked by another session, or the server overloaded?"
        ) from None
    except psycopg.OperationalError as error:
        if (error.sqlstate or "")[:2] in SERVER_CONDITIONS:
            raise SourceError(f"the database could not run a query on {database.table!r}: "
                              f"{describe_database_error(error)}" + (
                                  " (a read replica cancels a query that conflicts with the changes it replays: raise "
                                  "its max_standby_streaming_delay or turn on hot_standby_feedback if this keeps happening)"
                                  if error.sqlstate == "40001" else "")) from None
        raise SourceError(f"the database connection failed during a query: {describe_database_error(error)}") from None
    except psycopg.errors.InsufficientPrivilege as error:
        raise SourceError(f"the database refused a query on {database.table!r}: {describe_database_error(error)}") from None


# SQLSTATE classes of a server that is up but cannot run the query now, said as such rather than as a lost
# connection (both are outages, retried with back-off): transaction rollback (a hot standby's conflict with
# recovery), insufficient resources (disk full, out of memory), system error (I/O).
SERVER_CONDITIONS = {"40", "53", "58"}


def describe_database_error(error: BaseException) -> str:
    """The server's reason without the DSN (libpq messages can echo the connection string)."""
    diagnostic = getattr(error, "diag", None)
    primary = getattr(diagnostic, "message_primary", None) if diagnostic else None
    text = primary or str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "password" in text.lower() and "=" in text:
        return "authentication or connection-string error (details withheld: they may contain the password)"
    return text


_INTEGER = {"smallint", "integer", "bigint"}
_TEXT = {"text", "character varying", "character", "USER-DEFINED"}  # USER-DEFINED: citext and the like
# What each column must hold for the queries: ids compared and ordered as numbers (the watermark), text
# matched by regular expressions, a quality compared with numbers.
_COLUMN_TYPES = {
    "id_column": (_INTEGER, "an integer column whose values grow with each new row (bigserial or an identity column)"),
    "content_column": (_TEXT, "a text column"),
    "language_column": (_TEXT, "a text column"),
    "quality_column": (_INTEGER | {"numeric", "real", "double precision"},
                       "a numeric column (a score, on the scale of data.min_quality)"),
}


def check_table(connection: psycopg.Connection, database: DatabaseSettings) -> None:
    """Raise SchemaError naming the missing table, a missing column or a column of a type the queries cannot
    use (each cycle would otherwise fail on an SQL error, a traceback and all)."""
    schema, table = table_parts(database.table)
    rows = _run(
        connection, database,
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s "
        "AND (table_schema = %s::text OR (%s::text IS NULL AND table_schema = ANY(current_schemas(false))))",
        (table, schema, schema),
    ).fetchall()
    # information_schema shows only what this user may read; the catalog tells a missing table or column
    # from one the user was not granted (the fix is then a GRANT, not a setting).
    quoted = _names(database)["table"].as_string(connection)
    user, oid = _run(connection, database, "SELECT current_user, to_regclass(%s)::oid", (quoted,)).fetchone()
    grant = f"GRANT SELECT ON {quoted} TO {sql.Identifier(user).as_string(connection)}"
    if not rows:
        if oid is not None:
            raise SchemaError(f"table {database.table!r} exists, but the database user {user!r} may not read it: {grant}")
        similar = _similar_tables(connection, database, table)
        if similar:
            raise SchemaError(f"table {database.table!r} does not exist, but {' and '.join(map(repr, similar))} does "
                              f"(database.table names a table exactly, capitals included; a table in another schema than the "
                              f"search path's is named schema.table)")
        raise SchemaError(f"table {database.table!r} does not exist (database.table" + (
            "" if schema else "; a table in another schema than the search path's is named schema.table") + ")")
    present = dict(rows)
    wanted = {f"database.{key}": getattr(database, key) for key in _COLUMN_TYPES}
    missing = [f"{key}={column!r}" + _same_but_for_case(column, present) for key, column in wanted.items()
               if column not in present]
    if missing:
        hidden = {name for (name,) in _run(
            connection, database,
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,))}
        if all(column in hidden for column in wanted.values()):
            raise SchemaError(f"table {database.table!r}: the database user {user!r} may not read "
                              f"{', '.join(missing)}: {grant}")
        raise SchemaError(f"table {database.table!r} has no column {', '.join(missing)}")
    for key, (types, need) in _COLUMN_TYPES.items():
        column = getattr(database, key)
        if present[column] not in types:
            raise SchemaError(f"table {database.table!r}: database.{key}={column!r} is {present[column]}; it must be "
                              f"{need}")


def _similar_tables(connection: psycopg.Connection, database: DatabaseSettings, table: str) -> list[str]:
    """The tables this user can see whose name differs from `table` only in case, or that are in another
    schema: PostgreSQL folds an unquoted `CREATE TABLE ProcessedFiles` to processedfiles, and psql's
    `SELECT * FROM ProcessedFiles` still finds it, while a setting names the table exactly."""
    rows = _run(connection, database,
                "SELECT table_schema, table_name FROM information_schema.tables WHERE lower(table_name) = lower(%s) "
                "AND table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2 LIMIT 3", (table,)).fetchall()
    visible = {schema for (schema,) in _run(connection, database, "SELECT unnest(current_schemas(false))").fetchall()}
    return [name if schema in visible else f"{schema}.{name}" for schema, name in rows]


def _same_but_for_case(column: str, present: dict) -> str:
    """' (there is content)' when the table has the column in other capitals (see _similar_tables)."""
    matches = [name for name in present if name.lower() == column.lower()]
    return f" (there is {matches[0]!r}: column names are matched exactly)" if matches else ""


def id_index_problem(connection: psycopg.Connection, database: DatabaseSettings) -> str | None:
    """Why finding the new rows reads the whole table every cycle, or None: no index (other than a partial
    one, which the fetch cannot use) starts with the id column. A view is not checked: its table's are used."""
    row = _run(
        connection, database,
        "SELECT t.relkind, EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "  AND a.attnum = i.indkey[0] WHERE i.indrelid = t.oid AND a.attname = %s AND i.indpred IS NULL) "
        "FROM pg_class t WHERE t.oid = to_regclass(%s)",
        (database.id_column, _names(database)["table"].as_string(connection)),
    ).fetchone()
    if row is None or row[0] not in ("r", "p") or row[1]:  # a plain or partitioned table without such an index
        return None
    return (f"table {database.table!r} has no index on database.id_column={database.id_column!r}: every cycle reads "
            f"the whole table to find the new rows; add one: CREATE UNIQUE INDEX ON {database.table} ({database.id_column})")


def table_parts(table: str) -> tuple[str | None, str]:
    """(schema, name) of database.table: "crawl.processed_files" names a table outside the search path."""
    schema, dot, name = table.partition(".")
    return (schema, name) if dot else (None, table)


def _names(database: DatabaseSettings) -> dict[str, sql.Composable]:
    schema, table = table_parts(database.table)
    return {
        "table": sql.Identifier(schema, table) if schema else sql.Identifier(table),
        "id": sql.Identifier(database.id_column),
        # As text: check_table admits user-defined types (citext, a crawler's enum of languages), which have
        # no btrim, no regular-expression match and no char_length of their own.
        "content": sql.SQL("{}::text").format(sql.Identifier(database.content_column)),
        "language": sql.SQL("{}::text").format(sql.Identifier(database.language_column)),
        "quality": sql.Identifier(database.quality_column),
    }


def _skip_reason_sql(data: DataSettings) -> tuple[sql.Composable, dict]:
    """A CASE expression giving NULL for an eligible row and the skip reason otherwise."""
    conditions = [
        ("null_content", "{content} IS NULL"),
        ("empty_content", "{content} !~ '[^[:space:]]'"),
        ("bad_quality", "{quality} < 0 OR {quality} > 100"),
        ("low_quality", "{quality} < %(min_quality)s"),
        ("null_language", "{language} IS NULL OR {language} !~ '[^[:space:]]'"),
        ("too_short", "char_length({content}) < %(min_chars)s"),
        ("too_long", "char_length({content}) > %(max_chars)s"),
    ]
    if data.languages:
        conditions.append(("language", f"NOT ({LANGUAGE_SQL} = ANY(%(languages)s))"))
    # Last: only a row that no score could make eligible is skipped; the rest wait for their score (UNSCORED).
    conditions.append((UNSCORED, "{quality} IS NULL"))
    branches = " ".join(f"WHEN {condition} THEN '{reason}'" for reason, condition in conditions)
    parameters = {
        # A hair below: a `real` column holds a 0-1 scorer's 0.7 as 0.69999999, below the 0.7 it was given.
        "min_quality": data.min_quality * (1 - 1e-6),
        "min_chars": data.min_chars,
        "max_chars": data.max_chars,
        "languages": [normal_language(language) for language in data.languages],
    }
    return sql.SQL(f"CASE {branches} END"), parameters


def _in_gaps(select: sql.Composable, names: dict, condition: sql.Composable = sql.SQL("TRUE"),
             ordered: bool = True) -> sql.Composable:
    """`select` (a SELECT ... FROM table, no WHERE) over the rows inside the pending gap ranges, in id order
    (`ordered`; unordered, a LIMIT around it can stop early instead of reading every row in the ranges).
    One index range scan per range (a lateral join), not a test of every row in the table against every
    range: 10,000 ranges on a 1M-row table took 212 s as `WHERE EXISTS (... unnest ...)`, and the ranges
    that rows waiting for a score make can number that many."""
    return (sql.SQL("SELECT found.* FROM unnest(%(gap_firsts)s::bigint[], %(gap_lasts)s::bigint[]) "
                    "AS codelupe_gap(first_id, last_id) CROSS JOIN LATERAL (")
            # OFFSET 0 keeps the planner from flattening the join into one scan of the table tested against
            # every range (what it chose for 1,000 ranges on 1M rows: 46 s).
            + select + sql.SQL("WHERE {id} BETWEEN codelupe_gap.first_id AND codelupe_gap.last_id AND ({condition}) "
                               "OFFSET 0) AS found").format(condition=condition, **names)
            + sql.SQL(" ORDER BY 1" if ordered else ""))


def _gap_parameters(pending_gaps: list[tuple[int, int]] | None) -> dict:
    gaps = list(pending_gaps or [])
    return {"gap_firsts": [first for first, _ in gaps], "gap_lasts": [last for _, last in gaps]}


def count_new_samples(
    connection: psycopg.Connection, database: DatabaseSettings, data: DataSettings, after_id: int,
    pending_gaps: list[tuple[int, int]] | None = None, up_to: int | None = None,
) -> int:
    """How many eligible rows lie past the watermark (or inside a pending gap range), counting no further than
    `up_to`: the cycle only needs to know whether schedule.min_new_samples is reached, not the whole backlog."""
    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    eligible = sql.SQL("({reason}) IS NULL").format(reason=reason.format(**names))
    # The gaps lie below the watermark: the two counts never see the same row.
    query = sql.SQL(
        "SELECT least(%(up_to)s, (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {id} > %(after_id)s "
        "AND {eligible} LIMIT %(up_to)s) AS past) + (SELECT count(*) FROM ({gaps} LIMIT %(up_to)s) AS gaps))"
    ).format(eligible=eligible, gaps=_in_gaps(sql.SQL("SELECT {id} FROM {table} ").format(**names), names, eligible,
                                              ordered=False), **names)
    parameters.update(after_id=after_id, up_to=up_to, **_gap_parameters(pending_gaps))
    return _run(connection, database, query, parameters).fetchone()[0]


# How far an idle cycle looks past the watermark to say why the rows there are not eligible: an index range
# scan of this many rows at most (milliseconds), once per idle cycle.
NEW_ROWS_LOOKED_AT = 10_000

# Why a row is not eligible, in a person's words: the setting that decides it, where there is one.
INELIGIBLE = {
    "null_content": "no content",
    "empty_content": "only whitespace",
    "bad_quality": "a quality score outside 0-100",
    "low_quality": "below data.min_quality = {min_quality:g}",
    "null_language": "no language",
    "too_short": "shorter than data.min_chars = {min_chars}",
    "too_long": "longer than data.max_chars = {max_chars}",
    "language": "not in data.languages",
    UNSCORED: "waiting for a quality score",
}


@dataclass
class NewRows:
    """The first rows past the watermark, as an idle cycle explains them."""

    rows: int
    reasons: Counter  # why those that are not eligible are not
    highest_quality: float | None  # the largest quality score among them (None: no scored row)
    other_languages: list[str]  # a few language labels of the rows data.languages leaves out, as the table has them


def ineligible_new_rows(connection: psycopg.Connection, database: DatabaseSettings, data: DataSettings,
                        after_id: int, limit: int = NEW_ROWS_LOOKED_AT) -> NewRows:
    """The first `limit` rows past the watermark: how many, and why those that are not eligible are not."""
    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    query = sql.SQL("SELECT reason, count(*), max(quality)::float8, "
                    "(array_agg(DISTINCT label) FILTER (WHERE reason = 'language'))[1:5] FROM (SELECT {reason} "
                    "AS reason, {quality} AS quality, {language} AS label FROM {table} WHERE {id} > %(after_id)s "
                    "ORDER BY {id} LIMIT %(limit)s) AS new_rows GROUP BY reason"
                    ).format(reason=reason.format(**names), **names)
    parameters.update(after_id=after_id, limit=limit)
    found = NewRows(0, Counter(), None, [])
    for why, count, quality, labels in _run(connection, database, query, parameters).fetchall():
        found.rows += count
        if why is not None:
            found.reasons[why] += count
        if quality is not None:
            found.highest_quality = quality if found.highest_quality is None else max(found.highest_quality, quality)
        found.other_languages += labels or []
    return found


def describe_ineligible(new: NewRows, data: DataSettings, after_id: int) -> str | None:
    """Why the new rows past the watermark do not make a cycle, in one clause, or None when all are eligible.
    A crawler that scores on 0-1 against the shipped min_quality of 70 (on 0-100) is the first hour's usual
    cause: every row is skipped, and without this the daemon said only "0 eligible new samples" forever."""
    rows, reasons, highest_quality = new.rows, new.reasons, new.highest_quality
    skipped = sum(reasons.values())
    if not skipped:
        return None
    words = {"min_quality": data.min_quality, "min_chars": data.min_chars, "max_chars": data.max_chars}
    parts = ", ".join(f"{count:,} {INELIGIBLE.get(reason, reason).format(**words)}"
                      + (f" (labelled {', '.join(map(repr, new.other_languages))})"
                         if reason == "language" and new.other_languages else "")
                      for reason, count in reasons.most_common())
    looked = f"the first {rows:,}" if rows >= NEW_ROWS_LOOKED_AT else f"the {rows:,}"
    text = f"of {looked} rows past id {after_id:,}: {parts}"
    if reasons.get("low_quality") and highest_quality is not None and highest_quality < data.min_quality:
        # No row can pass: most likely a scorer on another scale than the shipped 0-100.
        text += f"; their quality_score is at most {highest_quality:g}"
        scale = next((scale for scale in (1, 10) if 0 < highest_quality <= scale < data.min_quality), None)
        if scale:
            text += (f": if the crawler scores 0-{scale}, set data.min_quality on that scale, such as "
                     f"{data.min_quality * scale / 100:g}")
    return text


def first_watermark(connection: psycopg.Connection, database: DatabaseSettings) -> int:
    """Where a state that has never advanced starts: below the table's smallest id. Sequences start at 1, so
    for most tables this is the state's 0; a table filled by hand or from a DataFrame (ids from 0), or one
    with negative ids, would otherwise have its first rows taken as trained without ever being read."""
    names = _names(database)
    lowest = _run(connection, database, sql.SQL("SELECT min({id}) FROM {table}").format(**names)).fetchone()[0]
    return 0 if lowest is None or lowest > 0 else lowest - 1


def ids_behind_watermark(connection: psycopg.Connection, database: DatabaseSettings, watermark: int) -> str | None:
    """Why no row can ever be new again, or None: every id in the table is at or below the watermark. Rows
    deleted after training leave the next ids above it (sequences never go back); a table dropped and created
    again (or TRUNCATE ... RESTART IDENTITY) starts its ids at 1 again, below the watermark, and the daemon
    would wait for "new" rows in silence forever while the crawler's rows were taken as trained."""
    names = _names(database)
    highest = _run(connection, database, sql.SQL("SELECT max({id}) FROM {table}").format(**names)).fetchone()[0]
    if highest is None or highest >= watermark:
        return None
    return (f"every id in {database.table!r} is at most {highest:,}, below the watermark (last_trained_id "
            f"{watermark:,}): if the table was created again, its ids started over and its rows count as trained "
            "(if the database was restored from an older backup, the rows inserted since do); see README, "
            "Troubleshooting")


# Rows below the watermark a state records, spread over the trained range: a crawler that edits or prunes
# its newest rows leaves the older ones to vouch for the table.
WATERMARK_ROWS = 3


def watermark_rows(connection: psycopg.Connection, database: DatabaseSettings, watermark: int) -> list[list]:
    """[id, md5 of its content] of a few rows at or below `watermark` (the newest one and two further back), read
    where the rows were just read: what identifies, in the next cycles, the rows the state counts as trained."""
    names = _names(database)
    query = sql.SQL("SELECT {id}, coalesce(md5({content}), '') FROM {table} WHERE {id} <= %(target)s "
                    "ORDER BY {id} DESC LIMIT 1").format(**names)
    rows: dict[int, str] = {}
    for share in range(WATERMARK_ROWS, 0, -1):
        found = _run(connection, database, query, {"target": watermark * share // WATERMARK_ROWS}).fetchone()
        if found is not None:
            rows[found[0]] = found[1]
    return [[row_id, digest] for row_id, digest in sorted(rows.items())]


def watermark_mismatch(connection: psycopg.Connection, database: DatabaseSettings, recorded: list[list],
                       watermark: int) -> str | None:
    """Why the rows at or below the watermark are not the ones the state trained, or None. Every recorded row
    that is still there holding other content means another table: database.url or database.table changed, or
    the table was dropped and filled again past the watermark; its rows below the watermark would be taken as
    trained without a word. Rows deleted since say nothing; one that still matches means the same table (a
    row edited in place, a renamed table, a restored backup, another route to the same server). Rows above
    the watermark are not asked about: set back by hand (README's remedy for a restored backup), it no longer
    counts them as trained, and the ids past it may be handed out again."""
    recorded = [[row_id, digest] for row_id, digest in recorded if row_id <= watermark]
    if not recorded:
        return None
    names = _names(database)
    query = sql.SQL("SELECT {id}, coalesce(md5({content}), '') FROM {table} WHERE {id} = ANY(%(ids)s)").format(**names)
    now = dict(_run(connection, database, query, {"ids": [row_id for row_id, _ in recorded]}).fetchall())
    present = [(row_id, digest) for row_id, digest in recorded if row_id in now]
    if not present or any(now[row_id] == digest for row_id, digest in present):
        return None
    ids = ", ".join(f"{row_id:,}" for row_id, _ in present)
    return (f"{database.table!r} is not the table this state trained on: its rows {ids} (at or below the watermark, "
            f"last_trained_id {watermark:,}) hold other content than when they were trained, so its rows up to "
            f"{watermark:,} would be taken as trained; nothing was trained or advanced. If database.url or "
            "database.table changed, or the table was created again, see README, Troubleshooting")


def fetch_new_samples(
    connection: psycopg.Connection,
    database: DatabaseSettings,
    data: DataSettings,
    after_id: int,
    result: FetchResult,
    pending_gaps: list[tuple[int, int]] | None = None,
    limit: int | None = None,
) -> Iterator[Sample]:
    """Yield eligible rows past `after_id` (and rows that filled a pending gap), in id order, page by page.

    Skipped rows and the ids missing between the rows read are recorded in `result` as the stream goes.
    At most `limit` samples are yielded (default: data.max_samples_per_run).
    """
    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    reason_sql = reason.format(**names)
    select = sql.SQL(
        "SELECT {id}, {reason} AS skip, CASE WHEN ({reason}) IS NULL THEN {content} END, {language}, {quality} "
        "FROM {table} "
    ).format(reason=reason_sql, **names)
    remaining = data.max_samples_per_run if limit is None else limit
    result.last_examined_id = after_id

    if pending_gaps:
        rows = _run(
            connection, database,
            _in_gaps(select, names),
            {**parameters, **_gap_parameters(pending_gaps)},
        ).fetchall()
        for row in rows:
            if row[1] == UNSCORED:
                result.waiting_for_score += 1  # still not scored: its id stays in its gap range
                continue
            result.filled_gaps.append(row[0])
            sample = _classify(row, result)
            if sample is not None:
                remaining -= 1
                yield sample

    page_query = select + sql.SQL("WHERE {id} > %(after_id)s ORDER BY {id} LIMIT %(page_size)s").format(**names)
    last_id = after_id
    while remaining > 0:
        size = min(database.page_size, max(remaining, 1) * 2)
        rows = _run(connection, database, page_query, {**parameters, "after_id": last_id, "page_size": size}).fetchall()
        if not rows:
            return
        for index, row in enumerate(rows):
            row_id = row[0]
            if row_id == last_id:
                raise _shared_id(database, row_id)
            unscored = row[1] == UNSCORED
            if len(result.new_gaps) >= MAX_NEW_GAP_RANGES and _needs_a_range(last_id, row_id, unscored, result):
                # Nothing may be passed over unwatched (a late commit in the ids missing before this row, or this
                # row once scored): the read ends before it and the next cycle's read goes on from here.
                log.info("read stopped below id %d: %d ranges of missing or unscored ids are what one read "
                         "watches; the next cycle reads on from there", row_id, MAX_NEW_GAP_RANGES)
                return
            _record_gap(last_id, row_id, result)
            last_id = row_id
            if unscored:
                _wait_for_score(row_id, result)
                sample = None
            else:
                sample = _classify(row, result)
            result.last_examined_id = row_id
            if sample is not None:
                remaining -= 1
            # The stream continues after the last id it read (`id > last`): rows sharing that id past the end
            # of a full page, or past the row the limit stopped at, would be passed over for good.
            if index + 1 < len(rows):
                if remaining == 0 and rows[index + 1][0] == row_id:
                    raise _shared_id(database, row_id)
            elif len(rows) == size and _id_is_shared(connection, database, row_id):
                raise _shared_id(database, row_id)
            if sample is not None:
                yield sample
                if remaining == 0:
                    return


def _id_is_shared(connection: psycopg.Connection, database: DatabaseSettings, row_id: int) -> bool:
    names = _names(database)
    query = sql.SQL("SELECT count(*) > 1 FROM (SELECT 1 FROM {table} WHERE {id} = %(id)s LIMIT 2) AS same").format(**names)
    return _run(connection, database, query, {"id": row_id}).fetchone()[0]


def _shared_id(database: DatabaseSettings, row_id: int) -> SchemaError:
    return SchemaError(f"table {database.table!r}: database.id_column={database.id_column!r} holds {row_id} in more "
                       "than one row; the watermark needs an id unique to each row (the primary key); nothing was "
                       "consumed")


def _needs_a_range(previous_id: int, row_id: int, unscored: bool, result: FetchResult) -> bool:
    """Whether reading this row adds a gap range: ids missing before it, or it waits for its score and does not
    extend the last range (at most one: an unscored row extends the range of the ids missing just before it)."""
    return row_id - previous_id > 1 or (unscored and not _ends_last_range(row_id - 1, result))


def _ends_last_range(row_id: int, result: FetchResult) -> bool:
    return bool(result.new_gaps) and result.new_gaps[-1][1] == row_id


def _wait_for_score(row_id: int, result: FetchResult) -> None:
    """A row whose quality is NULL has not been scored yet (a scorer that fills the column after the crawler's
    insert): its id is watched like a late commit's, for database.max_commit_lag_minutes, and it trains once
    scored."""
    if _ends_last_range(row_id - 1, result):
        result.new_gaps[-1] = (result.new_gaps[-1][0], row_id)
    else:
        result.new_gaps.append((row_id, row_id))
    result.rows_examined += 1
    result.waiting_for_score += 1


def _record_gap(previous_id: int, row_id: int, result: FetchResult) -> None:
    if row_id - previous_id > 1:
        result.new_gaps.append((previous_id + 1, row_id - 1))


def _classify(row: tuple, result: FetchResult) -> Sample | None:
    row_id, skip_reason, content, language, quality = row
    result.rows_examined += 1
    if skip_reason is None and isinstance(content, NotUtf8):
        skip_reason = "not_utf8"
    if skip_reason is not None:
        result.skipped[skip_reason] += 1
        return None
    return Sample(id=row_id, content=content, language=_language(language), quality=float(quality))


def _language(label: str) -> str:
    """A label with bytes that were not UTF-8 (a SQL_ASCII database) is still a name: those bytes become
    U+FFFD, which the state, the logs and W&B can carry."""
    if isinstance(label, NotUtf8):
        label = label.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return normal_language(label)


# ------------------------------------------------------------------ the holdout and replay reads


def select_holdout(
    connection: psycopg.Connection, database: DatabaseSettings, data: DataSettings, after_id: int, window: int,
    held: dict[str, int], size: int, min_per_language: int,
) -> list[tuple[int, str]]:
    """(id, language) of the rows to add to the fixed holdout, from the next `window` eligible rows past
    `after_id` (the rows this run will read). `held`: the holdout's rows of each language it has.

    A language the holdout lacks gets a share of `size` proportional to its rows in the window, at least
    `min_per_language`; one it has fewer than `min_per_language` rows of (it joined with a handful: at most
    half its rows in that run) is topped up to `min_per_language`, so its verdicts stop resting on a file or
    two once it has the rows; the others are left alone. Never more than half a language's rows in the window
    (so each language still trains). `size` is 0 after the first run. Rows are picked by a hash of their id,
    so the choice is spread over the window and repeatable.
    """
    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    languages = sorted(held)
    query = sql.SQL(
        "WITH window_rows AS ("
        f"  SELECT {{id}} AS id, {LANGUAGE_SQL} AS language FROM {{table}}"
        "  WHERE {id} > %(after_id)s AND ({reason}) IS NULL ORDER BY {id} LIMIT %(window)s"
        "), held AS ("
        "  SELECT * FROM unnest(%(held_languages)s::text[], %(held_rows)s::int[]) AS held(language, rows)"
        "), ranked AS ("
        "  SELECT w.id, w.language, coalesce(h.rows, 0) AS held_rows,"
        "         row_number() OVER (PARTITION BY w.language ORDER BY md5(w.id::text)) AS rank,"
        "         count(*) OVER (PARTITION BY w.language) AS language_rows, count(*) OVER () AS all_rows"
        "  FROM window_rows w LEFT JOIN held h ON h.language = w.language"
        "  WHERE coalesce(h.rows, 0) < %(min_per_language)s"
        ") SELECT id, language FROM ranked"
        "  WHERE rank <= CASE WHEN held_rows = 0"
        "                     THEN GREATEST(%(min_per_language)s, ceil(%(size)s * language_rows::float8 / all_rows))"
        "                     ELSE %(min_per_language)s - held_rows END"
        "    AND rank <= language_rows / 2 ORDER BY id"
    ).format(reason=reason.format(**names), **names)
    parameters.update(after_id=after_id, window=window, held_languages=languages,
                      held_rows=[held[language] for language in languages], size=size,
                      min_per_language=min_per_language)
    return [(row[0], _language(row[1])) for row in _run(connection, database, query, parameters).fetchall()]


def fetch_samples_by_id(connection: psycopg.Connection, database: DatabaseSettings, data: DataSettings,
                        ids: list[int]) -> list[Sample]:
    """The rows with these ids that are still eligible (a row deleted or edited into ineligibility drops out)."""
    if not ids:
        return []
    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    query = sql.SQL(
        "SELECT {id}, NULL, {content}, {language}, {quality} FROM {table} "
        "WHERE {id} = ANY(%(ids)s) AND ({reason}) IS NULL ORDER BY {id}"
    ).format(reason=reason.format(**names), **names)
    parameters["ids"] = list(ids)
    result = FetchResult(last_examined_id=0)
    return [sample for row in _run(connection, database, query, parameters).fetchall()
            if (sample := _classify(row, result)) is not None]


def fetch_replay_samples(
    connection: psycopg.Connection, database: DatabaseSettings, data: DataSettings, up_to_id: int, count: int,
    exclude_ids: list[int], salt: int,
) -> list[Sample]:
    """About `count` eligible rows at or below the watermark (already trained), drawn uniformly at random, so
    each language comes in proportion to its share of them; seeded by `salt` (each run draws anew).

    Candidate ids are drawn from the id range and looked up through the primary key, a few rounds until
    enough are eligible: the cost follows `count`, not the table. (Ranking every trained row instead read
    each one's content for the eligibility test: 12 s a cycle at a million rows, benchmarks/replay_draw.py.)
    Where ids are too sparse for that (most of the range deleted), the rest are the first eligible rows after
    random points, one index range scan each: a row after a long gap is likelier, a bias only sparse tables see.
    """
    if count <= 0 or up_to_id <= 0:
        return []
    names = _names(database)
    lowest = _run(connection, database, sql.SQL("SELECT min({id}) FROM {table}").format(**names)).fetchone()[0]
    if lowest is None or lowest > up_to_id:
        return []
    id_range = range(lowest, up_to_id + 1)
    generator = random.Random(salt)
    tried: set[int] = set(exclude_ids)
    chosen: list[Sample] = []
    hit_rate = 1.0
    for _ in range(REPLAY_ROUNDS):
        untried = len(id_range) - sum(1 for candidate in tried if candidate in id_range)
        missing = count - len(chosen)
        if missing <= 0 or untried <= 0:
            break
        size = min(untried, REPLAY_MAX_CANDIDATES, max(2 * missing, math.ceil(1.2 * missing / hit_rate)))
        candidates = _draw_ids(generator, id_range, size, tried, untried)
        if not candidates:  # every id drawn was tried already; the next round draws anew
            continue
        tried.update(candidates)
        found = {sample.id: sample for sample in fetch_samples_by_id(connection, database, data, candidates)}
        hit_rate = max(len(found) / len(candidates), 0.001)
        chosen += [found[candidate] for candidate in candidates if candidate in found][:missing]
    if len(chosen) < count:
        chosen += _rows_after_random_points(connection, database, data, id_range, count - len(chosen), generator,
                                            exclude_ids + [sample.id for sample in chosen])
    return chosen


def _rows_after_random_points(connection: psycopg.Connection, database: DatabaseSettings, data: DataSettings,
                              id_range: range, count: int, generator: random.Random, exclude_ids: list[int]) -> list[Sample]:
    names = _names(database)
    reason, parameters = _skip_reason_sql(data)
    query = sql.SQL(
        "SELECT DISTINCT picked.id FROM unnest(%(points)s::bigint[]) AS point(start) CROSS JOIN LATERAL ("
        "  SELECT {id} AS id FROM {table} WHERE {id} >= point.start AND {id} <= %(last)s AND ({reason}) IS NULL"
        "  AND NOT ({id} = ANY(%(exclude)s)) ORDER BY {id} LIMIT 1) AS picked"
    ).format(reason=reason.format(**names), **names)
    parameters.update(points=[generator.choice(id_range) for _ in range(2 * count)], last=id_range[-1],
                      exclude=exclude_ids)
    ids = sorted(row[0] for row in _run(connection, database, query, parameters).fetchall())
    generator.shuffle(ids)
    return fetch_samples_by_id(connection, database, data, ids[:count])


REPLAY_ROUNDS = 6
REPLAY_MAX_CANDIDATES = 50_000  # ids per lookup (one array parameter)


def _draw_ids(generator: random.Random, id_range: range, size: int, tried: set[int], untried: int) -> list[int]:
    """`size` ids of the range not tried yet, in random order (fewer when the draw repeats tried ones)."""
    # Most of what is left, or a range mostly tried already (a young table whose trained rows are mostly the
    # holdout): a random draw would mostly repeat tried ids, so list what is left and shuffle it. `tried`
    # holds at most the holdout and the few rounds' candidates, so this happens only for small ranges.
    if size * 2 >= untried:
        left = [candidate for candidate in id_range if candidate not in tried]
        generator.shuffle(left)
        return left[:size]
    return [candidate for candidate in generator.sample(id_range, size) if candidate not in tried]
