"""Settings: the TOML file, overridden by CODELUPE_<SECTION>__<KEY> environment variables.

Every section rejects unknown keys, and every error is reported as one line naming the key.
Secrets (the database URL's password, WANDB_API_KEY) are never part of any rendering of the settings.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

DEFAULT_CONFIG_PATH = Path("config/codelupe.toml")
SECRET_FIELD_NAMES = {"url"}


class ConfigError(Exception):
    """A configuration problem, always a single line that names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatabaseSettings(Section):
    url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/postgres"),
        description="libpq connection URL; a password in it is never printed.",
    )
    table: str = Field("processed_files", description="Table the crawler fills; only read, never written.")
    id_column: str = "id"
    content_column: str = "content"
    language_column: str = "language"
    quality_column: str = "quality_score"
    connect_timeout_s: int = Field(10, ge=1, description="Seconds before a connection attempt gives up.")
    statement_timeout_s: float = Field(
        300.0, gt=0, description="A query running longer (a locked table, a stuck server) fails the cycle clearly.")
    page_size: int = Field(5000, ge=1, description="Rows per keyset page while fetching.")
    max_commit_lag_minutes: float = Field(
        60.0,
        ge=0,
        description="How long a gap in ids below the watermark is watched for a late-committing row.",
    )

    @field_validator("url")
    @classmethod
    def _read_alike_by_libpq(cls, url: SecretStr) -> SecretStr:
        problem = url_ambiguity(url.get_secret_value()) or keyword_dsn_problem(url.get_secret_value())
        if problem:
            raise ValueError(problem)
        return url


class ScheduleSettings(Section):
    interval_minutes: float = Field(5.0, gt=0)
    min_new_samples: int = Field(1000, ge=1)
    misfire_grace_minutes: float = Field(5.0, gt=0)


class DataSettings(Section):
    min_quality: float = Field(
        70, ge=0, le=100, description="Rows scored below this are skipped; on the crawler's scale (0-100 as "
        "shipped; 0.7 for a scorer of 0-1).")
    min_chars: int = Field(50, ge=1)
    max_chars: int = Field(8000, ge=1)
    languages: list[str] = Field(default_factory=list, description="Empty means every language.")
    max_samples_per_run: int = Field(100_000, ge=1)
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_eval_samples: int = Field(
        500, ge=1, description="Cap on each run's evaluation split (evaluated before and after training); the rest "
        "of the eval_fraction share trains, so two evaluations never dominate a short cycle.")
    max_length: int = Field(2048, ge=8)
    seed: int = 42
    format: Literal["raw", "completion"] = "raw"
    block_secrets: bool = True
    block_license: bool = True
    blocked_licenses: list[str] = Field(
        default_factory=lambda: ["GPL", "AGPL", "LGPL"],
        description="Licence families blocked by SPDX identifier or header text.",
    )
    block_malicious: bool = True
    malicious_patterns: list[str] = Field(default_factory=list, description="Extra regexes, added to the defaults.")
    block_duplicates: bool = True
    block_near_duplicates: bool = Field(
        True, description="Block samples whose 5-token shingles overlap a trained sample's (MinHash LSH).")
    near_duplicate_threshold: float = Field(
        0.7, gt=0.0, lt=1.0, description="Jaccard similarity at which a sample counts as a near-duplicate "
        "(BigCode's value for The Stack).")

    @field_validator("malicious_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        # Each is matched as one alternative, (?:pattern), beside the defaults: a pattern that does not compile
        # would fail every cycle in the filters, and one that unbalances the group would change the others.
        for pattern in patterns:
            try:
                re.compile(f"(?:{pattern})", re.IGNORECASE)
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a regular expression Python's re can use ({error})") from None
            if pattern == "" or re.fullmatch(f"(?:{pattern})", ""):
                raise ValueError(f"{pattern!r} matches empty text, so it would block every sample")
        return patterns


def is_local_model(base_model: str) -> bool:
    """A local directory rather than a hub id (which has no leading ./ ~ and names no existing path)."""
    return base_model.startswith((".", "/", "~")) or Path(base_model).expanduser().exists()


class ModelSettings(Section):
    base_model: str = "Qwen/Qwen2.5-Coder-7B-Instruct"
    quantization: Literal["auto", "4bit", "8bit", "none"] = "auto"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        # Empty, peft would fail each cycle after the 7B had loaded ("Target modules set() not found").
        min_length=1,
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    packing: Literal["auto", "position_ids", "length_grouped"] = Field(
        "auto",
        description="auto: pack samples with restarting position ids if a probe shows the attention backend keeps "
        "them apart, else one sample per row in length-grouped batches.",
    )
    frozen_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="On CUDA with a quantized base: the dtype of the frozen weights quantization leaves unquantized "
        "(embeddings, LM head, norms). float32 as peft's k-bit preparation casts them; bfloat16 as the model was "
        "trained and is served: ~2.2 GB less on the 7B, and no cast of the LM head on every forward.",
    )

    # A local directory written as `~/models/coder-7b` is that directory (transformers would take it for a hub id).
    @field_validator("base_model")
    @classmethod
    def _expand_home(cls, name: str) -> str:
        return os.path.expanduser(name) if name.startswith("~") else name

    @property
    def is_local(self) -> bool:
        return is_local_model(self.base_model)

    @property
    def public_name(self) -> str:
        """The model's name where it leaves the machine (W&B): a hub id as it is, a local directory by its last
        folder only (its path can name a user, a host or a project)."""
        if not self.is_local:
            return self.base_model
        return "local:" + (Path(self.base_model).expanduser().name or "model")

    def quantization_on(self, device: str) -> str:
        """What `quantization` means on that device: auto is 4-bit NF4 on CUDA and none elsewhere."""
        if self.quantization == "auto":
            return "4bit" if device == "cuda" else "none"
        return self.quantization


