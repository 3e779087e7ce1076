"""Near-duplicate detection, as BigCode did it for The Stack and StarCoder's data: MinHash signatures over
5-token shingles and locality-sensitive hashing (LSH), continuous across runs and restarts.

- Shingles: the text split on non-identifier characters (so whitespace, punctuation and formatting do not
  matter), every run of 5 consecutive tokens. Each token is hashed once (crc32) and a shingle's hash is a
  polynomial of its five token hashes, computed with numpy for the whole file at once.
- Signatures: datasketch's MinHash, 256 permutations (BigCode's count). 128 were measured and are not
  equal: their best banding (14 x 9) finds a pair at Jaccard 0.81 only 90 % of the time, 256's (25 x 10) 96 %.
- Index: each signature's 25 band hashes (band index folded in, 8 bytes each) are the keys of an SQLite
  table in the daemon's store, `dedup.sqlite3`, beside the exact-duplicate hashes. A sample whose band
  shares a key with an indexed sample is a near-duplicate of it (the LSH candidate rule without a second
  Jaccard check, as BigCode's pipeline: with 10 rows a band, a pair at Jaccard 0.5 collides 2.4 % of the
  time, at 0.1 once in 4 x 10^8, so even 10 million indexed samples rarely block a new one by accident).
  The band count comes from datasketch's own optimiser (`_optimal_param`, equal weights).
  Memory does not grow with the index: it is on disk (~25 keys of ~15 bytes each per sample), and this
  run's pending keys are in a temporary table of the same connection.

Keys of the samples that pass are held in memory and written by the store's commit, after the state is
saved: a crash can let a near-duplicate through later, never block a sample that was not trained.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import zlib
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

SHINGLE_TOKENS = 5
NUM_PERM = 256
_IDENTIFIER = re.compile(r"[A-Za-z0-9_]+")
_MULTIPLIER = np.uint64(1_000_003)
_MASK32 = np.uint64(0xFFFFFFFF)


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the text's distinct 5-token shingles (one shingle for a shorter text)."""
    tokens = _IDENTIFIER.findall(text)
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    token_hashes = np.fromiter((zlib.crc32(token.encode()) for token in tokens), dtype=np.uint64, count=len(tokens))
    width = min(SHINGLE_TOKENS, len(tokens))
    count = len(tokens) - width + 1
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the polynomial wraps modulo 2**64 on purpose
        for offset in range(width):
            combined = combined * _MULTIPLIER + token_hashes[offset : offset + count]
    folded = (combined ^ (combined >> np.uint64(32))) & _MASK32
    return np.unique(folded)


@lru_cache(maxsize=4)
def _template(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1)


@lru_cache(maxsize=8)
def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives plus false negatives at `threshold` (datasketch's
    own optimiser, as its MinHashLSH uses)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def band_keys(text: str, threshold: float, num_perm: int = NUM_PERM) -> list[int]:
    from datasketch import MinHash

    template = _template(num_perm)
    signature = MinHash(num_perm=num_perm, seed=1, hashfunc=int, permutations=template.permutations,
                        scheme=template.scheme)
    signature.update_batch(shingle_hashes(text).tolist())
    bands, rows = lsh_shape(threshold, num_perm)
    values = signature.hashvalues
    keys = []
    for band in range(bands):
        digest = hashlib.blake2b(band.to_bytes(2, "little") + values[band * rows : (band + 1) * rows].tobytes(),
                                 digest_size=8).digest()
        keys.append(int.from_bytes(digest, "little", signed=True))
    return keys


class NearDuplicateIndex:
    """The LSH band keys of everything trained before (table `near_keys` in the store), this run's pending keys
    (a temporary table of the same connection: on disk, not in Python memory, however large the run), and
    protected keys (the holdout's: held in memory, rebuilt each run, never written)."""

    def __init__(self, connection: sqlite3.Connection | None, threshold: float, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self.num_perm = num_perm
        # No store (a build without a state directory): the same index, for this run only.
        self._connection = connection if connection is not None else sqlite3.connect(":memory:", isolation_level=None)
        self._protected: set[int] = set()
        self._connection.execute("PRAGMA temp_store = FILE")
        self._connection.execute("CREATE TABLE IF NOT EXISTS near_keys (key INTEGER PRIMARY KEY)")
        self._connection.execute("CREATE TABLE IF NOT EXISTS near_settings (name TEXT PRIMARY KEY, value TEXT)")
        self._connection.execute("CREATE TEMP TABLE IF NOT EXISTS near_pending (key INTEGER PRIMARY KEY)")
        self._check_settings()

    def _check_settings(self) -> None:
        """Keys made with another threshold or permutation count match nothing: start the index afresh."""
        wanted = f"threshold={self.threshold},num_perm={self.num_perm},shingle={SHINGLE_TOKENS}"
        row = self._connection.execute("SELECT value FROM near_settings WHERE name = 'shape'").fetchone()
        if row is not None and row[0] == wanted:
            return
        if row is not None:
            log.warning("near-duplicate index: the settings changed (%s -> %s); starting a new index", row[0], wanted)
        self._connection.execute("BEGIN IMMEDIATE")
        self._connection.execute("DELETE FROM near_keys")
        self._connection.execute("INSERT OR REPLACE INTO near_settings (name, value) VALUES ('shape', ?)", (wanted,))
        self._connection.execute("COMMIT")

    def protect(self, texts) -> None:
        for text in texts:
            self._protected.update(band_keys(text, self.threshold, self.num_perm))

    def seen(self, text: str) -> bool:
        """True if `text` is a near-duplicate of an indexed, protected or earlier-passed sample; otherwise
        its keys become pending (so of a cluster within a run, the first by id is kept)."""
        keys = band_keys(text, self.threshold, self.num_perm)
        if not self._protected.isdisjoint(keys):
            return True
        placeholders = ",".join("?" * len(keys))
        found = self._connection.execute(
            f"SELECT 1 FROM main.near_keys WHERE key IN ({placeholders}) "
            f"UNION ALL SELECT 1 FROM temp.near_pending WHERE key IN ({placeholders}) LIMIT 1", keys + keys).fetchone()
        if found is not None:
            return True
        self._connection.executemany("INSERT OR IGNORE INTO temp.near_pending (key) VALUES (?)", ((key,) for key in keys))
        return False

    def write_pending(self) -> None:
        """Inside the store's open transaction."""
        self._connection.execute("INSERT OR IGNORE INTO main.near_keys (key) SELECT key FROM temp.near_pending")

    def clear_pending(self) -> None:
        self._connection.execute("DELETE FROM temp.near_pending")

    def __len__(self) -> int:
        return self._connection.execute("SELECT count(*) FROM main.near_keys").fetchone()[0]
