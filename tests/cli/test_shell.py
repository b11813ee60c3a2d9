"""What every command shares: the options, the one-line error, the exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

import paymaster.server.run
from paymaster.cli.commands import common
from paymaster.cli.main import app
from paymaster.errors import AuthorityUnavailable
from paymaster.store.base import StoreUnavailable

from .conftest import Cli


def leaf_commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            out += leaf_commands(command, (*path, name))
        else:
            out.append(((*path, name), command))
    return out


def test_every_command_takes_db_config_and_json() -> None:
    commands = leaf_commands(typer.main.get_command(app))
    names = {" ".join(path) for path, _ in commands}
    assert names == {
        "init",
        "serve",
        "agents create",
        "agents list",
        "agents show",
        "agents freeze",
        "agents unfreeze",
        "agents revoke",
        "keys create",
        "fund",
        "limits",
        "status",
        "ledger",
        "audit verify",
        "report focus",
        "demo",
    }
    for path, command in commands:
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert {"--db", "--config", "--json"} <= options, path


def test_usage_errors_are_one_line_invalid_request(cli: Cli) -> None:
    assert "No such command" in cli.fails("frobnicate", code="invalid_request")
    assert "--amount" in cli.fails("fund", "writer", code="invalid_request")
    assert "--port" in cli.fails("serve", "--port", "0", code="invalid_request")


def test_no_command_prints_help(cli: Cli) -> None:
    result = cli(db=False)
    assert result.exit_code == 2
    assert "agents" in result.stdout


def test_an_unavailable_store_exits_1(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(settings: Any) -> Any:
        raise StoreUnavailable("database is locked")

    monkeypatch.setattr(common, "open_authority", broken)
    assert "database is locked" in ready.fails("agents", "list", code="authority_unavailable", exit_code=1)
    monkeypatch.setattr(
        common, "open_authority", lambda s: (_ for _ in ()).throw(AuthorityUnavailable("down"))
    )
    ready.fails("status", code="authority_unavailable", exit_code=1)


def test_serve_runs_the_server_with_the_settings(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(paymaster.server.run, "serve", lambda *args: calls.append(args))
    result = cli("serve", "--host", "0.0.0.0", "--port", "9000", "--workers", "3")
    assert result.exit_code == 0, result.stderr
    ((settings, host, port, workers),) = calls
    assert (host, port, workers) == ("0.0.0.0", 9000, 3)
    assert settings.db_url == cli.db
    assert "http://0.0.0.0:9000" in result.stdout
    calls.clear()
    assert cli("serve").exit_code == 0
    assert calls[0][1:] == ("127.0.0.1", 8787, 1)


def test_db_and_config_come_from_the_environment(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "paymaster.toml"
    config.write_text('authority_id = "pm.test"\ncurrency = "EUR"\n')
    env = {"PAYMASTER_DB": cli.db, "PAYMASTER_CONFIG": str(config)}
    assert cli("init", env=env, db=False).exit_code == 0
    made = cli("agents", "create", "w", "--key-out", str(tmp_path / "w.pem"), "--json", env=env, db=False)
    assert made.exit_code == 0, made.stderr
    agent = __import__("json").loads(made.stdout)["id"]
    funded = cli("fund", agent, "--amount", "1", "--json", env=env, db=False)
    assert __import__("json").loads(funded.stdout)["currency"] == "EUR"
    assert (cli.home / "pm.db").exists()
    report = cli("report", "focus", "--from", "2000-01-01", "--to", "2100-01-01", env=env, db=False)
    assert report.exit_code == 0


def test_a_bad_config_is_bad_input(ready: Cli, tmp_path: Path) -> None:
    ready.fails("status", "--config", str(tmp_path / "missing.toml"), code="invalid_request")
    broken = tmp_path / "broken.toml"
    broken.write_text("currency = [")
    ready.fails("status", "--config", str(broken), code="invalid_request")
    (tmp_path / "paymaster.toml").write_text("currency = [")  # the one in the cwd, read implicitly
    ready.fails("status", code="invalid_request")
