"""Replicas of ``paymaster serve`` as real processes on real sockets, sharing one database.

- :func:`make_cluster` starts N replicas (``paymaster serve --workers W``, each in a process
  group of its own) on free loopback ports against a fresh database: a PostgreSQL database
  created for the test from ``PAYMASTER_TEST_PG`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``) and dropped afterwards — skipped when the
  server does not answer, failed instead with ``PAYMASTER_REQUIRE_PG=1`` — or one SQLite file.
  It waits until every worker has started and ``/healthz`` answers, and can SIGKILL, stop and
  restart any replica. One cluster runs at a time on the machine (a file lock), whatever xdist
  does, so that clusters never compete for the PostgreSQL server's connections.
- :class:`Storm` drives agents' reserves, commits, releases, refunds and gateway calls from
  threads (httpx) spread over the live replicas, journals what each request got back (or that
  it got nothing: the request was in flight when its replica died), and afterwards retries
  the unanswered ones and replays the answered ones on a survivor with the same idempotency
  keys.
- :func:`check_database` checks the ledger invariants on one snapshot of the database (one
  transaction, read straight with psycopg or sqlite3); :func:`check_through_api` checks them
  through a replica's API after the traffic is over (events, reservations, ledger, budgets,
  audit verification); :meth:`Storm.check` checks that nothing was done twice.
- The soak figures (kills, reservations, invariants checked) are printed at the end of the
  run by ``pytest_terminal_summary``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import itertools
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from paymaster.sdk.keys import AgentKey

PG_BASE_URL = os.environ.get("PAYMASTER_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/test"
REQUIRE_PG = os.environ.get("PAYMASTER_REQUIRE_PG") == "1"
ADMIN_KEY = "pm_admin_replicas-suite-" + secrets.token_hex(8)
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
FAKE_PROVIDER = Path(__file__).resolve().parent.parent / "gateway" / "fake_provider.py"
KG = "kg.replicas.test"  # a flat-priced tool served by the fake provider
GEO = "geo.replicas.test"  # a volume-tiered tool: 3 calls a month at 0.005, then 0.012
KG_PRICE = "0.05"
TERMINAL = (
    "dev.paymaster.reservation.committed",
    "dev.paymaster.reservation.released",
    "dev.paymaster.reservation.expired",
)
ALLOWED = "dev.paymaster.reservation.allowed"
STARTED = "Application startup complete."


def dec(text: Any) -> Decimal:
    return Decimal(str(text))


# ---------------------------------------------------------------- PostgreSQL


def pg_problem() -> str | None:
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg cannot be imported: {exc}"
    try:
        import paymaster.store.postgres  # noqa: F401
    except ImportError as exc:
        return f"paymaster.store.postgres cannot be imported: {exc}"
    try:
        with psycopg.connect(PG_BASE_URL, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_BASE_URL} does not answer: {exc}"
    return None


def require_postgres() -> None:
    problem = pg_problem()
    if problem is None:
        return
    if REQUIRE_PG:
        pytest.fail(f"PAYMASTER_REQUIRE_PG=1 but {problem}")
    pytest.skip(problem)


def pg_url(database: str) -> str:
    parts = urlsplit(PG_BASE_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def pg_admin(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the maintenance database (``PAYMASTER_TEST_PG``), autocommit."""
    import psycopg

    with psycopg.connect(PG_BASE_URL, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def create_database() -> str:
    import psycopg

    name = f"pm_test_{secrets.token_hex(6)}"
    for attempt in range(10):
        try:
            pg_admin(f'CREATE DATABASE "{name}"')
            return name
        except psycopg.errors.ObjectInUse:  # template1 busy: another CREATE DATABASE
            time.sleep(0.2 * (attempt + 1))
    raise RuntimeError(f"could not create database {name}")


def drop_database(name: str) -> None:
    pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backends(database: str) -> int:
    rows = pg_admin(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
    )
    return int(rows[0][0])


def block_database(name: str, timeout: float = 30.0) -> None:
    """The database goes away for the replicas: no new connection is accepted, and every
    backend serving it is terminated (a stand-in for a database restart that leaves the
    other databases of a shared server alone)."""
    pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    deadline = time.monotonic() + timeout
    while True:
        pg_admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        if backends(name) == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"backends of {name} survive pg_terminate_backend")
        time.sleep(0.05)


def unblock_database(name: str) -> None:
    pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


# ---------------------------------------------------------------- the fake provider


def load_fake_provider() -> ModuleType | None:
    """tests/gateway/fake_provider.py, when the gateway and its fake provider exist."""
    if not FAKE_PROVIDER.exists() or importlib.util.find_spec("paymaster.gateway.proxy") is None:
        return None
    name = "replicas_fake_provider"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FAKE_PROVIDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def provider_server() -> Iterator[Any]:
    module = load_fake_provider()
    if module is None:
        yield None
        return
    server = module.FakeProvider().start()
    yield server
    server.stop()


@pytest.fixture
def provider(provider_server: Any) -> Any:
    """The fake provider (its record cleared), or None when there is no gateway to test."""
    if provider_server is not None:
        provider_server.recorder.reset()
    return provider_server


def provider_queries(provider: Any) -> Counter[str]:
    """How many times the provider was called with each ``q`` query value."""
    out: Counter[str] = Counter()
    for seen in provider.requests:
        for part in seen.query.split("&"):
            if part.startswith("q="):
                out[part[2:]] += 1
    return out


