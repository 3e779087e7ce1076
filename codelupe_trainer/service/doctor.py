"""`codelupe-trainer doctor`: every start-up precondition checked, each with a one-line verdict."""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import socket
import stat
import sys
from pathlib import Path

from ..config import Settings, wandb_directory
from ..data.filters import DEDUP_STORE_FILE, store_problem
from ..data.source import (SourceError, check_table, count_new_samples, describe_ineligible, first_watermark,
                           id_index_problem, ids_behind_watermark, ineligible_new_rows, open_connection,
                           watermark_mismatch)
from ..metrics import check_wandb_key, effective_wandb_mode, nvidia_gpu_names
from ..errors import StateError
from ..state import TrainerState, in_service_adapter, load_state
from ..training.adapter_fit import in_service_misfit
from ..training.disk import MB, nearest_existing, space_needed, space_problem
from ..training.gpu_check import cuda_checks, self_check
from ..training.model_files import check_model_path, model_problems, package_problems, target_modules_check
from ..training.rendezvous import split_endpoint


def run_checks(settings: Settings) -> list[tuple[str, bool | None, str]]:
    """(name, ok, detail) per check; ok None is a warning: it works, but not as it should (`doctor` exits 0)."""
    results: list[tuple[str, bool, str]] = [("config", True, settings.config_source() + (
        " loaded and valid" if settings.config_file else ""))]
    try:
        with open_connection(settings.database) as connection:
            results.append(("database", True, "reachable"))
            check_table(connection, settings.database)
            results.append(("table", True, f"{settings.database.table} has the configured columns"))
            slow = id_index_problem(connection, settings.database)
            results.append(("index", None, slow) if slow else
                           ("index", True, f"{settings.database.id_column} is indexed: new rows are found by a range scan"))
            try:
                state = load_state(settings.paths.state_file)
            except (OSError, StateError):
                state = None  # the state line says why
            other_table = None
            if state is not None and state.last_trained_id:
                other_table = watermark_mismatch(connection, settings.database, state.watermark_rows,
                                                 state.last_trained_id)
                behind = None if other_table else ids_behind_watermark(connection, settings.database,
                                                                       state.last_trained_id)
                if other_table:
                    results.append(("watermark", False, other_table))
                elif behind:
                    results.append(("watermark", None, behind))
            if state is not None and not other_table:
                results.append(check_new_rows(connection, settings, state))
    except SourceError as error:
        results.append(("database", False, str(error)))
    results.append(check_model_path(settings.model.base_model))
    targets = target_modules_check(settings.model.base_model, settings.model.target_modules)
    if targets is not None:
        results.append(("target_modules", *targets))
    for problem in package_problems(settings.model.attn_implementation, settings.training.loss):
        results.append(("packages", False, problem))
    results.append(check_state(settings))
    results.append(check_store(settings))
    results.append(check_adapter(settings))
    results.append(check_writable("output_dir", settings.paths.output_dir))
    results.append(check_writable("state_dir", settings.paths.state_file.parent))
    results.append(check_disk(settings))
    results.append(check_wandb(settings))
    if results[-1][1] and effective_wandb_mode(settings.wandb.mode, settings.wandb.enabled, warn=False) == "online":
        accepted, detail = check_wandb_key(min(settings.wandb.init_timeout_s, 15.0))
        results[-1] = ("wandb", accepted, f"{results[-1][2]}; {detail}")
    if settings.training.num_nodes > 1:
        results.append(check_rendezvous(settings.training.rendezvous_endpoint, settings.training.num_nodes))
    results.append(check_torch())
    if "torch" in sys.modules:  # it imported (a failed import leaves no module): the estimate can run
        results += self_check(settings)
    return results


