"""'Does any of these regexes occur in this text?', answered in one pass.

With hyperscan installed (x86-64), all patterns compile into one automaton that scans a text once, at
memory speed, in prefilter mode: it may say yes where no pattern truly matches (lookarounds and the like
are approximated) but never says no where one does. Callers confirm a yes with Python's `re`.
Without hyperscan, `re` searches pattern by pattern: exact, just slower.
"""

from __future__ import annotations

import re
from functools import lru_cache

try:  # an optional accelerator; the results are the same without it
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform
    hyperscan = None


class PatternSet:
    def __init__(self, patterns: list[re.Pattern], use_hyperscan: bool = True):
        self.patterns = list(patterns)
        self.engine = "re"
        self._database = None
        if hyperscan is not None and use_hyperscan and self.patterns:
            try:
                self._database = self._compile(self.patterns)
                self.engine = "hyperscan"
            except Exception:  # a pattern hyperscan cannot take even approximately: stay exact
                self._database = None

    @staticmethod
    def _compile(patterns: list[re.Pattern]):
        return _compiled_database(tuple((widen_repeats(pattern.pattern), pattern.flags) for pattern in patterns))

    def may_match(self, text: str) -> bool:
        """False only when no pattern matches; True may be a false alarm under hyperscan."""
        if self._database is None:
            return any(pattern.search(text) for pattern in self.patterns)
        found = []

        def on_match(pattern_id, start, end, flags, context):
            found.append(pattern_id)
            return True  # stop scanning: one hit is enough

        try:
            self._database.scan(text.encode("utf-8", "replace"), match_event_handler=on_match)
        except hyperscan.error:
            # scanning stopped by the callback raises ScanTerminated in some versions
            pass
        return bool(found)


_BOUNDED_REPEAT = re.compile(r"(?<!\\)\{(\d+),(\d+)\}")


def widen_repeats(pattern: str) -> str:
    """`x{0,200}` -> `x{0,}`: a superset that hyperscan compiles in milliseconds instead of seconds."""
    return _BOUNDED_REPEAT.sub(lambda match: "{" + match.group(1) + ",}", pattern)


@lru_cache(maxsize=32)
def _compiled_database(patterns: tuple[tuple[str, int], ...]):
    database = hyperscan.Database()
    flags = []
    for pattern, re_flags in patterns:
        flag = hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY
        if re_flags & re.IGNORECASE:
            flag |= hyperscan.HS_FLAG_CASELESS
        if re_flags & re.MULTILINE:
            flag |= hyperscan.HS_FLAG_MULTILINE
        if re_flags & re.DOTALL:
            flag |= hyperscan.HS_FLAG_DOTALL
        flags.append(flag | hyperscan.HS_FLAG_UTF8)
    database.compile(
        expressions=[pattern.encode("utf-8") for pattern, _ in patterns],
        ids=list(range(len(patterns))),
        elements=len(patterns),
        flags=flags,
    )
    return database
