"""Several GPUs, on one machine or several: a cycle's training as a DDP run of `training.num_nodes x
training.num_processes` ranks, through the Trainer's own distributed support (accelerate's DDP on a process
group built on torch's store: training/rendezvous.py).

The cycle's process is rank 0: it builds the dataset, talks to W&B, evaluates the holdout and writes the
adapter, the state and the stores, as with one process. The other ranks of its machine are its child
processes; those of the other machines are started there by `codelupe-trainer join` (service/node.py). Every
rank above 0 receives from rank 0, over the process group, what it needs to train exactly as rank 0 does: the
settings, the blocks and the previous adapter's files (the machines share no disk). Each loads the base model
on its own device (`device_map={"": local_rank}`), trains on its share of the blocks (the Trainer's
distributed sampler), takes part in every evaluation the Trainer runs, and writes nothing. NCCL on CUDA, gloo
on a CPU (where the tests run it). The effective batch is batch_size x accumulation x ranks.

A rank that fails reports its reason in the store and the cycle fails; a stop ends the whole group: rank 0
terminates its children on the way out, and the other machines' ranks lose their connection and exit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..config import ModelSettings, TrainingSettings
from ..data.packing import Block
from ..errors import TrainingError
from ..faults import crash_point
from ..logs import setup_logging
from .backoff import BackoffOutcome, check_ranks_memory_failure
from .rendezvous import (Cycle, connect_store, describe_failure, host_store, join_group, rank_result,
                         report_rank_result, reported_failure, split_endpoint, wait_for_ranks, wait_for_results)

log = logging.getLogger("codelupe_trainer.training.distributed")  # also when run as __main__ (a rank)
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass
class RankSpec:
    """What every rank above 0 needs to train exactly as rank 0 does."""

    model: ModelSettings
    training: TrainingSettings
    adapter_files: dict[str, bytes]  # the previous adapter's files by name; empty for a fresh LoRA
    train_blocks: list[Block]
    eval_blocks: list[Block]
    pad_token_id: int
    seed: int
    quantized: bool
    packed: bool


def read_adapter_files(adapter: Path | None) -> dict[str, bytes]:
    if adapter is None:
        return {}
    return {path.name: path.read_bytes() for path in adapter.iterdir() if path.is_file()}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(cycle: Cycle, host: str, port: int, node_rank: int, local_rank: int) -> dict[str, str]:
    """The variables torchrun would set (accelerate reads them), plus the cycle for our own rendezvous."""
    values = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "WORLD_SIZE": str(cycle.world_size),
              "RANK": str(node_rank * cycle.processes + local_rank), "LOCAL_RANK": str(local_rank),
              "LOCAL_WORLD_SIZE": str(cycle.processes), "CODELUPE_CYCLE": json.dumps(asdict(cycle))}
    if cycle.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # N ranks on one CPU: each gets its share of the cores, or they slow each other ~10x.
        values["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cycle.processes))
    return values


def start_ranks(cycle: Cycle, host: str, port: int, node_rank: int, local_ranks: range) -> list[subprocess.Popen]:
    """This machine's ranks as child processes (`python -m codelupe_trainer.training.distributed`)."""
    return [subprocess.Popen([sys.executable, "-m", "codelupe_trainer.training.distributed"],
                             env={**os.environ, **rank_environment(cycle, host, port, node_rank, local_rank)},
                             stdin=subprocess.DEVNULL)
            for local_rank in local_ranks]


