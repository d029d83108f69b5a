"""Settings and the instance list: read from TOML + environment, validated once at start.

Resolution order for every global setting: command-line flag, then environment
variable, then the config file, then the built-in default.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from etl.errors import ConfigError
from etl.redact import redact, register_secrets

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "etl.toml"
DEFAULT_DATABASE_URL = "sqlite:///chats.db"
ENV_CONFIG = "ETL_CONFIG"
ENV_DATABASE_URL = "ETL_DATABASE_URL"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_url(url: str, *, allow_insecure_http: bool) -> str:
    """Validate a Green-API base URL; plain http only for loopback or with an explicit opt-in."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must be a plain base URL (no query, fragment or credentials)")
    if parts.scheme == "http" and not _is_loopback(parts.hostname) and not allow_insecure_http:
        raise ValueError(
            "plain http:// is refused for a non-loopback host "
            "(set allow_insecure_http = true to opt in)"
        )
    return url.rstrip("/")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: the messenger of an instance: Green-API serves them all on the same getChats path
Platform = Literal["whatsapp", "telegram", "max"]


class Defaults(_Strict):
    """Values applied to every instance unless the instance sets its own."""

    api_url: str = "https://api.green-api.com"
    interval_seconds: Annotated[int, Field(ge=1, le=86_400)] = 60
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 40.0
    connect_timeout_seconds: Annotated[float, Field(gt=0, le=120)] = 5.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 4
    mass_removal_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    mass_removal_confirmations: Annotated[int, Field(ge=1, le=100)] = 3
    allow_insecure_http: bool = False
    backoff_max_seconds: Annotated[int, Field(ge=1, le=86_400)] = 900
    backoff_after_transient_failures: Annotated[int, Field(ge=1, le=1000)] = 3
    platform: Platform = "whatsapp"
    #: checkWhatsapp requests per second when linking changed chat ids (0: never ask)
    link_requests_per_second: Annotated[float, Field(ge=0, le=10)] = 5.0


class InstanceConfig(_Strict):
    """One Green-API instance (WhatsApp account) to sync."""

    id_instance: Annotated[int, Field(ge=1, le=9_999_999_999)]
    label: str = ""
    api_url: str | None = None
    api_token_env: str | None = None
    api_token_file: Path | None = None
    api_token: SecretStr | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    enabled: bool = True
    interval_seconds: Annotated[int, Field(ge=1, le=86_400)] | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    platform: Platform | None = None

    @model_validator(mode="after")
    def _one_token_source(self) -> InstanceConfig:
        given = [
            k
            for k in ("api_token_env", "api_token_file", "api_token")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of api_token_env, api_token_file, api_token"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class SchedulerSettings(_Strict):
    max_workers: Annotated[int, Field(ge=1, le=256)] = 8
    shutdown_timeout_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    #: several replicas on PostgreSQL: how often each renews its lease and claims work
    #: (default: a quarter of the shortest interval, between 0.5 and 10 s)
    heartbeat_seconds: Annotated[float, Field(gt=0, le=300)] | None = None
    #: how long a replica's lease lasts unrenewed before its instances are taken over
    #: (default: three heartbeats)
    lease_seconds: Annotated[float, Field(gt=0, le=3600)] | None = None
    #: keep each instance's snapshot packed between ticks (tens of bytes per chat instead
    #: of a few hundred, for CPU each tick) and write it every tick, so that a restart or
    #: a replica taking the instance over starts from it instead of the chat rows
    compact_snapshots: bool = False
    #: otherwise, every this many ticks each instance's snapshot is written (the instances
    #: take turns); a process that reads one some ticks old tops it up from the rows
    #: written since instead of reading every chat row (a replica that died, say); 0: never
    persist_every_ticks: Annotated[int, Field(ge=0, le=10_000)] = 10
    #: when the daemon stops or hands instances to another replica, write their snapshots
    #: (those not written already), so that the next process to sync them starts from them
    persist_on_release: bool = True

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self) -> SchedulerSettings:
        beat, lease = self.heartbeat_seconds, self.lease_seconds
        if beat is not None and lease is not None and lease < 2 * beat:
            raise ValueError("lease_seconds must be at least twice heartbeat_seconds")
        return self


