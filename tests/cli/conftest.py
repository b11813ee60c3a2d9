"""Fixtures for the command line: a CliRunner bound to a tmp_path database, and a way to
look at the same database through the authority, to check that what the CLI prints is
what the authority holds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import open_authority
from paymaster.cli.main import app
from paymaster.config import load_settings
from paymaster.money import parse_nanos

PAYMASTER_ENV = (
    "PAYMASTER_DB",
    "PAYMASTER_CONFIG",
    "PAYMASTER_ADMIN_KEY",
    "PAYMASTER_HOME",
    "PAYMASTER_AUDIT_SINK",
)


@dataclass
class Cli:
    """``cli("fund", "writer", "--amount", "1")`` runs ``paymaster … --db <tmp db>``."""

    db: str
    home: Path
    runner: CliRunner

    def __call__(self, *args: str, env: dict[str, str] | None = None, db: bool = True) -> Any:
        return self.runner.invoke(app, [*args, *(["--db", self.db] if db else [])], env=env)

    def ok(self, *args: str) -> Any:
        result = self(*args)
        assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}{result.stdout}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def fails(self, *args: str, code: str, exit_code: int = 2, db: bool = True) -> str:
        """Run a command that must fail; returns its one error line."""
        result = self(*args, db=db)
        assert result.exit_code == exit_code, f"exit {result.exit_code}: {result.stderr}{result.stdout}"
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"error: {code}: "), lines[0]
        return str(lines[0])

    @contextmanager
    def authority(self) -> Iterator[Authority]:
        authority = open_authority(load_settings(db=self.db, env={}))
        try:
            yield authority
        finally:
            authority.store.close()

    def agent(self, name: str = "writer", *extra: str) -> str:
        """Create an agent with a key made by the CLI; returns its id."""
        key = self.home / f"{name}-{len(list(self.home.glob('*.pem')))}.pem"
        return str(self.json("agents", "create", name, "--key-out", str(key), *extra)["id"])


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Neither the developer's environment nor a paymaster.toml in the cwd may leak in.
    for name in PAYMASTER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    home = tmp_path / "data"
    return Cli(db=f"sqlite:///{home / 'pm.db'}", home=home, runner=CliRunner())


@pytest.fixture
def ready(cli: Cli) -> Cli:
    """An initialised database."""
    cli.ok("init")
    return cli


def spend(
    authority: Authority, agent_id: str, hold: str, charge: str | None, **request: Any
) -> dict[str, Any]:
    """A reserve and (unless ``charge`` is None) its commit, as the API would run them."""
    caller = Caller("agent", agent_id=agent_id)
    held = authority.reserve(
        ReserveRequest(idempotency_key=None, amount=parse_nanos(hold), **{"connector": "search", **request}),
        caller,
    )
    if charge is None:
        return held
    return authority.commit(held["reservation_id"], amount=parse_nanos(charge), caller=caller)
