"""Settings: command-line arguments > ``PAYMASTER_*`` environment > ``paymaster.toml`` >
defaults. Read once, at the edge (CLI, server start); the core never reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paymaster.errors import InvalidRequest
from paymaster.money import check_currency

DEFAULT_DB = "sqlite:///.paymaster/paymaster.db"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ConnectorConfig:
    id: str
    hosts: tuple[str, ...]
    category: str | None = None
    usage: str | None = None  # openai | anthropic | header:NAME | flat
    upstream: str | None = None
    credentials: Mapping[str, str] | None = None
    pricing: Mapping[str, Any] | None = None

    def credential_header(self) -> tuple[str, str] | None:
        """The provider credential, ``${ENV}`` expanded at the moment of use."""
        if not self.credentials:
            return None
        name = self.credentials.get("header", "Authorization")
        value = _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), self.credentials.get("value", ""))
        return name, value


@dataclass(frozen=True)
class Settings:
    db_url: str = DEFAULT_DB
    config_path: str | None = None
    authority_id: str = "paymaster.local"
    currency: str = "USD"
    admin_key: str | None = None
    home: str = ".paymaster"
    prices: Mapping[str, Any] = field(default_factory=dict)
    fx: Mapping[str, Any] = field(default_factory=dict)
    connectors: tuple[ConnectorConfig, ...] = ()
    alerts: Mapping[str, Any] = field(default_factory=dict)
    audit_sink: str | None = None
    reservation_ttl: int = 300
    reservation_ttl_max: int = 3600
    session_ttl: int = 86400
    host: str = "127.0.0.1"
    port: int = 8787
    workers: int = 1

    @property
    def signing_key_path(self) -> Path:
        return Path(self.home) / "authority.key"

    def connector(self, connector_id: str) -> ConnectorConfig | None:
        for c in self.connectors:
            if c.id == connector_id:
                return c
        return None


def _parse_connectors(raw: Any) -> tuple[ConnectorConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest("[[connectors]] must be an array of tables")
    out: list[ConnectorConfig] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise InvalidRequest("each connector needs a string id")
        cid = item["id"]
        if cid in seen:
            raise InvalidRequest(f"connector {cid!r} is configured twice")
        seen.add(cid)
        hosts = item.get("hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise InvalidRequest(f"connector {cid!r}: hosts must be a list of strings")
        unknown = set(item) - {"id", "hosts", "category", "usage", "upstream", "credentials", "pricing"}
        if unknown:
            raise InvalidRequest(f"connector {cid!r}: unknown fields {sorted(unknown)}")
        usage = item.get("usage")
        if (
            usage is not None
            and usage not in ("openai", "anthropic", "flat")
            and not str(usage).startswith("header:")
        ):
            raise InvalidRequest(f"connector {cid!r}: usage must be openai, anthropic, header:NAME or flat")
        out.append(
            ConnectorConfig(
                id=cid,
                hosts=tuple(h.lower() for h in hosts),
                category=item.get("category"),
                usage=usage,
                upstream=item.get("upstream"),
                credentials=item.get("credentials"),
                pricing=item.get("pricing"),
            )
        )
    return tuple(out)


def load_settings(
    *,
    db: str | None = None,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build the settings from arguments, environment and the TOML file."""
    environ = os.environ if env is None else env
    config_path = config or environ.get("PAYMASTER_CONFIG")
    table: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.exists():
            raise InvalidRequest(f"config file {config_path} does not exist")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"config file {config_path}: {exc}") from exc
    elif Path("paymaster.toml").exists():
        config_path = "paymaster.toml"
        try:
            table = tomllib.loads(Path(config_path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"config file {config_path}: {exc}") from exc
    known = {
        "authority_id",
        "currency",
        "prices",
        "fx",
        "connectors",
        "alerts",
        "audit_sink",
        "reservation_ttl",
        "reservation_ttl_max",
        "session_ttl",
        "database",
        "home",
    }
    unknown = set(table) - known
    if unknown:
        raise InvalidRequest(f"config: unknown keys {sorted(unknown)}")
    db_url = db or environ.get("PAYMASTER_DB") or table.get("database") or DEFAULT_DB
    home = environ.get("PAYMASTER_HOME") or table.get("home") or _home_for(db_url)
    values: dict[str, Any] = {
        "db_url": db_url,
        "config_path": config_path,
        "authority_id": str(table.get("authority_id", "paymaster.local")),
        "currency": check_currency(table.get("currency", "USD")),
        "admin_key": environ.get("PAYMASTER_ADMIN_KEY") or None,
        "home": home,
        "prices": table.get("prices", {}),
        "fx": table.get("fx", {}),
        "connectors": _parse_connectors(table.get("connectors")),
        "alerts": table.get("alerts", {}),
        "audit_sink": environ.get("PAYMASTER_AUDIT_SINK") or table.get("audit_sink"),
        "reservation_ttl": int(table.get("reservation_ttl", 300)),
        "reservation_ttl_max": int(table.get("reservation_ttl_max", 3600)),
        "session_ttl": int(table.get("session_ttl", 86400)),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def _home_for(db_url: str) -> str:
    """Keep the authority key beside an SQLite database file; ``.paymaster`` otherwise."""
    if db_url.startswith("sqlite:///"):
        path = Path(db_url.removeprefix("sqlite:///"))
        return str(path.parent) if str(path.parent) not in ("", ".") else ".paymaster"
    return ".paymaster"
