"""The blocking filters: secrets, licences, malicious patterns and duplicates. Plain functions over a Sample.

Secrets use detect-secrets' own detectors (pattern plugins only: its entropy plugins flag ordinary code).
Calling the library line by line is far too slow for 100,000 samples, so each text first goes through one
fast pass (all the detectors' own denylist regexes plus a keyword-assignment pre-check, as one PatternSet);
only the few lines of the few texts that pass it are confirmed by the library.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from functools import lru_cache
from pathlib import Path

from ..config import DataSettings
from ..errors import StoreError
from ..faults import crash_point
from .neardup import NearDuplicateIndex
from .patternset import PatternSet
from .records import Blocker, Sample

# ------------------------------------------------------------------ secrets

_REGEX_PLUGINS = (
    "aws.AWSKeyDetector",
    "private_key.PrivateKeyDetector",
    "github_token.GitHubTokenDetector",
    "gitlab_token.GitLabTokenDetector",
    "basic_auth.BasicAuthDetector",
    "slack.SlackDetector",
    "stripe.StripeDetector",
    "jwt.JwtTokenDetector",
    "openai.OpenAIDetector",
    "sendgrid.SendGridDetector",
    "twilio.TwilioKeyDetector",
    "npm.NpmDetector",
    "pypi_token.PypiTokenDetector",
    "discord.DiscordBotTokenDetector",
    "azure_storage_key.AzureStorageKeyDetector",
    "artifactory.ArtifactoryDetector",
    "mailchimp.MailchimpDetector",
    "telegram_token.TelegramBotTokenDetector",
    "square_oauth.SquareOAuthDetector",
)

# Names a KeywordDetector hit needs nearby; lines without one of them are not worth the library's time.
_KEYWORD_HINT = re.compile(r"pass(?:wd|word)?|pwd|secret|token|api_?key|apikey|private_?key|credential|auth", re.IGNORECASE)
# Every KeywordDetector hit assigns or compares a value: the keyword, then ':', '=' or a quote on that line.
_KEYWORD_ASSIGNMENT = re.compile(
    r"(?:pass(?:wd|word)?|pwd|secret|token|api_?key|apikey|private_?key|credential|auth)[^\n]*[:='\"]", re.IGNORECASE
)


@lru_cache(maxsize=1)
def _secret_detectors():
    import importlib

    from detect_secrets.plugins.keyword import KeywordDetector

    plugins = []
    for dotted in _REGEX_PLUGINS:
        module_name, class_name = dotted.rsplit(".", 1)
        module = importlib.import_module(f"detect_secrets.plugins.{module_name}")
        plugins.append(getattr(module, class_name)())
    denylist = [pattern for plugin in plugins for pattern in plugin.denylist]
    return plugins, denylist, KeywordDetector(), PatternSet(denylist + [_KEYWORD_ASSIGNMENT])


def _is_placeholder(secret: str, line: str) -> bool:
    from detect_secrets.filters import heuristic

    return (
        heuristic.is_templated_secret(secret)
        or heuristic.is_sequential_string(secret)
        or heuristic.is_potential_uuid(secret)
        or heuristic.is_prefixed_with_dollar_sign(secret)
        or heuristic.is_not_alphanumeric_string(secret)
    )


def _confirmed(secrets, line: str) -> bool:
    return any(not _is_placeholder(secret, line) for secret in secrets)


def find_secret_lines(text: str, filename: str = "sample.py") -> list[int]:
    """Line numbers (0-based) where detect-secrets confirms a credential."""
    from detect_secrets.filters import heuristic
    from detect_secrets.plugins.keyword import QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, REGEX_BY_FILETYPE
    from detect_secrets.util.filetype import determine_file_type

    plugins, denylist, keyword, first_pass = _secret_detectors()
    if not first_pass.may_match(text):
        return []
    keyword_regexes = REGEX_BY_FILETYPE.get(determine_file_type(filename), QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP)
    found = []
    for number, line in enumerate(text.splitlines()):
        if any(pattern.search(line) for pattern in denylist):
            if any(_confirmed(plugin.analyze_string(line), line) for plugin in plugins):
                found.append(number)
                continue
        if _KEYWORD_HINT.search(line):
            # `password = get_password()` names a secret but holds none; only keyword hits can be such references.
            if not heuristic.is_indirect_reference(line) and _confirmed(
                keyword.analyze_string(line, denylist_regex_to_group=keyword_regexes), line
            ):
                found.append(number)
    return found


_EXTENSIONS = {"python": "py", "javascript": "js", "typescript": "ts", "go": "go", "java": "java", "rust": "rs",
               "ruby": "rb", "php": "php", "c": "c", "cpp": "cpp", "yaml": "yaml", "shell": "sh"}


def contains_secret(sample: Sample) -> bool:
    return bool(find_secret_lines(sample.content, f"sample.{_EXTENSIONS.get(sample.language, 'txt')}"))


# ------------------------------------------------------------------ licences

HEADER_CHARS = 3000


def license_pattern(families: list[str]) -> re.Pattern:
    """SPDX identifiers (GPL-2.0-only, AGPL-3.0-or-later, LGPL-2.1+) and the usual header sentences."""
    alternatives = []
    for family in families:
        family = family.strip().upper()
        if not family:
            continue
        alternatives.append(rf"SPDX-License-Identifier:[^\n]*\b{re.escape(family)}-\d")
        long_names = {
            "GPL": r"GNU General Public License",
            "AGPL": r"GNU Affero General Public License",
            "LGPL": r"GNU (?:Lesser|Library) General Public License",
        }
        if family in long_names:
            alternatives.append(long_names[family])
        else:
            alternatives.append(rf"\b{re.escape(family)}\b")
    if not alternatives:
        return re.compile(r"(?!x)x")
    return re.compile("|".join(alternatives), re.IGNORECASE)


# ------------------------------------------------------------------ malicious code

DEFAULT_MALICIOUS_PATTERNS = (
    r"bash\s+-i\s+>&\s*/dev/tcp/",                       # bash reverse shell
    r"/dev/tcp/\d{1,3}(?:\.\d{1,3}){3}/\d+",
    r"nc(?:at)?\s+(?:-\w+\s+)*-e\s+/bin/(?:ba)?sh",      # netcat reverse shell
    r"socket\.socket\([^)]*\)[\s\S]{0,200}?os\.dup2\(",  # python reverse shell
    r"pty\.spawn\(\s*['\"]/bin/(?:ba)?sh",
    r"exec\(\s*(?:base64\.b64decode|zlib\.decompress|marshal\.loads)\(",  # obfuscated payload loaders
    r"eval\(\s*(?:base64\.b64decode|atob)\(",
    r"eval\(\s*compile\(\s*base64",
    r"powershell(?:\.exe)?\s+[^\n]*-enc(?:odedcommand)?\s+[A-Za-z0-9+/=]{40,}",
    r"(?:Login Data|Cookies|Local State)['\"][\s\S]{0,200}?(?:CryptUnprotectData|sqlite3\.connect)",  # browser credential stealers
    r"\.ssh/id_(?:rsa|ed25519)['\"][\s\S]{0,300}?(?:requests\.post|urlopen|curl)",
    r"curl\s+[^\n|]*\|\s*(?:sudo\s+)?(?:ba)?sh\b[^\n]*(?:\d{1,3}\.){3}\d{1,3}",
)


def malicious_pattern(extra_patterns: list[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{pattern})" for pattern in (*DEFAULT_MALICIOUS_PATTERNS, *extra_patterns)), re.IGNORECASE)


def prefiltered(pattern: re.Pattern, window: int | None = None) -> Callable[[Sample], bool]:
    """A blocker: one fast PatternSet pass, confirmed by `re` (within the first `window` characters)."""
    first_pass = PatternSet([pattern])

    def blocks(sample: Sample) -> bool:
        text = sample.content if window is None else sample.content[:window]
        return first_pass.may_match(text) and pattern.search(text) is not None

    return blocks


# ------------------------------------------------------------------ duplicates


DEDUP_STORE_FILE = "dedup.sqlite3"
LEGACY_HASH_FILE = "trained-hashes.bin"


def content_hash(text: str) -> bytes:
    """Hash of the content with line endings and trailing whitespace normalised; 16 bytes."""
    normalized = "\n".join(line.rstrip() for line in text.strip().splitlines())
    return hashlib.blake2b(normalized.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def store_problem(path: Path, every_page: bool = False) -> str | None:
    """Why the store cannot be used (not an SQLite file; with `every_page`, a damaged page anywhere), or None;
    None too where there is none yet. Read-only: `doctor` and the start-up checks change nothing. Reading
    every page takes seconds on a store of millions of samples: `doctor` does, each start reads the schema."""
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            verdict = connection.execute("PRAGMA quick_check" if every_page else
                                         "SELECT 'ok' FROM sqlite_master LIMIT 1").fetchone()
            verdict = verdict[0] if verdict else "ok"  # an empty file is a store with nothing in it yet
    except sqlite3.DatabaseError as error:
        return describe_store_problem(path, str(error))
    return None if verdict == "ok" else describe_store_problem(path, verdict)


def describe_store_problem(path: Path, why: str) -> str:
    return (f"the duplicate store {path} cannot be used ({why}): it holds the hashes of the code trained, the "
            "near-duplicate index and the holdout's ids. Restore it from a backup, or move it aside (the holdout is "
            "then chosen again, and copies of code trained before can be trained again)")


class DuplicateStore:
    """Hashes of everything trained before, in an SQLite file beside the state (transactional: a crash or a
    full disk mid-write rolls back to the last commit, never a torn record; looked up on disk, so memory does
    not grow with the number of samples trained).

    New hashes are held in memory and written only by commit(), after the state is saved, so a failed run
    does not mark its samples as seen. A store in the old format (`trained-hashes.bin`, 16-byte records) is
    imported once, its complete records only.
    """

    def __init__(self, path: Path | None, near_threshold: float | None = None):
        self.path = path
        self._pending: set[bytes] = set()
        # Hashes of samples that must never be trained (the holdout's), held for this run only, never written.
        self._protected: set[bytes] = set()
        self._connection: sqlite3.Connection | None = None
        self.near: NearDuplicateIndex | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._connection = sqlite3.connect(path, isolation_level=None)
                # A rollback journal, not WAL: no shared-memory file beside it, nothing written between commits.
                self._connection.execute("PRAGMA journal_mode=DELETE")
                self._connection.execute("PRAGMA synchronous=FULL")
                self._connection.execute("CREATE TABLE IF NOT EXISTS trained_hashes (digest BLOB PRIMARY KEY) WITHOUT ROWID")
            except sqlite3.DatabaseError as error:  # not an SQLite file: one line, not a traceback per cycle
                raise StoreError(describe_store_problem(path, str(error))) from None
            self._import_legacy(path.with_name(LEGACY_HASH_FILE))
        if near_threshold is not None:
            self.near = NearDuplicateIndex(self._connection, near_threshold)

    def _import_legacy(self, legacy: Path) -> None:
        if not legacy.exists():
            return
        data = legacy.read_bytes()
        self._insert(data[index : index + 16] for index in range(0, len(data) - len(data) % 16, 16))
        legacy.rename(legacy.with_suffix(".bin.imported"))

    def _insert(self, digests, with_near: bool = False) -> None:
        """One transaction: the exact hashes and (with_near) the near-duplicate index's pending keys."""
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            self._connection.executemany("INSERT OR IGNORE INTO trained_hashes (digest) VALUES (?)",
                                         ((digest,) for digest in digests))
            if with_near and self.near is not None:
                self.near.write_pending()
            crash_point("dedup")
            self._connection.execute("COMMIT")
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise

    def known(self, digest: bytes) -> bool:
        if self._connection is None:
            return False
        return self._connection.execute("SELECT 1 FROM trained_hashes WHERE digest = ?", (digest,)).fetchone() is not None

    def protect(self, texts: list[str]) -> None:
        """Copies and (with the near-duplicate index) near-copies of these texts are blocked, without the
        texts ever being recorded as trained."""
        self._protected.update(content_hash(text) for text in texts)
        if self.near is not None:
            self.near.protect(texts)

    def is_protected(self, sample: Sample) -> bool:
        return content_hash(sample.content) in self._protected

    def seen(self, sample: Sample) -> bool:
        digest = content_hash(sample.content)
        if digest in self._protected or digest in self._pending or self.known(digest):
            return True
        self._pending.add(digest)
        return False

    def near_seen(self, sample: Sample) -> bool:
        return self.near is not None and self.near.seen(sample.content)

    def commit(self) -> None:
        if self._connection is None:
            return
        self._insert(sorted(self._pending), with_near=True)
        self._pending = set()
        if self.near is not None:
            self.near.clear_pending()

    def __len__(self) -> int:
        if self._connection is None:
            return 0
        return self._connection.execute("SELECT count(*) FROM trained_hashes").fetchone()[0]

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# ------------------------------------------------------------------ assembly


