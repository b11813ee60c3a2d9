"""The PostgreSQL store: several replicas, and several writers in each, on one database.

The ledger's verbs (:mod:`paymaster.store.ops`) run unchanged: :class:`_PgTx` turns their
portable SQL into psycopg's (``?`` → ``%s``, the reserved word ``window`` quoted) and returns
rows as dicts. What makes it safe and fast with many writers at once (docs/postgres.md):

* Each operation is one READ COMMITTED transaction on a pooled connection, run by one of a few
  writer threads (``write`` returns a future). The conditional ``UPDATE … WHERE limit_n -
  spent_n - reserved_n >= amount RETURNING`` is the guard; budget rows are locked in one fixed
  order (``lock_budgets``: sorted, ``ORDER BY id COLLATE "C" FOR UPDATE``), so writers queue on
  a hot budget instead of deadlocking. PostgreSQL groups concurrent commits in its WAL flush, so
  there is no batch transaction here (a batch would hold the locks of all its operations and
  break that order across replicas).
* Rows an operation reads and then changes on what it read are locked when read, in write
  transactions only (:data:`LOCKING_READS`); same-key idempotent requests take turns on a
  transaction advisory lock. Serialization failures, deadlocks, lock timeouts, unique
  violations (a read-then-insert race) and connections lost before COMMIT re-run the whole
  operation in a new transaction: operations are deterministic given the database state. A
  connection lost during COMMIT is resolved with ``pg_xact_status`` before anything is re-run.
  No psycopg exception leaves this module: what is not retried becomes ``StoreUnavailable``.
* Audit: every writer thread appends to a chain of its own (``events`` keyed by ``(chain,
  seq)``), sealed in the same transaction by an upsert of its signed head row in
  ``audit_heads`` — a row no other writer touches, so sealing serialises nothing.
* Volume-tier counters are sharded per writer (``tier_counter_shards``), summed by the
  ``tier_counters`` view.
* Agent, principal and policy changes ``NOTIFY paymaster_invalidate`` in their transaction; a
  listener thread hands the owner to the callbacks registered with :meth:`on_invalidate`.
* Migrations run at start under ``pg_advisory_lock``, so replicas starting together take turns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import errors as pg_errors
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from paymaster.core.audit import GENESIS_HASH, Head, build_event, event_hash, sign_head
from paymaster.ids import new_id
from paymaster.store.base import Params, Row, StoreUnavailable
from paymaster.store.sqlite import migrations

T = TypeVar("T")
log = logging.getLogger(__name__)

WRITERS = 8  # writer threads (and chains, and tier shards in use) per store instance
READERS = 8  # pooled connections for reads
POOL_TIMEOUT = 10.0  # seconds to wait for a pooled connection before failing closed
STATEMENT_TIMEOUT_MS = 30_000
IDLE_IN_TX_TIMEOUT_MS = 60_000
MAX_CONFLICT_RETRIES = 12  # serialization failures, deadlocks, lock timeouts
MAX_UNIQUE_RETRIES = 3  # unique violations: a read-then-insert race (or a plain bug)
MAX_CONNECTION_RETRIES = 3  # connections lost before COMMIT
OUT_OF_ORDER_LOCK_TIMEOUT = "250ms"
TIER_SHARDS = 16
EVENTS_PAGE = 1000
INVALIDATE_CHANNEL = "paymaster_invalidate"
MIGRATION_LOCK = 0x7061796D61737465  # "paymaste": the advisory lock key migrations run under

# Audit event types whose subject (an agent id or a principal name) every replica's cache drops.
INVALIDATING_EVENTS = frozenset(
    {
        "dev.paymaster.agent.frozen",
        "dev.paymaster.agent.unfrozen",
        "dev.paymaster.agent.revoked",
        "dev.paymaster.policy.changed",
        "dev.paymaster.principal.changed",
    }
)

# Reads in ops.py whose row the operation then changes on the strength of what it read. SQLite
# serialises writers; here, under READ COMMITTED, two replicas could both read "held" and both
# settle, or both read "active" and a freeze overwrite a revoke. In write transactions these
# exact statements lock their rows (tests/store/test_postgres.py checks that ops.py still has them).
LOCKING_READS: Mapping[str, str] = {
    # commit and release: the reservation row decides what happens to the budgets
    "SELECT * FROM reservations WHERE id = ?": "SELECT * FROM reservations WHERE id = ? FOR UPDATE",
    # expiry: each due hold is expired by one writer; the others skip it
    "SELECT * FROM reservations WHERE status = 'held' AND expires_at <= ? ORDER BY expires_at LIMIT ?": (
        "SELECT * FROM reservations WHERE status = 'held' AND expires_at <= ? ORDER BY expires_at LIMIT ?"
        " FOR UPDATE SKIP LOCKED"
    ),
    # refund: refunded_n bounds the refund
    "SELECT * FROM ledger WHERE id = ? AND kind = 'charge'": (
        "SELECT * FROM ledger WHERE id = ? AND kind = 'charge' FOR UPDATE"
    ),
    # status changes (revoke is final), fund, and the reserve's status gate
    "SELECT status FROM agents WHERE id = ?": "SELECT status FROM agents WHERE id = ? FOR UPDATE",
    # the reserve's status gate: a freeze or revoke and the reserves of that agent take turns
    # (a shared lock here let a stream of reserves starve the freeze past its lock timeout)
    "SELECT status, state_version FROM agents WHERE id = ?": (
        "SELECT status, state_version FROM agents WHERE id = ? FOR UPDATE"
    ),
}
# Before this lookup (in a write transaction) the (scope, key) advisory lock is taken, so a second
# request with the same key waits for the first to commit and then replays its answer.
IDEMPOTENCY_LOOKUP = "SELECT body_hash, status, response FROM idempotency WHERE scope = ? AND key = ?"
TIER_COUNT = (
    "INSERT INTO tier_counters (tier_key, calls) VALUES (?, 1)"
    " ON CONFLICT (tier_key) DO UPDATE SET calls = tier_counters.calls + 1"
)
TIER_UNCOUNT = "UPDATE tier_counters SET calls = calls - 1 WHERE tier_key = ? AND calls > 0"
_TIER_COUNT_PG = (
    "INSERT INTO tier_counter_shards (tier_key, shard, calls) VALUES (%s, %s, 1)"
    " ON CONFLICT (tier_key, shard) DO UPDATE SET calls = tier_counter_shards.calls + 1"
)
_TIER_UNCOUNT_PG = (
    "INSERT INTO tier_counter_shards (tier_key, shard, calls)"
    " SELECT %s, %s, -1"
    " WHERE (SELECT COALESCE(SUM(calls), 0) FROM tier_counter_shards WHERE tier_key = %s) > 0"
    " ON CONFLICT (tier_key, shard) DO UPDATE SET calls = tier_counter_shards.calls - 1"
)
_LOCK_BUDGETS = 'SELECT id FROM budgets WHERE id = ANY(%s) ORDER BY id COLLATE "C" FOR UPDATE'
_SEAL = (
    "INSERT INTO audit_heads (chain, seq, hash, sig) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, sig = excluded.sig"
    " WHERE audit_heads.seq = %s RETURNING pg_current_xact_id()::text AS xid"
)
_INSERT_EVENT = (
    "INSERT INTO events (chain, seq, id, type, time, subject, hash, event)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
_RETRY_CONFLICTS = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected, pg_errors.LockNotAvailable)
_WINDOW = re.compile(r"(?<![\w\"'])window(?![\w\"'])")


def utcnow() -> datetime:
    return datetime.now(UTC)


@lru_cache(maxsize=4096)
def to_pg(sql: str) -> str:
    """Portable SQL → psycopg's: ``?`` placeholders become ``%s`` (a literal ``%`` is doubled)
    and the column ``window``, a reserved word in PostgreSQL, is quoted."""
    return _WINDOW.sub('"window"', sql.replace("%", "%%").replace("?", "%s"))


def advisory_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for a tuple of strings."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _connection_lost(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    if conn is not None and (conn.broken or conn.closed):
        return True
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in {"57P01", "57P02", "57P03"}
    return False


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        f"SET statement_timeout = {STATEMENT_TIMEOUT_MS};"
        f" SET idle_in_transaction_session_timeout = {IDLE_IN_TX_TIMEOUT_MS}"
    )


def _rollback(conn: psycopg.Connection[Any]) -> None:
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
    except psycopg.Error:
        pass  # a broken connection: the pool discards it


@dataclass
class _Writer:
    """One writer thread's chain: its id, its tier shard, and the head it last committed."""

    chain: str
    shard: int
    seq: int = 0
    hash: str = GENESIS_HASH
    known: bool = False  # False: read the head from the database before the next append


