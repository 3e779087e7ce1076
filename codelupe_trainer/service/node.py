"""The service on the other machines of a multi-node group: `codelupe-trainer join --node-rank K`.

It waits for node 0's next cycle to announce itself at `training.rendezvous_endpoint`, starts this machine's
ranks for it (node 0 says how many: its `training.num_processes`; global ranks K x P .. K x P + P - 1), waits
for them to finish, and waits for the next cycle. It reads no database, talks to no W&B and writes nothing:
node 0 does all of that and reports each cycle's outcome. Between cycles it holds no GPU memory (the ranks are
fresh processes each cycle, like node 0's cycles).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable

from ..config import Settings
from ..training.distributed import start_ranks, stop_processes
from ..training.rendezvous import accepts_connections, claim_node, connect_store, read_announcement, split_endpoint

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0  # between looks for node 0's next cycle
CHECK_SECONDS = 5.0  # between looks at whether the running cycle is still open
CHECKS_BEFORE_STOPPING = 3
RANK_GRACE_SECONDS = 10.0


def next_cycle(host: str, port: int, last_served: str | None):
    """(store, cycle) of an announced cycle not yet served, else (None, None). Never blocks for long: node 0's
    store exists only while a cycle trains, and the one just served stays up until node 0 has published."""
    from datetime import timedelta

    import torch.distributed as dist

    if not accepts_connections(host, port):
        return None, None
    try:
        store = connect_store(host, port, timeout=timedelta(seconds=10))
        cycle = read_announcement(store)
    except dist.DistError:
        return None, None  # the store closed between the probe and the read
    if cycle is None or cycle.cycle_id == last_served:
        return None, None
    return store, cycle


def still_announced(host: str, port: int, cycle_id: str) -> bool:
    """Whether node 0 still holds this cycle open (its store closes when the cycle ends, however it ends)."""
    _, cycle = next_cycle(host, port, None)
    return cycle is not None and cycle.cycle_id == cycle_id


def wait_for_children(children: list[subprocess.Popen], cycle_open: Callable[[], bool]) -> list[int] | None:
    """The ranks' exit codes; None when node 0 ended the cycle while they still ran. A rank that outlives its
    cycle is stuck in a collective whose peer is gone (NCCL can wait its whole timeout for a dead peer), and
    would keep this node from the next cycle: it is stopped."""
    checked, misses = time.monotonic(), 0
    while any(child.poll() is None for child in children):
        if time.monotonic() - checked > CHECK_SECONDS:
            checked = time.monotonic()
            # Gone at several looks in a row: one failed connection may be the network, not the cycle's end.
            misses = 0 if cycle_open() else misses + 1
            if misses == CHECKS_BEFORE_STOPPING:
                stop_processes(children, grace_s=RANK_GRACE_SECONDS)
                return None
        time.sleep(0.2)
    return [child.returncode for child in children]


def serve_node(settings: Settings, node_rank: int) -> None:
    """Runs until stopped (a stop arrives as TrainingInterrupted from the signal handler)."""
    host, port = split_endpoint(settings.training.rendezvous_endpoint)
    try:
        socket.getaddrinfo(host, port)
    except OSError as error:
        # Said once, then waited on like an absent node 0: the name may resolve later (DNS, /etc/hosts).
        log.warning("node %d: training.rendezvous_endpoint %s does not resolve (%s); waiting anyway", node_rank,
                    host, error)
    last_served: str | None = None
    waiting_said = False
    children: list[subprocess.Popen] = []
    try:
        while True:
            store, cycle = next_cycle(host, port, last_served)
            if cycle is None:
                if not waiting_said:
                    log.info("node %d: waiting for node 0's next training at %s:%d", node_rank, host, port)
                    waiting_said = True
                time.sleep(POLL_SECONDS)
                continue
            last_served, waiting_said = cycle.cycle_id, False
            if node_rank >= cycle.nodes:
                log.error("node 0 trains run %d on %d node(s): --node-rank %d is not one of them (training.num_nodes "
                          "differs between the machines)", cycle.run, cycle.nodes, node_rank)
                continue
            if not claim_node(store, cycle, node_rank):
                log.error("run %d: another `codelupe-trainer join --node-rank %d` already took this node's place",
                          cycle.run, node_rank)
                continue
            first = node_rank * cycle.processes
            log.info("node %d: joining run %d (ranks %d-%d of %d)", node_rank, cycle.run, first,
                     first + cycle.processes - 1, cycle.world_size)
            children = start_ranks(cycle, host, port, node_rank, range(cycle.processes))
            store = None  # only node 0 keeps the store open
            codes = wait_for_children(children, lambda: still_announced(host, port, cycle.cycle_id))
            if codes is None:
                log.warning("node %d: node 0 ended run %d while this node's ranks still ran; they were stopped",
                            node_rank, cycle.run)
            elif any(codes):
                log.warning("node %d: run %d failed here (exit codes %s); node 0 reports the cycle's outcome",
                            node_rank, cycle.run, codes)
            else:
                log.info("node %d: run %d trained", node_rank, cycle.run)
    finally:
        stop_processes(children)

