"""What a language label is: the one rule that normalises it (in SQL and in Python) and the metric key it
gets in W&B.

Crawlers label rows with names such as `C++`, `C#`, `Jupyter Notebook` or `Visual Basic .NET`. The trainer
keeps the label as it is (lower case, trimmed) in the state, `status` and the logs, but a W&B metric name
should be letters, digits and underscores (W&B cannot sort or filter on the others, and a `/` opens a panel
section of its own), so each label has a key: `c++` -> `cpp`, `c#` -> `csharp`, `jupyter notebook` ->
`jupyter_notebook`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

# A row's language as the trainer knows it: lower case, without the whitespace around it ("Python\n" is
# python). The same in SQL (the language filter, the holdout's strata) and in Python (each sample), so a
# crawler's stray newline never makes a language of its own. (\x0b: PostgreSQL's E'' has no \v.)
LANGUAGE_SPACE = " \t\n\r\f\v"
LANGUAGE_SQL = "lower(btrim({language}, E' \\t\\n\\r\\f\\x0b'))"

# The spellings that would otherwise collapse into one another (c, c++ and c# are three languages).
_READABLE = (("++", "pp"), ("+", "plus"), ("#", "sharp"))
_NOT_A_KEY_CHARACTER = re.compile(r"[^a-z0-9]+")


def normal_language(language: object) -> str:
    return str(language).strip(LANGUAGE_SPACE).lower()


def language_key(language: str) -> str:
    """The label as a W&B-safe name part: ASCII letters, digits and single underscores, never empty and
    never starting with a digit."""
    text = unicodedata.normalize("NFKD", language.lower()).encode("ascii", "ignore").decode()
    for spelled, readable in _READABLE:
        text = text.replace(spelled, readable)
    key = _NOT_A_KEY_CHARACTER.sub("_", text).strip("_")
    if not key or key[0].isdigit():
        key = "_" + key
    return key


def language_keys(languages: Iterable[str]) -> dict[str, str]:
    """Each label's key. Labels that would share one (`objective-c` and `objective c`) each get a suffix
    from a hash of the label instead, so no metric overwrites another's and each keeps its own key in every
    run where both appear."""
    labels = sorted(set(languages))
    keys = {label: language_key(label) for label in labels}
    taken: dict[str, int] = {}
    for key in keys.values():
        taken[key] = taken.get(key, 0) + 1
    for label, key in keys.items():
        if taken[key] > 1:
            keys[label] = f"{key}_{hashlib.sha1(label.encode()).hexdigest()[:6]}"
    return keys
