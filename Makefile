# The two commands a new user needs: `make demo` (the main job, on an embedded default) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch for this project's own machines; a GPU box installs its CUDA build first (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench install-service clean

$(BIN)/codelupe-trainer: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/codelupe-trainer

demo: install
	$(BIN)/codelupe-trainer demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/metrics_overhead.py
	$(BIN)/python benchmarks/ingest.py --rows 100000 1000000
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/forgetting.py
	$(BIN)/python benchmarks/rank_handoff.py
	$(BIN)/python benchmarks/replay_draw.py
	$(BIN)/python benchmarks/idle_cycle.py
	$(BIN)/python benchmarks/cached_model_load.py
	$(BIN)/python benchmarks/code_stats.py
	$(BIN)/python benchmarks/pending_gaps.py

install-service: install
	bash systemd/install.sh

clean:
	rm -rf demo-run var .pytest_cache
