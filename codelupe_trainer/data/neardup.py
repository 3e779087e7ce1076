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
  Jaccard check, which would need every signature stored: with 10 rows a band, a pair at Jaccard 0.5
  collides 2.4 % of the time, at 0.1 once in 4 x 10^8: against 10 million indexed samples of that
  similarity a new sample is blocked by accident ~2.5 % of the time).
  The band count comes from datasketch's own optimiser (`_optimal_param`, equal weights).
  Memory does not grow with the index: it is on disk (~25 keys of ~15 bytes each per sample), and this
  run's pending keys are a set of at most PENDING_IN_MEMORY keys, spilled in bulk to a temporary table.

Keys of the samples that pass are held in memory and written by the store's commit, after the state is
saved: a crash can let a near-duplicate through later, never block a sample that was not trained.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import zlib
from functools import lru_cache

import numpy as np

log = logging.getLogger(__name__)

SHINGLE_TOKENS = 5
NUM_PERM = 256
# Pending keys held in memory before they spill to disk: 250,000 keys (10,000 samples) are ~18 MB of Python ints.
PENDING_IN_MEMORY = 250_000
_IDENTIFIER = re.compile(r"[A-Za-z0-9_]+")
_MULTIPLIER = np.uint64(1_000_003)
_MASK32 = np.uint64(0xFFFFFFFF)


# Token hashes, memoised: code repeats its identifiers, and a dictionary lookup is ~5x cheaper than hashing.
_TOKEN_HASHES: dict[str, int] = {}
_TOKEN_CACHE_LIMIT = 1_000_000


def _token_hash(token: str) -> int:
    value = _TOKEN_HASHES.get(token)
    if value is None:
        if len(_TOKEN_HASHES) >= _TOKEN_CACHE_LIMIT:
            _TOKEN_HASHES.clear()
        value = _TOKEN_HASHES[token] = zlib.crc32(token.encode("utf-8", "surrogatepass"))
    return value


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the text's 5-token shingles (one shingle for a shorter text). Repeats are kept:
    a MinHash of a multiset is the MinHash of its set."""
    tokens = _IDENTIFIER.findall(text)
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    token_hashes = np.array([_token_hash(token) for token in tokens], dtype=np.uint64)
    width = min(SHINGLE_TOKENS, len(tokens))
    count = len(tokens) - width + 1
    combined = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the polynomial wraps modulo 2**64 on purpose
        for offset in range(width):
            combined = combined * _MULTIPLIER + token_hashes[offset : offset + count]
    return (combined ^ (combined >> np.uint64(32))) & _MASK32


@lru_cache(maxsize=8)
def lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives plus false negatives at `threshold` (datasketch's
    own optimiser, as its MinHashLSH uses)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


@lru_cache(maxsize=8)
def _band_mixers(bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed odd 64-bit multipliers (one per row) and per-band offsets: a band's key is a polynomial of its
    rows' minimum hashes, different for the same values in another band."""
    generator = np.random.default_rng(20261126)
    multipliers = generator.integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    offsets = generator.integers(1, 2**63, size=bands, dtype=np.uint64)
    return multipliers, offsets


class Signer:
    """Band keys of a text: datasketch's MinHash (one object, cleared per text) over the shingle hashes,
    then each band of rows folded into one 64-bit key with numpy."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        from datasketch import MinHash

        self.bands, self.rows = lsh_shape(threshold, num_perm)
        self._minhash = MinHash(num_perm=num_perm, seed=1, hashfunc=int)
        self._multipliers, self._offsets = _band_mixers(self.bands, self.rows)

    def band_keys(self, text: str) -> list[int]:
        self._minhash.clear()
        self._minhash.update_batch(shingle_hashes(text).tolist())
        values = self._minhash.hashvalues[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        with np.errstate(over="ignore"):
            keys = (values * self._multipliers).sum(axis=1, dtype=np.uint64) ^ self._offsets
        return keys.view(np.int64).tolist()


def band_keys(text: str, threshold: float, num_perm: int = NUM_PERM) -> list[int]:
    return _signer(threshold, num_perm).band_keys(text)


def band_keys_of_chunk(texts: list[str], threshold: float, num_perm: int) -> list[list[int]]:
    """For the signing process: one chunk's band keys."""
    signer = _signer(threshold, num_perm)
    return [signer.band_keys(text) for text in texts]


CHUNK = 1000  # samples signed per task


