"""Configuration: one clear error per mistake (naming the instance and the key), defaults,
overrides, and the flag > environment > file > default resolution order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etl.config import (
    DEFAULT_DATABASE_URL,
    AppConfig,
    check_api_url,
    load_config,
)
from etl.errors import ConfigError
from tests.conftest import CANARY

ROOT = Path(__file__).resolve().parent.parent
IID = 1101000001
# Tokens loaded here are registered for redaction process-wide: keep them unlike any text.
INLINE = "inline" + "7e57" * 11
ABSOLUTE = "absolute" + "7e57" * 10


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ETL_* variable from the outside; run in an empty directory (no ./etl.toml)."""
    for name in list(os.environ):
        if name.startswith("ETL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CHATSYNC_TOKEN", CANARY)
    monkeypatch.chdir(tmp_path)


def write(path: Path, body: str, mode: int = 0o600) -> Path:
    path.write_text(body, encoding="utf-8")
    path.chmod(mode)
    return path


def instance(iid: int = IID, token: str = 'api_token_env = "CHATSYNC_TOKEN"', **extra: str) -> str:
    lines = ["[[instances]]", f"id_instance = {iid}", token]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def load(tmp_path: Path, body: str, **kwargs: str | None) -> AppConfig:
    cfg = write(tmp_path / "etl.toml", body)
    return load_config(config_path=str(cfg), **kwargs)


def config_error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, body)
    message = str(info.value)
    assert CANARY not in message and CANARY not in repr(info.value)
    return message


# -- tokens ------------------------------------------------------------------------------


def test_missing_token_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_TOKEN", raising=False)
    msg = config_error(
        tmp_path, instance() + instance(IID + 1, token='api_token_env = "NOPE_TOKEN"')
    )
    assert f"instance {IID + 1}" in msg
    assert "'api_token_env'" in msg and "NOPE_TOKEN" in msg


def test_blank_token_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLANK_TOKEN", "   ")
    msg = config_error(tmp_path, instance(token='api_token_env = "BLANK_TOKEN"'))
    assert f"instance {IID}" in msg and "BLANK_TOKEN" in msg


def test_empty_token_file(tmp_path: Path) -> None:
    write(tmp_path / "token.txt", "\n  \n")
    msg = config_error(tmp_path, instance(token='api_token_file = "token.txt"'))
    assert f"instance {IID}" in msg and "'api_token_file'" in msg and "empty" in msg


def test_missing_token_file(tmp_path: Path) -> None:
    msg = config_error(tmp_path, instance(token='api_token_file = "absent.txt"'))
    assert f"instance {IID}" in msg and "'api_token_file'" in msg and "absent.txt" in msg


def test_unreadable_token_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root (who ignores chmod 000).
    (tmp_path / "token.d").mkdir()
    msg = config_error(tmp_path, instance(token='api_token_file = "token.d"'))
    assert f"instance {IID}" in msg and "'api_token_file'" in msg and "cannot read" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_token_file_without_permission(tmp_path: Path) -> None:
    write(tmp_path / "token.txt", CANARY, mode=0o000)
    msg = config_error(tmp_path, instance(token='api_token_file = "token.txt"'))
    assert "'api_token_file'" in msg and "cannot read" in msg