# ---------------------------------------------------------------- replicas


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def paymaster_command() -> list[str]:
    script = Path(sys.executable).with_name("paymaster")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "paymaster.cli.main"]


def new_client(url: str) -> httpx.Client:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    return httpx.Client(base_url=url, timeout=60.0, limits=limits)


@dataclass
class Replica:
    """One ``paymaster serve`` process (and its workers) in a process group of its own."""

    index: int
    port: int
    workers: int
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    log: Path | None = None
    _client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = new_client(self.url)
        return self._client

    def start(self) -> None:
        assert not self.alive, f"replica {self.index} is already running"
        self.starts += 1
        self.log = self.workdir / f"replica-{self.index}.{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*paymaster_command(), "serve", "--port", str(self.port), "--workers", str(self.workers)],
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a kill takes its workers too
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every worker has started and ``/healthz`` answers 200."""
        assert self.proc is not None and self.log is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"replica {self.index} exited with {self.proc.returncode}:\n{self.tail()}"
                    )
                if self.log.read_text(errors="replace").count(STARTED) >= self.workers:
                    try:
                        if probe.get(f"{self.url}/healthz").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"replica {self.index} did not become healthy:\n{self.tail()}")
                time.sleep(0.05)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_group_gone(self, timeout: float = 15.0) -> None:
        """Until no process of the group is left (its workers included), so the port is free."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the replica and its workers at once: a crash, nothing gets to clean up."""
        assert self.proc is not None
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._wait_group_gone()
        self.close_client()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as a service manager stops it; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._wait_group_gone()
        self.close_client()

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def errors_logged(self) -> list[str]:
        """Tracebacks and ERROR lines in every log of this replica."""
        out: list[str] = []
        for log in sorted(self.workdir.glob(f"replica-{self.index}.*.log")):
            out += [
                f"{log.name}: {line}"
                for line in log.read_text(errors="replace").splitlines()
                if line.startswith(("ERROR", "Traceback"))
            ]
        return out


