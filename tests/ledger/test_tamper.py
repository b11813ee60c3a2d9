"""Tampering with the audit chain behind the authority's back (sqlite3 on the file).

Every edit, drop, reorder, insertion or truncation of events is caught by
``verify_audit()`` and names the first event that can no longer be trusted; a truncated
tail together with a rolled-back signed head is caught only against the heads exported to
the append-only sink (``verify_audit(against=SINK)``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paymaster.authority import Authority
from paymaster.bootstrap import open_authority
from paymaster.core.audit import VerifyResult, canonical, event_hash
from paymaster.money import parse_nanos

from .conftest import FakeClock, Ledger, settings_for


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Callable[[], Authority]]:
    """A closed SQLite database holding a chain of ~20 events written in many transactions
    (so the sink holds many heads); yields a function that reopens it."""
    db = tmp_path / "pm.db"
    sink = tmp_path / "heads.jsonl"
    settings = settings_for(f"sqlite:///{db}", tmp_path / "home", {"PAYMASTER_AUDIT_SINK": str(sink)})
    clock = FakeClock()
    authority = open_authority(settings, clock=clock)
    ledger = Ledger(authority, clock)
    agent = ledger.agent(fund="10.00", policy={"caps": [{"scope": "all", "period": "day", "limit": "5.00"}]})
    for i in range(4):
        res = ledger.reserve(agent, "1.00")
        if i % 2:
            ledger.release(res["reservation_id"])
        else:
            ledger.commit(res["reservation_id"], "0.40")
    with pytest.raises(Exception, match="cannot hold"):
        ledger.reserve(agent, "9.00")
    assert authority.verify_audit().ok
    authority.store.close()
    opened: list[Authority] = []

    def reopen() -> Authority:
        reopened = open_authority(settings, clock=clock)
        opened.append(reopened)
        return reopened

    yield reopen
    for a in opened:
        a.store.close()


def db_path(authority: Authority) -> str:
    return str(authority.store.path)  # type: ignore[attr-defined]


def sql(path: Path | str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with closing(sqlite3.connect(path)) as conn, conn:
        return conn.execute(statement, params).fetchall()


def event(path: Path | str, seq: int) -> dict[str, Any]:
    [(text,)] = sql(path, "SELECT event FROM events WHERE seq = ?", (seq,))
    out: dict[str, Any] = json.loads(text)
    return out


def head_seq(path: Path | str) -> int:
    [(seq,)] = sql(path, "SELECT seq FROM audit_head WHERE id = 1")
    return int(seq)


def put_event(path: Path | str, ev: dict[str, Any], *, insert: bool = False) -> None:
    text = json.dumps(ev, separators=(",", ":"))
    if insert:
        sql(
            path,
            "INSERT INTO events (seq, id, type, time, subject, hash, event) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ev["seq"], ev["id"], ev["type"], ev["time"], ev["subject"], event_hash(ev), text),
        )
    else:
        sql(path, "UPDATE events SET event = ?, hash = ? WHERE seq = ?", (text, event_hash(ev), ev["seq"]))


def verify(
    reopen: Callable[[], Authority], tamper: Callable[[str, int], int], against: bool = False
) -> tuple[VerifyResult, int]:
    """Apply ``tamper(path, head)`` to the closed database; return the verification of the
    reopened chain and the seq the tamper says must be named."""
    authority = reopen()
    path = db_path(authority)
    head = head_seq(path)
    assert head >= 12
    authority.store.close()
    expected = tamper(path, head)
    authority = reopen()
    sink = authority.settings.audit_sink if against else None
    return authority.verify_audit(against=sink), expected


def edit_data(path: str, head: int) -> int:
    k = head // 2
    ev = event(path, k)
    ev["data"]["forged"] = True
    put_event(path, ev)
    return k


def edit_amount_of_a_charge(path: str, head: int) -> int:
    [(k, text)] = sql(
        path,
        "SELECT seq, event FROM events WHERE type = ? ORDER BY seq LIMIT 1",
        ("dev.paymaster.reservation.committed",),
    )
    ev = json.loads(text)
    assert ev["data"]["total"] == "0.40"
    ev["data"]["total"] = "0.04"
    put_event(path, ev)
    return int(k)


def edit_the_last(path: str, head: int) -> int:
    ev = event(path, head)
    ev["subject"] = "someone-else"
    put_event(path, ev)
    return head


def drop(path: str, head: int) -> int:
    k = head // 2
    sql(path, "DELETE FROM events WHERE seq = ?", (k,))
    return k


def drop_and_renumber(path: str, head: int) -> int:
    k = head // 2
    sql(path, "DELETE FROM events WHERE seq = ?", (k,))
    for seq in range(k + 1, head + 1):
        ev = event(path, seq)
        ev["seq"] = seq - 1
        sql(path, "UPDATE events SET seq = ?, event = ? WHERE seq = ?", (seq - 1, json.dumps(ev), seq))
    return k


def swap_seq(path: str, head: int) -> int:
    k = head // 2
    sql(path, "UPDATE events SET seq = -1 WHERE seq = ?", (k,))
    sql(path, "UPDATE events SET seq = ? WHERE seq = ?", (k, k + 1))
    sql(path, "UPDATE events SET seq = ? WHERE seq = -1", (k + 1,))
    return k


def forged(path: str, seq: int, prevhash: str) -> dict[str, Any]:
    ev = event(path, 2)
    ev.update(id="ev_forged", seq=seq, prevhash=prevhash, type="dev.paymaster.budget.funded")
    ev["data"] = {"budget_id": ev["subject"], "amount": "1000000.00"}
    return ev


def insert_at_the_end(path: str, head: int) -> int:
    put_event(path, forged(path, head + 1, event_hash(event(path, head))), insert=True)
    return head + 1


def insert_in_the_middle(path: str, head: int) -> int:
    k = head // 2
    for seq in range(head, k - 1, -1):  # shift k.. up by one, their seq fields too
        ev = event(path, seq)
        ev["seq"] = seq + 1
        sql(path, "UPDATE events SET seq = ?, event = ? WHERE seq = ?", (seq + 1, json.dumps(ev), seq))
    put_event(path, forged(path, k, event_hash(event(path, k - 1))), insert=True)
    return k


def truncate_tail(path: str, head: int) -> int:
    sql(path, "DELETE FROM events WHERE seq > ?", (head - 3,))
    return head - 2


TAMPERS = [
    edit_data,
    edit_amount_of_a_charge,
    edit_the_last,
    drop,
    drop_and_renumber,
    swap_seq,
    insert_at_the_end,
    insert_in_the_middle,
    truncate_tail,
]


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_tampering_is_caught_at_the_first_bad_event(
    chain: Callable[[], Authority], tamper: Callable[[str, int], int]
) -> None:
    result, expected = verify(chain, tamper)
    assert not result.ok
    assert result.first_bad_seq == expected, result
    assert result.reason
    assert result.to_json()["first_bad_seq"] == expected


@pytest.mark.parametrize("tamper", TAMPERS, ids=[t.__name__ for t in TAMPERS])
def test_tampering_is_caught_against_the_sink_too(
    chain: Callable[[], Authority], tamper: Callable[[str, int], int]
) -> None:
    result, _ = verify(chain, tamper, against=True)
    assert not result.ok


def test_an_untouched_chain_verifies_with_and_without_the_sink(chain: Callable[[], Authority]) -> None:
    authority = chain()
    assert authority.verify_audit().ok
    assert authority.settings.audit_sink is not None
    heads = [json.loads(line) for line in Path(authority.settings.audit_sink).read_text().splitlines()]
    assert len(heads) >= 10  # one per transaction that wrote events
    result = authority.verify_audit(against=authority.settings.audit_sink)
    assert result.ok
    assert result.head_seq == heads[-1]["seq"]


def test_a_truncated_tail_with_a_rolled_back_head_is_caught_only_against_the_sink(
    chain: Callable[[], Authority],
) -> None:
    authority = chain()
    path = db_path(authority)
    sink = authority.settings.audit_sink
    assert sink is not None
    heads = [json.loads(line) for line in Path(sink).read_text().splitlines()]
    authority.store.close()
    old = heads[len(heads) // 2]  # a head the authority really signed, earlier on
    sql(path, "DELETE FROM events WHERE seq > ?", (old["seq"],))
    sql(
        path,
        "UPDATE audit_head SET seq = ?, hash = ?, sig = ? WHERE id = 1",
        (old["seq"], old["hash"], old["sig"]),
    )

    authority = chain()
    alone = authority.verify_audit()
    assert alone.ok and alone.head_seq == old["seq"]  # consistent on its own: undetectable without the sink
    result = authority.verify_audit(against=sink)
    assert not result.ok
    assert result.first_bad_seq == old["seq"] + 1, result


def test_a_forged_head_signature_is_caught(chain: Callable[[], Authority]) -> None:
    authority = chain()
    path = db_path(authority)
    authority.store.close()
    [(seq,)] = sql(path, "SELECT seq FROM audit_head")
    truncate_tail(path, int(seq))
    new_head = event_hash(event(path, int(seq) - 3))
    sql(path, "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (int(seq) - 3, new_head))
    result = chain().verify_audit()
    assert not result.ok
    assert result.reason == "head signature invalid"


def test_the_ledger_keeps_working_after_verification(chain: Callable[[], Authority]) -> None:
    authority = chain()
    ledger = Ledger(authority, authority.clock)  # type: ignore[arg-type]
    agent = ledger.agent(fund="1.00")
    ledger.commit(ledger.reserve(agent, "0.50")["reservation_id"])
    assert authority.verify_audit(against=authority.settings.audit_sink).ok
    assert authority.budget(f"{agent}/total")["spent"] == "0.50"
    assert parse_nanos("0.50") == 500_000_000


# ---------------------------------------------------------------- canonical JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_json_is_rfc8785(value: Any) -> None:
    import rfc8785

    try:
        expected = rfc8785.dumps(value)
    except Exception:
        with pytest.raises(Exception):
            canonical(value)
        return
    assert canonical(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        1.5,
        {"a": 1e21},
        {"\U0001f600": 1, "\ufb01": 2},
        ["\ud800"],
        2**53,
        -(2**53),
        {"k": [0.1, "x"]},
        "\x00\x1f\x7f",
    ],
)
def test_canonical_json_edge_cases_are_rfc8785(value: Any) -> None:
    import rfc8785

    try:
        expected = rfc8785.dumps(value)
    except Exception:
        with pytest.raises(Exception):
            canonical(value)
        return
    assert canonical(value) == expected