class _Retry(Exception):
    def __init__(self, cause: BaseException, kind: str) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.kind = kind  # conflict | unique | connection


class _ChainMoved(Exception):
    """The chain's head is not where this writer left it (a commit whose outcome was lost)."""


class _PgTx:
    """One transaction on a pooled connection, as the ledger's verbs see it."""

    dialect = "postgresql"

    def __init__(
        self, store: PostgresStore, conn: psycopg.Connection[Any], now: datetime, writer: _Writer | None
    ) -> None:
        self._store = store
        self._cur: psycopg.Cursor[DictRow] = conn.cursor(row_factory=dict_row)
        self._now = now
        self._writer = writer
        self._sp = 0
        # the chain while this transaction appends to it (None: not read yet)
        self._base_seq = 0
        self._seq: int | None = None
        self._hash = GENESIS_HASH
        self._notify: list[str] = []
        self._locked: set[str] = set()
        self._max_locked = ""
        self.sealed: tuple[int, str, str] | None = None

    @property
    def now(self) -> datetime:
        return self._now

    def _run(self, sql: str, params: Params) -> None:
        args: Sequence[Any] = tuple(params)
        if self._writer is not None:
            if sql in LOCKING_READS:
                sql = LOCKING_READS[sql]
            elif sql == IDEMPOTENCY_LOOKUP:
                self._cur.execute(
                    "SELECT pg_advisory_xact_lock(%s)", (advisory_key("idem", *map(str, args)),)
                )
            elif sql == TIER_COUNT:
                self._cur.execute(_TIER_COUNT_PG, (args[0], self._writer.shard))
                return
            elif sql == TIER_UNCOUNT:
                self._cur.execute(_TIER_UNCOUNT_PG, (args[0], self._writer.shard, args[0]))
                return
        self._cur.execute(to_pg(sql), args)

    def execute(self, sql: str, params: Params = ()) -> int:
        self._run(sql, params)
        return self._cur.rowcount

    def one(self, sql: str, params: Params = ()) -> Row | None:
        self._run(sql, params)
        return self._cur.fetchone()

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        self._run(sql, params)
        return list(self._cur.fetchall())

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self._sp += 1
        name = f"sp{self._sp}"
        state = (self._seq, self._hash, len(self._notify), set(self._locked), self._max_locked)
        self._cur.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            try:
                self._cur.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self._cur.execute(f"RELEASE SAVEPOINT {name}")
            except psycopg.Error:
                pass  # the connection is gone: the error on its way out says why
            # rows locked inside the savepoint are unlocked by its rollback
            self._seq, self._hash, n_notify, self._locked, self._max_locked = state
            del self._notify[n_notify:]
            raise
        else:
            self._cur.execute(f"RELEASE SAVEPOINT {name}")
        finally:
            self._sp -= 1

    def lock_budgets(self, budget_ids: Sequence[str]) -> None:
        """Lock the budget rows in one order (by id, bytewise), which every writer follows, so
        writers on the same budgets queue rather than deadlock. A second call in the same
        transaction (expiring other holds, then holding) may need ids below ones it holds:
        those wait only briefly, then the operation is re-run from the start."""
        if self._writer is None:
            return
        todo = sorted(set(budget_ids) - self._locked)
        if not todo:
            return
        behind = [b for b in todo if b < self._max_locked]
        ahead = [b for b in todo if b >= self._max_locked]
        if behind:
            self._cur.execute(f"SET LOCAL lock_timeout = '{OUT_OF_ORDER_LOCK_TIMEOUT}'")
            self._cur.execute(_LOCK_BUDGETS, (behind,))
            self._cur.execute("SET LOCAL lock_timeout = 0")
        if ahead:
            self._cur.execute(_LOCK_BUDGETS, (ahead,))
        self._locked.update(todo)
        self._max_locked = max(self._max_locked, todo[-1])

    def emit(self, event_type: str, subject: str, data: Mapping[str, Any]) -> dict[str, Any]:
        writer = self._writer
        if writer is None:
            raise RuntimeError("emit on a read-only transaction")
        if self._seq is None:
            self._open_chain(writer)
        assert self._seq is not None
        seq = self._seq + 1
        event = build_event(
            authority_id=self._store.authority_id,
            event_id=new_id("ev_"),
            event_type=event_type,
            subject=subject,
            data=data,
            at=self._now,
            seq=seq,
            prevhash=self._hash,
            chain=writer.chain,
        )
        digest = event_hash(event)
        self._cur.execute(
            _INSERT_EVENT,
            (
                writer.chain,
                seq,
                event["id"],
                event_type,
                event["time"],
                subject,
                digest,
                json.dumps(event, separators=(",", ":")),
            ),
        )
        self._seq, self._hash = seq, digest
        if event_type in INVALIDATING_EVENTS:
            self._notify.append(subject)
        return event

    def _open_chain(self, writer: _Writer) -> None:
        if writer.known:
            self._base_seq, self._hash = writer.seq, writer.hash
        else:
            self._cur.execute("SELECT seq, hash FROM audit_heads WHERE chain = %s", (writer.chain,))
            row = self._cur.fetchone()
            self._base_seq, self._hash = (int(row["seq"]), str(row["hash"])) if row else (0, GENESIS_HASH)
        self._seq = self._base_seq

    def seal(self) -> str | None:
        """Sign the chain's new head and upsert it, send the invalidations; return the
        transaction id (None when the transaction wrote nothing)."""
        writer = self._writer
        assert writer is not None
        xid: str | None
        if self._seq is not None and self._seq != self._base_seq:
            sig = sign_head(self._store._key, self._seq, self._hash)
            self._cur.execute(_SEAL, (writer.chain, self._seq, self._hash, sig, self._base_seq))
            row = self._cur.fetchone()
            if row is None:
                raise _ChainMoved(writer.chain)
            xid = str(row["xid"])
            self.sealed = (self._seq, self._hash, sig)
        else:
            self._cur.execute("SELECT pg_current_xact_id_if_assigned()::text AS xid")
            row = self._cur.fetchone()
            xid = None if row is None or row["xid"] is None else str(row["xid"])
        if self._notify:
            self._cur.execute(
                "SELECT pg_notify(%s, owner) FROM unnest(%s::text[]) AS owner",
                (INVALIDATE_CHANNEL, sorted(set(self._notify))),
            )
        return xid


