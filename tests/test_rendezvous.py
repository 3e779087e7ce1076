"""The rendezvous on torch's real TCPStore: announcements, node claims, who is missing, rank results."""

from __future__ import annotations

import socket

import pytest

from codelupe_trainer.errors import TrainingError
from codelupe_trainer.training.rendezvous import (Cycle, accepts_connections, claim_node, connect_store, host_store,
                                                  read_announcement, report_rank_result, wait_for_ranks,
                                                  wait_for_results)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_cycle_is_announced_claimed_once_per_node_and_missing_nodes_are_named():
    port = free_port()
    assert not accepts_connections("127.0.0.1", port)
    cycle = Cycle.new(run=7, nodes=3, processes=2, device="cpu")
    store = host_store("127.0.0.1", port, cycle)
    assert accepts_connections("127.0.0.1", port)
    client = connect_store("127.0.0.1", port)
    assert read_announcement(client) == cycle and cycle.world_size == 6
    assert claim_node(client, cycle, 1) is True
    assert claim_node(client, cycle, 1) is False  # a second `join --node-rank 1` is refused
    # A later cycle in the same store has its own keys: node 1 may join it again.
    assert claim_node(client, Cycle.new(run=8, nodes=3, processes=2, device="cpu"), 1) is True
    with pytest.raises(TrainingError, match=r"node 2 did not join the training within 1 s: is "
                                            r"`codelupe-trainer join --node-rank 2` running"):
        wait_for_ranks(store, cycle, 1, lambda: None)
    del client, store


def test_rank_results_fail_the_cycle_with_the_ranks_reason_or_a_timeout():
    port = free_port()
    cycle = Cycle.new(run=1, nodes=2, processes=1, device="cpu")
    store = host_store("127.0.0.1", port, cycle)
    report_rank_result(connect_store("127.0.0.1", port), cycle, 1, None)
    wait_for_results(store, cycle, 1, lambda: None)  # every rank reported ok: returns

    failing = Cycle.new(run=2, nodes=2, processes=1, device="cpu")
    report_rank_result(store, failing, 1, "OSError: no such model")
    with pytest.raises(TrainingError, match=r"training rank 1 \(node 1\) failed: OSError: no such model"):
        wait_for_results(store, failing, 5, lambda: None)

    silent = Cycle.new(run=3, nodes=2, processes=1, device="cpu")
    with pytest.raises(TrainingError, match="training rank 1 did not finish within 1 s"):
        wait_for_results(store, silent, 1, lambda: None)