class TrainingSettings(Section):
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, ge=1.0, description="Passes over each cycle's new data; at least 1, or rows would be "
                          "recorded as trained that no step saw.")
    max_steps: int = Field(-1, ge=-1)
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(0, ge=0, description="0 evaluates once, at the end of the run.")
    gradient_checkpointing: bool = True
    max_grad_norm: float = Field(1.0, ge=0.0)
    num_processes: int = Field(
        1, ge=1, le=64, description="Training processes (one per GPU) on each machine: DDP through the Trainer, rank 0 "
        "does everything else. The effective batch becomes batch_size x gradient_accumulation_steps x num_processes "
        "x num_nodes.")
    num_nodes: int = Field(
        1, ge=1, le=64, description="Machines training together: this one (node 0, running the daemon) and "
        "num_nodes - 1 others running `codelupe-trainer join --node-rank K`.")
    rendezvous_endpoint: str = Field(
        "", description="host:port of this machine as the other nodes reach it (rank 0 listens on the port); "
        "required when num_nodes > 1. Empty: a free port on 127.0.0.1.")
    rendezvous_timeout_s: int = Field(300, ge=5, description="How long a cycle waits for every rank to start (and "
                                      "to finish after rank 0) before it fails.")
    loss: Literal["auto", "fused", "chunked", "standard"] = Field(
        "auto",
        description="How the loss avoids vocabulary-sized fp32 logits: fused (Liger-Kernel, CUDA), chunked (pure "
        "PyTorch), standard (the model's own). auto: fused where liger_kernel is installed on CUDA and has kernels for the model's type, else chunked.",
    )


    @property
    def world_size(self) -> int:
        """Training ranks in all: each takes its share of a cycle's blocks."""
        return self.num_processes * self.num_nodes

    @property
    def block_budget(self) -> int | None:
        """How many training blocks one epoch may hold so that `max_steps` trains all of them (None: no step
        budget, training runs by epochs)."""
        if self.max_steps <= 0:
            return None
        return self.max_steps * self.batch_size * self.gradient_accumulation_steps * self.world_size

    @field_validator("rendezvous_endpoint")
    @classmethod
    def _host_and_port(cls, endpoint: str) -> str:
        if endpoint:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("expected host:port")
        return endpoint

    @model_validator(mode="after")
    def _nodes_need_an_endpoint(self) -> TrainingSettings:
        if self.num_nodes > 1 and not self.rendezvous_endpoint:
            raise ValueError("num_nodes > 1 needs training.rendezvous_endpoint (host:port of this machine as the other "
                             "nodes reach it)")
        return self


class MetricsSettings(Section):
    system_every_steps: int = Field(10, ge=0, description="0 turns system metrics off.")
    gradient_metrics_every_steps: int = Field(10, ge=0, description="0 turns gradient and weight metrics off.")
    per_layer_sample: int = Field(8, ge=0, le=64, description="How many layers get their own gradient/weight keys.")
    queue_size: int = Field(10_000, ge=10)
    gpu_peak_tflops: float = Field(0.0, ge=0, description="Dense bf16 peak of one accelerator, for performance/mfu_percent;"
                                   " 0 = from the card's name (known NVIDIA cards), else not reported.")


