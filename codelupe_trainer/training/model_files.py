"""Where the base model lives (a local directory or a hub id) and what its files and this machine's packages
allow (a tokenizer, the linear layers LoRA may target, flash-attn and Liger where a setting needs them),
checked without importing torch.

A hub id that is not in the local Hugging Face cache must be downloaded (~15 GB for the 7B, once); with no
reachable hub that fails in one line within seconds, instead of transformers' minute of retries.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import ModelSettings, is_local_model

HUB_PROBE_TIMEOUT_S = 5.0


def cached_hub_model(repo_id: str) -> str | None:
    """The local cache folder holding the model's config.json, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed id, an unreadable cache: treated as not cached
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def hub_reachable() -> tuple[bool, str]:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                               timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True, endpoint  # it answered
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return False, f"{endpoint} is unreachable ({reason})"
    return True, endpoint


def hub_model_problem(repo_id: str) -> str | None:
    """Why the hub will not give us model.base_model (a typo, a private model without a token, a gated one
    whose licence was not accepted), or None: it will, or the hub cannot tell now (an outage is retried).
    transformers says a typo only after the cycle began loading, as a multi-line OSError a cycle took for a bug."""
    from huggingface_hub import file_exists
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError

    try:
        if file_exists(repo_id, "config.json"):
            return None
    except GatedRepoError:  # before HfHubHTTPError, of which it is one
        return (f"model.base_model {repo_id!r} is a gated model on the Hugging Face hub: accept its terms on its page "
                "with your account and set HF_TOKEN (in secrets.env) to a token of that account")
    except HFValidationError:
        return (f"model.base_model {repo_id!r} is neither a local directory nor a hub id (owner/name): point it at "
                "the model's directory or write its hub id")
    except HfHubHTTPError as error:
        if getattr(getattr(error, "response", None), "status_code", None) == 401:  # what the hub answers a token it does not know
            return ("the Hugging Face hub refused HF_TOKEN (invalid credentials): set it in secrets.env to a valid "
                    f"token, or remove it for a public model such as {repo_id!r}")
        return None  # the hub erred: not the setting's fault; the cycle's download retries it
    except Exception:  # unreachable or timed out: the same
        return None
    return (f"model.base_model {repo_id!r} is not a model on the Hugging Face hub, or is a private one this machine "
            "has no token for (HF_TOKEN in secrets.env): check its spelling on huggingface.co")


# A tokenizer's own files, one set of which a model directory needs. Without any, transformers builds an
# empty tokenizer from config.json alone, without a word, and it reads every file of code as no tokens.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def check_model_path(base_model: str, probe_hub: bool = True) -> tuple[str, bool, str]:
    path = Path(base_model)
    if is_local_model(base_model):
        if not (path.expanduser() / "config.json").exists():
            return ("model", False, f"model.base_model {base_model!r} is not a directory with a config.json")
        if not any(all((path.expanduser() / name).exists() for name in names) for names in TOKENIZER_FILES):
            return ("model", False, f"model.base_model {base_model!r} has no tokenizer (tokenizer.json, or vocab.json "
                                    "and merges.txt): copy the tokenizer files of the model's hub repository into it")
        return ("model", True, f"local model at {path}")
    cached = cached_hub_model(base_model)
    if cached:
        return ("model", True, f"hub id {base_model!r}, in the local Hugging Face cache ({cached})")
    if not probe_hub:
        return ("model", True, f"hub id {base_model!r}, not in the local cache: the first run downloads it")
    reachable, detail = hub_reachable()
    if not reachable:
        return ("model", False, f"model.base_model {base_model!r} is not in the local Hugging Face cache and the hub "
                                f"cannot be reached: {detail}; download it on a connected machine or set a local directory")
    unknown = hub_model_problem(base_model)
    if unknown:
        return ("model", False, unknown)
    return ("model", True, f"hub id {base_model!r}, not in the local cache yet: the first run downloads it "
                           "(~15 GB for a 7B; set HF_TOKEN in secrets.env for a gated model)")


def model_folder(base_model: str) -> Path | None:
    """The folder holding the model's files on this machine: a local directory, or its hub cache snapshot."""
    local = Path(base_model).expanduser()
    if is_local_model(base_model):
        return local if (local / "config.json").exists() else None
    cached = cached_hub_model(base_model)
    return Path(cached) if cached else None


