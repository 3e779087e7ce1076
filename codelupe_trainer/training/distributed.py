"""Several GPUs on one machine: a cycle's training as a DDP run of `training.num_processes` ranks, through the
Trainer's own distributed support (accelerate's DDP, PyTorch's env:// rendezvous: the variables torchrun sets).

The cycle's process is rank 0: it builds the dataset, talks to W&B, evaluates the holdout and writes the
adapter, the state and the stores, as with one process. It starts ranks 1..N-1 as child processes
(`python -m codelupe_trainer.training.distributed SPEC`) that load the same base model and adapter on their own
device (`device_map={"": local_rank}`), train on their share of the same blocks (the Trainer's distributed
sampler), take part in every evaluation the Trainer runs, and write nothing. NCCL on CUDA, gloo on a CPU
(where the tests run it). The effective batch is batch_size x accumulation x N.

A rank that dies, or a stop, ends the whole group: rank 0 terminates the others on the way out, and a rank
left waiting in a collective is killed with them.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ..config import ModelSettings, TrainingSettings
from ..data.packing import Block
from ..errors import TrainingError

log = logging.getLogger(__name__)
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass
class RankSpec:
    """What every rank above 0 needs to train exactly as rank 0 does."""

    model: ModelSettings
    training: TrainingSettings
    previous_adapter: str | None
    train_blocks: list[Block]
    eval_blocks: list[Block]
    pad_token_id: int
    seed: int
    device: str
    quantized: bool
    packed: bool


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RankGroup:
    """Rank 0's side: the rendezvous variables in this process, the other ranks as children."""

    def __init__(self, processes: int, device: str):
        self.processes = processes
        self.device = device
        self.children: list[subprocess.Popen] = []
        self.directory = Path(tempfile.mkdtemp(prefix="codelupe-ranks-"))
        self._saved = {name: os.environ.get(name) for name in RENDEZVOUS_VARIABLES}
        self.port = free_port()

    def environment(self, rank: int) -> dict[str, str]:
        values = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port), "WORLD_SIZE": str(self.processes),
                  "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(self.processes)}
        if self.device == "cpu":
            # N ranks on one CPU: each gets its share of the cores, or they slow each other ~10x.
            values["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.processes))
        return values

    def __enter__(self) -> RankGroup:
        os.environ.update(self.environment(0))
        if self.device == "cpu":
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return self

    def start(self, spec: RankSpec) -> None:
        path = self.directory / "spec.pickle"
        with open(path, "wb") as handle:
            pickle.dump(spec, handle, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in range(1, self.processes):
            environment = {**os.environ, **self.environment(rank)}
            self.children.append(subprocess.Popen([sys.executable, "-m", "codelupe_trainer.training.distributed",
                                                   str(path)], env=environment, stdin=subprocess.DEVNULL))
        log.info("training on %d processes (ranks 1-%d started, %s)", self.processes, self.processes - 1,
                 "nccl" if self.device == "cuda" else "gloo")

    def finish(self, timeout_s: float = 300.0) -> None:
        """After rank 0's training: every other rank must have ended cleanly too."""
        for rank, child in enumerate(self.children, start=1):
            try:
                code = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise TrainingError(f"training rank {rank} did not finish within {timeout_s:.0f} s") from None
            if code != 0:
                raise TrainingError(f"training rank {rank} failed (exit {code}); see the log above")

    def __exit__(self, *exc_info) -> None:
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(self.directory, ignore_errors=True)


class _Silent:
    """Ranks above 0 report nothing: rank 0 has the metrics run."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def heartbeat(self, phase: str, step: int) -> None:
        return None


def run_rank(spec_path: Path) -> int:
    import torch

    from .loop import train_adapter
    from .model import attach_adapter, load_base_model
    from .telemetry import Frequencies

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(spec_path, "rb") as handle:
        spec: RankSpec = pickle.load(handle)
    local_rank = int(os.environ["LOCAL_RANK"])
    if spec.device == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base, _ = load_base_model(spec.model, spec.device, device_index=local_rank)
    model = attach_adapter(base, spec.model, Path(spec.previous_adapter) if spec.previous_adapter else None)
    with tempfile.TemporaryDirectory(prefix="codelupe-rank-") as scratch:
        train_adapter(model, SimpleNamespace(pad_token_id=spec.pad_token_id), spec.train_blocks, spec.eval_blocks,
                      spec.training, Path(scratch), _Silent(), Frequencies(0, 0, 0), lambda: False, dict, spec.seed,
                      spec.device, quantized=spec.quantized, packed=spec.packed)
    return 0


if __name__ == "__main__":
    sys.exit(run_rank(Path(sys.argv[1])))
