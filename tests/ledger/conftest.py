"""Fixtures for the ledger suites: one backend per parameter, a fake clock, an authority
factory, and the invariants every suite checks (money conserved, holds accounted for,
no enforce budget over its limit because of a reserve, the audit chain intact).

The PostgreSQL parameter runs when ``paymaster.store.postgres`` imports and the server at
``PAYMASTER_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``) answers; each
test gets databases of its own, dropped afterwards. With ``PAYMASTER_REQUIRE_PG=1`` (CI)
a missing server or backend fails the test instead of skipping it.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from paymaster.authority import Authority, Caller, ReserveRequest, body_hash
from paymaster.bootstrap import open_authority
from paymaster.config import Settings, load_settings
from paymaster.core import tokens
from paymaster.money import parse_nanos
from paymaster.store.base import Tx
from paymaster.store.ops import Answer

PG_BASE_URL = os.environ.get("PAYMASTER_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/test"
REQUIRE_PG = os.environ.get("PAYMASTER_REQUIRE_PG") == "1"
# A Tuesday morning; a day cap's window is 2026-03-10 until the clock is advanced.
START = datetime(2026, 3, 10, 9, 0, 0, tzinfo=UTC)

TERMINAL_EVENTS = (
    "dev.paymaster.reservation.committed",
    "dev.paymaster.reservation.released",
    "dev.paymaster.reservation.expired",
)


# ---------------------------------------------------------------- clock


class FakeClock:
    """An injectable clock: ``clock()`` and ``clock.now`` read it, ``advance`` moves it."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self.now = self.now + timedelta(seconds=seconds)
            return self.now


# ---------------------------------------------------------------- backends


