"""What loading a base model that is already in the local Hugging Face cache costs while the hub is down.

    .venv/bin/python benchmarks/cached_model_load.py [--status 503]

Every cycle loads the base model (tokenizer and weights). Side by side, each in a fresh process against the
same cache and the same local stand-in for the hub (which answers every request with `--status`, 503 by
default: an outage), the model is loaded:

- the way transformers does when left to itself (`from_pretrained(<hub id>)`): it asks the hub about each
  file of the cached model, retries the 5xx answers, then falls back to the cache;
- the daemon's way (`training/model.py: from_cache_first`): from the cache alone, the hub asked only for
  what is missing.

Prints the wall time and the requests the hub received for each, and the ratio. The model is the tests'
tiny Qwen2 (the load itself is about a second); the 7B has more files, so more requests and retries.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The hub's stand-in, at the top of a child process's script (before huggingface_hub is imported): it answers
# every request with $HUB_STATUS and keeps the request lines in `asked`; the child's HF_ENDPOINT points at it
# and its HF_HUB_CACHE at $STAND_IN_CACHE. tests/test_first_hour.py uses it too.
HUB_STAND_IN = """
import json, os, socket, sys, threading

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
asked = []
answer = f"HTTP/1.1 {os.environ['HUB_STATUS']} Stand-in\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n".encode()


def serve():
    while True:
        connection, _ = server.accept()
        asked.append(connection.recv(4096).split(b"\\r\\n")[0].decode())
        connection.sendall(answer)
        connection.close()


threading.Thread(target=serve, daemon=True).start()
os.environ.update(HF_HUB_CACHE=os.environ["STAND_IN_CACHE"], HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}",
                  HF_HUB_DISABLE_TELEMETRY="1")
os.environ.pop("HF_HUB_OFFLINE", None)
"""

LOAD = HUB_STAND_IN + """
import time
from transformers import AutoModelForCausalLM, AutoTokenizer
from codelupe_trainer.training.model import from_cache_first

name = "codelupe-bench/tiny-qwen2"
started = time.perf_counter()
if sys.argv[1] == "transformers":
    AutoTokenizer.from_pretrained(name)
    AutoModelForCausalLM.from_pretrained(name)
else:
    from_cache_first(AutoTokenizer.from_pretrained, name)
    from_cache_first(AutoModelForCausalLM.from_pretrained, name, cache_only={"adapter_kwargs": {"local_files_only": True}})
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "asked": [line for line in asked if "tiny-qwen2" in line]}))
"""


def cache_as_downloaded(model: Path, hub: Path, repository: str) -> Path:
    """Lay `model`'s files out in the hub cache `hub` as a download of `repository` leaves them (a snapshot
    named by its commit, refs/main pointing at it); returns the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = hub / f"models--{repository.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in model.iterdir():
        if path.is_file():
            shutil.copy(path, snapshot / path.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def tiny_model(directory: Path) -> Path:
    from codelupe_trainer.demo.demo import standard_library_files
    from codelupe_trainer.demo.tinymodel import build_tiny_model

    corpus = [path.read_text(encoding="utf-8", errors="replace") for path in standard_library_files(100)]
    return build_tiny_model(directory / "model", corpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--status", default="503", help="the hub stand-in's answer to every request")
    arguments = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "CODELUPE_"))}
    env["PYTHONPATH"] = str(REPO)
    with tempfile.TemporaryDirectory(prefix="codelupe-bench-") as scratch:
        hub = Path(scratch) / "hub"
        cache_as_downloaded(tiny_model(Path(scratch)), hub, "codelupe-bench/tiny-qwen2")
        env.update(HUB_STATUS=arguments.status, STAND_IN_CACHE=str(hub))
        results = {}
        for way in ("transformers", "from_cache_first"):
            wall = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", LOAD, way], env=env, capture_output=True, text=True,
                                  timeout=1800)
            if done.returncode != 0:
                raise SystemExit(f"{way}: the load failed:\n{done.stderr[-2000:]}")
            results[way] = json.loads(done.stdout.strip().splitlines()[-1]) | {"process": time.perf_counter() - wall}
            print(f"{way:>18}: load {results[way]['seconds']:7.1f} s (process {results[way]['process']:.1f} s), "
                  f"{len(results[way]['asked'])} requests to the hub about the model")
    ratio = results["transformers"]["seconds"] / results["from_cache_first"]["seconds"]
    print(f"hub answering {arguments.status}: the cached load is {ratio:.0f}x faster from the cache alone")


if __name__ == "__main__":
    main()
