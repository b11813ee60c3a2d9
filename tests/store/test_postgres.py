"""The PostgreSQL store, on a real server: migrations, the ledger through the authority, several
replicas on one database (exact admission, per-writer audit chains, cache invalidation), lost
connections, and lock ordering.

Each test gets a database of its own (``CREATE DATABASE pm_test_…`` from ``PAYMASTER_TEST_PG``,
default ``postgresql://postgres@127.0.0.1:5432/test``), dropped afterwards. The tests skip when
the server does not answer, unless ``PAYMASTER_REQUIRE_PG=1`` (then they fail).
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from paymaster.authority import Authority, Caller, ReserveRequest
from paymaster.bootstrap import open_authority
from paymaster.config import Settings, load_settings
from paymaster.core import tokens
from paymaster.core.audit import GENESIS_HASH
from paymaster.errors import SpendDenied
from paymaster.ids import new_id
from paymaster.money import parse_nanos
from paymaster.store import ops
from paymaster.store.base import StoreUnavailable, Tx
from paymaster.store.sqlite import migrations

psycopg = pytest.importorskip("psycopg")
postgres = pytest.importorskip("paymaster.store.postgres")

pytestmark = pytest.mark.postgres

PG_BASE_URL = os.environ.get("PAYMASTER_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/test"
REQUIRE_PG = os.environ.get("PAYMASTER_REQUIRE_PG") == "1"


def _server_problem() -> str | None:
    try:
        with psycopg.connect(PG_BASE_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_BASE_URL} does not answer: {exc}"
    return None


def _with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@pytest.fixture(scope="module")
def pg_server() -> str:
    problem = _server_problem()
    if problem is not None:
        if REQUIRE_PG:
            pytest.fail(problem)
        pytest.skip(problem)
    return PG_BASE_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    name = f"pm_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield _with_db(pg_server, name)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def key() -> Any:
    return tokens.generate_private_key()


@pytest.fixture
def stores(pg_url: str, key: Any) -> Iterator[Callable[..., Any]]:
    """A factory of PostgresStore instances (replicas) on the test database, closed afterwards."""
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        store = postgres.PostgresStore(pg_url, authority_id="pm.test", signing_key=key, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[Callable[[], Authority]]:
    """A factory of authorities (replicas) on the test database, sharing one signing key."""
    made: list[Authority] = []
    settings = Settings(db_url=pg_url, home=str(tmp_path / "home"), authority_id="pm.test")

    def make() -> Authority:
        authority = open_authority(settings)
        made.append(authority)
        return authority

    yield make
    for authority in made:
        authority.store.close()


def sql(pg_url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return list(cur.fetchall()) if cur.description else []


def new_agent(authority: Authority, fund: str | None = None, **kwargs: Any) -> str:
    agent = authority.create_agent("worker", tokens.public_key_b64(tokens.generate_private_key()), **kwargs)
    if fund is not None:
        authority.fund(agent["id"], parse_nanos(fund))
    return str(agent["id"])


def reserve(authority: Authority, agent_id: str, amount: str, key: str | None = None) -> dict[str, Any]:
    return authority.reserve(
        ReserveRequest(connector="tool", idempotency_key=key, agent_id=agent_id, amount=parse_nanos(amount)),
        Caller.admin(),
    )


def budget_state(authority: Authority, budget_id: str) -> tuple[int, int, int]:
    row = authority.store.read(
        lambda tx: tx.one("SELECT limit_n, spent_n, reserved_n FROM budgets WHERE id = ?", (budget_id,))
    )
    assert row is not None
    return int(row["limit_n"]), int(row["spent_n"]), int(row["reserved_n"])


def cap(owner: str, limit: str, scope: str = "all") -> ops.BudgetSpec:
    return ops.BudgetSpec(
        id=f"{owner}/{scope}/day/2026-03-10",
        kind="cap",
        owner=owner,
        scope=scope,
        period="day",
        window="2026-03-10",
        limit=parse_nanos(limit),
    )


def hold_command(path: tuple[ops.BudgetSpec, ...], amount: str = "0.01", **kwargs: Any) -> ops.ReserveCommand:
    base: dict[str, Any] = {
        "reservation_id": new_id("res_"),
        "decision_id": new_id("dec_"),
        "principal": "team",
        "agent_id": None,
        "connector": "tool",
        "category": None,
        "amount": parse_nanos(amount),
        "currency": "USD",
        "decision": "allow",
        "path": path,
        "expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    base.update(kwargs)
    return ops.ReserveCommand(**base)


# ---------------------------------------------------------------- migrations


def test_migrations_are_idempotent_and_safe_when_stores_start_together(pg_url: str, stores: Any) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    opened: list[Any] = []

    def start() -> None:
        barrier.wait()
        try:
            opened.append(stores(writers=2, readers=2))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(opened) == 4
    latest = str(max(version for version, _ in migrations("postgres")))
    assert sql(pg_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(latest,)]
    # once more, and once more by hand: nothing to do, nothing breaks
    again = stores(writers=1, readers=1)
    assert again.migrate() == int(latest)
    tables = {r[0] for r in sql(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"budgets", "reservations", "events", "audit_heads", "tier_counter_shards", "meta"} <= tables


def test_open_fails_closed_when_the_server_is_unreachable(key: Any) -> None:
    with pytest.raises(StoreUnavailable):
        postgres.PostgresStore(
            "postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=2",
            authority_id="pm.test",
            signing_key=key,
        )


# ---------------------------------------------------------------- the ledger through the authority


def test_reserve_commit_release_round_trip_through_open_authority(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default home, .paymaster, lands here
    authority = open_authority(load_settings(db=pg_url, env={}))
    try:
        assert authority.store.dialect == "postgresql"
        agent = new_agent(authority, fund="5.00", policy={"daily_cap": "1.00"})
        first = reserve(authority, agent, "0.60", key="k1")
        assert first["decision"] == "allow"
        assert reserve(authority, agent, "0.60", key="k1") == first  # idempotent replay
        with pytest.raises(SpendDenied) as denied:
            reserve(authority, agent, "0.60", key="k2")
        assert denied.value.code == "policy_cap_exceeded"
        committed = authority.commit(
            first["reservation_id"], amount=parse_nanos("0.25"), caller=Caller.admin()
        )
        assert (committed["charged"], committed["released"]) == ("0.25", "0.35")
        second = reserve(authority, agent, "0.50")
        released = authority.release(second["reservation_id"], caller=Caller.admin(), reason="not needed")
        assert released["released"] == "0.50"
        assert authority.query_reservation(second["reservation_id"])["status"] == "released"
        assert budget_state(authority, f"{agent}/total") == (parse_nanos("5.00"), parse_nanos("0.25"), 0)
        [entry] = authority.ledger()
        assert entry["total"] == "0.25"
        refund = authority.refund(
            entry["id"], parse_nanos("0.05"), "partial", idempotency_key="r1", body={"a": 1}
        )
        assert refund["amount"] == "0.05"
        assert budget_state(authority, f"{agent}/total")[1] == parse_nanos("0.20")
        result = authority.verify_audit()
        assert result.ok, result
        events = authority.events()
        assert [e["type"] for e in events][:2] == [
            "dev.paymaster.agent.created",
            "dev.paymaster.policy.changed",
        ]
        assert all(e["chain"].startswith(authority.store.instance) for e in events)
        assert result.events == len(events)
    finally:
        authority.store.close()


def test_driver_errors_never_leave_the_store(stores: Any) -> None:
    store = stores(writers=1, readers=1)
    with pytest.raises(StoreUnavailable):
        store.write(lambda tx: tx.execute("INSERT INTO no_such_table VALUES (1)")).result()
    with pytest.raises(StoreUnavailable):
        store.read(lambda tx: tx.one("SELECT no_such_column FROM budgets"))
    with pytest.raises(StoreUnavailable):  # a CHECK violation
        store.write(
            lambda tx: tx.execute(
                "INSERT INTO api_keys (key_hash, kind, principal, created_at)"
                " VALUES (?, 'nobody', NULL, 'x')",
                ("h",),
            )
        ).result()

    class Boom(Exception):
        pass

    def fails(tx: Tx) -> None:
        tx.emit("dev.paymaster.agent.created", "ag_x", {})
        raise Boom

    with pytest.raises(Boom):  # the op's own exceptions pass through, and roll it back
        store.write(fails).result()
    assert store.read(lambda tx: tx.one("SELECT COUNT(*) AS n FROM events"))["n"] == 0
    # and the store still works
    assert store.write(lambda tx: ops.meta_set_once(tx, "probe", "1")).result() is True
    assert store.write(lambda tx: ops.meta_set_once(tx, "probe", "2")).result() is False


# ---------------------------------------------------------------- replicas


def test_two_replicas_admit_exactly_what_the_wallet_holds(replicas: Callable[[], Authority]) -> None:
    a, b = replicas(), replicas()
    agent = new_agent(a, fund="1.00")
    barrier = threading.Barrier(400)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        authority = a if i % 2 else b
        barrier.wait()
        try:
            reserve(authority, agent, "0.01")
            outcome = "allowed"
        except SpendDenied as exc:
            outcome = exc.code
        with lock:
            outcomes[outcome] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(400)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == {"allowed": 100, "balance_insufficient": 300}
    assert budget_state(a, f"{agent}/total") == (parse_nanos("1.00"), 0, parse_nanos("1.00"))
    # every writer of each replica kept a chain of its own, and each verifies against its head
    heads = a.store.chain_heads()
    assert {h.chain.rsplit(".", 1)[0] for h in heads} == {a.store.instance, b.store.instance}
    assert len(heads) > 2
    for authority in (a, b):
        result = authority.verify_audit()
        assert result.ok, result
        assert result.chains == len(heads)
    types_seen = Counter(e["type"] for e in a.events(limit=10_000))
    assert types_seen["dev.paymaster.reservation.allowed"] == 100
    assert types_seen["dev.paymaster.reservation.denied"] == 300
    assert sum(types_seen.values()) == a.verify_audit().events
    for head in heads:
        events = list(a.store.events(chain=head.chain))
        assert [e["seq"] for e in events] == list(range(1, head.seq + 1))
        assert events[0]["prevhash"] == GENESIS_HASH
        assert {e["chain"] for e in events} == {head.chain}
    assert a.store.stats["40P01"] == b.store.stats["40P01"] == 0  # no deadlock was ever broken


def test_invalidation_reaches_the_other_replica(replicas: Callable[[], Authority]) -> None:
    a, b = replicas(), replicas()
    agent = new_agent(a, fund="1.00")
    assert b.agent(agent).status == "active"  # now cached in b

    def dropped_from_b() -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with b._lock:
                if agent not in b._agents:
                    return True
            time.sleep(0.01)
        return False

    a.set_status(agent, "frozen")
    assert dropped_from_b()
    assert b.agent(agent).status == "frozen"
    with pytest.raises(SpendDenied) as denied:
        reserve(b, agent, "0.01")
    assert denied.value.code == "agent_frozen"
    a.set_agent_policy(agent, {"daily_cap": "0.50"})
    assert dropped_from_b()
    assert b.agent(agent).policy_version == 1
    # principals too
    a.put_principal("team", {"policy": {"daily_cap": "2.00"}})
    assert b.principal("team") is not None
    a.put_principal("team", {"policy": {"daily_cap": "3.00"}})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with b._lock:
            if "team" not in b._principals:
                break
        time.sleep(0.01)
    record = b.principal("team")
    assert record is not None and record.policy_version == 2


def test_same_idempotency_key_on_two_replicas_holds_once(stores: Any) -> None:
    a, b = stores(), stores()
    wallet = cap("team", "10.00")
    idem = ops.Idem("team:reserve", "same-key", "body")
    commands = [hold_command((wallet,), idem=idem) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(
                lambda ic: (a if ic[0] % 2 else b).write(lambda tx: ops.reserve(tx, ic[1])).result(),
                enumerate(commands),
            )
        )
    assert len({a.to_json() for a in answers}) == 1
    assert answers[0].status == 201
    held = a.read(lambda tx: tx.one("SELECT reserved_n FROM budgets WHERE id = ?", (wallet.id,)))
    assert int(held["reserved_n"]) == parse_nanos("0.01")


def test_a_reservation_settles_once_when_replicas_race(replicas: Callable[[], Authority]) -> None:
    a, b = replicas(), replicas()
    agent = new_agent(a, fund="10.00")
    for _ in range(10):
        res = reserve(a, agent, "1.00")
        barrier = threading.Barrier(2)
        results: list[str] = []

        def settle(authority: Authority, verb: str, rid: str = res["reservation_id"]) -> None:
            barrier.wait()
            try:
                if verb == "commit":
                    authority.commit(rid, amount=None, caller=Caller.admin())
                else:
                    authority.release(rid, caller=Caller.admin())
                results.append(verb)
            except SpendDenied as exc:
                results.append(exc.code)

        threads = [
            threading.Thread(target=settle, args=(a, "commit")),
            threading.Thread(target=settle, args=(b, "release")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) in (["commit", "reservation_settled"], ["release", "reservation_settled"])
    _, spent, reserved = budget_state(a, f"{agent}/total")
    assert reserved == 0
    assert spent == parse_nanos("1.00") * len(a.ledger())


def test_revoke_stays_final_when_a_freeze_races_it(replicas: Callable[[], Authority]) -> None:
    a, b = replicas(), replicas()
    for _ in range(5):
        agent = new_agent(a)
        barrier = threading.Barrier(2)

        def change(authority: Authority, status: str, agent_id: str = agent) -> None:
            barrier.wait()
            try:
                authority.set_status(agent_id, status)
            except SpendDenied:
                pass

        threads = [
            threading.Thread(target=change, args=(a, "revoked")),
            threading.Thread(target=change, args=(b, "frozen")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.invalidate(agent)
        assert a.agent(agent).status == "revoked"


# ---------------------------------------------------------------- lock order


def test_overlapping_paths_in_opposite_orders_do_not_deadlock(stores: Any) -> None:
    a, b = stores(), stores()
    team, org, dept = cap("team", "1000.00"), cap("org", "1000.00"), cap("dept", "1000.00")
    orders = [(team, org, dept), (dept, org, team), (org, team, dept), (dept, team, org)]
    held: list[str] = []

    def one(i: int) -> None:
        store = a if i % 2 else b
        command = hold_command(orders[i % len(orders)], principal=f"p{i % 3}")
        answer = store.write(lambda tx: ops.reserve(tx, command)).result()
        assert answer.status == 201, answer.body
        held.append(command.reservation_id)
        if i % 3 == 0:
            store.write(lambda tx: ops.release(tx, command.reservation_id, None)).result()
        else:
            store.write(lambda tx: ops.commit(tx, ops.CommitCommand(command.reservation_id, None))).result()

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(240)))
    assert len(held) == 240
    for spec in (team, org, dept):
        row = a.read(
            lambda tx, s=spec: tx.one("SELECT spent_n, reserved_n FROM budgets WHERE id = ?", (s.id,))
        )
        assert int(row["reserved_n"]) == 0
        assert int(row["spent_n"]) == parse_nanos("0.01") * 160
    assert a.stats["40P01"] == b.stats["40P01"] == 0


# ---------------------------------------------------------------- lost connections


def test_a_connection_killed_mid_op_is_retried(stores: Any) -> None:
    store = stores(writers=2, readers=2)
    attempts: list[int] = []

    def killed_once(tx: Tx) -> str:
        attempts.append(1)
        tx.emit("dev.paymaster.agent.created", "ag_killed", {"attempt": len(attempts)})
        if len(attempts) == 1:
            tx.one("SELECT pg_terminate_backend(pg_backend_pid()) AS x")
        return "done"

    assert store.write(killed_once).result() == "done"
    assert len(attempts) == 2
    assert store.stats["connection"] == 1
    [event] = list(store.events())
    assert event["data"] == {"attempt": 2}  # the first attempt's event died with its transaction
    assert event["seq"] == 1


def test_a_connection_killed_every_time_fails_cleanly(stores: Any) -> None:
    store = stores(writers=1, readers=1)

    def always_killed(tx: Tx) -> None:
        tx.one("SELECT pg_terminate_backend(pg_backend_pid()) AS x")

    with pytest.raises(StoreUnavailable):
        store.write(always_killed).result()
    with pytest.raises(StoreUnavailable):
        store.read(always_killed)
    # and then it works again
    assert store.write(lambda tx: ops.meta_set_once(tx, "after", "1")).result() is True
    assert store.read(lambda tx: ops.meta_get(tx, "after")) == "1"


def test_pooled_connections_killed_between_ops_are_replaced(
    pg_url: str, replicas: Callable[[], Authority]
) -> None:
    a, b = replicas(), replicas()
    agent = new_agent(a, fund="1.00")
    reserve(a, agent, "0.10")
    assert b.agent(agent).status == "active"
    heard: list[str | None] = []
    b.store.on_invalidate(heard.append)
    # kill every other session on the database: pooled writers and readers, listeners
    sql(
        pg_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    reserve(a, agent, "0.10")
    reserve(b, agent, "0.10")
    assert budget_state(a, f"{agent}/total")[2] == parse_nanos("0.30")
    # the listeners reconnect and say that changes may have been missed (every cache dropped)
    deadline = time.monotonic() + 10
    while None not in heard and time.monotonic() < deadline:
        time.sleep(0.02)
    assert None in heard
    b.agent(agent)  # cached again
    a.set_status(agent, "frozen")
    deadline = time.monotonic() + 5
    while agent not in heard and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.agent(agent).status == "frozen"
    assert a.verify_audit().ok


def test_a_lost_commit_is_resolved_by_its_transaction_id(stores: Any, pg_url: str) -> None:
    store = stores(writers=1, readers=1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("BEGIN")
        xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        aborted = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        conn.execute("ROLLBACK")
    assert store._outcome(xid) is True
    assert store._outcome(aborted) is False
    assert store._outcome(None) is True


# ---------------------------------------------------------------- tiers, events, verification


def test_tier_counters_are_sharded_and_summed(stores: Any) -> None:
    a, b = stores(), stores()
    wallet = cap("team", "100.00")
    commands = [hold_command((wallet,), tier_key="geocode:2026-03") for _ in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(
                lambda ic: (a if ic[0] % 2 else b).write(lambda tx: ops.reserve(tx, ic[1])).result(),
                enumerate(commands),
            )
        )

    def calls() -> int:
        row = a.read(
            lambda tx: tx.one("SELECT calls FROM tier_counters WHERE tier_key = ?", ("geocode:2026-03",))
        )
        return int(row["calls"])

    assert calls() == 40
    shards = a.read(lambda tx: tx.all("SELECT shard FROM tier_counter_shards"))
    assert len(shards) > 1
    for command in commands[:15]:
        b.write(lambda tx, c=command: ops.release(tx, c.reservation_id, None)).result()
    assert calls() == 25


def test_events_merged_view_and_chain_view(stores: Any) -> None:
    a, b = stores(writers=2), stores(writers=2)

    def emit(i: int) -> Callable[[Tx], None]:
        def run(tx: Tx) -> None:
            tx.emit("dev.paymaster.task.created", f"task_{i}", {"i": i})

        return run

    for i in range(30):
        (a if i % 2 else b).write(emit(i)).result()
    merged = list(a.events())
    assert len(merged) == 30
    times = [e["time"] for e in merged]
    assert times == sorted(times)
    assert [e["data"]["i"] for e in merged] == list(range(30))  # one after the other: time order
    assert list(a.events(after_seq=10, limit=5)) == merged[10:15]
    assert list(a.events(after_seq=25)) == merged[25:]
    for head in a.chain_heads():
        own = list(a.events(chain=head.chain))
        assert [e["seq"] for e in own] == list(range(1, head.seq + 1))
        assert list(a.events(chain=head.chain, after_seq=1, limit=1)) == own[1:2]


def test_events_of_equal_time_keep_the_order_they_were_written(stores: Any) -> None:
    frozen = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
    a, b = stores(writers=4, clock=lambda: frozen), stores(writers=4, clock=lambda: frozen)

    def emit(i: int) -> Callable[[Tx], None]:
        def run(tx: Tx) -> None:
            tx.emit("dev.paymaster.task.created", f"task_{i}", {"i": i})

        return run

    for i in range(40):
        (a if i % 3 else b).write(emit(i)).result()
    assert len(a.chain_heads()) >= 2  # interleaved: ordering ties by chain would group them
    assert [e["data"]["i"] for e in a.events()] == list(range(40))
    assert [e["data"]["i"] for e in a.events(after_seq=17, limit=3)] == [17, 18, 19]


def test_events_page_through_large_chains(stores: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = stores(writers=1)
    monkeypatch.setattr(postgres, "EVENTS_PAGE", 7)

    def many(tx: Tx) -> None:
        for i in range(30):
            tx.emit("dev.paymaster.task.created", f"task_{i}", {"i": i})

    store.write(many).result()
    assert [e["data"]["i"] for e in store.events()] == list(range(30))
    assert [e["data"]["i"] for e in store.events(after_seq=3, limit=20)] == list(range(3, 23))
    [head] = store.chain_heads()
    assert [e["seq"] for e in store.events(chain=head.chain, after_seq=5)] == list(range(6, 31))


def test_verify_names_the_broken_chain(pg_url: str, replicas: Callable[[], Authority]) -> None:
    a, b = replicas(), replicas()
    agent = new_agent(a, fund="1.00")
    for authority in (a, b, a, b):
        reserve(authority, agent, "0.01")
    assert a.verify_audit().ok
    victim = next(h for h in a.store.chain_heads() if h.chain.startswith(b.store.instance))
    # edit an event of one of b's chains
    sql(
        pg_url,
        'UPDATE events SET event = replace(event, \'"amount":"0.01"\', \'"amount":"0.00"\')'
        " WHERE chain = %s AND seq = 1",
        (victim.chain,),
    )
    result = a.verify_audit()
    assert not result.ok and result.chain == victim.chain, result
    assert result.to_json()["chain"] == victim.chain
    # a head deleted: its events belong to no signed chain
    sql(pg_url, "DELETE FROM audit_heads WHERE chain = %s", (victim.chain,))
    result = a.verify_audit()
    assert not result.ok and result.chain == victim.chain and result.first_bad_seq == 1, result
    assert "not covered by a signed head" in (result.reason or "")


def test_verify_beside_live_writers_raises_no_false_alarm(tmp_path: Path, pg_url: str) -> None:
    sink = tmp_path / "heads.jsonl"
    settings = Settings(db_url=pg_url, home=str(tmp_path / "home"), audit_sink=str(sink))
    a, b = open_authority(settings), open_authority(settings)
    try:
        agent = new_agent(a, fund="100000.00")
        stop = threading.Event()

        def traffic(authority: Authority) -> None:
            while not stop.is_set():
                res = reserve(authority, agent, "0.01")
                authority.commit(res["reservation_id"], amount=parse_nanos("0.005"), caller=Caller.admin())

        writers = [threading.Thread(target=traffic, args=(x,)) for x in (a, b, a, b)]
        for t in writers:
            t.start()
        try:
            results = [a.verify_audit(str(sink)) for _ in range(20)]
        finally:
            stop.set()
            for t in writers:
                t.join(timeout=60)
        assert [r for r in results if not r.ok] == []
        assert a.verify_audit(str(sink)).ok
    finally:
        a.store.close()
        b.store.close()


def test_verify_against_the_exported_heads(pg_url: str, tmp_path: Path) -> None:
    sink = tmp_path / "heads.jsonl"
    settings = Settings(db_url=pg_url, home=str(tmp_path / "home"), audit_sink=str(sink))
    a, b = open_authority(settings), open_authority(settings)
    try:
        agent = new_agent(a, fund="1.00")
        for authority in (a, b, a, b):
            reserve(authority, agent, "0.01")
        lines = [json.loads(line) for line in sink.read_text().splitlines()]
        assert {line["chain"] for line in lines} == {h.chain for h in a.store.chain_heads()}
        assert a.verify_audit(str(sink)).ok
        # a whole chain deleted together with its head: only the sink knows it was there
        gone = lines[-1]["chain"]
        sql(pg_url, "DELETE FROM events WHERE chain = %s", (gone,))
        sql(pg_url, "DELETE FROM audit_heads WHERE chain = %s", (gone,))
        assert a.verify_audit().ok
        result = a.verify_audit(str(sink))
        assert not result.ok and result.chain == gone, result
    finally:
        a.store.close()
        b.store.close()


# ---------------------------------------------------------------- the SQL the store adapts


def _string_constants(code: types.CodeType) -> Iterator[str]:
    for const in code.co_consts:
        if isinstance(const, str):
            yield const
        elif isinstance(const, types.CodeType):
            yield from _string_constants(const)


def test_the_statements_the_store_adapts_are_still_those_of_ops() -> None:
    """LOCKING_READS, the idempotency lookup and the tier counter statements are matched by their
    exact text: if ops.py rewords one, this fails instead of the lock silently going away."""
    used: set[str] = set()
    for obj in vars(ops).values():
        if inspect.isfunction(obj) and obj.__module__ == ops.__name__:
            used.update(_string_constants(obj.__code__))
    adapted = [
        *postgres.LOCKING_READS,
        postgres.IDEMPOTENCY_LOOKUP,
        postgres.TIER_COUNT,
        postgres.TIER_UNCOUNT,
    ]
    missing = [s for s in adapted if s not in used]
    assert missing == []


def test_portable_sql_is_adapted() -> None:
    assert postgres.to_pg("SELECT * FROM budgets WHERE id = ? AND window = ?") == (
        'SELECT * FROM budgets WHERE id = %s AND "window" = %s'
    )
    assert postgres.to_pg("SELECT window_start, window_end FROM budgets") == (
        "SELECT window_start, window_end FROM budgets"
    )
    assert postgres.to_pg("SELECT '5%' AS x, ? AS y") == "SELECT '5%%' AS x, %s AS y"
    assert postgres.to_pg('SELECT "window" FROM budgets') == 'SELECT "window" FROM budgets'
