"""Fault injection for the crash tests: `CODELUPE_FAULT=<phase>:<kill|oom|error>` makes the process die
(SIGKILL), raise a CUDA out-of-memory error, or raise a plain error when it reaches that phase.

Phases: fetch (first row read), tokenize (dataset built), train (first optimizer step), save (adapter
published, state not yet written), state (new state file written, not yet renamed into place), dedup (the
duplicate store's transaction written, not yet committed).
Unset in production, where each call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


class InjectedFault(RuntimeError):
    pass


def crash_point(phase: str) -> None:
    fault = os.environ.get("CODELUPE_FAULT")
    if not fault:
        return
    wanted, _, action = fault.partition(":")
    if wanted != phase:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {phase})")
    raise InjectedFault(f"injected fault at {phase}")
