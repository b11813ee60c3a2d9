"""``paymaster agents …`` and ``paymaster keys create``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from paymaster.authority import check_principal_name
from paymaster.bootstrap import create_service_key
from paymaster.cli import render
from paymaster.cli.commands import common
from paymaster.errors import InvalidRequest
from paymaster.money import format_nanos

if TYPE_CHECKING:
    from paymaster.sdk.keys import AgentKey

app = typer.Typer(
    help="Register agents and pause, resume or revoke them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
keys_app = typer.Typer(
    help="Service keys for trusted services (gateways, LiteLLM hooks).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

AgentArg = Annotated[str, typer.Argument(metavar="AGENT", help="Agent id (ag_…) or unique name.")]


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for people; need not be unique.")],
    public_key: Annotated[
        str | None,
        typer.Option("--public-key", metavar="B64", help="The agent's own ed25519 public key (base64url)."),
    ] = None,
    key_out: Annotated[
        Path | None,
        typer.Option("--key-out", metavar="FILE", help="Make the agent's key and write it here (0600)."),
    ] = None,
    allow: Annotated[
        list[str] | None, typer.Option("--allow", metavar="HOST", help="A host it may call (repeatable).")
    ] = None,
    daily: Annotated[str | None, typer.Option("--daily", metavar="AMT", help="A daily cap.")] = None,
    parent: Annotated[str | None, typer.Option("--parent", metavar="P", help="Its team or tenant.")] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", metavar="K=V", help="Metadata (repeatable).")
    ] = None,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Register an agent, by its own public key or with a key made here.

    Exactly one of --public-key (the agent made its key) and --key-out (make it now, write
    it 0600, never over an existing file): the authority keeps only public keys.
    """
    if (public_key is None) == (key_out is None):
        raise InvalidRequest("give exactly one of --public-key B64 and --key-out FILE")
    policy: dict[str, Any] = {}
    if allow:
        policy["allow_hosts"] = list(allow)
    if daily is not None:
        policy["caps"] = [
            {"scope": "all", "period": "day", "limit": format_nanos(common.amount(daily, "--daily"))}
        ]
    metadata = common.pairs(meta, "--meta")
    settings = common.settings(db, config)
    with common.opened(settings) as authority:
        written: Path | None = None
        if key_out is not None:
            # Imported here: the SDK package brings httpx and its clients, which only the
            # commands that make a key need; every other command starts faster without them.
            from paymaster.sdk.keys import AgentKey

            key = AgentKey.generate()
            _write_key(key, key_out)
            written, public_key = key_out, key.public_key
        assert public_key is not None
        try:
            agent = authority.create_agent(
                name, public_key, policy=policy or None, parent=parent, metadata=metadata or None
            )
        except BaseException:
            # The key was made here for this agent alone: without the agent it is of no use.
            if written is not None:
                with contextlib.suppress(OSError):
                    written.unlink()
            raise
    if json:
        render.json_out({**agent, "key_file": str(written) if written else None})
    else:
        render.agent_created(agent, str(written) if written else None)


def _write_key(key: AgentKey, path: Path) -> None:
    try:
        key.save(path)
    except FileExistsError:
        raise InvalidRequest(f"{path} exists: --key-out never overwrites a key") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot write the key to {path}: {exc.strerror or exc}") from None


@app.command("list")
def list_(
    db: common.DbOption = None, config: common.ConfigOption = None, json: common.JsonOption = False
) -> None:
    """Every agent, oldest first."""
    with common.opened(common.settings(db, config)) as authority:
        agents = authority.list_agents()
    if json:
        render.json_out({"agents": agents})
    else:
        render.agents_table(agents)


@app.command("show")
def show(
    agent: AgentArg,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """One agent: its key, status, metadata and policy."""
    with common.opened(common.settings(db, config)) as authority:
        record = authority.get_agent(common.resolve_agent(authority, agent))
    if json:
        render.json_out(record)
    else:
        render.agent_detail(record)


def _set_status(agent: str, status: str, db: str | None, config: str | None, json: bool) -> None:
    with common.opened(common.settings(db, config)) as authority:
        record = authority.set_status(common.resolve_agent(authority, agent), status)
    if json:
        render.json_out(record)
    else:
        render.status_changed(record)


@app.command("freeze")
def freeze(
    agent: AgentArg,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Pause an agent: its calls are denied (agent_frozen) until it is unfrozen."""
    _set_status(agent, "frozen", db, config, json)


@app.command("unfreeze")
def unfreeze(
    agent: AgentArg,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Resume a frozen agent (a revoked one stays revoked: agent_revoked)."""
    _set_status(agent, "active", db, config, json)


@app.command("revoke")
def revoke(
    agent: AgentArg,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Revoke an agent for good: its key is refused from now on. Revoke is final."""
    _set_status(agent, "revoked", db, config, json)


@keys_app.command("create")
def create_key(
    service: Annotated[
        str,
        typer.Option(
            "--service", metavar="PRINCIPAL", help="The principal (or agent id) the key may charge."
        ),
    ],
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Make a service key bound to PRINCIPAL and what lies below it; printed once."""
    with common.opened(common.settings(db, config)) as authority:
        if service.startswith("ag_"):
            authority.agent(service)  # an agent id must name a registered agent
        else:
            check_principal_name(service)
        key = create_service_key(authority, service)
    if json:
        render.json_out({"key": key, "kind": "service", "principal": service})
    else:
        render.service_key(service, key)