@functools.cache
def postgres_unavailable() -> str | None:
    """Why the PostgreSQL backend cannot run here, or None when it can."""
    try:
        import paymaster.store.postgres  # noqa: F401
    except ImportError as exc:
        return f"paymaster.store.postgres cannot be imported: {exc}"
    try:
        import psycopg

        with psycopg.connect(PG_BASE_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"no PostgreSQL server answers at {PG_BASE_URL}: {exc}"
    return None


def require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if REQUIRE_PG:
        pytest.fail(f"PAYMASTER_REQUIRE_PG=1 but {reason}")
    pytest.skip(reason)


def _pg_url(database: str) -> str:
    parts = urlsplit(PG_BASE_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def create_pg_database() -> tuple[str, str]:
    """A new, empty database ``pm_test_<random>``: (name, url)."""
    import psycopg

    name = f"pm_test_{secrets.token_hex(6)}"
    for attempt in range(5):
        try:
            with psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            return name, _pg_url(name)
        except psycopg.errors.ObjectInUse:
            # template1 busy for a moment (another CREATE DATABASE): try again
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"could not create database {name}")


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PgDatabases:
    """Fresh databases without the wait: one background thread keeps a few created ahead,
    another drops the used ones, so a test pays neither CREATE nor DROP DATABASE."""

    AHEAD = 3

    def __init__(self) -> None:
        self._ready: queue.Queue[tuple[str, str]] = queue.Queue()
        self._wanted = threading.Semaphore(self.AHEAD)
        self._drops: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._create, name="pm-test-create", daemon=True),
            threading.Thread(target=self._drop, name="pm-test-drop", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _create(self) -> None:
        while True:
            self._wanted.acquire()
            if self._stop.is_set():
                return
            try:
                self._ready.put(create_pg_database())
            except Exception:
                self._wanted.release()  # take() creates its own when none is ready
                time.sleep(1)

    def _drop(self) -> None:
        while (name := self._drops.get()) is not None:
            try:
                drop_pg_database(name)
            except Exception:
                pass  # a stray pm_test_ database; nothing depends on it

    def take(self) -> tuple[str, str]:
        try:
            database = self._ready.get(timeout=20)
        except queue.Empty:
            return create_pg_database()
        self._wanted.release()
        return database

    def give_back(self, name: str) -> None:
        self._drops.put(name)

    def close(self) -> None:
        self._stop.set()
        self._wanted.release()
        self._drops.put(None)
        for t in self._threads:
            t.join(timeout=120)
        while not self._ready.empty():
            drop_pg_database(self._ready.get()[0])


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    pool = PgDatabases()
    yield pool
    pool.close()


@dataclass
class Backend:
    """One database backend for one test: ``url`` is its database; ``new_url()`` makes
    another fresh one (dropped at the end of the test too)."""

    name: str
    tmp: Path
    pool: PgDatabases | None = None
    _databases: list[str] = field(default_factory=list)
    _count: int = 0
    url: str = ""

    def new_url(self) -> str:
        self._count += 1
        if self.pool is None:
            return f"sqlite:///{self.tmp / f'pm-{self._count}.db'}"
        db_name, url = self.pool.take()
        self._databases.append(db_name)
        return url

    def cleanup(self) -> None:
        while self._databases and self.pool is not None:
            self.pool.give_back(self._databases.pop())


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    pool = None
    if name == "postgresql":
        require_postgres()
        pool = request.getfixturevalue("pg_databases")
    (tmp_path / "db").mkdir()
    be = Backend(name, tmp_path / "db", pool)
    be.url = be.new_url()
    try:
        yield be
    finally:
        be.cleanup()


# ---------------------------------------------------------------- authorities


def settings_for(url: str, home: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Settings that read nothing from the machine: no paymaster.toml, no environment."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "paymaster.toml"
    if not config.exists():
        config.write_text("")
    return load_settings(db=url, config=str(config), env=dict(env or {}), home=str(home))


AuthorityFactory = Callable[..., Authority]


@pytest.fixture
def make_authority(backend: Backend, tmp_path: Path) -> Iterator[AuthorityFactory]:
    """``make_authority(clock=..., url=None, env=None)``: an authority on the test's
    database (or ``url``), sharing one signing key; closed after the test."""
    opened: list[Authority] = []
    home = tmp_path / "home"

    def make(
        *,
        clock: Callable[[], datetime] | None = None,
        url: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Authority:
        settings = settings_for(url or backend.url, home, env)
        authority = open_authority(settings, clock=clock or FakeClock())
        opened.append(authority)
        return authority

    yield make
    for authority in opened:
        authority.store.close()


# ---------------------------------------------------------------- the harness


def n(amount: str) -> int:
    return parse_nanos(amount)


@dataclass
class Ledger:
    """An authority with a fake clock and the small helpers every test repeats."""

    authority: Authority
    clock: FakeClock
    _keys: int = 0

    def key(self, prefix: str = "k") -> str:
        self._keys += 1
        return f"{prefix}-{self._keys}"

    def agent(
        self,
        *,
        fund: str | None = None,
        policy: Mapping[str, Any] | None = None,
        parent: str | None = None,
        name: str = "agent",
    ) -> str:
        public_key = tokens.public_key_b64(tokens.generate_private_key())
        agent_id: str = self.authority.create_agent(name, public_key, policy=policy, parent=parent)["id"]
        if fund is not None:
            self.fund(agent_id, fund)
        return agent_id

    def fund(self, agent_id: str, amount: str) -> dict[str, Any]:
        return self.authority.fund(agent_id, n(amount))

    def request(
        self,
        agent_id: str,
        amount: str,
        *,
        key: str | None = None,
        connector: str = "tool",
        session: str | None = None,
        task: str | None = None,
        ttl: int | None = None,
        request_sent: bool = False,
    ) -> ReserveRequest:
        body = {
            "agent_id": agent_id,
            "connector": connector,
            "amount": amount,
            "session": session,
            "task": task,
            "ttl_seconds": ttl,
        }
        return ReserveRequest(
            connector=connector,
            idempotency_key=key,
            agent_id=agent_id,
            amount=n(amount),
            session=session,
            task=task,
            ttl_seconds=ttl,
            body_hash=body_hash(body),
            request_sent=request_sent,
        )

    def reserve(self, agent_id: str, amount: str, **kwargs: Any) -> dict[str, Any]:
        return self.authority.reserve(
            self.request(agent_id, amount, **kwargs), Caller("agent", agent_id=agent_id)
        )

    def reserve_answer(self, agent_id: str, amount: str, **kwargs: Any) -> Answer:
        return self.authority.reserve_answer(
            self.request(agent_id, amount, **kwargs), Caller("agent", agent_id=agent_id)
        )

    def commit(
        self, reservation_id: str, amount: str | None = None, *, key: str | None = None
    ) -> dict[str, Any]:
        return self.authority.commit(
            reservation_id,
            amount=None if amount is None else n(amount),
            caller=Caller.admin(),
            idempotency_key=key,
            body={"amount": amount},
        )

    def release(self, reservation_id: str) -> dict[str, Any]:
        return self.authority.release(reservation_id, caller=Caller.admin())

    def refund(self, ledger_entry_id: str, amount: str, *, key: str | None = None) -> dict[str, Any]:
        body = {"ledger_entry_id": ledger_entry_id, "amount": amount, "reason": "test"}
        return self.authority.refund(ledger_entry_id, n(amount), "test", key, body=body)

    def budget(self, budget_id: str) -> dict[str, Any]:
        return self.authority.budget(budget_id)

    def state(self, budget_id: str) -> tuple[int, int, int]:
        """(limit, spent, reserved) in nanos, straight from the store; zeros when absent."""
        row = self.authority.store.read(
            lambda tx: tx.one("SELECT limit_n, spent_n, reserved_n FROM budgets WHERE id = ?", (budget_id,))
        )
        if row is None:
            return (0, 0, 0)
        return int(row["limit_n"]), int(row["spent_n"]), int(row["reserved_n"])

    def reservation(self, reservation_id: str) -> dict[str, Any]:
        return self.authority.query_reservation(reservation_id)

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        out = list(self.authority.store.events())
        if event_type is not None:
            out = [e for e in out if e["type"] == event_type]
        return out

    def day(self, owner: str, scope: str | None = None) -> str:
        """The id of ``owner``'s day-cap window at the clock's current time."""
        head = owner if scope is None else f"{owner}/{scope}"
        return f"{head}/day/{self.clock.now:%Y-%m-%d}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(make_authority: AuthorityFactory, clock: FakeClock) -> Ledger:
    return Ledger(make_authority(clock=clock), clock)


# ---------------------------------------------------------------- invariants


@dataclass(frozen=True)
class Snapshot:
    budgets: dict[str, dict[str, Any]]
    reservations: dict[str, dict[str, Any]]
    ledger: dict[str, dict[str, Any]]
    terminal_events: Counter[str]
    allowed_events: int
    denied_events: int


def snapshot(authority: Authority) -> Snapshot:
    """Budgets, reservations, ledger entries and settle events, read in one transaction."""

    def read(tx: Tx) -> Snapshot:
        budgets = {
            str(r["id"]): dict(r)
            for r in tx.all("SELECT id, kind, mode, limit_n, spent_n, reserved_n FROM budgets")
        }
        reservations = {
            str(r["id"]): dict(r)
            for r in tx.all(
                "SELECT id, status, amount_n, charged_n, estimated, overrun, request_sent, budgets,"
                " ledger_entry_id, settled_at FROM reservations"
            )
        }
        entries = {
            str(r["id"]): dict(r)
            for r in tx.all(
                "SELECT id, kind, total_n, refunded_n, refund_of, reservation_id, budgets, estimated, overrun"
                " FROM ledger"
            )
        }
        terminal = Counter(
            str(r["subject"])
            for r in tx.all("SELECT subject FROM events WHERE type IN (?, ?, ?)", TERMINAL_EVENTS)
        )
        counts = Counter(
            {
                str(r["type"]): int(r["n"])
                for r in tx.all(
                    "SELECT type, COUNT(*) AS n FROM events WHERE type IN (?, ?) GROUP BY type",
                    ("dev.paymaster.reservation.allowed", "dev.paymaster.reservation.denied"),
                )
            }
        )
        return Snapshot(
            budgets,
            reservations,
            entries,
            terminal,
            counts["dev.paymaster.reservation.allowed"],
            counts["dev.paymaster.reservation.denied"],
        )

    return authority.store.read(read)


def check_invariants(authority: Authority, *, excused: Collection[str] = (), verify: bool = True) -> Snapshot:
    """Assert ARCHITECTURE.md's correctness rules on the stored state:

    - money is conserved: every budget's ``spent`` is the sum of its ledger entries
      (charges minus refunds), and its ``reserved`` the sum of the holds on it;
    - no enforce budget has ``spent + reserved > limit`` beyond what overrunning commits
      added (each ``charged - held`` of an overrun); ``excused`` budgets (a limit lowered
      under their use) are left out;
    - every reservation is held or ended exactly once: its status, charge and ledger
      entry agree, and it has one settle event when ended, none while held;
    - the audit chain verifies.
    """
    snap = snapshot(authority)
    spent: Counter[str] = Counter()
    for entry in snap.ledger.values():
        for budget_id in json.loads(entry["budgets"]):
            spent[budget_id] += int(entry["total_n"])
    reserved: Counter[str] = Counter()
    overrun_allowance: Counter[str] = Counter()
    for res in snap.reservations.values():
        path = [str(item[0]) for item in json.loads(res["budgets"])]
        for budget_id in path:
            if res["status"] == "held":
                reserved[budget_id] += int(res["amount_n"])
            if int(res["overrun"]):
                overrun_allowance[budget_id] += int(res["charged_n"]) - int(res["amount_n"])
    problems: list[str] = []
    for budget_id, b in snap.budgets.items():
        limit, b_spent, b_reserved = int(b["limit_n"]), int(b["spent_n"]), int(b["reserved_n"])
        if b_spent != spent[budget_id]:
            problems.append(f"{budget_id}: spent {b_spent} but its ledger entries sum to {spent[budget_id]}")
        if b_reserved != reserved[budget_id]:
            problems.append(f"{budget_id}: reserved {b_reserved} but its holds sum to {reserved[budget_id]}")
        if b["mode"] == "enforce" and budget_id not in excused:
            if b_spent + b_reserved > limit + overrun_allowance[budget_id]:
                problems.append(
                    f"{budget_id}: spent {b_spent} + reserved {b_reserved} > limit {limit}"
                    f" (+{overrun_allowance[budget_id]} of overruns)"
                )
    for budget_id in set(spent) | set(reserved):
        if budget_id not in snap.budgets and (spent[budget_id] or reserved[budget_id]):
            problems.append(f"{budget_id}: has ledger entries or holds but no budget row")
    for res_id, res in snap.reservations.items():
        status = res["status"]
        events = snap.terminal_events[res_id]
        if status == "held":
            if events or res["charged_n"] is not None or res["settled_at"] is not None:
                problems.append(f"{res_id}: held but settled ({events} settle events)")
            continue
        if events != 1:
            problems.append(f"{res_id}: {status} with {events} settle events")
        entry_id = res["ledger_entry_id"]
        if status == "committed" or (status == "expired" and entry_id is not None):
            charge = snap.ledger.get(str(entry_id))
            if (
                charge is None
                or int(charge["total_n"]) != int(res["charged_n"])
                or charge["reservation_id"] != res_id
            ):
                problems.append(
                    f"{res_id}: {status}, but its ledger entry {entry_id} does not match its charge"
                )
            if status == "expired" and not int(res["estimated"]):
                problems.append(f"{res_id}: charged on expiry but not flagged estimated")
        elif entry_id is not None or int(res["charged_n"] or 0) != 0:
            problems.append(f"{res_id}: {status} but charged")
    charges_per_reservation = Counter(
        str(e["reservation_id"]) for e in snap.ledger.values() if e["kind"] == "charge"
    )
    problems += [f"{r}: {k} charges" for r, k in charges_per_reservation.items() if k != 1]
    refunds: Counter[str] = Counter()
    for entry in snap.ledger.values():
        if entry["kind"] == "refund":
            refunds[str(entry["refund_of"])] -= int(entry["total_n"])
    for entry_id, entry in snap.ledger.items():
        if entry["kind"] != "charge":
            continue
        if not 0 <= int(entry["refunded_n"]) == refunds[entry_id] <= int(entry["total_n"]):
            problems.append(
                f"{entry_id}: refunded {entry['refunded_n']} of {entry['total_n']},"
                f" refund entries {refunds[entry_id]}"
            )
    assert not problems, "ledger invariants broken:\n" + "\n".join(problems)
    if verify:
        result = authority.verify_audit()
        assert result.ok, f"audit chain does not verify: {result}"
    return snap
