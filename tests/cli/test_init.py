"""``paymaster init``: idempotent, never replaces a key, prints a new admin key once."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from paymaster.bootstrap import lookup_api_key

from .conftest import Cli

ADMIN_KEY = re.compile(r"pm_admin_[A-Za-z0-9_-]{20,}")

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_init_makes_database_and_keys_and_prints_the_admin_key_once(cli: Cli) -> None:
    first = cli.ok("init")
    key_file = cli.home / "authority.key"
    assert (cli.home / "pm.db").exists()
    assert mode(key_file) == 0o600
    pem = key_file.read_bytes()
    match = ADMIN_KEY.search(first.stdout)
    assert match is not None, first.stdout
    admin_key = match.group(0)
    assert first.stdout.count(admin_key) == 1
    assert "shown once" in first.stdout

    second = cli.ok("init")
    assert ADMIN_KEY.search(second.stdout) is None
    assert "earlier init" in second.stdout
    # never replaced: same bytes, same mode
    assert key_file.read_bytes() == pem
    assert mode(key_file) == 0o600
    # the authority's private key is never printed, only its path
    for result in (first, second):
        assert "PRIVATE KEY" not in result.stdout + result.stderr
        assert str(key_file) in result.stdout
    with cli.authority() as authority:
        assert lookup_api_key(authority, admin_key) == ("admin", None)


def test_init_json_gives_the_admin_key_only_when_made(cli: Cli) -> None:
    first = cli.json("init")
    assert first["db"] == cli.db
    assert first["signing_key_path"] == str(cli.home / "authority.key")
    assert first["signing_key_created"] is True
    assert first["admin_key_source"] == "created"
    assert ADMIN_KEY.fullmatch(first["admin_key"])
    second = cli.json("init")
    assert second["signing_key_created"] is False
    assert second["admin_key"] is None
    assert second["admin_key_source"] == "existing"


def test_init_takes_the_admin_key_from_the_environment_and_never_prints_it(cli: Cli) -> None:
    key = "pm_admin_from-the-environment-0123456789"
    result = cli("init", env={"PAYMASTER_ADMIN_KEY": key})
    assert result.exit_code == 0, result.stderr
    assert "PAYMASTER_ADMIN_KEY" in result.stdout
    assert key not in result.stdout + result.stderr
    assert ADMIN_KEY.search(result.stdout) is None
    with cli.authority() as authority:
        assert lookup_api_key(authority, key) == ("admin", None)


def test_init_refuses_an_unusable_database_url(cli: Cli) -> None:
    line = cli.fails("init", "--db", "sqlite://relative.db", code="invalid_request", db=False)
    assert "sqlite:///PATH" in line


def test_commands_refuse_a_database_init_never_made(cli: Cli) -> None:
    line = cli.fails("status", code="not_found")
    assert "paymaster init" in line
    assert not (cli.home / "pm.db").exists()  # nothing was created at the mistyped path


def test_a_missing_authority_key_is_unavailable_not_silently_replaced(ready: Cli) -> None:
    (ready.home / "authority.key").unlink()
    line = ready.fails("status", code="authority_unavailable", exit_code=1)
    assert "authority.key" in line
    assert not (ready.home / "authority.key").exists()