class PostgresStore:
    """The store on PostgreSQL (psycopg 3, pooled connections); see the module docstring."""

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        authority_id: str,
        signing_key: Ed25519PrivateKey,
        clock: Callable[[], datetime] = utcnow,
        audit_sink: str | None = None,
        writers: int = WRITERS,
        readers: int = READERS,
        pool_timeout: float = POOL_TIMEOUT,
    ) -> None:
        self.url = url
        self.authority_id = authority_id
        self._key = signing_key
        self._clock = clock
        self._sink = audit_sink
        self._sink_lock = threading.Lock()
        self._timeout = pool_timeout
        self._closed = False
        # this instance's chains are "<instance>.<n>", one per writer thread
        self.instance = new_id("ch_")
        self._shard_base = zlib.crc32(self.instance.encode("ascii"))
        self._n_writers = 0
        self._lock = threading.Lock()
        # retries by kind (conflict, unique, connection) and by SQLSTATE, for metrics and tests
        self.stats: Counter[str] = Counter()
        self._local = threading.local()
        self.migrate()
        kwargs: dict[str, Any] = {"autocommit": True}
        self._wpool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=min(2, writers),
            max_size=writers,
            kwargs=kwargs,
            configure=_configure,
            open=False,
            name="paymaster-writers",
            timeout=pool_timeout,
            reconnect_timeout=pool_timeout,  # bounds the backoff: back within seconds of the database
        )
        self._rpool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=readers,
            kwargs=kwargs,
            configure=_configure,
            open=False,
            name="paymaster-readers",
            timeout=pool_timeout,
            reconnect_timeout=pool_timeout,  # bounds the backoff: back within seconds of the database
        )
        try:
            self._wpool.open(wait=True, timeout=pool_timeout)
            self._rpool.open(wait=True, timeout=pool_timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            self._wpool.close()
            self._rpool.close()
            raise StoreUnavailable(f"cannot open database connections: {exc}") from exc
        self._executor = ThreadPoolExecutor(
            max_workers=writers, thread_name_prefix="paymaster-pg-writer", initializer=self._start_writer
        )
        # invalidation listener, started by the first on_invalidate
        self._callbacks: list[Callable[[str | None], None]] = []
        self._listener: threading.Thread | None = None
        self._listening = threading.Event()
        self._stop = threading.Event()

    # ------------------------------------------------------------ schema

    def migrate(self) -> int:
        """Apply the shipped migrations not yet recorded in ``meta.schema_version``, each in a
        transaction, under an advisory lock so that replicas starting together take turns."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
                try:
                    current = _schema_version(conn)
                    for version, sql in migrations("postgres"):
                        if version <= current:
                            continue
                        conn.execute("BEGIN")
                        try:
                            conn.execute(sql)
                            conn.execute(
                                "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                (str(version),),
                            )
                            conn.execute("COMMIT")
                        except BaseException:
                            _rollback(conn)
                            raise
                        current = version
                finally:
                    if not conn.broken:
                        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot migrate the database: {exc}") from exc
        return current

    # ------------------------------------------------------------ writes

    def write(self, op: Callable[[Any], T]) -> Future[T]:
        if not self._closed:
            try:
                return self._executor.submit(self._run_write, op)
            except RuntimeError:  # shut down meanwhile
                pass
        fut: Future[T] = Future()
        fut.set_exception(StoreUnavailable("store is closed"))
        return fut

    def _start_writer(self) -> None:
        with self._lock:
            self._n_writers += 1
            n = self._n_writers
        self._local.writer = _Writer(chain=f"{self.instance}.{n}", shard=(self._shard_base + n) % TIER_SHARDS)

    def _run_write(self, op: Callable[[Any], T]) -> T:
        writer: _Writer = self._local.writer
        counts = {"conflict": 0, "unique": 0, "connection": 0}
        caps = {
            "conflict": MAX_CONFLICT_RETRIES,
            "unique": MAX_UNIQUE_RETRIES,
            "connection": MAX_CONNECTION_RETRIES,
        }
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(op, writer)
            except _Retry as retry:
                counts[retry.kind] += 1
                self._count(retry.kind, getattr(retry.cause, "sqlstate", None) or type(retry.cause).__name__)
                if counts[retry.kind] > caps[retry.kind]:
                    raise StoreUnavailable(
                        f"database write failed after {attempt} attempts: {retry.cause}"
                    ) from retry.cause
                if retry.kind == "connection":
                    self._check(self._wpool)
                time.sleep(min(0.1, 0.002 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.5))

    def _count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self.stats[key] += 1

    def _attempt(self, op: Callable[[Any], T], writer: _Writer) -> T:
        conn = self._getconn(self._wpool)
        tx = _PgTx(self, conn, self._clock(), writer)
        committing = False
        xid: str | None = None
        try:
            try:
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                value = op(tx)
                xid = tx.seal()
                committing = True
                conn.execute("COMMIT")
            except psycopg.Error as exc:
                lost = _connection_lost(exc, conn)
                writer.known = False
                if not lost:
                    _rollback(conn)
                elif committing:
                    outcome = self._outcome(xid)
                    if outcome is None:
                        raise StoreUnavailable(
                            "the database connection was lost while committing; the outcome is unknown"
                        ) from exc
                    if outcome:
                        self._committed(tx)
                        return value
                if lost:
                    raise _Retry(exc, "connection") from exc
                if isinstance(exc, _RETRY_CONFLICTS):
                    raise _Retry(exc, "conflict") from exc
                if isinstance(exc, pg_errors.UniqueViolation):
                    raise _Retry(exc, "unique") from exc
                raise StoreUnavailable(f"database error: {exc}") from exc
            except _ChainMoved as exc:
                writer.known = False
                _rollback(conn)
                raise _Retry(exc, "conflict") from exc
            except BaseException:
                _rollback(conn)
                raise
        finally:
            self._putconn(self._wpool, conn)
        if tx.sealed is not None:
            writer.seq, writer.hash = tx.sealed[0], tx.sealed[1]
            writer.known = True
        self._committed(tx)
        return value

    def _committed(self, tx: _PgTx) -> None:
        if tx.sealed is not None and self._sink and tx._writer is not None:
            self._export_head(tx._writer.chain, *tx.sealed)

    def _outcome(self, xid: str | None) -> bool | None:
        """Did the transaction whose COMMIT lost its connection commit? None: cannot tell."""
        if xid is None:
            return True  # it wrote nothing: nothing was lost
        for _ in range(40):
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    row = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
            except psycopg.Error:
                return None
            status = row[0] if row else None
            if status == "committed":
                return True
            if status == "aborted":
                return False
            if status != "in progress":
                return None
            time.sleep(0.05)  # the server has not yet noticed the lost client
        return None

    def _export_head(self, chain: str, seq: int, head_hash: str, sig: str) -> None:
        """Heads also go to an append-only sink outside the database (see audit verify --against)."""
        assert self._sink is not None
        line = json.dumps({"chain": chain, "seq": seq, "hash": head_hash, "sig": sig}) + "\n"
        with self._sink_lock:
            try:
                with open(self._sink, "a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError:
                # the database already committed: a missing sink line weakens verification, no more
                pass

    # ------------------------------------------------------------ connections

    def _getconn(self, pool: ConnectionPool[psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
        try:
            return pool.getconn(timeout=self._timeout)
        except (PoolTimeout, PoolClosed) as exc:
            raise StoreUnavailable(f"no database connection: {exc}") from exc

    @staticmethod
    def _putconn(pool: ConnectionPool[psycopg.Connection[Any]], conn: psycopg.Connection[Any]) -> None:
        try:
            pool.putconn(conn)
        except psycopg.Error:  # pragma: no cover - the pool closed under us
            conn.close()

    @staticmethod
    def _check(pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        """After a lost connection, drop the pool's other dead connections before retrying."""
        with suppress(psycopg.Error):
            pool.check()

    # ------------------------------------------------------------ reads

    def read(self, op: Callable[[Any], T]) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        attempt = 0
        while True:
            attempt += 1
            conn = self._getconn(self._rpool)
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                value = op(_PgTx(self, conn, self._clock(), None))
                conn.execute("COMMIT")
                return value
            except psycopg.Error as exc:
                lost = _connection_lost(exc, conn)
                if not lost:
                    _rollback(conn)
                elif attempt <= MAX_CONNECTION_RETRIES:
                    self._check(self._rpool)
                    continue
                raise StoreUnavailable(f"database read failed: {exc}") from exc
            except BaseException:
                _rollback(conn)
                raise
            finally:
                self._putconn(self._rpool, conn)

    def events(
        self, after_seq: int = 0, limit: int | None = None, chain: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """With ``chain``: that chain's events after seq ``after_seq``. Without: every event in
        order of time, events of equal time in the order they were written (``pos``), the first
        ``after_seq`` skipped. Read page by page, so no connection is held between pages."""
        left = limit
        cursor: tuple[Any, ...] | None = None
        while left is None or left > 0:
            n = EVENTS_PAGE if left is None else min(EVENTS_PAGE, left)
            if chain is not None:
                after = after_seq if cursor is None else int(cursor[2])
                sql = (
                    "SELECT time, pos, seq, event FROM events WHERE chain = ? AND seq > ?"
                    " ORDER BY seq LIMIT ?"
                )
                params: tuple[Any, ...] = (chain, after, n)
            elif cursor is None:
                sql = "SELECT time, pos, seq, event FROM events ORDER BY time, pos LIMIT ? OFFSET ?"
                params = (n, after_seq)
            else:
                sql = (
                    "SELECT time, pos, seq, event FROM events WHERE (time, pos) > (?, ?)"
                    " ORDER BY time, pos LIMIT ?"
                )
                params = (cursor[0], cursor[1], n)
            rows = self.read(_fetch_all(sql, params))
            for row in rows:
                yield json.loads(row["event"])
            if len(rows) < n:
                return
            last = rows[-1]
            cursor = (last["time"], int(last["pos"]), int(last["seq"]))
            if left is not None:
                left -= len(rows)

    def chain_heads(self) -> list[Head]:
        rows = self.read(lambda tx: tx.all("SELECT chain, seq, hash, sig FROM audit_heads ORDER BY chain"))
        return [Head(int(r["seq"]), str(r["hash"]), str(r["sig"]), str(r["chain"])) for r in rows]

    def unsealed_events(self) -> dict[str, int]:
        rows = self.read(
            lambda tx: tx.all(
                "SELECT e.chain, MIN(e.seq) AS s FROM events e LEFT JOIN audit_heads h ON h.chain = e.chain"
                " WHERE h.seq IS NULL OR e.seq > h.seq GROUP BY e.chain"
            )
        )
        return {str(r["chain"]): int(r["s"]) for r in rows}

    # ------------------------------------------------------------ invalidation

    def on_invalidate(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(owner)`` whenever an agent, principal or policy changes, in any
        replica; ``callback(None)`` after the listener lost its connection (changes may have
        been missed). Returns once the listener is listening."""
        with self._lock:
            self._callbacks.append(callback)
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen, name="paymaster-pg-listen", daemon=True
                )
                self._listener.start()
        self._listening.wait(timeout=self._timeout)

    def _listen(self) -> None:
        delay = 0.05
        missed = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {INVALIDATE_CHANNEL}")
                    self._listening.set()
                    delay = 0.05
                    if missed:
                        self._fire(None)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.25):
                            self._fire(note.payload or None)
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    log.warning("invalidation listener lost its connection: %s", exc)
                missed = True
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)

    def _fire(self, owner: str | None) -> None:
        for callback in list(self._callbacks):
            try:
                callback(owner)
            except Exception:
                log.exception("invalidation callback failed")

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self._wpool.close()
        self._rpool.close()


def _fetch_all(sql: str, params: Params) -> Callable[[_PgTx], list[Row]]:
    def run(tx: _PgTx) -> list[Row]:
        return tx.all(sql, params)

    return run


def _schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0