def test_token_file_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "secrets").mkdir(parents=True)
    write(conf_dir / "secrets" / "t1", f"  {CANARY}\n")
    write(tmp_path / "t2", f"{ABSOLUTE}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the config's directory
    cfg = write(
        conf_dir / "etl.toml",
        instance(token='api_token_file = "secrets/t1"')
        + instance(IID + 1, token=f'api_token_file = "{tmp_path / "t2"}"'),
    )
    app = load_config(config_path=str(cfg))
    assert app.instances[0].token.get_secret_value() == CANARY  # stripped
    assert app.instances[1].token.get_secret_value() == ABSOLUTE


def test_token_from_env_and_inline_are_stripped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATSYNC_TOKEN", f" {CANARY}\n")
    app = load(tmp_path, instance() + instance(IID + 1, token=f'api_token = " {INLINE} "'))
    assert [i.token.get_secret_value() for i in app.instances] == [CANARY, INLINE]


def test_two_token_sources(tmp_path: Path) -> None:
    msg = config_error(
        tmp_path,
        instance(token=f'api_token_env = "CHATSYNC_TOKEN"\napi_token = "{CANARY}"'),
    )
    assert f"instance {IID}" in msg
    assert "exactly one of" in msg and "got api_token_env, api_token" in msg


def test_no_token_source(tmp_path: Path) -> None:
    msg = config_error(tmp_path, instance(token='label = "no token"'))
    assert f"instance {IID}" in msg and "exactly one of" in msg
    assert "api_token_env" in msg and "api_token_file" in msg


def test_empty_inline_token(tmp_path: Path) -> None:
    msg = config_error(tmp_path, instance(token='api_token = "  "'))
    assert f"instance {IID}" in msg and "'api_token'" in msg


def test_inline_token_in_a_world_readable_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="etl.config")
    cfg = write(tmp_path / "etl.toml", instance(token=f'api_token = "{CANARY}"'), mode=0o644)
    load_config(config_path=str(cfg))
    warnings = [r for r in caplog.records if r.name == "etl.config"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "readable by other users" in warnings[0].getMessage()
    assert str(cfg) in warnings[0].getMessage()
    assert CANARY not in caplog.text


@pytest.mark.parametrize(
    ("mode", "token"),
    [
        pytest.param(0o600, f'api_token = "{CANARY}"', id="private-inline"),
        pytest.param(0o644, 'api_token_env = "CHATSYNC_TOKEN"', id="readable-env"),
    ],
)
def test_no_warning_when_private_or_no_inline_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, token: str
) -> None:
    caplog.set_level(logging.WARNING, logger="etl.config")
    cfg = write(tmp_path / "etl.toml", instance(token=token), mode=mode)
    load_config(config_path=str(cfg))
    assert [r for r in caplog.records if r.name == "etl.config"] == []


# -- structure ---------------------------------------------------------------------------


def test_duplicate_id_instance(tmp_path: Path) -> None:
    msg = config_error(tmp_path, instance() + instance(IID + 1) + instance())
    assert f"duplicate id_instance {IID}" in msg and "'instances'" in msg


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param('colour = "blue"\n' + instance(), "key 'colour'", id="top-level"),
        pytest.param(
            "[defaults]\ninterval = 60\n" + instance(), "key 'defaults.interval'", id="defaults"
        ),
        pytest.param(
            "[scheduler]\nworkers = 3\n" + instance(), "key 'scheduler.workers'", id="scheduler"
        ),
        pytest.param(
            instance(token_env='"X"'),
            f"instance {IID} (instances[0]), key 'token_env'",
            id="instance",
        ),
        pytest.param(
            instance() + instance(IID + 1, apiUrl='"https://x"'),
            f"instance {IID + 1} (instances[1]), key 'apiUrl'",
            id="second-instance",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, body: str, where: str) -> None:
    msg = config_error(tmp_path, body)
    assert f"{where}: unknown key" in msg


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param(instance(interval_seconds="0"), "key 'interval_seconds'", id="interval-0"),
        pytest.param(instance(max_attempts="21"), "key 'max_attempts'", id="attempts-21"),
        pytest.param(instance(count="0"), "key 'count'", id="count-0"),
        pytest.param(instance(enabled='"maybe"'), "key 'enabled'", id="enabled-str"),
        pytest.param(
            "[defaults]\ntimeout_seconds = -1\n" + instance(),
            "key 'defaults.timeout_seconds'",
            id="defaults-timeout",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, body: str, where: str) -> None:
    msg = config_error(tmp_path, body)
    assert where in msg


def test_bad_id_instance(tmp_path: Path) -> None:
    msg = config_error(tmp_path, instance(iid=0))
    assert "instances[0]" in msg and "id_instance" in msg


def test_invalid_toml(tmp_path: Path) -> None:
    msg = config_error(tmp_path, f'[[instances]\nid_instance = 1\napi_token = "{CANARY}"\n')
    assert "not valid TOML" in msg and "etl.toml" in msg


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    msg = config_error(tmp_path, "colour = 1\n[defaults]\nshade = 2\n" + instance(hue="3"))
    assert "'colour'" in msg and "'defaults.shade'" in msg and "'hue'" in msg


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("ftp://api.green-api.com", "not an http(s) URL", id="ftp"),
        pytest.param("api.green-api.com", "not an http(s) URL", id="no-scheme"),
        pytest.param("https://", "not an http(s) URL", id="no-host"),
        pytest.param("https://api.green-api.com/?x=1", "no query", id="query"),
        pytest.param("https://api.green-api.com/#top", "no query, fragment", id="fragment"),
        pytest.param("https://u:p@api.green-api.com", "credentials", id="credentials"),
        pytest.param("http://api.green-api.com", "allow_insecure_http", id="plain-http"),
        pytest.param("http://10.0.0.5:8080", "allow_insecure_http", id="plain-http-private-ip"),
    ],
)
def test_bad_api_url(tmp_path: Path, url: str, reason: str) -> None:
    msg = config_error(tmp_path, instance(api_url=f'"{url}"'))
    assert f"instance {IID}, key 'api_url'" in msg and reason in msg