def check_new_rows(connection, settings: Settings, state: TrainerState) -> tuple[str, bool | None, str]:
    """How many eligible rows wait past the watermark, and why the others do not count: a warning when rows are
    there and none is eligible (the daemon would wait for ever, every check above passing)."""
    after = state.last_trained_id
    if state.total_training_runs == 0 and state.last_trained_id == 0:  # where the first cycle starts
        after = first_watermark(connection, settings.database)
    wanted = settings.schedule.min_new_samples
    available = count_new_samples(connection, settings.database, settings.data, after, state.gap_ranges(),
                                  up_to=wanted)
    why = describe_ineligible(ineligible_new_rows(connection, settings.database, settings.data, after),
                              settings.data, after)
    detail = (f"{'at least ' if available >= wanted else ''}{available:,} eligible new rows past id {after:,} "
              f"(a cycle trains from schedule.min_new_samples = {wanted:,})" + (f"; {why}" if why else ""))
    return "rows", None if available == 0 and why else True, detail


def check_state(settings: Settings) -> tuple[str, bool, str]:
    """Whether the state file can be used: every cycle reads it first."""
    path = settings.paths.state_file
    try:
        state = load_state(path)
    except StateError as error:
        return ("state", False, str(error))
    except OSError as error:
        return ("state", False, f"{path} cannot be read: {error.strerror or error}" + ownership_hint(path, path.parent))
    if not path.exists():
        return ("state", True, f"{path} does not exist yet: the first run starts at the table's first row")
    return ("state", True, f"{path}: {state.total_training_runs} runs, rows up to id {state.last_trained_id} consumed")


def check_store(settings: Settings, every_page: bool = True) -> tuple[str, bool | None, str]:
    """Whether the duplicate store beside the state can be used; a warning where it is gone after runs.
    `every_page` False: the start-up's quick look (the file is SQLite), not `doctor`'s full read."""
    path = settings.paths.state_file.parent / DEDUP_STORE_FILE
    problem = store_problem(path, every_page)
    if problem:
        return ("store", False, problem)
    if not path.exists():
        try:
            runs = load_state(settings.paths.state_file).total_training_runs
        except (OSError, StateError):
            runs = 0  # the state line says why
        if runs:
            return ("store", None, f"{path} is gone after {runs} runs: the next run chooses the holdout again, and "
                                   "copies of code trained before can be trained again; restore it if it was moved")
        return ("store", True, f"{path} does not exist yet: the first run creates it")
    return ("store", True, f"{path} can be read")


def state_problems(settings: Settings) -> list[str]:
    """An unusable state file or duplicate store: `run` and `run-once` refuse to start on them (every cycle
    would fail on them)."""
    return [detail for _, ok, detail in (check_state(settings), check_store(settings, every_page=False))
            if ok is False]


def check_adapter(settings: Settings) -> tuple[str, bool, str]:
    """The adapter the next run continues from, and whether today's model settings can continue it."""
    try:
        state = load_state(settings.paths.state_file)
    except (OSError, StateError) as error:  # the `state` line says what is wrong
        return ("adapter", None, f"not checked: the state cannot be read ({type(error).__name__}; the `state` line "
                                 "says why), so neither can its adapter")
    adapter = in_service_adapter(state)
    if adapter is None:
        return ("adapter", True, f"{state.latest_adapter} is missing: the next run starts a new LoRA"
                if state.latest_adapter else "none in service yet: the next run starts a new LoRA")
    misfit = in_service_misfit(adapter, settings.model)
    if misfit:
        return ("adapter", False, misfit)
    return ("adapter", True, f"the next run continues {adapter}")


def check_torch() -> tuple[str, bool, str]:
    """Which torch build this is, and whether it can use the GPUs the driver sees: a CPU-only wheel on a GPU
    box (what a plain `pip install torch` can pick) would train a 7B on the CPU."""
    try:
        import torch
    except Exception as error:  # ImportError, or OSError from a CUDA library the wheel cannot find
        return ("torch", False, f"torch cannot be imported ({type(error).__name__}: {error}); install the torch "
                "build for this machine (README: Install)")
    problem = unusable_gpus(nvidia_gpu_names(), torch.cuda.is_available(), torch.__version__, torch.version.cuda)
    if problem:
        return ("torch", False, problem)
    return ("torch", True, f"torch {torch.__version__}, " + (f"CUDA {torch.version.cuda}" if torch.version.cuda
                                                             else "a CPU build"))


