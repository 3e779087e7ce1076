"""What the `code/*` statistics cost per sample, the patterns in `data/codestats.py` against the ones they
replaced (until 2026-11-29), side by side in one run:

    .venv/bin/python benchmarks/code_stats.py

- real code: the standard library's files cut to `data.max_chars` (8,000), as the daemon sees them;
- files a crawler does deliver now and then: thousands of blank lines, one call per line, a long run of
  open parentheses. With `^\\s*` after a line start, each blank line scanned all the ones after it.

Prints the total seconds per set for each pattern set, the worst single file, and that both count the
same on the real code.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codelupe_trainer.data import codestats  # noqa: E402
from codelupe_trainer.demo.demo import standard_library_files  # noqa: E402

PREVIOUS = {
    "FUNCTIONS": {
        "python": re.compile(r"^\s*(?:async\s+)?def\s", re.MULTILINE),
        "go": re.compile(r"^\s*func\s", re.MULTILINE),
        "rust": re.compile(r"\bfn\s+\w+"),
        "javascript": re.compile(r"\bfunction\b|=>"),
        "typescript": re.compile(r"\bfunction\b|=>"),
        "ruby": re.compile(r"^\s*def\s", re.MULTILINE),
        "php": re.compile(r"\bfunction\b"),
    },
    "C_LIKE_FUNCTION": re.compile(r"^[^\n;=]*\b\w+\s*\([^;{}]*\)\s*(?:const\s*)?\{", re.MULTILINE),
    "PYTHON_DOCSTRING": re.compile(r'^\s*[rRbBuU]?("""|\'\'\')', re.MULTILINE),
    "BLOCK_DOC": re.compile(r"^\s*/\*\*", re.MULTILINE),
}
CURRENT = {name: getattr(codestats, name) for name in PREVIOUS}
ODD_FILES = {
    "blank lines": "\n" * 7999 + "x",
    "tab lines": "\t\n" * 4000,
    "one call per line": "a(b)\n" * 1600,
    "open parentheses": "f(" * 4000,
}


def use(patterns: dict) -> None:
    for name, value in patterns.items():
        setattr(codestats, name, value)


def measure(files: list[tuple[str, str]]) -> tuple[float, float, list]:
    """(total seconds, worst file's seconds, the statistics) over (content, language) pairs."""
    total, worst, results = 0.0, 0.0, []
    for content, language in files:
        started = time.perf_counter()
        results.append(codestats.measure_code(content, language))
        spent = time.perf_counter() - started
        total, worst = total + spent, max(worst, spent)
    return total, worst, results


def main() -> None:
    real = [(path.read_text(encoding="utf-8", errors="replace")[:8000], "python") for path in standard_library_files(1500)]
    odd = [(content, language) for content in ODD_FILES.values() for language in ("python", "go", "c", "java")]
    for label, files in ((f"real code ({len(real)} stdlib files)", real), (f"odd files ({len(odd)})", odd)):
        use(PREVIOUS)
        before = measure(files)
        use(CURRENT)
        after = measure(files)
        print(f"{label}: previous {before[0]:.3f} s (worst file {before[1] * 1000:.1f} ms), "
              f"current {after[0]:.3f} s (worst file {after[1] * 1000:.1f} ms): {before[0] / after[0]:.1f}x")
        if files is real:
            same = sum(a == b for a, b in zip(before[2], after[2]))
            print(f"  the same statistics for {same} of {len(files)} files")


if __name__ == "__main__":
    main()