def signed_ahead(samples, index: "NearDuplicateIndex"):
    """Pass samples through while a second process computes the band keys of the next chunk (the signature
    is a pure function of the text; only the index lookups must stay in order, in this process). On a
    multi-core box signing then costs the cycle almost nothing; a run of one chunk is signed inline."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from itertools import islice

    iterator = iter(samples)
    current = list(islice(iterator, CHUNK))
    if len(current) < CHUNK:
        yield from current
        return
    # spawn, not fork: the caller may already run threads (the tokenizer's).
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = pool.submit(band_keys_of_chunk, [sample.content for sample in current], index.threshold, index.num_perm)
        while current:
            following = list(islice(iterator, CHUNK))
            upcoming = (pool.submit(band_keys_of_chunk, [sample.content for sample in following], index.threshold,
                                    index.num_perm) if following else None)
            keys = pending.result()
            index.look_up_chunk(keys)
            index.precomputed = dict(zip((sample.content for sample in current), keys))
            yield from current
            current, pending = following, upcoming
    index.precomputed = {}
    index.end_chunks()


@lru_cache(maxsize=4)
def _signer(threshold: float, num_perm: int) -> Signer:
    return Signer(threshold, num_perm)


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
        # Band keys computed ahead by `signed_ahead`, by text, for the chunk being read, and which of them the
        # stored index holds (one query per chunk instead of one per sample: the stored index does not change
        # during a run); keys spilled to disk while a chunk is read stay in `_recently_spilled` until the next.
        self.precomputed: dict[str, list[int]] = {}
        self._chunk_known: set[int] | None = None
        self._recently_spilled: set[int] = set()
        # This run's keys: a set for speed, spilled to a temporary table (on disk) in bulk when it grows, so
        # memory stays bounded however large the run.
        self._pending: set[int] = set()
        self._spilled = False
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
        precomputed = self.precomputed.get(text)
        keys = precomputed or band_keys(text, self.threshold, self.num_perm)
        if not (self._protected.isdisjoint(keys) and self._pending.isdisjoint(keys)):
            return True
        if precomputed is not None and self._chunk_known is not None:
            if not (self._chunk_known.isdisjoint(keys) and self._recently_spilled.isdisjoint(keys)):
                return True
            self._pending.update(keys)
            if len(self._pending) >= PENDING_IN_MEMORY:
                self._spill()
            return False
        placeholders = ",".join("?" * len(keys))
        query = f"SELECT 1 FROM main.near_keys WHERE key IN ({placeholders})"
        if self._spilled:
            query += f" UNION ALL SELECT 1 FROM temp.near_pending WHERE key IN ({placeholders})"
        if self._connection.execute(query + " LIMIT 1", keys + keys if self._spilled else keys).fetchone() is not None:
            return True
        self._pending.update(keys)
        if len(self._pending) >= PENDING_IN_MEMORY:
            self._spill()
        return False

    def look_up_chunk(self, chunk_keys: list[list[int]]) -> None:
        """Which of a chunk's keys the stored index (and this run's spilled keys) already hold, in one query."""
        wanted = sorted({key for keys in chunk_keys for key in keys})
        query = "SELECT key FROM main.near_keys WHERE key IN (SELECT value FROM json_each(?))"
        if self._spilled:
            query += " UNION SELECT key FROM temp.near_pending WHERE key IN (SELECT value FROM json_each(?))"
        known: set[int] = set()
        for start in range(0, len(wanted), 50_000):
            batch = json.dumps(wanted[start : start + 50_000])
            known.update(row[0] for row in self._connection.execute(query, (batch, batch) if self._spilled else (batch,)))
        self._chunk_known = known
        self._recently_spilled = set()

    def end_chunks(self) -> None:
        self._chunk_known = None
        self._recently_spilled = set()

    def _spill(self) -> None:
        if self._chunk_known is not None:
            self._recently_spilled |= self._pending
        self._connection.execute("BEGIN")
        self._connection.executemany("INSERT OR IGNORE INTO temp.near_pending (key) VALUES (?)",
                                     ((key,) for key in self._pending))
        self._connection.execute("COMMIT")
        self._pending = set()
        self._spilled = True

    def write_pending(self) -> None:
        """Inside the store's open transaction."""
        self._connection.executemany("INSERT OR IGNORE INTO main.near_keys (key) VALUES (?)",
                                     ((key,) for key in self._pending))
        if self._spilled:
            self._connection.execute("INSERT OR IGNORE INTO main.near_keys (key) SELECT key FROM temp.near_pending")

    def clear_pending(self) -> None:
        self._pending = set()
        if self._spilled:
            self._connection.execute("DELETE FROM temp.near_pending")
            self._spilled = False

    def __len__(self) -> int:
        return self._connection.execute("SELECT count(*) FROM main.near_keys").fetchone()[0]
