"""Configuration: every shipped file loads, the environment wins, bad input is one line naming the key."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import quote

import pytest

from codelupe_trainer.cli import main
from codelupe_trainer.config import (ConfigError, Settings, changed_settings, dsn_passwords, load_settings, public_settings,
                                     redact_url)
from codelupe_trainer.logs import redact_also, setup_logging

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda path: path.name)
def test_every_shipped_config_loads_and_env_overrides_apply(path, monkeypatch):
    settings = load_settings(path)
    assert settings.model.lora_alpha >= settings.model.lora_r
    monkeypatch.setenv("CODELUPE_DATABASE__URL", "postgresql://trainer:pw123@db.internal:5432/code")
    monkeypatch.setenv("CODELUPE_SCHEDULE__MIN_NEW_SAMPLES", "7")
    monkeypatch.setenv("CODELUPE_DATA__LANGUAGES", '["python", "go"]')
    overridden = load_settings(path)
    assert overridden.schedule.min_new_samples == 7
    assert overridden.data.languages == ["python", "go"]
    assert overridden.database.url.get_secret_value().endswith("db.internal:5432/code")
    assert overridden.schedule.interval_minutes == settings.schedule.interval_minutes


def test_production_config_matches_the_5090_plan():
    settings = load_settings(CONFIG_DIR / "codelupe.toml")
    assert settings.model.base_model == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert settings.model.quantization == "auto"
    assert settings.data.max_length == 2048


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[data]\nmin_qualty = 70\n", "data.min_qualty: unknown key"),
        ("[training]\nbatch_size = \"four\"\n", "training.batch_size: Input should be a valid integer"),
        ("[data]\nmin_quality = 170\n", "data.min_quality: Input should be less than or equal to 100"),
        ("[databse]\nurl = \"x\"\n", "unknown section [databse]"),
        ("[wandb]\nmode = \"sometimes\"\n", "wandb.mode: Input should be 'online', 'offline' or 'disabled'"),
        ("[data\n", "not valid TOML"),
        # Each extra pattern is one alternative beside the shipped ones: it must compile alone and as a group.
        ('[data]\nmalicious_patterns = ["(unclosed"]\n', "data.malicious_patterns: Value error, '(unclosed' is not a "
         "regular expression Python's re can use (missing ), unterminated subpattern"),
        ('[data]\nmalicious_patterns = ["a)|(b"]\n', "data.malicious_patterns: Value error, 'a)|(b' is not a regular"),
        ('[data]\nmalicious_patterns = ["x", "(?:evil)?"]\n', "'(?:evil)?' matches empty text, so it would block"),
        # A stop lets the hand-off finish, so it must fit in the daemon's wait for a stopping cycle.
        ('[promotion]\non_promote = ["/usr/local/bin/reload"]\non_promote_timeout_s = 300\n',
         "promotion.on_promote_timeout_s (300) must be below service.stop_timeout_s (120)"),
        # Checks across a section's keys name them and their values, and never echo the whole section.
        ("[data]\nmin_chars = 9000\n", "data.min_chars (9000) must not exceed data.max_chars (8000)"),
        ("[promotion]\nholdout_samples = 0\n", "promotion.holdout_samples = 0 leaves the gate"),
        ("[training]\nnum_nodes = 2\n", "num_nodes > 1 needs training.rendezvous_endpoint"),
        ("[model]\ntarget_modules = []\n", "model.target_modules: List should have at least 1 item"),
    ],
)
def test_bad_config_is_one_line_that_names_the_key(tmp_path, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    message = str(raised.value)
    assert expected in message
    assert "\n" not in message
    assert "{" not in message  # no section dumped as a dict


def test_bad_config_exits_2_with_the_key_named(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[schedule]\ninterval_minutes = -5\n")
    assert main(["status", "--config", str(path)]) == 2
    assert "schedule.interval_minutes" in capsys.readouterr().err


def test_wrong_type_for_the_url_never_echoes_it(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[database]\nurl = 12345\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert "database.url" in str(raised.value) and "12345" not in str(raised.value)


def test_wandb_log_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_LOG_MODEL", "checkpoint")
    with pytest.raises(ConfigError, match="WANDB_LOG_MODEL"):
        load_settings(None)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:hunter22@h:5432/d", "postgresql://u:***@h:5432/d"),
        ("postgresql://u@h/d?password=hunter22&sslmode=require", "postgresql://u@h/d?password=***&sslmode=require"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("host=db user=trainer password=hunter22 dbname=code", "host=db user=trainer password=*** dbname=code"),
        ("host=db password = 'hunter 22' dbname=code", "host=db password = *** dbname=code"),
        ("host=db PASSWORD=hunter22", "host=db PASSWORD=***"),
        ("host=db user=trainer dbname=code", "host=db user=trainer dbname=code"),
        # A socket directory and several hosts: shown as written, nothing to mask.
        ("postgresql:///code?host=/var/run/postgresql", "postgresql:///code?host=/var/run/postgresql"),
        ("postgresql://u:hunter22@h1:5432,h2:5433/d", "postgresql://u:***@h1:5432,h2:5433/d"),
        ("postgresql://u:hunter%3F22@h/d?password=x9y&sslmode=require",
         "postgresql://u:***@h/d?password=***&sslmode=require"),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("dsn", "passwords"),
    [
        ("postgresql://u:hunter%2122@h/d", ["hunter%2122", "hunter!22"]),
        ("host=db password='it\\'s secret' dbname=d", ["'it\\'s secret'", "it's secret"]),
        ("host=db password=hunter22", ["hunter22"]),
        ("host=db password=hunter\\ 22 user=u", ["hunter\\ 22", "hunter 22"]),  # libpq's escaped space
        ("host=db user=u", []),
    ],
)
def test_dsn_passwords_finds_both_forms(dsn, passwords):
    assert dsn_passwords(dsn) == passwords


@pytest.mark.parametrize("password", ["hunt@er22sec", "hunt/er22sec", "hunt?er22sec", "hunt#er22sec", "hunt er22sec"])
def test_a_url_whose_password_libpq_would_misread_is_refused_without_a_fragment_of_it(password, monkeypatch, capsys,
                                                                                       tmp_path):
    """A raw '@' (or '/', '?', '#', a space) in a URL's password: libpq and URL parsers disagree on where it
    ends, libpq tries part of it as a host or a port and prints that part in its error ("failed to resolve
    host 'er22sec'"), where no redaction could know it. Refused at load instead, exit 2, naming the key and
    the fix, with no piece of the password; percent-encoded, the same password works and is masked."""
    for dsn, advice in ((f"postgresql://trainer:{password}@127.0.0.1:5432/code", "percent-encode it"),
                        # The key=value form with the password unquoted: libpq says 'missing "=" after "er22sec"'.
                        (f"host=127.0.0.1 user=trainer password={password} dbname=code", "in single quotes")):
        if " " not in password and advice == "in single quotes":
            continue  # only a space breaks an unquoted key=value password
        monkeypatch.setenv("CODELUPE_DATABASE__URL", dsn)
        assert main(["show-config", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 2
        captured = capsys.readouterr()
        [line] = captured.err.strip().splitlines()
        assert "database.url" in line and advice in line and captured.out == ""
        for fragment in ("hunt", "er22sec"):
            assert fragment not in captured.err
    encoded = quote(password, safe="")
    monkeypatch.setenv("CODELUPE_DATABASE__URL", f"postgresql://trainer:{encoded}@127.0.0.1:5432/code")
    assert main(["show-config", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert "postgresql://trainer:***@127.0.0.1:5432/code" in output and "er22sec" not in output
    assert {encoded, password} <= set(dsn_passwords(f"postgresql://trainer:{encoded}@127.0.0.1:5432/code"))


def test_key_value_dsn_password_stays_out_of_show_config_and_logs(tmp_path, monkeypatch, capsys):
    dsn = "host=127.0.0.1 port=1 user=trainer password=hunter22 dbname=code connect_timeout=1"
    monkeypatch.setenv("CODELUPE_DATABASE__URL", dsn)
    assert main(["show-config", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert "hunter22" not in output and "password=***" in output
    # A log line quoting the connection string, or the password alone, is redacted by the filter.
    setup_logging(load_settings(CONFIG_DIR / "codelupe.toml"))
    logging.getLogger("codelupe_trainer.test").warning("connecting with %s (password hunter22)", dsn)
    logged = capsys.readouterr().err
    assert "connecting with" in logged and "hunter22" not in logged


@pytest.mark.parametrize("dsn", [
    "host=127.0.0.1 port=1 user=trainer password=hunter22 sslmode=require sslkey=/etc/key.pem sslpassword=Kp4ss0rd dbname=code",
    "postgresql://trainer:hunter22@127.0.0.1:1/code?sslmode=require&sslkey=/etc/key.pem&sslpassword=Kp4ss0rd",
])
def test_the_client_keys_sslpassword_is_as_secret_as_the_password(dsn, monkeypatch, capsys):
    # libpq's sslpassword unlocks the client certificate's key: a secret in both forms.
    monkeypatch.setenv("CODELUPE_DATABASE__URL", dsn)
    assert main(["show-config", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert "Kp4ss0rd" not in output and "hunter22" not in output and "sslpassword=***" in output
    assert "sslkey=/etc/key.pem" in output  # a path, not a secret: left readable
    setup_logging(load_settings(CONFIG_DIR / "codelupe.toml"))
    logging.getLogger("codelupe_trainer.test").warning("the key's passphrase Kp4ss0rd was refused")
    logged = capsys.readouterr().err
    assert "was refused" in logged and "Kp4ss0rd" not in logged


def test_a_reloaded_config_names_what_changed_and_masks_its_new_password_as_well_as_the_old(tmp_path, monkeypatch, capsys):
    """The daemon's reload (SIGHUP) reads the file again: its log names the changed settings, never their
    values, and a new database password is masked in its lines from then on, the old one still."""
    monkeypatch.delenv("CODELUPE_DATABASE__URL", raising=False)
    config = tmp_path / "codelupe.toml"
    config.write_text('[database]\nurl = "postgresql://trainer:Old-pass-11@db.internal/code"\n[schedule]\nmin_new_samples = 10\n')
    before = load_settings(config)
    setup_logging(before)
    config.write_text('[database]\nurl = "host=db.internal user=trainer password=New-pass-22 dbname=code"\n'
                      '[schedule]\nmin_new_samples = 20\n')
    after = load_settings(config)
    assert changed_settings(before, after) == ["database.url", "schedule.min_new_samples"]
    assert changed_settings(after, load_settings(config)) == []
    redact_also(after)
    redact_also(after)  # a second reload adds nothing twice
    logging.getLogger("codelupe_trainer.test").warning("new password New-pass-22, old password Old-pass-11")
    logged = capsys.readouterr().err
    assert "new password ***, old password ***" in logged, logged


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("CODELUPE_DATABSE__URL", "environment variable CODELUPE_DATABSE__URL: unknown setting section 'databse'"),
        ("CODELUPE_DATA__MIN_QUALTY", "environment variable CODELUPE_DATA__MIN_QUALTY: unknown key data.min_qualty"),
        ("CODELUPE_TRAINING", "environment variable CODELUPE_TRAINING: name a key"),
    ],
)
def test_a_misspelt_environment_variable_is_refused_by_name(monkeypatch, capsys, variable, expected):
    monkeypatch.setenv(variable, "5")
    with pytest.raises(ConfigError) as raised:
        load_settings(CONFIG_DIR / "codelupe.toml")
    assert str(raised.value) == expected or str(raised.value).startswith(expected)
    assert main(["status", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 2
    assert variable in capsys.readouterr().err


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("CODELUPE_DATA__LANGUAGES", "python", "environment variable CODELUPE_DATA__LANGUAGES: not JSON"),
    ("CODELUPE_PROMOTION__ON_PROMOTE", "/usr/local/bin/reload", "environment variable CODELUPE_PROMOTION__ON_PROMOTE: not JSON"),
    # A bad value from the environment is the variable's, not the file's: the file may say something else.
    ("CODELUPE_SCHEDULE__INTERVAL_MINUTES", "5m", "environment variable CODELUPE_SCHEDULE__INTERVAL_MINUTES (schedule.interval_minutes): "),
    ("CODELUPE_DATA__MIN_QUALITY", "170", "environment variable CODELUPE_DATA__MIN_QUALITY (data.min_quality): "),
])
def test_an_unparsable_environment_value_names_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv("CODELUPE_DATA__MAX_CHARS", "9000")  # a good neighbour, never blamed
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings(CONFIG_DIR / "codelupe.toml")
    message = str(raised.value)
    assert message.startswith(expected) and "\n" not in message
    assert "codelupe.toml" not in message and "MAX_CHARS" not in message


def test_show_config_redacts_every_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CODELUPE_DATABASE__URL", "postgresql://trainer:hunter22@db:5432/code")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-abcdef123456")
    assert main(["show-config", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 0
    output = capsys.readouterr().out
    assert "hunter22" not in output and "wandb-key-abcdef123456" not in output
    assert "postgresql://trainer:***@db:5432/code" in output
    assert public_settings(load_settings(CONFIG_DIR / "codelupe.toml"))["database"]["url"].startswith("postgresql://")


@pytest.mark.parametrize(("make", "expected"), [
    (lambda path: path.mkdir(), "is a directory, not a TOML file"),
    (lambda path: path.write_bytes(b"[data]\nmin_quality = 70 # \xff\xfe\n"), "not UTF-8 text"),
])
def test_an_unreadable_config_file_is_one_line_and_exit_2(tmp_path, capsys, make, expected):
    path = tmp_path / "codelupe.toml"
    make(path)
    assert main(["status", "--config", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and str(path) in error and "\n" not in error and "Traceback" not in error


def test_a_path_from_the_home_directory_is_the_home_directory(tmp_path, monkeypatch):
    # `~` is the home directory in every path setting, as in a shell; not a folder named `~` in the working
    # directory, and not a hub id for the model.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "codelupe.toml"
    path.write_text('[paths]\nstate_file = "~/codelupe/state.json"\noutput_dir = "~/codelupe/adapters"\n'
                    '[wandb]\ndir = "~/wandb-runs"\n[model]\nbase_model = "~/models/coder-7b"\n')
    settings = load_settings(path)
    home = tmp_path / "home"
    assert settings.paths.state_file == home / "codelupe" / "state.json"
    assert settings.paths.output_dir == home / "codelupe" / "adapters"
    assert settings.wandb.dir == home / "wandb-runs"
    assert settings.model.base_model == str(home / "models" / "coder-7b") and settings.model.is_local
    assert settings.model.public_name == "local:coder-7b"


def test_a_config_saved_by_a_windows_editor_reads_as_written(tmp_path):
    # Notepad and some editors start a UTF-8 file with a byte-order mark and end lines with CRLF; tomllib
    # calls the mark "Invalid statement (at line 1, column 1)", on a line that looks right.
    path = tmp_path / "codelupe.toml"
    path.write_bytes("\ufeff[data]\r\nmin_quality = 55\r\nlanguages = [\"python\"]\r\n".encode())
    settings = load_settings(path)
    assert settings.data.min_quality == 55 and settings.data.languages == ["python"]


def test_a_missing_config_named_by_codelupe_config_is_an_error_not_the_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CODELUPE_CONFIG", str(tmp_path / "codelupe.tmol"))
    assert main(["status"]) == 2
    assert f"CODELUPE_CONFIG {tmp_path / 'codelupe.tmol'} does not exist" in capsys.readouterr().err


def test_status_on_an_unreadable_state_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "state.json").mkdir()  # as root every file is readable: a directory stands in for it
    monkeypatch.setenv("CODELUPE_PATHS__STATE_FILE", str(tmp_path / "state.json"))
    assert main(["status", "--config", str(CONFIG_DIR / "codelupe.toml")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("codelupe-trainer: cannot read") and "\n" not in error


def test_every_setting_is_in_the_shipped_config_and_the_readme():
    """A new key must be documented where users look: the commented TOML and the README's key table."""
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    shipped = (CONFIG_DIR / "codelupe.toml").read_text()
    sections = {}
    current = None
    for line in shipped.splitlines():
        if line.startswith("["):
            current = line.strip("[] ")
        elif current and "=" in line:
            sections.setdefault(current, set()).add(line.lstrip("# ").split("=", 1)[0].strip())
    missing = []
    for section, field in Settings.model_fields.items():
        for key in field.annotation.model_fields:
            if f"`{section}.{key}`" not in readme and not re.search(rf"`{section}\.[^`]*\b{key}\b[^`]*`", readme):
                missing.append(f"README: {section}.{key}")
            if key not in sections.get(section, set()) and f"{section}.{key}" != "database.url":  # a secret: env only
                missing.append(f"config/codelupe.toml: {section}.{key}")
    assert missing == []


@pytest.mark.parametrize(("base_model", "public"), [
    ("Qwen/Qwen2.5-Coder-7B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct"),  # a hub id is a public name
    ("/home/alice/acme-internal/coder-7b", "local:coder-7b"),
    ("./models/coder-7b/", "local:coder-7b"),
    ("~/coder-7b", "local:coder-7b"),
])
def test_a_local_model_leaves_the_machine_by_its_folder_name_only(base_model, public):
    from codelupe_trainer.config import ModelSettings
    from codelupe_trainer.report import run_config

    model = ModelSettings(base_model=base_model)
    assert model.public_name == public
    settings = Settings(database={"url": "postgresql://localhost/db"}, model={"base_model": base_model})
    assert run_config(settings)["model"]["base_model"] == public
    # Only what W&B is given changes (`~` is expanded for the machine's own use).
    assert settings.model.base_model == os.path.expanduser(base_model)
