"""``paymaster demo``: a runaway loop stopped at its cap, on a throwaway database."""

from __future__ import annotations

from pathlib import Path

from paymaster.money import parse_nanos

from .conftest import Cli


def test_demo_stops_the_loop_at_its_cap(cli: Cli, tmp_path: Path) -> None:
    # PAYMASTER_DB is ignored: a demo never writes into the database used for real
    env = {"PAYMASTER_DB": f"sqlite:///{tmp_path / 'real.db'}"}
    result = cli("demo", "--json", db=False, env=env)
    assert result.exit_code == 0, result.stderr
    report = __import__("json").loads(result.stdout)
    assert not (tmp_path / "real.db").exists()
    assert report["temporary"] is True
    calls = report["calls"]
    assert [c["decision"] for c in calls[:-1]] == ["allow"] * (len(calls) - 1)
    assert calls[-1]["decision"] == "deny"
    assert calls[-1]["code"] == "policy_cap_exceeded"
    assert calls[-1]["budget_id"].endswith(calls[-1]["budget_id"].rsplit("/", 1)[-1])
    charged = sum(parse_nanos(e["total"]) for e in report["ledger"])
    assert len(report["ledger"]) == len(calls) - 1
    day = next(b for b in report["status"]["budgets"] if b["period"] == "day")
    assert parse_nanos(day["spent"]) == charged <= parse_nanos(day["limit"])
    assert report["audit"]["ok"] is True


def test_demo_prints_each_decision_and_the_ledger(cli: Cli) -> None:
    out = cli("demo", db=False)
    assert out.exit_code == 0, out.stderr
    assert "allow" in out.stdout
    assert "DENY" in out.stdout
    assert "policy_cap_exceeded" in out.stdout
    assert "final ledger" in out.stdout
    assert "ok: audit log intact" in out.stdout


def test_demo_in_a_named_database(ready: Cli) -> None:
    report = ready.json("demo", "--calls", "3")
    assert report["temporary"] is False
    assert [c["decision"] for c in report["calls"]] == ["allow"] * 3
    assert len(ready.json("ledger")["entries"]) == 3