def unusable_gpus(gpu_names: list[str], cuda_available: bool, torch_version: str, torch_cuda: str | None) -> str | None:
    """The problem when the driver sees NVIDIA GPUs that torch cannot use, else None."""
    if cuda_available or not gpu_names:
        return None
    why = ("a CPU-only build" if torch_cuda is None
           else f"built for CUDA {torch_cuda}: the NVIDIA driver may be older than that build needs")
    return (f"this machine has {len(gpu_names)} NVIDIA GPU(s) ({gpu_names[0]}) that torch {torch_version} cannot "
            f"use ({why}); every cycle would train on the CPU. Install torch's CUDA build (README: On the GPU box)")


def check_rendezvous(endpoint: str, nodes: int) -> tuple[str, bool, str]:
    """Node 0's side of a multi-node group: the endpoint's host must be this machine, as the others will
    reach it (a typo here would only show as every cycle timing out)."""
    host, port = split_endpoint(endpoint)
    addresses = resolved_addresses(host, port)
    if isinstance(addresses, OSError):
        return ("rendezvous", False, f"training.rendezvous_endpoint: {host!r} does not resolve ({addresses})")
    local = [address for address in addresses if can_bind(address)]
    if not local:
        return ("rendezvous", False, not_this_machine(host, addresses))
    loopback = all(ipaddress.ip_address(address).is_loopback for address in local)
    return ("rendezvous", True, f"{host}:{port} is this machine" + (" (loopback: no other machine can reach it)"
            if loopback else "") + f"; on each other machine run `codelupe-trainer join --node-rank K` for K in "
            f"1..{nodes - 1}")


def resolved_addresses(host: str, port: int) -> set[str] | OSError:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as error:
        return error


def not_this_machine(host: str, addresses: set[str]) -> str:
    return (f"training.rendezvous_endpoint: {host} ({', '.join(sorted(addresses))}) is not an address of this "
            "machine; it must name node 0, where the daemon runs")


def port_taken(host: str, port: int) -> str | None:
    """Why the daemon could not listen on host:port (in use, not an address of this machine), or None."""
    addresses = resolved_addresses(host, port)
    if isinstance(addresses, OSError):
        return f"{host} does not resolve: {addresses.strerror or addresses}"
    return next((why for address in sorted(addresses) if (why := bind_error(address, port))), None)


def bind_error(address: str, port: int = 0) -> str | None:
    """Why this machine cannot listen on address:port (not one of its addresses, the port in use), or None."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
        try:
            probe.bind((address, port))
        except OSError as error:
            return error.strerror or str(error)
    return None


def can_bind(address: str) -> bool:
    return bind_error(address) is None


def startup_problems(settings: Settings) -> tuple[list[str], list[str]]:
    """(problems no retry can fix: a missing model directory, a missing table or column; warnings: what works
    but not as it should, such as a table without an index on its id, said once at start).

    An unreachable database is not among the problems: the daemon retries it with backoff.
    """
    problems, warnings = settings_problems(settings)
    problems += gpu_problems()
    if settings.service.metrics_port:
        taken = port_taken(settings.service.metrics_host, settings.service.metrics_port)
        if taken:
            problems.append(f"service.metrics_port: {settings.service.metrics_host}:{settings.service.metrics_port} "
                            f"cannot be served ({taken}): choose a free port (or 0 for no endpoint), or another "
                            "service.metrics_host")
    return problems, warnings


def settings_problems(settings: Settings) -> tuple[list[str], list[str]]:
    """What the settings themselves get wrong, checked at start and again when a running daemon reloads its
    config (which must not swap working settings for ones every cycle would fail on). Not the machine's GPU
    nor the endpoint's port: neither changes under a running daemon."""
    problems = (unwritable_paths(settings) + state_problems(settings) + adapter_problems(settings)
                + model_problems(settings.model, settings.training.loss, probe_hub=False))
    warnings: list[str] = []
    try:
        with open_connection(settings.database) as connection:
            check_table(connection, settings.database)
            slow = id_index_problem(connection, settings.database)
            warnings += [slow] if slow else []
            other_table = another_table(connection, settings)
            problems += [other_table] if other_table else []
    except SourceError as error:
        if not str(error).startswith("cannot connect"):
            problems.append(str(error))
    if settings.training.num_nodes > 1:
        host, port = split_endpoint(settings.training.rendezvous_endpoint)
        addresses = resolved_addresses(host, port)
        # A name that does not resolve may be DNS being down (retried like the database); one that resolves
        # to another machine would time out every cycle.
        if not isinstance(addresses, OSError) and not any(can_bind(address) for address in addresses):
            problems.append(not_this_machine(host, addresses))
    _, wandb_ok, wandb_detail = check_wandb(settings)
    if wandb_ok is None:  # said once at start; each cycle's own warning follows in the journal
        warnings.append(f"wandb: {wandb_detail}")
    return problems, warnings