def test_bad_default_api_url_names_the_defaults_key(tmp_path: Path) -> None:
    msg = config_error(tmp_path, '[defaults]\napi_url = "gopher://x"\n' + instance())
    assert f"instance {IID}, key 'defaults.api_url'" in msg


@pytest.mark.parametrize(
    "url",
    [
        "https://api.green-api.com",
        "https://7103.api.greenapi.com/",
        "http://127.0.0.1:8080",
        "http://localhost:9000",
        "http://[::1]:9000",
        "http://127.5.5.5",
    ],
)
def test_good_api_urls(url: str) -> None:
    assert check_api_url(url, allow_insecure_http=False) == url.rstrip("/")


def test_plain_http_to_a_remote_host_needs_the_opt_in(tmp_path: Path) -> None:
    body = "[defaults]\nallow_insecure_http = true\n" + instance(
        api_url='"http://gateway.internal:8080/"'
    )
    app = load(tmp_path, body)
    assert app.instances[0].api_url == "http://gateway.internal:8080"


# -- defaults and overrides --------------------------------------------------------------


def test_builtin_defaults(tmp_path: Path) -> None:
    [inst] = load(tmp_path, instance()).instances
    assert inst.api_url == "https://api.green-api.com"
    assert (inst.interval_seconds, inst.timeout_seconds, inst.connect_timeout_seconds) == (
        60,
        40.0,
        5.0,
    )
    assert (inst.max_attempts, inst.count, inst.enabled) == (4, None, True)
    assert (inst.mass_removal_threshold, inst.mass_removal_confirmations) == (0.5, 3)
    assert (inst.platform, inst.link_requests_per_second) == ("whatsapp", 5.0)
    assert inst.label == f"instance {IID}"


def test_platform_per_instance_and_in_defaults(tmp_path: Path) -> None:
    body = (
        '[defaults]\nplatform = "telegram"\nlink_requests_per_second = 2\n'
        + instance()
        + instance(IID + 1, platform='"max"')
    )
    first, second = load(tmp_path, body).instances
    assert (first.platform, second.platform) == ("telegram", "max")
    assert first.link_requests_per_second == 2.0


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('platform = "viber"\n', "key 'platform'"),
        ("link_requests_per_second = 11\n", "key 'defaults.link_requests_per_second'"),
    ],
)
def test_platform_and_link_rate_are_validated(tmp_path: Path, body: str, where: str) -> None:
    text = "[defaults]\n" + body + instance() if body.startswith("link") else instance() + body
    with pytest.raises(ConfigError, match=where):
        load(tmp_path, text)


def test_defaults_section_applies_and_instances_override(tmp_path: Path) -> None:
    body = (
        "[defaults]\n"
        'api_url = "https://7103.api.greenapi.com/"\n'
        "interval_seconds = 120\n"
        "timeout_seconds = 9.5\n"
        "connect_timeout_seconds = 2\n"
        "max_attempts = 3\n"
        "mass_removal_threshold = 0.25\n"
        "mass_removal_confirmations = 5\n"
        "[scheduler]\nmax_workers = 4\nshutdown_timeout_seconds = 7\n"
        + instance(label='"Sales"')
        + instance(
            IID + 1,
            api_url='"https://1101.api.greenapi.com"',
            interval_seconds="300",
            timeout_seconds="20",
            max_attempts="6",
            count="500",
            enabled="false",
        )
    )
    app = load(tmp_path, body)
    first, second = app.instances
    assert (first.label, first.api_url) == ("Sales", "https://7103.api.greenapi.com")
    assert (first.interval_seconds, first.timeout_seconds, first.max_attempts) == (120, 9.5, 3)
    assert (first.connect_timeout_seconds, first.count, first.enabled) == (2.0, None, True)
    assert (first.mass_removal_threshold, first.mass_removal_confirmations) == (0.25, 5)
    assert second.api_url == "https://1101.api.greenapi.com"
    assert (second.interval_seconds, second.timeout_seconds, second.max_attempts) == (300, 20, 6)
    assert (second.count, second.enabled, second.connect_timeout_seconds) == (500, False, 2.0)
    assert (app.scheduler.max_workers, app.scheduler.shutdown_timeout_seconds) == (4, 7.0)


