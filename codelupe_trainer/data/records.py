"""Plain data that crosses module boundaries: a row as read from the table, and why rows were skipped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """One eligible row: only the columns the daemon is configured to read."""

    id: int
    content: str
    language: str
    quality: float  # on the crawler's scale (0-100, or 0-1): data.min_quality is on it too


@dataclass
class FetchResult:
    """What one fetch produced besides the samples themselves."""

    # The highest id whose row was read and either yielded or skipped; the candidate watermark.
    last_examined_id: int
    skipped: Counter = field(default_factory=Counter)
    # Ranges of ids (first, last) missing below last_examined_id: possibly a transaction not committed yet
    # (a bulk insert can hold thousands of ids), or deleted rows; no width limit.
    new_gaps: list[tuple[int, int]] = field(default_factory=list)
    # Ids inside pending gap ranges that have now appeared (they were read in this fetch).
    filled_gaps: list[int] = field(default_factory=list)
    rows_examined: int = 0
    # Rows read without a quality score yet (NULL): kept in the gap ranges, to train once a scorer fills it.
    waiting_for_score: int = 0
    # Pending gap ranges first seen before this time (database.max_commit_lag_minutes before the read) are
    # given up once this fetch has read through them (state.give_up_gaps); None: none is.
    give_up_seen_before: float | None = None
    # [id, md5 of its content] of a few rows at or below the new watermark, read from the table the rows came
    # from (source.watermark_rows): the state keeps them to tell its table from another. None: not read.
    watermark_rows: list[list] | None = None

    def stop_before(self, sample_id: int) -> None:
        """The sample `sample_id` was read but will not be trained this run: everything from it on is left
        for the next run (the watermark stays below it, its gaps are not recorded yet)."""
        self.last_examined_id = min(self.last_examined_id, sample_id - 1)
        self.new_gaps = [(first, min(last, sample_id - 1)) for first, last in self.new_gaps if first < sample_id]
        self.filled_gaps = [gap for gap in self.filled_gaps if gap < sample_id]
        self.rows_examined -= 1


# A blocker returns the name of the filter that blocks the sample, or None to let it pass.
Blocker = Callable[[Sample], "str | None"]