def base_model_config(base_model: str) -> dict | None:
    """The base model's config.json where it is on this machine (a local directory or the hub cache)."""
    folder = model_folder(base_model)
    if folder is None:
        return None
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def linear_module_names(base_model: str) -> set[str] | None:
    """The names (last part) of the model's linear layers, read from its safetensors headers: what
    model.target_modules may name. None where the weights are not on this machine (yet) or not safetensors."""
    folder = model_folder(base_model)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    names: set[str] = set()
    for file in files:
        try:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if size > 100_000_000:  # not a safetensors header: a damaged file
                    return None
                header = json.loads(handle.read(size))
        except (OSError, ValueError):
            return None
        for key, entry in header.items():
            if key.endswith(".weight") and isinstance(entry, dict) and len(entry.get("shape", ())) == 2:
                names.add(key.removesuffix(".weight").rsplit(".", 1)[-1])
    return names or None


def target_modules_check(base_model: str, target_modules: list[str]) -> tuple[bool | None, str] | None:
    """(False, why) when model.target_modules names none of the model's linear layers (peft refuses the
    model, every cycle), (None, which) when it names some that the model lacks (peft leaves them out without
    a word), (True, ...) when all are there; None when the weights cannot be read here."""
    names = linear_module_names(base_model)
    if names is None:
        return None
    missing = [name for name in target_modules if name not in names]
    layers = ", ".join(sorted(names - {"lm_head", "embed_tokens"}))
    if len(missing) == len(target_modules):
        return (False, f"model.target_modules = {target_modules} names no linear layer of model.base_model "
                       f"{base_model!r}; its layers are: {layers}")
    if missing:
        return (None, f"model.target_modules: {', '.join(missing)} not in model.base_model {base_model!r}: LoRA "
                      f"goes on the other {len(target_modules) - len(missing)} only (its layers are: {layers})")
    return (True, f"all {len(target_modules)} in the model")


def package_problems(attn_implementation: str, loss: str) -> list[str]:
    """Settings that need a package this machine lacks: transformers would fail every cycle on them after the
    model's weights were read (a traceback each time). flash_attention_2 needs flash-attn; the fused loss
    needs Liger-Kernel (both CUDA-only: the load says so on a machine without CUDA)."""
    import importlib.util

    problems = []
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation = \"flash_attention_2\" needs the flash-attn package, which is not "
                        "installed: `pip install flash-attn --no-build-isolation` on the GPU box, or use \"sdpa\" (the "
                        "default; packing keeps samples apart with either)")
    if loss == "fused" and importlib.util.find_spec("liger_kernel") is None:
        problems.append("training.loss = \"fused\" needs Liger-Kernel, which is not installed: `pip install \".[gpu]\"` "
                        "on the GPU box, or use \"auto\" (fused where Liger is installed on CUDA, else chunked)")
    return problems


def model_problems(model: ModelSettings, loss: str, probe_hub: bool = True) -> list[str]:
    """What would fail every cycle once the model had loaded (or before): no model where the setting says,
    target_modules naming none of its layers, a package a setting needs. The cycle and `run`/`join`'s
    start-up ask this; `doctor` shows each check as a line of its own."""
    _, found, detail = check_model_path(model.base_model, probe_hub=probe_hub)
    if not found:
        return [detail]
    problems = []
    targets = target_modules_check(model.base_model, model.target_modules)
    if targets is not None and targets[0] is False:
        problems.append(targets[1])
    return problems + package_problems(model.attn_implementation, loss)


def downloaded_bytes(repo_id: str, cache_dir: str | Path | None = None) -> int:
    """Bytes of the model's files in the local hub cache, partial downloads included (both the HTTP and the
    Xet download write into `blobs/<etag>.<id>.incomplete` there)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    total = 0
    try:
        for entry in os.scandir(blobs):
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue  # renamed from .incomplete to its final name between the listing and the stat
    except OSError:
        return 0
    return total


@contextmanager
def watching_download(repo_id: str, on_growth: Callable[[int], None], interval_s: float,
                      cache_dir: str | Path | None = None) -> Iterator[None]:
    """While the block runs (a model load that may download), call on_growth(bytes) each time the model's
    bytes in the cache have grown since the last look: a download that moves is progress, one that stalls
    is not."""
    done = threading.Event()

    def watch() -> None:
        seen = downloaded_bytes(repo_id, cache_dir)
        while not done.wait(interval_s):
            now = downloaded_bytes(repo_id, cache_dir)
            if now > seen:
                seen = now
                on_growth(now)

    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