def another_table(connection, settings: Settings) -> str | None:
    """Whether the configured table is another than the one the state's watermark counts rows of (an edited
    database.url or table: at start and at a reload, refused before any cycle reads it)."""
    try:
        state = load_state(settings.paths.state_file)
    except (OSError, StateError):
        return None  # said by the state's own check
    return watermark_mismatch(connection, settings.database, state.watermark_rows, state.last_trained_id)


def unwritable_paths(settings: Settings) -> list[str]:
    """Where the state and the adapters go, when they cannot be written there: every cycle would fail on it
    (and the daemon could not even say what it is doing), so `run` and `run-once` refuse to start instead."""
    return [f"{setting}: {detail}" for setting, (_, ok, detail) in (
        ("paths.state_file", check_writable("state_dir", settings.paths.state_file.parent)),
        ("paths.output_dir", check_writable("output_dir", settings.paths.output_dir))) if not ok]


def adapter_problems(settings: Settings) -> list[str]:
    """Model settings the adapter in service cannot be continued with: every cycle would fail on them."""
    _, fits, detail = check_adapter(settings)
    return [detail] if fits is False else []


def model_and_gpu_problems(settings: Settings) -> list[str]:
    """What every training machine needs, node 0 or another (`join` checks these too): the base model where
    the settings say, and a GPU its torch build can use."""
    # A hub id that is not cached is not fatal here: the network may come back; each cycle says so.
    return model_problems(settings.model, settings.training.loss, probe_hub=False) + gpu_problems()


