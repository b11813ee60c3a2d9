"""``paymaster demo``: a runaway agent loop, stopped at its cap, with no server needed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from paymaster import bootstrap
from paymaster.authority import Authority, ReserveRequest
from paymaster.cli import render
from paymaster.cli.commands import common
from paymaster.errors import SpendDenied
from paymaster.money import parse_nanos

if TYPE_CHECKING:
    from paymaster.sdk.keys import AgentKey

WALLET = "5.00"
DAILY_CAP = "1.00"
HOLD = "0.12"  # the worst case the agent's tool call is priced at
CHARGE = "0.10"  # what each call really costs


def demo(
    calls: Annotated[
        int, typer.Option("--calls", min=1, max=1000, help="Most loop iterations to try.")
    ] = 100,
    db: Annotated[
        str | None,
        typer.Option("--db", help="Run in this (initialised) database instead of a fresh temporary one."),
    ] = None,
    config: common.ConfigOption = None,
    json: common.JsonOption = False,
) -> None:
    """Run an agent stuck in a loop against a daily cap, and show each decision and the ledger.

    Uses a fresh temporary database unless --db names one (PAYMASTER_DB is ignored here,
    so a demo never writes into the database you use for real).
    """
    with tempfile.TemporaryDirectory(prefix="paymaster-demo-") as tmp:
        if db is None:
            # Everything the demo writes, key and audit sink included, stays in the temp dir.
            settings = common.settings(
                f"sqlite:///{Path(tmp) / 'demo.db'}",
                config,
                home=tmp,
                audit_sink=str(Path(tmp) / "heads.jsonl"),
            )
            bootstrap.init(settings)
        else:
            settings = common.settings(db, config)
        with common.opened(settings) as authority:
            report = _run(authority, settings.db_url, db is None, calls, json)
    if json:
        render.json_out(report)


def _run(authority: Authority, db_url: str, temporary: bool, calls: int, quiet: bool) -> dict[str, Any]:
    from paymaster.sdk.keys import AgentKey  # the SDK package is slow to import; only the demo needs it

    key = AgentKey.generate()
    agent = authority.create_agent(
        "runaway-researcher",
        key.public_key,
        policy={"caps": [{"scope": "all", "period": "day", "limit": DAILY_CAP}]},
        metadata={"demo": "true"},
    )
    agent_id = agent["id"]
    authority.fund(agent_id, parse_nanos(WALLET))
    if not quiet:
        render.demo_intro(agent, db_url, temporary, DAILY_CAP, WALLET, HOLD)
    results: list[dict[str, Any]] = []
    for n in range(1, calls + 1):
        result = _call(authority, key, agent_id, n)
        results.append(result)
        if not quiet:
            render.demo_call(result)
        if result["decision"] == "deny":
            break
    ledger = authority.ledger(agent=agent_id)
    view = authority.agent_budgets(agent_id)
    audit = authority.verify_audit().to_json()
    if not quiet:
        wallet = next(b for b in view["budgets"] if b["period"] == "total")
        render.demo_stopped(len(results), wallet["spent"], DAILY_CAP)
        render.ledger_table(
            ledger,
            {wallet["currency"]: wallet["spent"]},
            {agent_id: agent["name"]},
            title="final ledger",
            ids=False,
        )
        render.budgets(authority.get_agent(agent_id), view)
        render.audit(audit)
    return {
        "db": db_url,
        "temporary": temporary,
        "agent": agent,
        "calls": results,
        "ledger": ledger,
        "status": view,
        "audit": audit,
    }


def _call(authority: Authority, key: AgentKey, agent_id: str, n: int) -> dict[str, Any]:
    """One iteration, as the SDK would do it: a fresh spend token per verb, reserve, commit."""
    caller = authority.verify_token(key.sign(agent_id=agent_id, aud="paymaster"), audience="paymaster")
    request = ReserveRequest(
        connector="web-search",
        idempotency_key=f"demo-{n}",
        amount=parse_nanos(HOLD),
        metadata={"query": "the same query, again"},
    )
    try:
        hold = authority.reserve(request, caller)
    except SpendDenied as denial:
        return {
            "n": n,
            "decision": "deny",
            "code": denial.code,
            "message": denial.message,
            "budget_id": denial.budget_id,
            "requested": denial.requested,
            "remaining": denial.remaining,
        }
    settle = authority.verify_token(key.sign(agent_id=agent_id, aud="paymaster"), audience="paymaster")
    done = authority.commit(hold["reservation_id"], amount=parse_nanos(CHARGE), caller=settle)
    return {
        "n": n,
        "decision": hold["decision"],
        "reservation_id": hold["reservation_id"],
        "held": hold["amount"],
        "charged": done["charged"],
        # after the commit: what each budget on the path really has left
        "budgets": [
            {"id": b["id"], "remaining": b["remaining"]} for b in authority.agent_budgets(agent_id)["budgets"]
        ],
    }
