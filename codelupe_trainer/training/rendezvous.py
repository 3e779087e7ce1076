"""Where the training ranks of one cycle find each other: a PyTorch `TCPStore` hosted by the cycle's process.

The cycle's process (rank 0, on node 0, the machine running the daemon) opens the store on
`training.rendezvous_endpoint` (a free port on 127.0.0.1 when everything runs on one machine) and announces
the cycle in it: an id, the number of nodes and of processes per node, the device. Ranks count themselves in;
when all `nodes x processes` are in, every rank builds the process group on the store, under a prefix named
after the cycle, so a rank left over from an earlier cycle can never be taken for one of this cycle's.
The other machines run `codelupe-trainer join`, which waits for an announcement and starts that node's ranks
(service/node.py). Failed ranks leave their one-line reason in the store for rank 0 to report.

This is the engine's own rendezvous (torch.distributed's store and `init_process_group(store=...)`); the
interface the group's traffic uses is torch's to pick, set with GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta

from ..errors import TrainingError

ANNOUNCEMENT = "codelupe/cycle"
# Collectives may wait this long for a slow rank: rank 0 evaluates the holdout alone while the others wait
# (under a minute for 256 samples of the 7B); a rank stuck longer is dead, and the collective fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Cycle:
    """One cycle's training group, as announced in the store."""

    cycle_id: str
    run: int
    nodes: int
    processes: int  # per node
    device: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes

    def key(self, name: str) -> str:
        return f"{self.cycle_id}/{name}"

    @staticmethod
    def new(run: int, nodes: int, processes: int, device: str) -> Cycle:
        return Cycle(uuid.uuid4().hex, run, nodes, processes, device)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def accepts_connections(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """A plain connect first: a TCPStore client that finds nobody listening logs C++ errors at every retry."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def host_store(host: str, port: int, cycle: Cycle):
    """Rank 0: open the store (it listens on every interface) and announce the cycle."""
    import torch.distributed as dist

    try:
        store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    except RuntimeError as error:
        raise TrainingError(f"cannot open the training rendezvous on port {port}: {str(error).splitlines()[0]} "
                            "(training.rendezvous_endpoint)") from None
    store.set(ANNOUNCEMENT, json.dumps(asdict(cycle)))
    return store


def connect_store(host: str, port: int, timeout: timedelta = COLLECTIVE_TIMEOUT):
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=False, timeout=timeout)


def read_announcement(store) -> Cycle | None:
    """The cycle announced in the store (None before the announcement is in: no blocking wait)."""
    if not store.check([ANNOUNCEMENT]):
        return None
    return Cycle(**json.loads(store.get(ANNOUNCEMENT)))


def claim_node(store, cycle: Cycle, node_rank: int) -> bool:
    """One `join` per node and cycle: False when another process already took this node's place."""
    return store.add(cycle.key(f"node/{node_rank}"), 1) == 1


def wait_for_ranks(store, cycle: Cycle, timeout_s: float, check_children: Callable[[], None]) -> None:
    """Rank 0: until every other rank has counted itself in; names the nodes that did not come."""
    deadline = time.monotonic() + timeout_s
    while store.add(cycle.key("joined"), 0) < cycle.world_size - 1:
        check_children()
        if time.monotonic() > deadline:
            missing = [node for node in range(1, cycle.nodes) if store.add(cycle.key(f"node/{node}"), 0) == 0]
            if missing:
                commands = ", ".join(f"`codelupe-trainer join --node-rank {node}`" for node in missing)
                raise TrainingError(f"node {', '.join(map(str, missing))} did not join the training within "
                                    f"{timeout_s:.0f} s: is {commands} running there and able to reach this machine "
                                    "(training.rendezvous_endpoint)?")
            raise TrainingError(f"not every training rank started within {timeout_s:.0f} s")
        time.sleep(0.1)


def join_group(store, cycle: Cycle, rank: int) -> None:
    """Every rank: build the process group on the store, under the cycle's own prefix."""
    import torch.distributed as dist

    if rank > 0:
        store.add(cycle.key("joined"), 1)
    dist.init_process_group("nccl" if cycle.device == "cuda" else "gloo", store=dist.PrefixStore(cycle.cycle_id, store),
                            rank=rank, world_size=cycle.world_size, timeout=COLLECTIVE_TIMEOUT)


def report_rank_result(store, cycle: Cycle, rank: int, failure: str | None) -> None:
    store.set(cycle.key(f"result/{rank}"), failure or "ok")


def rank_result(store, cycle: Cycle, rank: int) -> str | None:
    """What a rank reported ("ok" or its one-line reason), None while it has not."""
    key = cycle.key(f"result/{rank}")
    return store.get(key).decode() if store.check([key]) else None


def reported_failure(store, cycle: Cycle) -> tuple[int, str] | None:
    """The first failure a rank reported: (rank, its one-line reason), or None when none did."""
    for rank in range(1, cycle.world_size):
        result = rank_result(store, cycle, rank)
        if result not in (None, "ok"):
            return rank, result
    return None


def describe_failure(cycle: Cycle, rank: int, reason: str) -> str:
    return f"training rank {rank} (node {rank // cycle.processes}) failed: {reason}"


def wait_for_results(store, cycle: Cycle, timeout_s: float, check_children: Callable[[], None]) -> None:
    """Rank 0, after its training: every other rank must report that it finished cleanly."""
    deadline = time.monotonic() + timeout_s
    pending = set(range(1, cycle.world_size))
    while pending:
        for rank in sorted(pending):  # one read of each rank still pending per look
            result = rank_result(store, cycle, rank)
            if result not in (None, "ok"):
                raise TrainingError(describe_failure(cycle, rank, result))
            if result == "ok":
                pending.discard(rank)
        if not pending:
            return
        check_children()
        if time.monotonic() > deadline:
            raise TrainingError(f"training rank {min(pending)} did not finish within {timeout_s:.0f} s")
        time.sleep(0.1)
