"""Ingest benchmark: rows in PostgreSQL -> train-ready blocks, our pipeline against the seed's way.

    .venv/bin/python benchmarks/ingest.py --rows 100000 1000000

For each table size it loads that many rows of real code (function-sized pieces of the Python standard
library, each made unique) with COPY, then runs, each in a fresh child process so peak memory is its own:

- ours: keyset pages -> every filter (secrets, licence, malicious, duplicates) -> batched tokenizer ->
  best-fit packing into max_length blocks;
- seed: fetch every row at once, tokenize each sample on its own (truncate and pad to max_length), then
  tokenize each one again to count its tokens, as the design document's sketch did.

It prints rows per second, peak RSS and the fraction of real (non-padding) tokens, and the ratios.
The seed's way runs once, on the first --seed-rows rows of the first table: it holds every padded sample
as Python lists (~250 KB a row here), so 100,000 rows would exhaust this machine's 24 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCTION_CAP = 100_000  # data.max_samples_per_run's default
sys.path.insert(0, str(REPO))


def code_pieces():
    """Function-sized pieces (5-30 lines, about 550 characters) of the standard library's source, forever, each made unique."""
    from codelupe_trainer.demo.demo import standard_library_files

    files = [path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files()]
    variant = 0
    while True:
        for text in files:
            lines = text.splitlines()
            start = 0
            while start < len(lines):
                size = 5 + (start * 7 + variant) % 25
                piece = "\n".join(lines[start : start + size])
                start += size
                if len(piece) >= 50:
                    variant += 1
                    yield f"{piece}\n# variant {variant}\n"


def load_table(url: str, rows: int) -> None:
    import hashlib

    import psycopg

    from codelupe_trainer.demo.pgserver import CREATE_PROCESSED_FILES

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS processed_files")
        connection.execute(CREATE_PROCESSED_FILES)
        started = time.perf_counter()
        with connection.cursor().copy(
            "COPY processed_files (relative_path, content, language, lines, size, hash, repo_name, quality_score) FROM STDIN"
        ) as copy:
            for index, content in zip(range(rows), code_pieces()):
                lines = content.count("\n")
                copy.write_row((f"piece_{index}.py", content, "python", lines, len(content),
                                hashlib.sha1(content.encode()).hexdigest(), "stdlib", 70 if 10 <= lines <= 500 else 40))
        connection.execute("ANALYZE processed_files")
        print(f"loaded {rows:,} rows in {time.perf_counter() - started:.1f} s", flush=True)


def run_ours(url: str, model_dir: str, max_samples: int, max_length: int, near: bool = False) -> dict:
    """Our pipeline with the exact-duplicate store on disk (as the daemon runs it) and near-duplicate
    filtering on or off; the store's commit (what the daemon does after the state is saved) is timed too."""
    from transformers import AutoTokenizer

    from codelupe_trainer.config import DatabaseSettings, DataSettings
    from codelupe_trainer.data.dataset import build_dataset
    from codelupe_trainer.data.filters import build_blockers
    from codelupe_trainer.data.records import FetchResult
    from codelupe_trainer.data.source import fetch_new_samples, open_connection

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    database = DatabaseSettings(url=url)
    data = DataSettings(max_samples_per_run=max_samples, max_length=max_length, min_quality=0,
                        block_near_duplicates=near)
    store_dir = Path(tempfile.mkdtemp(prefix="ingest-store-"))
    blockers, store = build_blockers(data, store_dir=store_dir)
    started = time.perf_counter()
    result = FetchResult(last_examined_id=0)
    with open_connection(database) as connection:
        rows = fetch_new_samples(connection, database, data, 0, result)
        if store.near is not None:  # as the cycle does
            from codelupe_trainer.data.neardup import signed_ahead

            rows = signed_ahead(rows, store.near)
        built = build_dataset(rows, tokenizer, max_length,
                              eval_fraction=0.05, seed=0, blockers=blockers, skipped_upstream=result.skipped)
    commit_started = time.perf_counter()
    store.commit()
    commit_seconds = time.perf_counter() - commit_started
    seconds = time.perf_counter() - started
    indexed = built.total_samples
    store_bytes = sum(path.stat().st_size for path in store_dir.iterdir())
    near_keys = len(store.near) if store.near is not None else 0
    store.close()
    return {
        "near": near,
        "commit_seconds": commit_seconds,
        "store_bytes": store_bytes,
        "store_bytes_per_sample": store_bytes / indexed if indexed else 0.0,
        "near_keys": near_keys,
        "blocked_near": built.data_metrics["data/blocked_near_duplicates"],
        "rows": result.rows_examined,
        "seconds": seconds,
        "rows_per_second": result.rows_examined / seconds,
        "real_token_fraction": built.dataset_metrics["dataset/real_token_fraction"],
        "blocked": built.data_metrics["data/blocked_total"],
        "samples": built.total_samples,
    }


def run_seed(url: str, model_dir: str, max_samples: int, max_length: int) -> dict:
    import psycopg
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT id, content, language, quality_score FROM processed_files ORDER BY id LIMIT %s", (max_samples,)
        ).fetchall()
    samples = [{"id": row[0], "content": row[1], "language": row[2], "quality_score": row[3]} for row in rows]
    texts = [f"<|lang:{sample['language']}|>\n{sample['content']}" for sample in samples]
    dataset = [tokenizer(text, truncation=True, max_length=max_length, padding="max_length") for text in texts]
    lengths = [len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]
    seconds = time.perf_counter() - started
    return {
        "rows": len(samples),
        "seconds": seconds,
        "rows_per_second": len(samples) / seconds,
        "real_token_fraction": sum(lengths) / (len(dataset) * max_length),
    }


