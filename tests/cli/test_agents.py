"""``paymaster agents …`` and ``paymaster keys create``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from paymaster.bootstrap import lookup_api_key
from paymaster.sdk.keys import AgentKey

from .conftest import Cli

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@posix_only
def test_create_with_key_out_writes_the_agent_key_0600(ready: Cli, tmp_path: Path) -> None:
    key_file = tmp_path / "writer.pem"
    agent = ready.json("agents", "create", "writer", "--key-out", str(key_file))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # the file holds the private half of the public key the authority registered
    assert AgentKey.load(key_file).public_key == agent["public_key"]
    assert agent["key_file"] == str(key_file)
    assert "PRIVATE KEY" not in str(agent)
    with ready.authority() as authority:
        assert authority.get_agent(agent["id"]) == {k: v for k, v in agent.items() if k != "key_file"}


@pytest.mark.parametrize(
    "options",
    [[], ["--public-key", AgentKey.generate().public_key, "--key-out", "both.pem"]],
    ids=["neither", "both"],
)
def test_create_needs_exactly_one_key_option(ready: Cli, tmp_path: Path, options: list[str]) -> None:
    line = ready.fails("agents", "create", "writer", *options, code="invalid_request")
    assert "--public-key" in line
    assert "--key-out" in line
    assert not (tmp_path / "both.pem").exists()
    assert ready.json("agents", "list") == {"agents": []}


def test_create_never_overwrites_a_key_file(ready: Cli, tmp_path: Path) -> None:
    key_file = tmp_path / "kept.pem"
    key_file.write_bytes(b"someone's key")
    line = ready.fails("agents", "create", "writer", "--key-out", str(key_file), code="invalid_request")
    assert "never overwrites" in line
    assert key_file.read_bytes() == b"someone's key"
    assert ready.json("agents", "list") == {"agents": []}


def test_create_with_a_public_key_and_every_option(ready: Cli) -> None:
    public_key = AgentKey.generate().public_key
    agent = ready.json(
        "agents",
        "create",
        "researcher",
        "--public-key",
        public_key,
        "--allow",
        "api.openai.com",
        "--allow",
        "*.tavily.com",
        "--daily",
        "5",
        "--parent",
        "team:growth",
        "--meta",
        "team=growth",
        "--meta",
        "query=a=b",
    )
    assert agent["public_key"] == public_key
    assert agent["key_file"] is None
    assert agent["parent"] == "team:growth"
    assert agent["metadata"] == {"team": "growth", "query": "a=b"}
    assert agent["policy"]["allow_hosts"] == ["api.openai.com", "*.tavily.com"]
    assert [(c["scope"], c["period"], c["limit"]) for c in agent["policy"]["caps"]] == [
        ("all", "day", "5.00")
    ]
    with ready.authority() as authority:
        assert authority.get_agent(agent["id"])["policy"] == agent["policy"]


def test_a_refused_agent_leaves_no_key_behind(ready: Cli, tmp_path: Path) -> None:
    key_file = tmp_path / "k.pem"
    ready.fails(
        "agents", "create", "writer", "--key-out", str(key_file), "--daily", "1e3", code="invalid_amount"
    )
    ready.fails(
        "agents", "create", "writer", "--key-out", str(key_file), "--parent", "a/b", code="invalid_request"
    )
    ready.fails(
        "agents", "create", "writer", "--key-out", str(key_file), "--meta", "novalue", code="invalid_request"
    )
    assert not key_file.exists()
    assert ready.json("agents", "list") == {"agents": []}


def test_create_refuses_a_malformed_public_key(ready: Cli) -> None:
    ready.fails("agents", "create", "writer", "--public-key", "not-a-key", code="invalid_request")


def test_list_and_show_print_the_authority_records(ready: Cli) -> None:
    first, second = ready.agent("one"), ready.agent("two", "--meta", "team=ops")
    listed = ready.json("agents", "list")["agents"]
    with ready.authority() as authority:
        assert listed == authority.list_agents()
        assert ready.json("agents", "show", second) == authority.get_agent(second)
    assert [a["id"] for a in listed] == [first, second]
    table = ready.ok("agents", "list").stdout
    assert first in table
    assert second in table
    shown = ready.ok("agents", "show", "two").stdout
    assert second in shown
    assert "team=ops" in shown


def test_freeze_unfreeze_revoke(ready: Cli) -> None:
    agent = ready.agent()
    assert ready.json("agents", "freeze", agent)["status"] == "frozen"
    assert ready.json("agents", "unfreeze", agent)["status"] == "active"
    assert "is now revoked" in ready.ok("agents", "revoke", agent).stdout
    line = ready.fails("agents", "unfreeze", agent, code="agent_revoked")  # revoke is final
    assert "final" in line
    with ready.authority() as authority:
        assert authority.get_agent(agent)["status"] == "revoked"


def test_agents_are_named_by_id_or_unique_name(ready: Cli) -> None:
    writer = ready.agent("writer")
    assert ready.json("agents", "show", "writer")["id"] == writer
    ready.fails("agents", "show", "nobody", code="not_found")
    ready.fails("agents", "show", "ag_00000000000000000000000000", code="not_found")
    twin = ready.agent("writer")
    line = ready.fails("agents", "freeze", "writer", code="invalid_request")
    assert writer in line
    assert twin in line


def test_keys_create_prints_a_service_key_once(ready: Cli) -> None:
    made = ready.json("keys", "create", "--service", "team:growth")
    assert made["principal"] == "team:growth"
    assert made["key"].startswith("pm_svc_")
    shown = ready.ok("keys", "create", "--service", "team:growth").stdout
    key = next(word for word in shown.split() if word.startswith("pm_svc_"))
    assert shown.count(key) == 1
    assert "shown once" in shown
    with ready.authority() as authority:
        assert lookup_api_key(authority, made["key"]) == ("service", "team:growth")
        assert lookup_api_key(authority, key) == ("service", "team:growth")


def test_keys_create_checks_the_principal(ready: Cli) -> None:
    ready.fails("keys", "create", "--service", "team/growth", code="invalid_request")
    ready.fails("keys", "create", "--service", "ag_00000000000000000000000000", code="not_found")
    agent = ready.agent()
    assert ready.json("keys", "create", "--service", agent)["principal"] == agent