class WandbSettings(Section):
    enabled: bool = True
    project: str = "codelupe-qwen-training"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: Path | None = Field(None, description="Where W&B writes its run folders; default: beside the state file.")
    group: str = Field("codelupe-continuous", description="All runs of one daemon share this W&B group.")
    init_timeout_s: float = Field(30.0, gt=0)
    finish_timeout_s: float = Field(30.0, gt=0)
    keep_offline_days: float = Field(14.0, gt=0, description="Offline run folders older than this (or synced) are removed.")

    @field_validator("dir")
    @classmethod
    def _expand_home(cls, path: Path | None) -> Path | None:  # `~/wandb` is in the home directory
        return path.expanduser() if path is not None else None


class PathsSettings(Section):
    state_file: Path = Path("var/state.json")
    output_dir: Path = Path("var/adapters")
    keep_adapters: int = Field(5, ge=1)

    # `~/codelupe/state.json` means the home directory, as in a shell, not a folder named `~` in the
    # working directory (the service's is /var/lib/codelupe-trainer).
    @field_validator("state_file", "output_dir")
    @classmethod
    def _expand_home(cls, path: Path) -> Path:
        return path.expanduser()


class ServiceSettings(Section):
    metrics_port: int = Field(0, ge=0, le=65535, description="0 keeps the HTTP endpoint off.")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="The address /health and /metrics listen on: "
                              "0.0.0.0 (or this host's address) lets a Prometheus server on another machine scrape them.")
    cycle_stall_minutes: float = Field(
        30.0, gt=0, description="A cycle whose progress has not moved for this long is ended and counted as failed.")
    stop_timeout_s: float = Field(
        120.0, gt=0, description="After SIGTERM, how long the daemon waits for the cycle before killing it "
        "(keep below the unit's TimeoutStopSec=180).")
    alert_after_failures: int = Field(
        3, ge=1, description="Consecutive failed cycles (or failures at one watermark) before a W&B alert is sent.")