def gpu_problems() -> list[str]:
    """On a CUDA machine: a torch build without kernels for the card, no bf16, or a broken 4-bit matmul would
    fail every cycle the same way; refuse to start instead (memory is only warned about: the OOM back-off
    copes).

    Checked in a short-lived child process: the daemon and `join` live for months, and a CUDA context once
    made stays with its process until it exits (GPU memory every cycle's training would lack, on a card the
    shipped settings nearly fill), as does torch's host memory (~0.5 GB). A plain subprocess, not
    multiprocessing: that would leave its resource tracker running beside `join` for good."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("torch") is None:
        return ["torch is not installed: install the torch build for this machine first (README: Install)"]
    code = "import json; from codelupe_trainer.service.doctor import gpu_problems_here; print(json.dumps(gpu_problems_here()))"
    # The child imports this package from where this process did, however it was started.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    checked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if checked.returncode != 0:
        last = (checked.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"the GPU self-check's process failed (exit {checked.returncode}: {last}); "
                "`codelupe-trainer doctor` runs the same checks and shows where"]
    return json.loads(checked.stdout.strip().splitlines()[-1])


def gpu_problems_here() -> list[str]:
    """gpu_problems' checks, in this process: doctor's torch line, then the CUDA checks."""
    _, usable, detail = check_torch()
    if not usable:
        return [detail]
    import torch

    if not torch.cuda.is_available():
        return []
    return [detail for name, ok, detail in cuda_checks(None) if not ok and name in ("gpu", "bf16", "4-bit")]


def foreign_entries(directory: Path) -> list[Path]:
    """What the daemon rewrites or prunes there (the state, the stores, the adapters, the model cache) but
    this user cannot write: what a `run-once` run as root leaves behind for the service's user."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    # Not judged: a mount point's lost+found, and hidden entries other than our staging folders (a home
    # directory's .cache when the state lives in one).
    return [entry for entry in entries if entry.name != "lost+found"
            and (not entry.name.startswith(".") or entry.name.startswith(".staging-"))
            and not entry.is_symlink() and not os.access(entry, os.W_OK, follow_symlinks=False)]


def ownership_hint(path: Path, directory: Path) -> str:
    """", owned by root: left by a command run as root? `sudo chown -R ...`" where another user owns `path`."""
    try:
        owner = path.lstat().st_uid
    except OSError:
        return ""
    if owner == os.geteuid():
        return ""
    return (f", owned by {user_name(owner)}: left by a command run as {user_name(owner)}? "
            f"`sudo chown -R {user_name(os.geteuid())}: {directory}`")


def not_permitted(path: str | None, command: str) -> str:
    """A command run by a user the service's files do not admit (a person on the box, not the `codelupe`
    user the service runs as), in one line: whose the file is, and how to run the command as them."""
    if path is None:
        return f"permission denied: run `codelupe-trainer {command}` as the user the service runs as"
    existing = nearest_existing(Path(path))  # a file to be created: the folder that refused it
    try:
        status = existing.stat()
    except OSError:
        return f"{path}: permission denied"
    owner, mode = user_name(status.st_uid), stat.filemode(status.st_mode)
    try:
        group = grp.getgrgid(status.st_gid).gr_name
    except KeyError:
        group = str(status.st_gid)
    how = "with sudo" if owner == "root" else f"as {owner} (`sudo -u {owner} codelupe-trainer {command} ...`)"
    if owner != "root" and command in ("status", "adapters", "doctor"):  # reading is enough: the group may
        how += f" or as a member of group {group}"
    whose = f"{owner}:{group} {mode}" if str(existing) == str(path) else f"{existing} is {owner}:{group} {mode}"
    return f"{path}: permission denied ({whose}): run `codelupe-trainer {command}` {how}"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_disk(settings: Settings) -> tuple[str, bool, str]:
    """Room to save a run (a cycle checks the same before it trains)."""
    problem = space_problem(settings)
    if problem:
        return ("disk", False, problem)
    needed = ", ".join(f"up to {size / MB:,.0f} MB under {directory}" for directory, size in space_needed(settings).items())
    return ("disk", True, f"room for a run, which writes {needed}")


def check_wandb(settings: Settings) -> tuple[str, bool | None, str]:
    """The mode W&B will run in, and a warning when it could not start: W&B never fails a run, so an
    unwritable `wandb.dir` would only show as one warning per cycle while every run's metrics miss W&B."""
    mode = effective_wandb_mode(settings.wandb.mode, settings.wandb.enabled, warn=False)  # its own line says it
    detail = f"mode {mode}" + (" (no API key: falls back to offline)" if mode != settings.wandb.mode and mode == "offline" else "")
    if mode == "disabled":
        return ("wandb", True, detail)
    _, writable, why = check_writable("wandb", wandb_directory(settings))
    if not writable:
        return ("wandb", None, f"{detail}, but wandb.dir: {why}: W&B cannot start, so each run's metrics go to "
                               "metrics.jsonl only")
    return ("wandb", True, detail)


def check_writable(name: str, directory: Path) -> tuple[str, bool, str]:
    """Whether the daemon could write there, judged without creating anything (doctor may run as root)."""
    existing = nearest_existing(directory)
    if not existing.is_dir():
        return (name, False, f"{directory} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        return (name, False, f"{existing} is not writable by this user ({user_name(os.geteuid())})"
                             + ownership_hint(existing, existing))
    foreign = foreign_entries(directory) if existing == directory else []
    if foreign:
        return (name, False, f"{directory} holds {len(foreign)} file(s) this user ({user_name(os.geteuid())}) cannot "
                             f"write, such as {foreign[0].name}" + ownership_hint(foreign[0], directory))
    free_gb = os.statvfs(existing).f_bavail * os.statvfs(existing).f_frsize / 1e9
    if existing != directory:
        return (name, True, f"{directory} does not exist yet; it will be created in {existing} ({free_gb:.1f} GB free)")
    return (name, True, f"{directory} writable, {free_gb:.1f} GB free")
