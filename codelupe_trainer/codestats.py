"""Cheap per-language code statistics for the `code/*` metrics: lines, comments, docstrings, complexity.

Estimates, not parsers: a regex pass per sample, so they cost little next to tokenizing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HASH_COMMENTS = {"python", "shell", "bash", "ruby", "perl", "r", "yaml", "toml", "dockerfile", "makefile", "elixir"}
DASH_COMMENTS = {"sql", "lua", "haskell"}
BRANCHES = re.compile(r"\b(?:if|elif|else if|for|foreach|while|case|catch|except|when|match)\b|&&|\|\|")
FUNCTIONS = {
    "python": re.compile(r"^\s*(?:async\s+)?def\s", re.MULTILINE),
    "go": re.compile(r"^\s*func\s", re.MULTILINE),
    "rust": re.compile(r"\bfn\s+\w+"),
    "javascript": re.compile(r"\bfunction\b|=>"),
    "typescript": re.compile(r"\bfunction\b|=>"),
    "ruby": re.compile(r"^\s*def\s", re.MULTILINE),
    "php": re.compile(r"\bfunction\b"),
}
C_LIKE_FUNCTION = re.compile(r"^[^\n;=]*\b\w+\s*\([^;{}]*\)\s*(?:const\s*)?\{", re.MULTILINE)
PYTHON_DOCSTRING = re.compile(r'^\s*[rRbBuU]?("""|\'\'\')', re.MULTILINE)
BLOCK_DOC = re.compile(r"^\s*/\*\*", re.MULTILINE)


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


def summarize_code(stats: list[CodeStats]) -> dict[str, float]:
    if not stats:
        return {"code/avg_lines": 0.0, "code/comments_percent": 0.0, "code/docstrings_percent": 0.0, "code/avg_complexity": 0.0}
    total_lines = sum(item.lines for item in stats)
    # Complexity: 1 + branches per function (McCabe's estimate); a file with no function counts as one.
    complexity = [1 + item.branches / max(item.functions, 1) for item in stats]
    return {
        "code/avg_lines": total_lines / len(stats),
        "code/comments_percent": 100.0 * sum(item.comment_lines for item in stats) / max(total_lines, 1),
        "code/docstrings_percent": 100.0 * sum(1 for item in stats if item.docstrings) / len(stats),
        "code/avg_complexity": sum(complexity) / len(complexity),
    }
