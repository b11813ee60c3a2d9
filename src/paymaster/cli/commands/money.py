"""``paymaster fund``, ``paymaster limits`` and ``paymaster status``."""

from __future__ import annotations

from typing import Annotated

import typer

from paymaster.cli import render
from paymaster.cli.commands import common
from paymaster.money import format_nanos

AgentArg = Annotated[str, typer.Argument(metavar="AGENT", help="Agent id (ag_…) or unique name.")]


def fund(
    agent: AgentArg,
    amount: Annotated[
        str, typer.Option("--amount", metavar="AMT", help="Decimal, e.g. 20.00; added to the wallet.")
    ],
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Add AMT to the agent's wallet (its total budget) and print the wallet."""
    nanos = common.amount(amount, "amount", allow_zero=False)
    with common.opened(common.settings(db, config)) as authority:
        agent_id = common.resolve_agent(authority, agent)
        wallet = authority.fund(agent_id, nanos)
        record = authority.get_agent(agent_id)
    if json:
        render.json_out(wallet)
    else:
        render.funded(record, format_nanos(nanos), wallet)


def limits(
    agent: AgentArg,
    daily: Annotated[str | None, typer.Option("--daily", metavar="AMT", help="Cap per UTC day.")] = None,
    monthly: Annotated[
        str | None, typer.Option("--monthly", metavar="AMT", help="Cap per UTC month.")
    ] = None,
    session: Annotated[str | None, typer.Option("--session", metavar="AMT", help="Cap per session.")] = None,
    per_call: Annotated[
        str | None, typer.Option("--per-call", metavar="AMT", help="Most any one call may cost.")
    ] = None,
    connector: Annotated[
        list[str] | None,
        typer.Option("--connector", metavar="ID=AMT/PERIOD", help="Cap on one connector (repeatable)."),
    ] = None,
    category: Annotated[
        list[str] | None,
        typer.Option("--category", metavar="CAT=AMT/PERIOD", help="Cap on one category (repeatable)."),
    ] = None,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Set the limits named and keep every other part of the policy as it is.

    PERIOD is session, hour, day, week, month or total. Connector ids need not be
    configured. With no limit named, prints the current limits and changes nothing.
    """
    # Every value is parsed before anything is written: a bad one changes nothing.
    values = {
        "daily": common.optional_amount(daily, "--daily"),
        "monthly": common.optional_amount(monthly, "--monthly"),
        "session": common.optional_amount(session, "--session"),
        "per_call": common.optional_amount(per_call, "--per-call"),
    }
    connectors = common.limit_specs(connector, "--connector")
    categories = common.limit_specs(category, "--category")
    named = {k: v for k, v in values.items() if v is not None}
    changed = bool(named or connectors or categories)
    with common.opened(common.settings(db, config)) as authority:
        agent_id = common.resolve_agent(authority, agent)
        if changed:
            record = authority.set_limits(
                agent_id, **named, connector=connectors or None, category=categories or None
            )
        else:
            record = authority.get_agent(agent_id)
    if json:
        render.json_out(record)
    else:
        render.limits(record, changed)


def status(
    agent: Annotated[
        str | None,
        typer.Argument(metavar="[AGENT]", help="Agent id or unique name; every agent when left out."),
    ] = None,
    db: common.DbOption = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Each budget on an agent's path in its current window: limit, spent, reserved, remaining, % used."""
    with common.opened(common.settings(db, config)) as authority:
        if agent is not None:
            agent_id = common.resolve_agent(authority, agent)
            records = [authority.get_agent(agent_id)]
        else:
            records = authority.list_agents()
        views = [authority.agent_budgets(record["id"]) for record in records]
    if json:
        # The shapes of GET /v1/agents/{id}/budgets, and a list of them for every agent.
        render.json_out(views[0] if agent is not None else {"agents": views})
        return
    if not records:
        render.agents_table([])
    for record, view in zip(records, views, strict=True):
        render.budgets(record, view)