def measure_in_child(kind: str, url: str, model_dir: str, max_samples: int, max_length: int) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--url", url, "--model", model_dir,
         "--max-samples", str(max_samples), "--max-length", str(max_length)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def child_main(arguments) -> None:
    if arguments.child == "seed":
        result = run_seed(arguments.url, arguments.model, arguments.max_samples, arguments.max_length)
    else:
        result = run_ours(arguments.url, arguments.model, arguments.max_samples, arguments.max_length,
                          near=arguments.child == "ours-near")
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    # The near-duplicate signing process (the largest of this child's children).
    result["helper_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(json.dumps(result))


def compare_near_duplicates(url: str, model_dir: str, rows: int, max_length: int) -> None:
    """The same rows with near-duplicate filtering off and on, each in a fresh child (its own peak memory)."""
    off = measure_in_child("ours", url, model_dir, rows, max_length)
    on = measure_in_child("ours-near", url, model_dir, rows, max_length)
    per_sample = on["store_bytes_per_sample"]
    print(f"[{rows:,} rows] near-duplicates off: {off['rows_per_second']:,.0f} rows/s, peak {off['peak_rss_gb']:.2f} GB, "
          f"store {off['store_bytes'] / 1e6:.1f} MB", flush=True)
    print(f"[{rows:,} rows] near-duplicates on:  {on['rows_per_second']:,.0f} rows/s, peak {on['peak_rss_gb']:.2f} GB, "
          f"store {on['store_bytes'] / 1e6:.1f} MB ({on['near_keys']:,} LSH keys; commit {on['commit_seconds']:.1f} s), "
          f"blocked as near-duplicates {on['blocked_near']:,}; the signing process peaked at "
          f"{on['helper_peak_rss_gb']:.2f} GB", flush=True)
    print(f"[{rows:,} rows] near-duplicates on/off: throughput {on['rows_per_second'] / off['rows_per_second']:.2f}x, "
          f"peak memory {on['peak_rss_gb'] / off['peak_rss_gb']:.2f}x; store on disk {per_sample:.0f} bytes a sample "
          f"(exact + near), projected to 10 million samples: {per_sample * 1e7 / 1e9:.1f} GB on disk; in memory the "
          f"index is SQLite's page cache (fixed), not per sample", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--seed-rows", type=int, default=40_000,
                        help="rows the seed's way processes (it holds ~250 KB a row: 100,000 rows would exhaust 24 GB)")
    parser.add_argument("--url", default=os.environ.get("CODELUPE_TEST_DATABASE_URL"))
    parser.add_argument("--child")
    parser.add_argument("--model")
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--near-only", action="store_true",
                        help="only the near-duplicate comparison (on and off, same rows), no seed run")
    arguments = parser.parse_args()
    if arguments.child:
        child_main(arguments)
        return

    from codelupe_trainer.demo.pgserver import postgres_at
    from codelupe_trainer.demo.demo import standard_library_files
    from codelupe_trainer.demo.tinymodel import build_tiny_model

    model_dir = Path(tempfile.mkdtemp(prefix="ingest-tokenizer-"))
    build_tiny_model(model_dir, (path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files(300)))
    with postgres_at(arguments.url) as url:
        for rows in arguments.rows:
            load_table(url, rows)
            if rows <= PRODUCTION_CAP:
                compare_near_duplicates(url, str(model_dir), rows, arguments.max_length)
            if arguments.near_only:
                continue
            ours = measure_in_child("ours", url, str(model_dir), rows, arguments.max_length)
            print(f"[{rows:,} rows] ours, all rows in one run: {ours['rows_per_second']:,.0f} rows/s, "
                  f"peak {ours['peak_rss_gb']:.2f} GB, real tokens {ours['real_token_fraction']:.1%}, "
                  f"blocked {ours['blocked']:,}", flush=True)
            if rows > PRODUCTION_CAP:
                capped = measure_in_child("ours", url, str(model_dir), PRODUCTION_CAP, arguments.max_length)
                print(f"[{rows:,} rows] ours, max_samples_per_run={PRODUCTION_CAP:,} (the default): "
                      f"{capped['rows_per_second']:,.0f} rows/s, peak {capped['peak_rss_gb']:.2f} GB", flush=True)
            if rows == arguments.rows[0]:
                seed_rows = min(rows, arguments.seed_rows)
                seed = measure_in_child("seed", url, str(model_dir), seed_rows, arguments.max_length)
                print(f"[{rows:,} rows] seed ({seed_rows:,} rows): {seed['rows_per_second']:,.0f} rows/s, "
                      f"peak {seed['peak_rss_gb']:.2f} GB ({seed['peak_rss_gb'] / seed_rows * 1e6:.1f} KB a row), "
                      f"real tokens {seed['real_token_fraction']:.1%}", flush=True)
                print(f"[{rows:,} rows] ratio: throughput {ours['rows_per_second'] / seed['rows_per_second']:.1f}x, "
                      f"peak memory {seed['peak_rss_gb'] / ours['peak_rss_gb']:.1f}x lower, "
                      f"real-token fraction {ours['real_token_fraction'] / seed['real_token_fraction']:.1f}x", flush=True)


if __name__ == "__main__":
    main()