def build_blockers(data: DataSettings, store_dir: Path | None,
                   protected: list[str] = ()) -> tuple[list[tuple[str, Blocker]], DuplicateStore]:
    """The enabled filters, cheapest first; a duplicate is recorded only once every other filter passed it.
    `protected`: texts never to train on (the holdout's): their copies are blocked as duplicates even with
    data.block_duplicates off, and their near-copies as near-duplicates when that filter is on."""
    blockers: list[tuple[str, Blocker]] = []
    if data.block_license:
        blockers.append(("license", prefiltered(license_pattern(data.blocked_licenses), HEADER_CHARS)))
    if data.block_malicious:
        blockers.append(("malicious", prefiltered(malicious_pattern(data.malicious_patterns))))
    if data.block_secrets:
        blockers.append(("secrets", contains_secret))
    persistent = store_dir is not None and (data.block_duplicates or data.block_near_duplicates)
    store = DuplicateStore(store_dir / DEDUP_STORE_FILE if persistent else None,
                           data.near_duplicate_threshold if data.block_near_duplicates else None)
    store.protect(list(protected))
    if data.block_duplicates:
        blockers.append(("duplicates", store.seen))
    elif protected:
        blockers.append(("duplicates", store.is_protected))
    if data.block_near_duplicates:
        blockers.append(("near_duplicates", store.near_seen))
    return blockers, store

