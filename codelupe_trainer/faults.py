"""Fault injection for the crash tests: `CODELUPE_FAULT=<phase>:<action>` acts when the process reaches that phase.

Actions: kill (SIGKILL), pause (wait, interruptibly, for a test's signal), wait=<file> (go on once the file
exists), hang (ignore SIGTERM and never return, like a CUDA hang), oom (raise a CUDA out-of-memory error),
error (raise a plain error).
Phases: startup (`run` and `join`, before their start-up checks), cycle-start (a daemon's cycle process, before
its stop handler), fetch (first row read), tokenize (dataset
built), load (model load begins), train (first optimizer step), eval (first evaluation batch), publish (trained and evaluated, nothing written yet), save (adapter
published, state not yet written), state (new state file written, not yet renamed into place), dedup (the
duplicate store's transaction written, not yet committed), hand-off (a promotion's state and store written,
on_promote not run yet), teardown (the cycle has ended, published or not: its rank group and W&B run not yet
closed), rank-teardown (a training rank above 0 ends: its result reported, its process group not yet torn
down).
`oom-above:<rows>` and `diverge` are faults of their own (below). Unset in production, where each call is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal


class InjectedFault(RuntimeError):
    pass


def memory_fault(rows: int) -> None:
    """`CODELUPE_FAULT=oom-above:<rows>`: a forward pass over more rows than that raises CUDA's out-of-memory
    error, as a GPU too small for the micro-batch would (on any device, so the back-off is tested on CPU)."""
    fault = os.environ.get("CODELUPE_FAULT")
    if fault and fault.startswith("oom-above:") and rows > int(fault.partition(":")[2]):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected: micro-batch {rows} rows)")


def divergence_fault(model) -> None:
    """`CODELUPE_FAULT=diverge`: after training, each rank shifts its trainable weights by its own rank's
    amount, as ranks whose gradients were never averaged end up (rank 0 is left as it is)."""
    if os.environ.get("CODELUPE_FAULT") != "diverge":
        return
    import torch
    import torch.distributed as dist

    shift = 1e-3 * (dist.get_rank() if dist.is_initialized() else 0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(shift)


def crash_point(phase: str) -> None:
    fault = os.environ.get("CODELUPE_FAULT")
    if not fault:
        return
    wanted, _, action = fault.partition(":")
    if wanted != phase:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "pause":  # wait here, in Python (a signal handler runs), for a test to send a signal
        import sys
        import time

        print(f"codelupe-fault: paused at {phase}", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.1)
    if action.startswith("wait="):  # wait here until the named file exists: a test changes the world meanwhile
        import sys
        import time
        from pathlib import Path

        print(f"codelupe-fault: waiting at {phase}", file=sys.stderr, flush=True)
        while not Path(action.removeprefix("wait=")).exists():
            time.sleep(0.05)
        return
    if action == "hang":  # a cycle stuck where no signal handler runs (a CUDA hang, a dead socket)
        import sys
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"codelupe-fault: hanging at {phase}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {phase})")
    raise InjectedFault(f"injected fault at {phase}")