@dataclass
class Cluster:
    backend: str  # postgresql | sqlite
    db_url: str
    database: str | None  # the PostgreSQL database's name
    workdir: Path
    replicas: list[Replica]

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def start(self, *indexes: int) -> None:
        chosen = [self.replicas[i] for i in indexes] if indexes else self.replicas
        for replica in chosen:
            replica.start()
        for replica in chosen:
            replica.wait_ready()

    def alive(self) -> list[int]:
        return [r.index for r in self.replicas if r.alive]

    def close(self) -> None:
        for replica in self.replicas:
            if replica.proc is not None and replica.alive:
                replica.kill()
            replica.close_client()

    # ------------------------------------------------------------ API helpers

    def admin(self, index: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.replicas[index].client.request(method, path, headers=ADMIN, **kwargs)

    def admin_json(self, index: int, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        r = self.admin(index, method, path, **kwargs)
        assert r.status_code == expect, f"{method} {path} → {r.status_code} {r.text}"
        return r.json()

    def create_agent(
        self,
        index: int = 0,
        *,
        fund: str | None = None,
        policy: Mapping[str, Any] | None = None,
        parent: str | None = None,
    ) -> Agent:
        key = AgentKey.generate()
        body: dict[str, Any] = {"name": "replica-agent", "public_key": key.public_key}
        if policy is not None:
            body["policy"] = dict(policy)
        if parent is not None:
            body["parent"] = parent
        agent = self.admin_json(index, "POST", "/v1/agents", expect=201, json=body)
        if fund is not None:
            self.admin_json(index, "POST", f"/v1/agents/{agent['id']}/fund", json={"amount": fund})
        return Agent(agent["id"], key)

    def budget(self, index: int, budget_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.admin_json(index, "GET", f"/v1/budgets/{budget_id}")
        return result

    def verify(self, index: int) -> dict[str, Any]:
        r = self.admin(index, "GET", "/v1/audit/verify")
        assert r.status_code == 200 and r.json()["ok"] is True, f"audit verify on replica {index}: {r.text}"
        result: dict[str, Any] = r.json()
        return result


def config_text(provider: Any, ttl: int) -> str:
    lines = ['authority_id = "pm.replicas.test"', f"reservation_ttl = {ttl}"]
    if provider is not None:
        lines.append(
            f"""
[[connectors]]
id = "kg"
hosts = ["{KG}"]
category = "tool"
upstream = "{provider.url}"
pricing = {{ per_call = "{KG_PRICE}" }}

[[connectors]]
id = "geo"
hosts = ["{GEO}"]
category = "tool"
upstream = "{provider.url}"
pricing = {{ per_call = [{{ up_to = 3, price = "0.005" }}, {{ price = "0.012" }}], period = "month" }}
"""
        )
    return "\n".join(lines) + "\n"


ClusterFactory = Callable[..., Cluster]
LOCK_FILE = Path(tempfile.gettempdir()) / "paymaster-replicas.lock"


@contextlib.contextmanager
def one_cluster_at_a_time(timeout: float = 900.0) -> Iterator[None]:
    """An exclusive lock on one file of the machine's temporary directory, so that clusters of
    xdist workers (``--dist loadgroup`` does not group on pytest 9.2: pytest-xdist#1386) and of
    concurrent runs never share the PostgreSQL server's connections: a cluster of two
    ``--workers 2`` replicas may open up to 68 of its default 100."""
    with open(LOCK_FILE, "a+b") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{LOCK_FILE} stayed locked for {timeout:.0f}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """``make_cluster(replicas=2, workers=2, backend="postgresql", provider=None, ttl=300)``:
    ``paymaster init``, then N replicas of ``paymaster serve`` on one fresh database, all
    healthy. Every process is killed and the database dropped after the test."""
    made: list[Cluster] = []
    databases: list[str] = []
    exclusive = contextlib.ExitStack()

    def make(
        *,
        replicas: int = 2,
        workers: int = 2,
        backend: str = "postgresql",
        provider: Any = None,
        ttl: int = 300,
    ) -> Cluster:
        if not made:
            exclusive.enter_context(one_cluster_at_a_time())
        workdir = tmp_path / f"cluster-{len(made)}"
        home = workdir / "home"
        home.mkdir(parents=True)
        database: str | None = None
        if backend == "postgresql":
            require_postgres()
            database = create_database()
            databases.append(database)
            db_url = pg_url(database)
        else:
            db_url = f"sqlite:///{workdir / 'paymaster.db'}"
        config = workdir / "paymaster.toml"
        config.write_text(config_text(provider, ttl))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMASTER_")}
        env.update(
            PAYMASTER_DB=db_url,
            PAYMASTER_HOME=str(home),  # one authority key for every replica
            PAYMASTER_CONFIG=str(config),
            PAYMASTER_ADMIN_KEY=ADMIN_KEY,
        )
        init = subprocess.run(
            [*paymaster_command(), "init", "--json"], env=env, cwd=workdir, capture_output=True, timeout=120
        )
        assert init.returncode == 0, init.stderr.decode(errors="replace")
        cluster = Cluster(
            backend,
            db_url,
            database,
            workdir,
            [Replica(i, free_port(), workers, env, workdir) for i in range(replicas)],
        )
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.close()
        for replica in cluster.replicas:
            if replica.log is not None:
                print(f"--- replica {replica.index} (last start) ---\n{replica.tail(15)}")
    for name in databases:
        drop_database(name)
    exclusive.close()


# ---------------------------------------------------------------- agents


@dataclass
class Agent:
    id: str
    key: AgentKey

    def token(self, aud: str = "paymaster", **claims: Any) -> str:
        return self.key.sign(agent_id=self.id, aud=aud, ttl_seconds=180, **claims)

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"x-paymaster-agent-id": self.id, "x-paymaster-spend-token": token or self.token()}

    def gateway_headers(self, host: str, path: str, method: str = "GET") -> dict[str, str]:
        return self.headers(self.token(aud=host, htm=method, htu=f"https://{host}{path}"))


def reserve(
    client: httpx.Client, agent: Agent, amount: str, key: str | None = None, **fields: Any
) -> httpx.Response:
    body = {"connector": "tool", "amount": amount, "idempotency_key": key or secrets.token_hex(8), **fields}
    return client.post("/v1/reservations", json=body, headers=agent.headers())


def error_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code"))
    return None


def poll(what: str, condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """``condition()``'s first truthy value, polled until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- the database, read directly


@dataclass(frozen=True)
class Snapshot:
    """Budgets, reservations, ledger entries and settle events as of one transaction."""

    budgets: dict[str, dict[str, Any]]
    reservations: dict[str, dict[str, Any]]
    ledger: dict[str, dict[str, Any]]
    terminal: Counter[str]

    @property
    def held(self) -> list[str]:
        return [rid for rid, r in self.reservations.items() if r["status"] == "held"]


_SNAPSHOT_SQL = {
    "budgets": "SELECT id, kind, mode, limit_n, spent_n, reserved_n FROM budgets",
    "reservations": (
        "SELECT id, status, amount_n, charged_n, overrun, estimated, request_sent, budgets,"
        " ledger_entry_id, metadata FROM reservations"
    ),
    "ledger": "SELECT id, kind, total_n, refunded_n, refund_of, reservation_id, budgets FROM ledger",
    "terminal": (
        "SELECT subject, COUNT(*) AS n FROM events WHERE type IN ('dev.paymaster.reservation.committed',"
        " 'dev.paymaster.reservation.released', 'dev.paymaster.reservation.expired') GROUP BY subject"
    ),
}


class Database:
    """A read-only view of the cluster's database, straight from the driver: each
    :meth:`snapshot` is one transaction (REPEATABLE READ on PostgreSQL, a WAL read
    transaction on SQLite), so it sees the committed state of one instant."""

    def __init__(self, cluster: Cluster) -> None:
        self.backend = cluster.backend
        self.url = cluster.db_url
        self._conn: Any = None

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        conn: Any
        if self.backend == "postgresql":
            import psycopg

            conn = psycopg.connect(self.url, connect_timeout=10)
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        else:
            conn = sqlite3.connect(
                self.url.removeprefix("sqlite:///"), timeout=30, isolation_level=None, check_same_thread=False
            )
        self._conn = conn
        return conn

    def _rows(self, conn: Any, sql: str) -> list[dict[str, Any]]:
        cur = conn.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def snapshot(self) -> Snapshot:
        conn = self._connect()
        try:
            if self.backend == "sqlite":
                conn.execute("BEGIN")
            rows = {name: self._rows(conn, sql) for name, sql in _SNAPSHOT_SQL.items()}
        finally:
            if self.backend == "postgresql":
                conn.rollback()
            else:
                conn.execute("ROLLBACK")
        return Snapshot(
            budgets={str(r["id"]): r for r in rows["budgets"]},
            reservations={str(r["id"]): r for r in rows["reservations"]},
            ledger={str(r["id"]): r for r in rows["ledger"]},
            terminal=Counter({str(r["subject"]): int(r["n"]) for r in rows["terminal"]}),
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def check_database(snap: Snapshot) -> int:
    """Assert the ledger invariants on one snapshot; the number of checks made.

    Per budget: ``spent`` = the sum of the ledger entries on it (charges minus refunds),
    ``reserved`` = the sum of the holds on it, and an enforced budget is not over its limit
    beyond what flagged overruns charged above their holds. Per reservation: held with no
    settle event, or ended with exactly one, and charged by exactly the ledger entry it names.
    """
    spent: Counter[str] = Counter()
    for entry in snap.ledger.values():
        for budget_id in json.loads(entry["budgets"]):
            spent[budget_id] += int(entry["total_n"])
    reserved: Counter[str] = Counter()
    overruns: Counter[str] = Counter()
    for res in snap.reservations.values():
        for budget_id, *_ in json.loads(res["budgets"]):
            if res["status"] == "held":
                reserved[budget_id] += int(res["amount_n"])
            if int(res["overrun"]):
                overruns[budget_id] += int(res["charged_n"]) - int(res["amount_n"])
    problems: list[str] = []
    checks = 0
    for budget_id, b in snap.budgets.items():
        limit, b_spent, b_reserved = int(b["limit_n"]), int(b["spent_n"]), int(b["reserved_n"])
        checks += 3
        if b_spent != spent[budget_id]:
            problems.append(f"{budget_id}: spent {b_spent}, its ledger entries sum to {spent[budget_id]}")
        if b_reserved != reserved[budget_id]:
            problems.append(f"{budget_id}: reserved {b_reserved}, its holds sum to {reserved[budget_id]}")
        if b["mode"] == "enforce" and b_spent + b_reserved > limit + overruns[budget_id]:
            problems.append(
                f"{budget_id}: spent {b_spent} + reserved {b_reserved} > limit {limit}"
                f" + overruns {overruns[budget_id]}"
            )
    charges = Counter(str(e["reservation_id"]) for e in snap.ledger.values() if e["kind"] == "charge")
    for res_id, res in snap.reservations.items():
        checks += 2
        settles = snap.terminal[res_id]
        if res["status"] == "held":
            if settles or charges[res_id] or res["charged_n"] is not None:
                problems.append(f"{res_id}: held, yet {settles} settle events and {charges[res_id]} charges")
            continue
        if settles != 1:
            problems.append(f"{res_id}: {res['status']} with {settles} settle events")
        entry_id = res["ledger_entry_id"]
        if entry_id is None:
            if charges[res_id] or int(res["charged_n"] or 0):
                problems.append(f"{res_id}: {res['status']} without a ledger entry, yet charged")
            continue
        charge = snap.ledger.get(str(entry_id))
        if (
            charges[res_id] != 1
            or charge is None
            or charge["reservation_id"] != res_id
            or int(charge["total_n"]) != int(res["charged_n"])
        ):
            problems.append(f"{res_id}: {charges[res_id]} charges; its entry {entry_id} does not match")
    refunded: Counter[str] = Counter()
    for entry in snap.ledger.values():
        if entry["kind"] == "refund":
            refunded[str(entry["refund_of"])] -= int(entry["total_n"])
    for entry_id, entry in snap.ledger.items():
        if entry["kind"] == "charge":
            checks += 1
            if not 0 <= int(entry["refunded_n"]) == refunded[entry_id] <= int(entry["total_n"]):
                problems.append(
                    f"{entry_id}: refunded {entry['refunded_n']}, refunds sum to {refunded[entry_id]}"
                )
    assert not problems, "ledger invariants broken:\n" + "\n".join(problems[:50])
    return checks


class Monitor:
    """Checks the invariants on a fresh snapshot of the database, again and again, while the
    traffic runs: they must hold at every committed instant, not only at the end."""

    def __init__(self, cluster: Cluster, interval: float = 0.15) -> None:
        self.db = Database(cluster)
        self.interval = interval
        self.snapshots = 0
        self.checks = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replicas-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.db.close()
        if self.failure is not None and exc[0] is None:
            raise AssertionError(f"invariants broken during the run: {self.failure}") from self.failure

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                snap = self.db.snapshot()
            except Exception:  # the database itself is unavailable (the outage test): skip
                self.db.close()
                continue
            try:
                self.checks += check_database(snap)
                self.snapshots += 1
            except AssertionError as exc:
                self.failure = exc
                return


# ---------------------------------------------------------------- checks through the API


@dataclass
class ApiFigures:
    events: int = 0
    reservations: int = 0
    budgets: int = 0
    entries: int = 0
    checks: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    reservation_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    ledger_rows: list[dict[str, Any]] = field(default_factory=list)


def all_events(client: httpx.Client) -> list[dict[str, Any]]:
    """Every event, paged through ``GET /v1/events`` as docs/api.md says: ``next_after_seq``
    back as ``after_seq``. An event seen twice, or a page that does not move on, fails."""
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    after = 0
    for _ in range(10_000):
        r = client.get("/v1/events", params={"after_seq": after, "limit": 1000}, headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        page = body["events"]
        if not page:
            return events
        for event in page:
            assert event["id"] not in seen, f"event {event['id']} came twice while paging (after_seq={after})"
            seen.add(event["id"])
        events += page
        assert body["next_after_seq"] != after, "next_after_seq does not move on"
        after = body["next_after_seq"]
    raise AssertionError("the event pages never end")


def check_through_api(cluster: Cluster, index: int) -> ApiFigures:
    """With no traffic and no hold left, check through replica ``index``'s API alone: every
    allowed reservation ended exactly once (one settle event, a final status, the charge its
    ledger entry says), every budget's spent is the sum of its ledger entries and nothing is
    reserved, no enforced budget is over its limit beyond flagged overruns, refunds add up,
    the event pages hold every event once, and the audit chains verify."""
    client = cluster[index].client
    figures = ApiFigures()
    verify = cluster.verify(index)
    events = all_events(client)
    assert len(events) == verify["events"], f"{len(events)} events paged, {verify['events']} verified"
    figures.events = len(events)
    allowed = {e["subject"]: e["data"] for e in events if e["type"] == ALLOWED}
    settles = Counter(e["subject"] for e in events if e["type"] in TERMINAL)
    assert set(settles) <= set(allowed), f"settled but never allowed: {set(settles) - set(allowed)}"
    entries = cluster.admin_json(index, "GET", "/v1/ledger", params={"limit": 10_000})["entries"]
    assert len(entries) < 10_000
    figures.entries = len(entries)
    figures.ledger_rows = entries

    def get_reservation(rid: str) -> dict[str, Any]:
        r = client.get(f"/v1/reservations/{rid}", headers=ADMIN)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    budget_ids = sorted({b for data in allowed.values() for b in data["budgets"]})
    with ThreadPoolExecutor(16) as pool:
        reservations = dict(zip(allowed, pool.map(get_reservation, allowed), strict=True))
        budgets = dict(zip(budget_ids, pool.map(lambda b: cluster.budget(index, b), budget_ids), strict=True))
    figures.reservations = len(reservations)
    figures.reservation_rows = reservations
    figures.budgets = len(budgets)
    problems: list[str] = []
    charges: dict[str, list[dict[str, Any]]] = defaultdict(list)
    refunds: dict[str, Decimal] = defaultdict(Decimal)
    spent: dict[str, Decimal] = defaultdict(Decimal)
    for entry in entries:
        if entry["kind"] == "charge":
            charges[entry["reservation_id"]].append(entry)
        else:
            refunds[entry["refund_of"]] += -dec(entry["total"])
        for budget_id in entry["budgets"]:
            spent[budget_id] += dec(entry["total"])
    overruns: dict[str, Decimal] = defaultdict(Decimal)
    for rid, res in reservations.items():
        figures.checks += 3
        figures.by_status[res["status"]] += 1
        if settles[rid] != 1:
            problems.append(f"{rid}: {settles[rid]} settle events")
        if res["status"] not in ("committed", "released", "expired"):
            problems.append(f"{rid}: still {res['status']}")
            continue
        mine = charges.get(rid, [])
        if res["ledger_entry_id"] is None:
            if mine or dec(res["charged"]) != 0:
                problems.append(f"{rid}: {res['status']}, no ledger entry, yet charged {res['charged']}")
        elif (
            len(mine) != 1
            or mine[0]["id"] != res["ledger_entry_id"]
            or dec(mine[0]["total"]) != dec(res["charged"])
        ):
            problems.append(f"{rid}: charged {res['charged']} by {res['ledger_entry_id']}, ledger has {mine}")
        if res["status"] == "expired" and res["ledger_entry_id"] is not None:
            if not res["estimated"] or dec(res["charged"]) != dec(res["amount"]):
                problems.append(f"{rid}: expired after its request was sent, not charged at the hold")
        if res["overrun"]:
            for budget_id in res["budgets"]:
                overruns[budget_id] += dec(res["charged"]) - dec(res["amount"])
    for budget_id, b in budgets.items():
        figures.checks += 3
        if dec(b["spent"]) != spent[budget_id]:
            problems.append(f"{budget_id}: spent {b['spent']}, ledger entries sum to {spent[budget_id]}")
        if dec(b["reserved"]) != 0:
            problems.append(f"{budget_id}: {b['reserved']} still reserved with every hold ended")
        if (
            b["mode"] == "enforce"
            and dec(b["spent"]) + dec(b["reserved"]) > dec(b["limit"]) + overruns[budget_id]
        ):
            problems.append(
                f"{budget_id}: spent {b['spent']} over limit {b['limit']} (+{overruns[budget_id]})"
            )
    for entry in entries:
        if entry["kind"] == "charge":
            figures.checks += 1
            if dec(entry["refunded"]) != refunds[entry["id"]] or refunds[entry["id"]] > dec(entry["total"]):
                problems.append(
                    f"{entry['id']}: refunded {entry['refunded']}, refunds sum to {refunds[entry['id']]}"
                )
    assert not problems, "invariants broken (through the API):\n" + "\n".join(problems[:50])
    return figures


def wait_no_holds(cluster: Cluster, timeout: float = 60.0) -> Snapshot:
    """Until no hold is left in the database (the replicas' sweepers expire them); checks the
    invariants on the last snapshot. Reading the database does not expire anything itself."""
    db = Database(cluster)
    try:
        last: list[Snapshot] = []

        def settled() -> bool:
            snap = db.snapshot()
            last[:] = [snap]
            return not snap.held

        poll("every hold to expire", settled, timeout, interval=0.2)
        check_database(last[0])
        return last[0]
    finally:
        db.close()


# ---------------------------------------------------------------- the storm


AMOUNTS = ("0.01", "0.02", "0.05", "0.10", "0.15", "0.25")


@dataclass
class Op:
    """One request of the storm, its answer, and (when it got none) its retry."""

    id: str
    kind: str  # reserve | commit | release | refund | gateway
    method: str
    path: str
    body: dict[str, Any] | None
    agent: Agent | None
    reservation: str | None = None  # the reservation a commit or release settles
    replica: int = -1
    status: int | None = None  # None: no answer
    answer: Any = None
    reached: bool = True  # False: the connection was refused, it never reached a server
    retry_status: int | None = None
    retry_answer: Any = None

    @property
    def lost(self) -> bool:
        """In flight when its replica died: it may or may not have happened."""
        return self.status is None and self.reached


@dataclass
class StormFigures:
    ops: int = 0
    answered: int = 0
    in_flight: int = 0
    refused: int = 0
    replayed: int = 0
    gateway_calls: int = 0
    gateway_made: int = 0
    denied: int = 0


class Storm:
    """Threads of agents' traffic over the live replicas: reserves (amounts, TTLs, sessions,
    connectors at random), then commit (sometimes above the hold: an overrun), release, or
    nothing (the sweeper expires it); admin refunds of earlier charges; gateway calls with an
    idempotency key each. ``live`` decides where requests go; a request to a replica that has
    died meanwhile gets no answer and is journaled as such."""

    def __init__(
        self,
        cluster: Cluster,
        agents: list[Agent],
        seed: int,
        *,
        threads: int = 8,
        gateway: bool = False,
    ) -> None:
        self.cluster = cluster
        self.agents = agents
        self.seed = seed
        self.threads = threads
        self.gateway = gateway
        self.live = cluster.alive()
        self.ops: list[Op] = []
        self.charges: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._ids = itertools.count()
        self.failure: BaseException | None = None

    # ------------------------------------------------------------ running

    def start(self) -> None:
        for t in range(self.threads):
            thread = threading.Thread(target=self._run, args=(t,), name=f"storm-{t}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=120)
        if self.failure is not None:
            raise AssertionError(f"a storm thread failed: {self.failure!r}") from self.failure

    def answered(self) -> int:
        with self._lock:
            return sum(1 for op in self.ops if op.status is not None)

    def wait_answered(self, count: int, timeout: float = 120.0) -> None:
        poll(f"{count} answered requests", lambda: self.answered() >= count, timeout, interval=0.01)

    def _run(self, t: int) -> None:
        rng = random.Random(f"{self.seed}:{t}")
        try:
            while not self._stop.is_set():
                self._step(rng)
        except BaseException as exc:
            self.failure = exc

    def _new_id(self, kind: str) -> str:
        return f"{self.seed}-{kind}-{next(self._ids)}-{secrets.token_hex(3)}"

    def _step(self, rng: random.Random) -> None:
        agent = rng.choice(self.agents)
        roll = rng.random()
        if self.gateway and roll < 0.15:
            op_id = self._new_id("gw")
            self.send(Op(op_id, "gateway", "GET", f"/proxy/{KG}/kg/query?q={op_id}", None, agent), rng)
            return
        if roll < 0.20:
            with self._lock:
                charge = rng.choice(self.charges) if self.charges else None
            if charge is not None:
                op_id = self._new_id("refund")
                refund = {
                    "ledger_entry_id": charge[0],
                    "amount": "0.01",
                    "reason": op_id,
                    "idempotency_key": op_id,
                }
                self.send(Op(op_id, "refund", "POST", "/v1/refunds", refund, None), rng)
                return
        op_id = self._new_id("res")
        body: dict[str, Any] = {
            "connector": rng.choice(("tool", "search")),
            "amount": rng.choice(AMOUNTS),
            "ttl_seconds": rng.randint(2, 4),
            "idempotency_key": op_id,
            "metadata": {"op": op_id},
        }
        if rng.random() < 0.3:
            body["session"] = f"s{rng.randint(1, 3)}"
        op = self.send(Op(op_id, "reserve", "POST", "/v1/reservations", body, agent), rng)
        if op.status != 201:
            return
        rid = op.answer["reservation_id"]
        roll = rng.random()
        if roll < 0.65:
            held = dec(body["amount"])
            choice = rng.random()
            amount = held + dec("0.03") if choice < 0.1 else held if choice < 0.5 else held / 2
            op_id = self._new_id("commit")
            commit_body = {"amount": str(amount), "idempotency_key": op_id}
            path = f"/v1/reservations/{rid}/commit"
            done = self.send(Op(op_id, "commit", "POST", path, commit_body, agent, reservation=rid), rng)
            if done.status == 200 and dec(done.answer["charged"]) >= dec("0.02"):
                with self._lock:
                    self.charges.append((done.answer["ledger_entry_id"], done.answer["charged"]))
        elif roll < 0.85:
            op_id = self._new_id("release")
            path = f"/v1/reservations/{rid}/release"
            self.send(Op(op_id, "release", "POST", path, {"reason": op_id}, agent, reservation=rid), rng)
        # else: left held, for the sweeper

    def headers(self, op: Op) -> dict[str, str]:
        if op.kind == "refund":
            return dict(ADMIN)
        assert op.agent is not None
        if op.kind == "gateway":
            headers = op.agent.gateway_headers(KG, "/kg/query")
            headers["x-paymaster-idempotency-key"] = op.id
            return headers
        return op.agent.headers()

    def request(self, op: Op, index: int) -> tuple[int | None, Any, bool]:
        """(status, json, reached) of ``op`` sent to replica ``index``; no status when the
        connection failed (``reached`` False when it was refused: nothing was sent)."""
        try:
            r = self.cluster[index].client.request(op.method, op.path, json=op.body, headers=self.headers(op))
        except httpx.ConnectError:
            return None, None, False
        except httpx.TransportError:
            return None, None, True
        try:
            return r.status_code, r.json(), True
        except ValueError:
            return r.status_code, r.text, True

    def send(self, op: Op, rng: random.Random) -> Op:
        op.replica = rng.choice(self.live)
        op.status, op.answer, op.reached = self.request(op, op.replica)
        if not op.reached:
            with self._lock:  # as a load balancer does: a refused connection marks it down
                self.live = [i for i in self.live if i != op.replica] or self.live
        if op.status is not None and op.status >= 500:
            raise AssertionError(f"{op.kind} {op.path} → {op.status} {op.answer} on replica {op.replica}")
        with self._lock:
            self.ops.append(op)
        return op

    # ------------------------------------------------------------ after the storm

    def retry_and_replay(self, index: int, victims: set[int]) -> StormFigures:
        """Send every unanswered request again to replica ``index`` (same body, same
        idempotency key, a fresh token), and replay the answered requests of the dead
        replicas (and a sample of the others) there: each must get its first answer back."""
        figures = StormFigures(ops=len(self.ops))
        rng = random.Random(self.seed)
        answered = [op for op in self.ops if op.status is not None]
        replays = [op for op in answered if op.replica in victims and op.kind != "release"]
        others = [op for op in answered if op.replica not in victims and op.kind != "release"]
        replays += rng.sample(others, min(40, len(others)))
        for op in self.ops:
            if op.status is None:
                figures.in_flight += op.reached
                figures.refused += not op.reached
                op.retry_status, op.retry_answer, _ = self.request(op, index)
                assert op.retry_status is not None and op.retry_status < 500, (op.kind, op.retry_answer)
        for op in replays:
            status, answer, _ = self.request(op, index)
            figures.replayed += 1
            if op.kind == "gateway":
                if op.status == 200:  # that call was made: a replay is refused, not made again
                    assert (status, error_code_of(answer)) == (409, "idempotency_conflict"), (op, answer)
                else:
                    assert (status, answer) == (op.status, op.answer), (op, status, answer)
            else:
                assert (status, answer) == (op.status, op.answer), (
                    f"{op.kind} {op.id}: first answer {op.status} {op.answer}, replayed {status} {answer}"
                )
        figures.answered = len(answered)
        figures.gateway_calls = sum(1 for op in self.ops if op.kind == "gateway")
        figures.gateway_made = sum(1 for op in self.ops if op.kind == "gateway" and op.status == 200)
        figures.denied = sum(
            1 for op in answered if op.kind in ("reserve", "gateway") and op.status in (402, 403)
        )
        return figures

    def check(self, api: ApiFigures, provider: Any) -> None:
        """Nothing happened twice, and what a client was told happened did happen."""
        by_op: dict[str, list[str]] = defaultdict(list)
        for rid, res in api.reservation_rows.items():
            if "op" in res["metadata"]:
                by_op[res["metadata"]["op"]].append(rid)
        refunds_by_op = Counter(e["reason"] for e in api.ledger_rows if e["kind"] == "refund")
        seen = provider_queries(provider) if provider is not None else Counter()
        problems: list[str] = []
        for op in self.ops:
            status, answer = (
                (op.status, op.answer) if op.status is not None else (op.retry_status, op.retry_answer)
            )
            if op.kind == "reserve":
                expected = [answer["reservation_id"]] if status == 201 else []
                if by_op.get(op.id, []) != expected:
                    problems.append(f"reserve {op.id} ({status}): reservations {by_op.get(op.id)}")
            elif op.kind == "commit":
                res = api.reservation_rows[op.reservation or ""]
                if status == 200:
                    if (res["status"], res["ledger_entry_id"], dec(res["charged"])) != (
                        "committed",
                        answer["ledger_entry_id"],
                        dec(answer["charged"]),
                    ):
                        problems.append(f"commit {op.id} told {answer}, the reservation is {res}")
                elif error_code_of(answer) != "reservation_expired":  # its TTL may lapse first
                    problems.append(f"commit {op.id}: {status} {answer}")
                elif res["status"] != "expired":
                    problems.append(f"commit {op.id}: told expired, the reservation is {res['status']}")
            elif op.kind == "release":
                res = api.reservation_rows[op.reservation or ""]
                if status == 200 and res["status"] != "released":
                    problems.append(f"release {op.id} told {answer}, the reservation is {res['status']}")
            elif op.kind == "refund":
                if refunds_by_op[op.id] != (1 if status == 201 else 0):
                    problems.append(f"refund {op.id} ({status}): {refunds_by_op[op.id]} refund entries")
            elif op.kind == "gateway":
                # one upstream call for a call answered 200 (first time or on its retry), none for
                # a denial; a call lost in flight and then refused as a repeat made at most one
                calls = seen[op.id]
                if status == 200:
                    wrong = calls != 1
                elif op.status is None and error_code_of(answer) == "idempotency_conflict":
                    wrong = calls > 1
                else:
                    wrong = calls != 0
                if wrong:
                    problems.append(
                        f"gateway {op.id} ({op.status}, retry {op.retry_status}): {calls} upstream calls"
                    )
        assert not problems, "done twice, or not as told:\n" + "\n".join(problems[:50])


def error_code_of(answer: Any) -> str | None:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("code"))
    return None


STORM_TEAM_POLICY = {
    "caps": [
        {"scope": "all", "period": "day", "limit": "24.00"},
        {"scope": "connector:search", "period": "day", "limit": "3.00", "mode": "shadow"},
    ]
}
STORM_AGENT_POLICY = {
    "caps": [
        {"scope": "all", "period": "day", "limit": "6.00"},
        {"scope": "connector:tool", "period": "hour", "limit": "4.00"},
        {"scope": "all", "period": "session", "limit": "1.50"},
    ]
}


def storm_agents(cluster: Cluster, count: int = 4) -> list[Agent]:
    """A team with a day cap and a shadow cap, and agents under it, each with a wallet, a
    day cap, an hourly cap on one connector and a session cap."""
    cluster.admin_json(0, "PUT", "/v1/principals/team-storm", expect=201, json={"policy": STORM_TEAM_POLICY})
    return [
        cluster.create_agent(
            i % len(cluster.replicas), fund="8.00", policy=STORM_AGENT_POLICY, parent="team-storm"
        )
        for i in range(count)
    ]


@dataclass
class KillFigures:
    seed: int
    victim: int
    storm: StormFigures
    api: ApiFigures
    snapshots: int
    checks: int
    seconds: float


def kill_during_storm(cluster: Cluster, provider: Any, seed: int) -> KillFigures:
    """The scenario of test_kill: a storm over every replica, one SIGKILLed at a random moment,
    the storm going on over the survivors; then, through a survivor, the unanswered requests
    retried and the answered ones replayed, every hold left expired by its sweeper, and every
    invariant checked (on database snapshots all along, and through the API at the end)."""
    began = time.monotonic()
    rng = random.Random(seed)
    agents = storm_agents(cluster)
    storm = Storm(cluster, agents, seed, threads=8, gateway=provider is not None)
    with Monitor(cluster) as monitor:
        storm.start()
        try:
            storm.wait_answered(rng.randint(30, 150))
            time.sleep(rng.uniform(0, 0.3))  # a random moment, not a condition to wait for
            victim = rng.choice(cluster.alive())
            cluster[victim].kill()
            storm.live = [i for i in storm.live if i != victim]
            storm.wait_answered(storm.answered() + rng.randint(20, 60))
        finally:
            storm.stop()
        survivor = storm.live[0]
        served = Counter(op.replica for op in storm.ops if op.status is not None)
        assert served[victim] > 0 and served[survivor] > 0, f"not a storm over both replicas: {served}"
        figures = storm.retry_and_replay(survivor, {victim})
        snap = wait_no_holds(cluster)
        api = check_through_api(cluster, survivor)
        storm.check(api, provider)
        assert len(snap.reservations) == api.reservations
    for replica in cluster.replicas:
        assert replica.errors_logged() == [], "\n".join(replica.errors_logged())
    return KillFigures(
        seed,
        victim,
        figures,
        api,
        monitor.snapshots,
        monitor.checks + api.checks,
        time.monotonic() - began,
    )


# ---------------------------------------------------------------- soak figures


@dataclass
class SoakTotals:
    runs: int = 0
    kills: int = 0
    ops: int = 0
    in_flight: int = 0
    replayed: int = 0
    reservations: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    events: int = 0
    snapshots: int = 0
    checks: int = 0
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)

    def add(self, backend: str, f: KillFigures) -> None:
        self.runs += 1
        self.kills += 1
        self.ops += f.storm.ops
        self.in_flight += f.storm.in_flight
        self.replayed += f.storm.replayed
        self.reservations += f.api.reservations
        self.statuses.update(f.api.by_status)
        self.events += f.api.events
        self.snapshots += f.snapshots
        self.checks += f.checks
        self.seconds += f.seconds
        line = (
            f"{backend} seed {f.seed}: killed replica {f.victim}; {f.storm.ops} requests"
            f" ({f.storm.in_flight} in flight at the kill, {f.storm.refused} refused, all retried;"
            f" {f.storm.replayed} replayed; {f.storm.gateway_calls} gateway calls,"
            f" {f.storm.gateway_made} made; {f.storm.denied} denials); {f.api.reservations} reservations"
            f" {dict(sorted(f.api.by_status.items()))}; {f.api.events} events;"
            f" {f.snapshots} snapshots; {f.checks} invariant checks; {f.seconds:.1f}s"
        )
        self.lines.append(line)
        print(line)


TOTALS = SoakTotals()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """This folder's soak runs only when ``-m`` selects them (``make soak``): a plain
    ``pytest tests/replicas`` stays within minutes."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="a soak run: select it with -m soak (make soak)")
    for item in items:
        if "soak" in item.keywords and item.path.is_relative_to(here):
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    # the suite runs in one xdist group (``make test`` uses --dist loadgroup): two clusters
    # at once would need twice the PostgreSQL connections; registered here for -p no:xdist
    config.addinivalue_line("markers", "xdist_group(name): run in the xdist worker of this group")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TOTALS.runs:
        return
    t = TOTALS
    terminalreporter.section("replicas: kill runs")
    for line in t.lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        f"total: {t.runs} runs, {t.kills} replicas SIGKILLed, {t.ops} requests ({t.in_flight} in flight"
        f" at a kill), {t.replayed} replays, {t.reservations} reservations"
        f" {dict(sorted(t.statuses.items()))}, {t.events} audit events, {t.snapshots} database"
        f" snapshots, {t.checks} invariant checks, all held; {t.seconds:.0f}s"
    )