class DatabaseSettings(_Strict):
    """How the daemon talks to its database."""

    #: PostgreSQL: psycopg prepares a statement on the server once it has run this many
    #: times; "off" never prepares, for PgBouncer in transaction mode before 1.21 (a
    #: prepared statement would be looked for on another server connection)
    prepare_threshold: Annotated[int, Field(ge=0, le=1_000_000)] | Literal["off"] = 5

    @property
    def psycopg_prepare_threshold(self) -> int | None:
        """The value for psycopg (None: never prepare)."""
        return None if self.prepare_threshold == "off" else self.prepare_threshold


class HttpSettings(_Strict):
    """The status/metrics HTTP endpoint (on in `etl run`, off in `etl sync --once`)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65_535)] = 8000
    #: one `id_instance` label per instance on the per-instance gauges; off for huge fleets
    per_instance_metrics: bool = True


class RetentionSettings(_Strict):
    """How long ``sync_runs`` rows are kept; the daemon prunes older ones in batches."""

    sync_runs_days: Annotated[int, Field(ge=0, le=36_500)] = 30  # 0 = keep forever
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    interval_seconds: Annotated[int, Field(ge=1, le=604_800)] = 3600


class FileConfig(_Strict):
    """The TOML file, as written by the user."""

    database_url: str | None = None
    database: DatabaseSettings = DatabaseSettings()
    defaults: Defaults = Defaults()
    scheduler: SchedulerSettings = SchedulerSettings()
    http: HttpSettings = HttpSettings()
    retention: RetentionSettings = RetentionSettings()
    instances: list[InstanceConfig] = []

    @field_validator("instances")
    @classmethod
    def _unique_ids(cls, value: list[InstanceConfig]) -> list[InstanceConfig]:
        seen: set[int] = set()
        for inst in value:
            if inst.id_instance in seen:
                raise ValueError(f"duplicate id_instance {inst.id_instance}")
            seen.add(inst.id_instance)
        return value


@dataclass(frozen=True, slots=True)
class Instance:
    """A fully resolved instance: defaults applied, token loaded. ``repr`` hides the token."""

    id_instance: int
    label: str
    api_url: str
    token: SecretStr
    count: int | None
    enabled: bool
    interval_seconds: int
    timeout_seconds: float
    connect_timeout_seconds: float
    max_attempts: int
    mass_removal_threshold: float
    mass_removal_confirmations: int
    backoff_max_seconds: int = 900
    backoff_after_transient_failures: int = 3
    platform: str = "whatsapp"
    link_requests_per_second: float = 5.0


@dataclass(frozen=True, slots=True)
class AppConfig:
    database_url: str
    instances: tuple[Instance, ...]
    scheduler: SchedulerSettings
    source: Path | None
    http: HttpSettings = HttpSettings()
    retention: RetentionSettings = RetentionSettings()
    database: DatabaseSettings = DatabaseSettings()


def _error_location(err: Any, raw: dict[str, Any]) -> str:
    """Turn a pydantic error location into 'instance 1101000001 (instances[0]), key api_url'."""
    loc = list(err["loc"])
    if len(loc) >= 2 and loc[0] == "instances" and isinstance(loc[1], int):
        idx = loc[1]
        try:
            ident = raw["instances"][idx].get("id_instance", "?")
        except (IndexError, AttributeError, KeyError, TypeError):
            ident = "?"
        key = ".".join(str(p) for p in loc[2:]) or "(instance)"
        return f"instance {ident} (instances[{idx}]), key {key!r}"
    return f"key {'.'.join(str(p) for p in loc) or '(top level)'!r}"


def _format_validation_error(exc: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors(include_input=False, include_url=False):
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {_error_location(err, raw)}: {msg}")
    return "\n".join(lines)


def _load_token(inst: InstanceConfig, source: str) -> SecretStr:
    where = f"instance {inst.id_instance}"
    if inst.api_token is not None:
        token = inst.api_token.get_secret_value().strip()
        if not token:
            raise ConfigError(f"{where}, key 'api_token': empty token")
        return SecretStr(token)
    if inst.api_token_env is not None:
        value = os.environ.get(inst.api_token_env)
        if value is None or not value.strip():
            raise ConfigError(
                f"{where}, key 'api_token_env': environment variable "
                f"{inst.api_token_env} is not set or empty"
            )
        return SecretStr(value.strip())
    assert inst.api_token_file is not None
    path = inst.api_token_file
    if not path.is_absolute() and source:
        path = Path(source).parent / path
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{where}, key 'api_token_file': cannot read {path}: {exc.strerror}"
        ) from None
    if not value:
        raise ConfigError(f"{where}, key 'api_token_file': {path} is empty")
    return SecretStr(value)


def _warn_if_readable(path: Path, file_config: FileConfig) -> None:
    if not any(i.api_token is not None for i in file_config.instances):
        return
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "%s holds an inline api_token and is readable by other users; "
            "prefer api_token_env or api_token_file (or chmod 600 the file)",
            path,
        )


def parse_config(raw: dict[str, Any], *, source: str = "<config>") -> FileConfig:
    try:
        return FileConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, raw, source)) from None


def resolve_instances(file_config: FileConfig, *, source: str = "") -> tuple[Instance, ...]:
    """Apply defaults, validate URLs and load every token (registered for redaction)."""
    d = file_config.defaults
    tokens = [_load_token(inst, source) for inst in file_config.instances]
    # Every token is registered before any URL is checked, so that a bad URL quoted in an
    # error below is masked even when it holds a token; and all at once (see
    # register_secrets).
    register_secrets(token.get_secret_value() for token in tokens)
    checked: dict[str, str] = {}  # most instances share a URL: each is checked once
    out: list[Instance] = []
    for inst, token in zip(file_config.instances, tokens, strict=True):
        api_url = inst.api_url or d.api_url
        if api_url not in checked:
            checked[api_url] = _checked_url(inst, api_url, d.allow_insecure_http)
        out.append(
            Instance(
                id_instance=inst.id_instance,
                label=inst.label or f"instance {inst.id_instance}",
                api_url=checked[api_url],
                token=token,
                count=inst.count,
                enabled=inst.enabled,
                interval_seconds=inst.interval_seconds or d.interval_seconds,
                timeout_seconds=inst.timeout_seconds or d.timeout_seconds,
                connect_timeout_seconds=d.connect_timeout_seconds,
                max_attempts=inst.max_attempts or d.max_attempts,
                mass_removal_threshold=d.mass_removal_threshold,
                mass_removal_confirmations=d.mass_removal_confirmations,
                backoff_max_seconds=d.backoff_max_seconds,
                backoff_after_transient_failures=d.backoff_after_transient_failures,
                platform=inst.platform or d.platform,
                link_requests_per_second=d.link_requests_per_second,
            )
        )
    return tuple(out)


def _checked_url(inst: InstanceConfig, api_url: str, allow_insecure_http: bool) -> str:
    key = "api_url" if inst.api_url else "defaults.api_url"
    try:
        return check_api_url(api_url, allow_insecure_http=allow_insecure_http)
    except ValueError as exc:
        raise ConfigError(redact(f"instance {inst.id_instance}, key {key!r}: {exc}")) from None


def resolve_config_path(flag: str | None) -> tuple[Path, bool]:
    """The config path and whether the user asked for it explicitly (flag or env)."""
    if flag:
        return Path(flag), True
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env), True
    return Path(DEFAULT_CONFIG_PATH), False


def read_file_config(path: Path, *, required: bool) -> FileConfig:
    if not path.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist")
        return FileConfig()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    file_config = parse_config(raw, source=str(path))
    _warn_if_readable(path, file_config)
    return file_config


def resolve_database_url(flag: str | None, file_config: FileConfig | None) -> str:
    if flag:
        return flag
    env = os.environ.get(ENV_DATABASE_URL)
    if env:
        return env
    if file_config is not None and file_config.database_url:
        return file_config.database_url
    return DEFAULT_DATABASE_URL


def load_config(
    *, config_path: str | None = None, database_url: str | None = None, load_instances: bool = True
) -> AppConfig:
    """Load and validate everything. Raises ConfigError with a message that names the key."""
    path, explicit = resolve_config_path(config_path)
    file_config = read_file_config(path, required=explicit)
    instances = resolve_instances(file_config, source=str(path)) if load_instances else ()
    return AppConfig(
        database_url=resolve_database_url(database_url, file_config),
        instances=instances,
        scheduler=file_config.scheduler,
        source=path if path.exists() else None,
        http=file_config.http,
        retention=file_config.retention,
        database=file_config.database,
    )