class PromotionSettings(Section):
    mode: Literal["gate", "always"] = Field(
        "gate", description="gate: a new adapter becomes `latest` only if it is no worse on the fixed holdout than the "
        "adapter in use; always: every finished run becomes `latest`.")
    holdout_samples: int = Field(
        256, ge=0, description="Size of the fixed holdout, frozen from the first run's rows (0: no holdout; needs mode = always).")
    holdout_min_per_language: int = Field(
        8, ge=1, description="Holdout samples each language gets at least; a language the holdout lacks joins it "
        "with this many of its rows (at most half of them) when it first appears, and one that joined with fewer is "
        "topped up from later runs' new rows until it has this many.")
    max_loss_increase: float = Field(
        0.01, ge=0.0, description="Largest relative rise of the overall holdout loss a promoted adapter may have (0.01 = 1 %).")
    max_language_loss_increase: float = Field(
        0.03, ge=0.0, description="The same, for each language's holdout loss.")
    max_drift: float = Field(
        0.03, ge=0.0, description="Largest relative rise of a language's holdout loss above the best any adapter in "
        "service reached on it (the base model included): stops the per-run tolerances from compounding. A large "
        "value (10) turns it off.")
    replay_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Older, already-trained samples mixed into each run, as a fraction of its new "
        "training samples (re-read from PostgreSQL by id).")
    on_promote: list[str] = Field(
        default_factory=list, description="A command (argv list) run after each promotion or rollback, with "
        "CODELUPE_ADAPTER_PATH, CODELUPE_RUN_NUMBER and the losses in its environment.")
    on_promote_timeout_s: float = Field(60.0, gt=0, description="The on_promote command is killed after this long.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CODELUPE_",
        env_nested_delimiter="__",
        # Unknown top-level names in the environment (CODELUPE_CONFIG, CODELUPE_TEST_DATABASE_URL)
        # are ours but not settings; unknown TOML sections are rejected separately in load_settings.
        extra="ignore",
        validate_assignment=True,
    )

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    wandb: WandbSettings = Field(default_factory=WandbSettings)
    paths: PathsSettings = Field(default_factory=PathsSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    # The TOML file these settings were read from; None: no file, the built-in defaults and the environment.
    _config_file: Path | None = PrivateAttr(default=None)

    @property
    def config_file(self) -> Path | None:
        return self._config_file

    def config_source(self) -> str:
        """Where these settings came from, for `doctor` and the daemon's first line."""
        if self._config_file is not None:
            return str(self._config_file)
        return (f"no config file ({DEFAULT_CONFIG_PATH} is not in {Path.cwd()}): the built-in defaults and "
                "CODELUPE_* variables; pass --config FILE")

    @field_validator("promotion")
    @classmethod
    def _gate_needs_holdout(cls, promotion: PromotionSettings) -> PromotionSettings:
        if promotion.mode == "gate" and promotion.holdout_samples == 0:
            raise ValueError("promotion.holdout_samples = 0 leaves the gate (promotion.mode = \"gate\") nothing to compare "
                             "on; set promotion.mode = \"always\" or a holdout size")
        return promotion

    @field_validator("data")
    @classmethod
    def _chars_in_order(cls, data: DataSettings) -> DataSettings:
        if data.min_chars > data.max_chars:
            raise ValueError(f"data.min_chars ({data.min_chars}) must not exceed data.max_chars ({data.max_chars})")
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the environment comes first so it wins.
        return (env_settings, init_settings)


def resolve_config_path(path: str | Path | None) -> Path:
    """--config, else $CODELUPE_CONFIG, else config/codelupe.toml."""
    if path:
        return Path(path)
    if os.environ.get("CODELUPE_CONFIG"):
        return Path(os.environ["CODELUPE_CONFIG"])
    return DEFAULT_CONFIG_PATH


def read_toml(config_path: Path) -> dict[str, Any]:
    """The file's TOML, or one line saying why it cannot be read."""
    source = "CODELUPE_CONFIG" if os.environ.get("CODELUPE_CONFIG") == str(config_path) else "config file"
    try:
        # utf-8-sig: a byte-order mark (Notepad writes one) is not part of the TOML.
        return tomllib.loads(config_path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{source} {config_path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} {config_path} is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(f"{source} {config_path} is not readable by this user") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{config_path}: not UTF-8 text (byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{config_path}: not valid TOML: {error}") from None


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the TOML file (if it exists) and the environment; raise ConfigError on anything wrong."""
    config_path = resolve_config_path(path)
    # Named explicitly (--config or CODELUPE_CONFIG), a file must exist: a typo must not run on the defaults.
    explicit = path is not None or bool(os.environ.get("CODELUPE_CONFIG"))
    toml_values: dict[str, Any] = {}
    if config_path.exists() or explicit:
        toml_values = read_toml(config_path)
    check_environment(os.environ)
    known_sections = set(Settings.model_fields)
    for section, values in toml_values.items():
        if section not in known_sections:
            raise ConfigError(f"{config_path}: unknown section [{section}] (known: {', '.join(sorted(known_sections))})")
        if not isinstance(values, dict):
            raise ConfigError(f"{config_path}: '{section}' must be a [section] table")
    try:
        settings = Settings(**toml_values)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, config_path, os.environ)) from None
    except SettingsError as error:
        # pydantic-settings could not parse an environment value (lists and tables are JSON there).
        section = str(error).split('"')[1] if '"' in str(error) else "?"
        names = ", ".join(unparsable_variables(section, os.environ)) or f"CODELUPE_{section.upper()}__*"
        raise ConfigError(f"environment variable {names}: not JSON, and this setting is a list: write it as JSON, "
                          f"e.g. CODELUPE_DATA__LANGUAGES='[\"python\", \"go\"]'") from None
    if os.environ.get("WANDB_LOG_MODEL", "").strip().lower() not in ("", "false", "0", "none"):
        raise ConfigError(
            "WANDB_LOG_MODEL is set: codelupe-trainer sends metrics only and never uploads model files; unset it"
        )
    promotion, service = settings.promotion, settings.service
    if promotion.on_promote and promotion.on_promote_timeout_s >= service.stop_timeout_s:
        # A stop waits for the hand-off to finish; the daemon would kill the cycle half-way through it.
        raise ConfigError(f"{config_path}: promotion.on_promote_timeout_s ({promotion.on_promote_timeout_s:g}) must be "
                          f"below service.stop_timeout_s ({service.stop_timeout_s:g}): a stop lets on_promote finish")
    if config_path.exists():
        settings._config_file = config_path.resolve()
    return settings


def changed_settings(before: Settings, after: Settings) -> list[str]:
    """The 'section.key' names whose values differ: names only, so a changed password can be said safely."""
    old, new = before.model_dump(), after.model_dump()
    return [f"{section}.{key}" for section, values in new.items() for key, value in values.items()
            if old[section].get(key) != value]


# Secrets that arrive as environment variables (from secrets.env): masked in every log line and saved
# traceback, and never handed to the on_promote command. PGPASSWORD is libpq's alternative to a password in
# database.url.
SECRET_VARIABLES = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "PGPASSWORD")

# CODELUPE_* variables that are not settings: the config path, the tests' database, fault injection.
NON_SETTING_VARIABLES = {"CODELUPE_CONFIG", "CODELUPE_TEST_DATABASE_URL", "CODELUPE_FAULT"}


def check_environment(environment: dict[str, str] | os._Environ) -> None:
    """A misspelt CODELUPE_ variable is an error, not a silent fall-back to the default it meant to change."""
    for name in sorted(environment):
        if not name.startswith("CODELUPE_") or name in NON_SETTING_VARIABLES:
            continue
        section, separator, key = name.removeprefix("CODELUPE_").lower().partition("__")
        fields = Settings.model_fields
        if section not in fields:
            raise ConfigError(f"environment variable {name}: unknown setting section {section!r} "
                              f"(known: {', '.join(sorted(fields))})")
        if not separator:
            raise ConfigError(f"environment variable {name}: name a key, as CODELUPE_{section.upper()}__<KEY>")
        section_fields = fields[section].annotation.model_fields
        if key not in section_fields:
            raise ConfigError(f"environment variable {name}: unknown key {section}.{key}")


def unparsable_variables(section: str, environment: dict[str, str] | os._Environ) -> list[str]:
    """The section's variables for list settings whose values are not JSON (what pydantic-settings stumbled on)."""
    fields = Settings.model_fields[section].annotation.model_fields if section in Settings.model_fields else {}
    names = []
    for key, field in fields.items():
        name = f"CODELUPE_{section.upper()}__{key.upper()}"
        value = next((value for variable, value in environment.items() if variable.upper() == name), None)
        if value is None or typing.get_origin(field.annotation) not in (list, tuple, dict):
            continue
        try:
            json.loads(value)
        except ValueError:
            names.append(name)
    return names


def describe_validation_error(error: ValidationError, config_path: Path,
                              environment: dict[str, str] | os._Environ | None = None) -> str:
    """One line per problem: 'section.key: message', without echoing a secret's value, naming where the
    value came from: the environment variable that set it (it overrides the file), else the file."""
    variables = {name.upper(): name for name in (environment or {}) if name.upper().startswith("CODELUPE_")}
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        variable = variables.get("CODELUPE_" + "__".join(str(part) for part in item["loc"][:2]).upper())
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        shown_input = ""
        last = str(item["loc"][-1]) if item["loc"] else ""
        # A check across a section's keys gets the whole section as its input: its message names the keys and
        # values, and the section (the database's holds the URL) is never echoed.
        if (item["type"] != "extra_forbidden" and last not in SECRET_FIELD_NAMES and "input" in item
                and not isinstance(item["input"], dict)):
            shown_input = f" (got {item['input']!r})"
        lines.append(f"environment variable {variable} ({key}): {message}{shown_input}" if variable
                     else f"{config_path}: {key}: {message}{shown_input}")
    return "; ".join(lines)


# libpq's key=value form: `password=secret` or `password = 'it''s \\ quoted'` anywhere in the string; and
# `sslpassword`, the passphrase of the client certificate's key (sslkey), as secret as the password.
_KEYWORD_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:[^\s\\]|\\.)+)", re.IGNORECASE)
# One `key = value` of that form, as libpq reads it: a value is single-quoted, or runs to the next space
# (a backslash escapes the character after it in both).
_KEYWORD_PAIR = re.compile(r"\s*\w+\s*=\s*(?:'(?:[^'\\]|\\.)*'|(?!')(?:[^\s\\]|\\.)*)\s*")
# A URL's query parameter: ?password=secret&... (or ?sslpassword=...)
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)([^&#]*)", re.IGNORECASE)


def is_url_dsn(dsn: str) -> bool:
    return dsn.startswith(("postgresql://", "postgres://"))


def _libpq_url_password(dsn: str) -> str | None:
    """The password as libpq reads a URL: its user info runs to the FIRST '@' (unless a '/' comes before),
    where urllib takes the last one and stops at '?' or '#' as well."""
    rest = dsn.split("://", 1)[1]
    end = re.search(r"[@/]", rest)
    if end is None or end.group() != "@" or ":" not in rest[:end.start()]:
        return None
    return rest[:end.start()].split(":", 1)[1]


def keyword_dsn_problem(dsn: str) -> str | None:
    """Why libpq cannot read this key=value string, or None. Its own error repeats the word it stumbled on,
    which is often the second half of an unquoted password with a space ('missing "=" after "..."')."""
    if is_url_dsn(dsn):
        return None
    position = 0
    while position < len(dsn):
        match = _KEYWORD_PAIR.match(dsn, position)
        if match is None or match.end() == position:
            return ("not a key=value connection string libpq can read: a value with a space or a quote must be in "
                    "single quotes, e.g. password='two words'")
        position = match.end()
    return None


def url_ambiguity(dsn: str) -> str | None:
    """Why libpq would read another user, password, host or port from this URL than it says, or None.

    A raw '@', '/', '?', '#' or space in the password makes libpq and every URL parser disagree on where it
    ends: libpq then tries part of the password as a host name or a port, and says so in its error. The
    message never repeats the URL."""
    if not is_url_dsn(dsn):
        return None
    rest = dsn.split("://", 1)[1]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    try:
        urlsplit(dsn).port
        port_ok = True
    except ValueError:
        port_ok = False
    libpq_password = _libpq_url_password(dsn) or ""
    if ("@" in authority.rpartition("@")[0] or (not port_ok and "@" in rest[len(authority):])
            or re.search(r"\s", libpq_password)):
        return ("its user or password holds a character a URL reserves ('@', '/', '?', '#' or a space), so libpq "
                "would read another host, port or password from it: percent-encode it (@ as %40, / as %2F, "
                "? as %3F, # as %23, a space as %20)")
    return None


def dsn_passwords(dsn: str) -> list[str]:
    """Every password a connection string carries, in both libpq forms (URL userinfo and query parameter,
    or key=value), as written and as libpq reads it (percent-decoded, unquoted), for the log filter. For a
    URL, both readings of where the password ends (libpq's and urllib's)."""
    found: list[str] = []
    if is_url_dsn(dsn):
        try:
            password = urlsplit(dsn).password
        except ValueError:
            password = None
        for candidate in (password, _libpq_url_password(dsn)):
            if candidate:
                found += [candidate, unquote(candidate)]
        for match in _QUERY_PASSWORD.finditer(dsn):
            found += [match.group(2), unquote(match.group(2))]
    else:
        for match in _KEYWORD_PASSWORD.finditer(dsn):
            raw = match.group(2)
            found.append(raw)
            # As libpq reads it: unquoted, and with its backslash escapes resolved (quoted or not).
            found.append(re.sub(r"\\(.)", r"\1", raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] == "'" else raw))
    return [password for password in dict.fromkeys(found) if password]


def redact_url(dsn: str) -> str:
    """The connection string with every password replaced by '***' (user, host and database stay readable, and
    the rest of the string as written). Both libpq forms: a URL (userinfo or ?password=) and key=value."""
    if not is_url_dsn(dsn):
        return _KEYWORD_PASSWORD.sub(lambda match: match.group(1) + "***", dsn)
    redacted = _QUERY_PASSWORD.sub(lambda match: match.group(1) + "***", dsn)
    try:
        urllib_password = urlsplit(dsn).password
    except ValueError:
        urllib_password = None
    # Where the password ends, as urllib reads it (the last '@') and as libpq does (the first).
    for password in (urllib_password, _libpq_url_password(dsn)):
        if password:
            redacted = redacted.replace(f":{password}@", ":***@", 1)
    return redacted


def public_settings(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain JSON values, with every secret redacted."""
    values = settings.model_dump(mode="json")
    values["database"]["url"] = redact_url(settings.database.url.get_secret_value())
    return values


# ---------------------------------------------------------------- paths derived from the settings


def metrics_file(settings: Settings) -> Path:
    return settings.paths.state_file.parent / "metrics.jsonl"


def wandb_directory(settings: Settings) -> Path:
    return settings.wandb.dir or settings.paths.state_file.parent