def test_instance_repr_hides_the_token(tmp_path: Path) -> None:
    app = load(tmp_path, instance())
    assert CANARY not in repr(app) and CANARY not in str(app.instances[0])
    assert app.instances[0].token.get_secret_value() == CANARY


def test_no_instances_is_loadable(tmp_path: Path) -> None:
    assert load(tmp_path, "[defaults]\ninterval_seconds = 30\n").instances == ()


# -- resolution order: flag > environment > file > default -------------------------------


def test_database_url_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_url = write(tmp_path / "with.toml", 'database_url = "sqlite:///file.db"\n')
    without = write(tmp_path / "without.toml", "")

    def url(cfg: Path, flag: str | None) -> str:
        return load_config(config_path=str(cfg), database_url=flag).database_url

    assert url(without, None) == DEFAULT_DATABASE_URL == "sqlite:///chats.db"
    assert url(with_url, None) == "sqlite:///file.db"
    monkeypatch.setenv("ETL_DATABASE_URL", "sqlite:///env.db")
    assert url(with_url, None) == "sqlite:///env.db"
    assert url(without, None) == "sqlite:///env.db"
    assert url(with_url, "sqlite:///flag.db") == "sqlite:///flag.db"
    monkeypatch.setenv("ETL_DATABASE_URL", "")  # empty counts as unset
    assert url(with_url, None) == "sqlite:///file.db"


def test_config_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "etl.toml", 'database_url = "sqlite:///default-path.db"\n')
    write(tmp_path / "env.toml", 'database_url = "sqlite:///env-path.db"\n')
    write(tmp_path / "flag.toml", 'database_url = "sqlite:///flag-path.db"\n')
    assert load_config().database_url == "sqlite:///default-path.db"
    assert load_config().source == Path("etl.toml")
    monkeypatch.setenv("ETL_CONFIG", str(tmp_path / "env.toml"))
    assert load_config().database_url == "sqlite:///env-path.db"
    assert load_config(config_path=str(tmp_path / "flag.toml")).database_url == (
        "sqlite:///flag-path.db"
    )


def test_default_config_file_may_be_missing(tmp_path: Path) -> None:
    assert not (tmp_path / "etl.toml").exists()
    app = load_config()
    assert (app.database_url, app.instances, app.source) == (DEFAULT_DATABASE_URL, (), None)


def test_named_config_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="missing.toml does not exist"):
        load_config(config_path=str(tmp_path / "missing.toml"))
    monkeypatch.setenv("ETL_CONFIG", str(tmp_path / "also-missing.toml"))
    with pytest.raises(ConfigError, match="also-missing.toml does not exist"):
        load_config()


def test_unreadable_config_file(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(config_path=str(tmp_path / "dir.toml"))


def test_load_instances_false_skips_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `etl db upgrade` must work without the tokens being available
    monkeypatch.delenv("CHATSYNC_TOKEN")
    cfg = write(tmp_path / "etl.toml", 'database_url = "sqlite:///x.db"\n' + instance())
    app = load_config(config_path=str(cfg), load_instances=False)
    assert (app.database_url, app.instances) == ("sqlite:///x.db", ())
    with pytest.raises(ConfigError, match="CHATSYNC_TOKEN"):
        load_config(config_path=str(cfg))


# -- the command line stops with one line --------------------------------------------------


def test_cli_stops_with_one_clear_line(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "etl.toml",
        instance(token=f'api_token = "{CANARY}"')
        + instance(IID + 1, token='api_token_env = "NOPE"'),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETL_") and k != "NOPE"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "etl", "--config", str(cfg), "sync", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert f"instance {IID + 1}" in lines[0] and "'api_token_env'" in lines[0]
    assert "NOPE" in lines[0]
    assert CANARY not in proc.stderr
    assert not (tmp_path / "chats.db").exists()  # nothing was started