def stop_processes(children: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s` (a rank stuck in a collective may not get to its handler)."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class RankGroup:
    """Rank 0's side: the store, the rendezvous variables in this process, this machine's other ranks."""

    def __init__(self, training: TrainingSettings, device: str, run: int):
        self.cycle = Cycle.new(run, training.num_nodes, training.num_processes, device)
        self.timeout_s = training.rendezvous_timeout_s
        if training.rendezvous_endpoint:
            self.host, self.port = split_endpoint(training.rendezvous_endpoint)
        else:
            self.host, self.port = "127.0.0.1", free_port()
        self.children: list[subprocess.Popen] = []
        self.store = None
        self._saved = {name: os.environ.get(name) for name in RENDEZVOUS_VARIABLES}

    def check_children(self) -> None:
        for local_rank, child in enumerate(self.children, start=1):
            code = child.poll()
            # A rank that reported "ok" had trained: how its teardown ended does not matter.
            if code not in (None, 0) and rank_result(self.store, self.cycle, local_rank) != "ok":
                raise TrainingError(f"training rank {local_rank} failed (exit {code}); see the log above")

    def __enter__(self) -> RankGroup:
        """Open the store, start this machine's other ranks and wait until every rank of every node is in."""
        environment = rank_environment(self.cycle, self.host, self.port, 0, 0)
        environment.pop("CODELUPE_CYCLE")
        os.environ.update(environment)
        if self.cycle.device == "cpu":
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.store = host_store(self.host, self.port, self.cycle)
        self.children = start_ranks(self.cycle, self.host, self.port, 0, range(1, self.cycle.processes))
        if self.cycle.nodes > 1:
            log.info("waiting for %d other node(s) at %s:%d", self.cycle.nodes - 1, self.host, self.port)
        wait_for_ranks(self.store, self.cycle, self.timeout_s, self.check_children)
        join_group(self.store, self.cycle, 0)
        log.info("training on %d processes (%d node(s) x %d, %s)", self.cycle.world_size, self.cycle.nodes,
                 self.cycle.processes, "nccl" if self.cycle.device == "cuda" else "gloo")
        return self

    def train(self, spec: RankSpec, attempt: Callable[[TrainingSettings], Any]) -> tuple[Any, BackoffOutcome]:
        """Hand every other rank its work (they wait for it in the same collective), train rank 0's share with
        `attempt`, and wait until every other rank has ended cleanly too. All ranks must train with the same
        sizes, so an out-of-memory on any rank fails the cycle with the smaller size for the next one
        (training/backoff.py: OutOfMemoryOnRanks)."""
        import torch.distributed as dist

        dist.broadcast_object_list([spec], src=0)
        try:
            result = attempt(spec.training)
        except Exception as error:
            # An out-of-memory on any rank: the next cycle trains smaller (the ranks cannot retry within a run).
            check_ranks_memory_failure(error, spec.training)
            failure = reported_failure(self.store, self.cycle)
            if failure:  # a rank's own reason is clearer than rank 0's "connection closed by peer"
                check_ranks_memory_failure(failure[1], spec.training)
                raise TrainingError(describe_failure(self.cycle, *failure)) from None
            raise
        wait_for_results(self.store, self.cycle, self.timeout_s, self.check_children)
        return result, BackoffOutcome(spec.training.batch_size, spec.training.gradient_accumulation_steps, 0)

    def __exit__(self, *exc_info) -> None:
        stop_processes(self.children)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.store = None  # closes the store: ranks of other nodes see the cycle end
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Silent:
    """Ranks above 0 report nothing: rank 0 has the metrics run."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def heartbeat(self, phase: str, step: int) -> None:
        return None


def train_rank(spec: RankSpec, device: str, local_rank: int) -> None:
    import torch

    from .loop import train_adapter
    from .model import attach_adapter, load_base_model
    from .telemetry import ReportingOptions

    if device == "cuda":
        torch.cuda.set_device(local_rank)
    base, _ = load_base_model(spec.model, device, device_index=local_rank)
    with tempfile.TemporaryDirectory(prefix="codelupe-rank-") as scratch:
        previous = None
        if spec.adapter_files:
            previous = Path(scratch) / "previous-adapter"
            previous.mkdir()
            for name, content in spec.adapter_files.items():
                (previous / name).write_bytes(content)
        rank = int(os.environ["RANK"])
        if previous is None:
            log.info("rank %d: a fresh LoRA", rank)
        else:
            log.info("rank %d: continuing from the previous adapter (%d files, %d bytes)", rank,
                     len(spec.adapter_files), sum(map(len, spec.adapter_files.values())))
        model = attach_adapter(base, spec.model, previous)
        train_adapter(model, SimpleNamespace(pad_token_id=spec.pad_token_id), spec.train_blocks, spec.eval_blocks,
                      spec.training, Path(scratch), _Silent(), ReportingOptions(0, 0, 0), lambda: False, dict, spec.seed,
                      device, quantized=spec.quantized, packed=spec.packed)


def run_rank() -> int:
    """A rank above 0: join the cycle's group, receive the work, train, report the result in the store."""
    import torch
    import torch.distributed as dist

    setup_logging(None)  # the same format and filters as every other process; a rank holds no secret
    cycle = Cycle(**json.loads(os.environ["CODELUPE_CYCLE"]))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if cycle.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    store = connect_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    try:
        join_group(store, cycle, rank)
        received: list[RankSpec | None] = [None]
        dist.broadcast_object_list(received, src=0)
        train_rank(received[0], cycle.device, local_rank)
        # Reported before the group is torn down: the rank's work is done, and a teardown that fails must not
        # fail a cycle that trained (gloo has aborted a process at exit, "terminate called without an active
        # exception", when its peer closed first: tests/ddp_gradients.py saw it on this project's CI box).
        report_rank_result(store, cycle, rank, None)
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        # A warning: rank 0 reports the cycle's failure (one ERROR line per failed cycle, wherever ranks run).
        log.warning("training rank %d stopped: %s", rank, reason)
        try:
            report_rank_result(store, cycle, rank, reason)
        except Exception:
            pass  # rank 0 is gone too (a stop, or its own failure): nobody is left to tell
        return 1
    finally:
        crash_point("rank-teardown")
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_rank())
