"""The benchmarks measure what they print: run in small, through the same functions `make bench` runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    """benchmarks/ is not a package: load a script as a module."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_metrics_overhead_benchmark_trains_the_steps_it_divides_by(tiny_model, tmp_path):
    """It handed train_adapter all its blocks with max_steps = --steps; train_adapter trains a whole epoch
    rather than leave rows unseen (the daemon cuts its rows to the budget first), so `make bench` trained
    5,284 steps per trial for its "100 steps" and never finished."""
    from codelupe_trainer.data.dataset import build_dataset
    from codelupe_trainer.data.records import Sample
    from codelupe_trainer.demo.demo import crawler_rows, standard_library_files
    from codelupe_trainer.training.model import load_tokenizer

    bench = load("metrics_overhead")
    tokenizer = load_tokenizer(str(tiny_model))
    samples = [Sample(index, row[3], "python", 70) for index, row in enumerate(crawler_rows(standard_library_files(40)))]
    blocks = build_dataset(samples, tokenizer, max_length=256, eval_fraction=0.0, seed=0).train_blocks
    assert len(blocks) > 8 * 2 * 3  # three times what 2 steps of 8 take
    (tmp_path / "scratch").mkdir()
    assert bench.train_once(tiny_model, blocks, "off", 2, tmp_path) > 0
