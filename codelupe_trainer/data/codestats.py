"""Cheap per-language code statistics for the `code/*` metrics: lines, comments, docstrings, complexity.

Estimates, not parsers: a regex pass per sample, so they cost little next to tokenizing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HASH_COMMENTS = {"python", "shell", "bash", "ruby", "perl", "r", "yaml", "toml", "dockerfile", "makefile", "elixir"}
DASH_COMMENTS = {"sql", "lua", "haskell"}
BRANCHES = re.compile(r"\b(?:if|elif|else if|for|foreach|while|case|catch|except|when|match)\b|&&|\|\|")
# Indentation is `[ \t]*`, never `\s*`: after a line start `\s*` also runs over the newlines that follow, so each of
# a file's blank lines scanned all the others (2 s and more for one 8,000-character file of blank lines). The
# parameter list of a C-like function is bounded for the same reason (benchmarks/code_stats.py).
FUNCTIONS = {
    "python": re.compile(r"^[ \t]*(?:async\s+)?def\s", re.MULTILINE),
    "go": re.compile(r"^[ \t]*func\s", re.MULTILINE),
    "rust": re.compile(r"\bfn\s+\w+"),
    "javascript": re.compile(r"\bfunction\b|=>"),
    "typescript": re.compile(r"\bfunction\b|=>"),
    "ruby": re.compile(r"^[ \t]*def\s", re.MULTILINE),
    "php": re.compile(r"\bfunction\b"),
}
C_LIKE_FUNCTION = re.compile(r"^[^\n;=]{0,200}\b\w+[ \t]*\([^;{}]{0,400}\)\s*(?:const\s*)?\{", re.MULTILINE)
PYTHON_DOCSTRING = re.compile(r'^[ \t]*[rRbBuU]?("""|\'\'\')', re.MULTILINE)
BLOCK_DOC = re.compile(r"^[ \t]*/\*\*", re.MULTILINE)


@dataclass
class CodeStats:
    lines: int
    comment_lines: int
    docstrings: int
    functions: int
    branches: int


def measure_code(content: str, language: str) -> CodeStats:
    lines = content.splitlines()
    prefix = "#" if language in HASH_COMMENTS else "--" if language in DASH_COMMENTS else "//"
    comment_lines = 0
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith(prefix) or (prefix == "//" and stripped.startswith(("/*", "*"))):
            comment_lines += 1
    if language == "python":
        docstrings = len(PYTHON_DOCSTRING.findall(content)) // 2 or (1 if PYTHON_DOCSTRING.search(content) else 0)
    else:
        docstrings = len(BLOCK_DOC.findall(content))
    functions = len(FUNCTIONS.get(language, C_LIKE_FUNCTION).findall(content))
    return CodeStats(len(lines), comment_lines, docstrings, functions, len(BRANCHES.findall(content)))


@dataclass
class CodeTotals:
    """Running sums over a stream of samples, so the statistics cost no memory per sample."""

    samples: int = 0
    lines: int = 0
    comment_lines: int = 0
    with_docstring: int = 0
    complexity: float = 0.0

    def add(self, stats: CodeStats) -> None:
        self.samples += 1
        self.lines += stats.lines
        self.comment_lines += stats.comment_lines
        self.with_docstring += bool(stats.docstrings)
        # McCabe's estimate: 1 + branches per function; a file with no function counts as one.
        self.complexity += 1 + stats.branches / max(stats.functions, 1)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"code/avg_lines": 0.0, "code/comments_percent": 0.0, "code/docstrings_percent": 0.0, "code/avg_complexity": 0.0}
        return {
            "code/avg_lines": self.lines / self.samples,
            "code/comments_percent": 100.0 * self.comment_lines / max(self.lines, 1),
            "code/docstrings_percent": 100.0 * self.with_docstring / self.samples,
            "code/avg_complexity": self.complexity / self.samples,
        }


def summarize_code(stats: list[CodeStats]) -> dict[str, float]:
    totals = CodeTotals()
    for item in stats:
        totals.add(item)
    return totals.summary()
