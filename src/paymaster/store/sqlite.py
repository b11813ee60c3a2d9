"""The embedded store: SQLite in WAL mode, one writer thread per process fed by a queue.

Concurrent callers share transactions (group commit): the writer takes every operation
waiting in the queue, runs each inside its own SAVEPOINT (so one failure rolls back only
itself), seals the audit chain once by signing its new head, and commits once. Several
processes on one database file serialise through ``BEGIN IMMEDIATE``; the chain head is
read inside each write transaction, so their events form one chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from paymaster.core.audit import GENESIS_HASH, MAIN_CHAIN, Head, build_event, canonical, sign_head
from paymaster.ids import new_id
from paymaster.store.base import Params, Row, StoreUnavailable

T = TypeVar("T")
MAX_BATCH = 512
BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    return datetime.now(UTC)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


def migrations(dialect: str) -> list[tuple[int, str]]:
    """The versioned SQL files shipped with the package, in order."""
    folder = resources.files("paymaster.store").joinpath("migrations", dialect)
    out = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql"):
            out.append((int(name.split("_", 1)[0]), entry.read_text()))
    return sorted(out)


class _SqliteTx:
    """A transaction on the writer (or a reader) connection."""

    dialect = "sqlite"

    def __init__(self, store: SqliteStore, conn: sqlite3.Connection, now: datetime, writable: bool) -> None:
        self._store = store
        self._conn = conn
        self._now = now
        self._writable = writable
        self._sp = 0

    @property
    def now(self) -> datetime:
        return self._now

    def execute(self, sql: str, params: Params = ()) -> int:
        cur = self._conn.execute(sql, tuple(params))
        return cur.rowcount

    def one(self, sql: str, params: Params = ()) -> Row | None:
        cur = self._conn.execute(sql, tuple(params))
        row: sqlite3.Row | None = cur.fetchone()
        cur.close()
        return row  # type: ignore[return-value]

    def all(self, sql: str, params: Params = ()) -> list[Row]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        self._sp += 1
        name = f"sp{self._sp}"
        chain = self._store._chain_state()
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            self._store._restore_chain(chain)
            raise
        else:
            self._conn.execute(f"RELEASE {name}")
        finally:
            self._sp -= 1

    def emit(self, event_type: str, subject: str, data: Mapping[str, Any]) -> dict[str, Any]:
        if not self._writable:
            raise RuntimeError("emit on a read-only transaction")
        return self._store._append_event(self._conn, event_type, subject, data, self._now)

    def lock_budgets(self, budget_ids: Sequence[str]) -> None:
        """SQLite holds the database write lock for the whole transaction already."""


class SqliteStore:
    dialect = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        authority_id: str,
        signing_key: Ed25519PrivateKey,
        clock: Callable[[], datetime] = utcnow,
        audit_sink: str | None = None,
    ) -> None:
        self.path = path
        self.authority_id = authority_id
        self._key = signing_key
        self._clock = clock
        self._sink = audit_sink
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = _connect(path)
        # Writers of several processes on one file queue on this lock: the kernel wakes the
        # next one the moment it is free, where SQLite's own busy handler sleeps and retries.
        self._process_lock = _ProcessLock(path + ".writer-lock") if path != ":memory:" else None
        self.migrate()
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._batch_lock = threading.Lock()
        # chain state while a write transaction is open (writer thread only)
        self._seq = 0
        self._hash = GENESIS_HASH
        self._dirty = False
        self._new_heads: list[tuple[int, str, str]] = []
        self._thread = threading.Thread(target=self._run, name="paymaster-sqlite-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ schema

    def migrate(self) -> int:
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            has_meta = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            current = 0
            if has_meta:
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                current = int(row[0]) if row else 0
            for version, sql in migrations("sqlite"):
                if version > current:
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (str(version),),
                    )
                    current = version
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreUnavailable(f"cannot migrate {self.path}: {exc}") from exc
        return current

    # ------------------------------------------------------------ writes

    def write(self, op: Callable[[Any], T]) -> Future[T]:
        fut: Future[T] = Future()
        if self._closed:
            fut.set_exception(StoreUnavailable("store is closed"))
            return fut
        # Nobody waiting and the writer idle: run the batch of one in the caller's thread,
        # saving the two thread hand-offs that dominate an uncontended call. Under load the
        # queue is not empty and the writer thread batches as usual.
        if self._queue.empty() and self._batch_lock.acquire(blocking=False):
            try:
                if self.closed:  # closed while we took the lock
                    fut.set_exception(StoreUnavailable("store is closed"))
                else:
                    self._run_batch([(op, fut)])
            finally:
                self._batch_lock.release()
            return fut
        self._queue.put((op, fut))
        return fut

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._run_queued_batch(batch)

    def _run_queued_batch(self, batch: list[tuple[Callable[[Any], Any], Future[Any]]]) -> None:
        with self._batch_lock:
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Callable[[Any], Any], Future[Any]]]) -> None:
        """Run one batch; the caller holds ``_batch_lock`` (one batch at a time per process)."""
        if self._process_lock is None:
            self._run_locked_batch(batch)
            return
        with self._process_lock:
            self._run_locked_batch(batch)

    def _run_locked_batch(self, batch: list[tuple[Callable[[Any], Any], Future[Any]]]) -> None:
        conn = self._writer
        results: list[tuple[Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            self._seq, self._hash = (int(head[0]), str(head[1])) if head else (0, GENESIS_HASH)
            self._dirty = False
            for op, fut in batch:
                if not fut.set_running_or_notify_cancel():
                    continue
                tx = _SqliteTx(self, conn, self._clock(), writable=True)
                try:
                    with tx.savepoint():
                        value = op(tx)
                except Exception as exc:  # the op rolled back alone; its caller gets the error
                    results.append((fut, False, _translate(exc)))
                else:
                    results.append((fut, True, value))
            sealed: tuple[int, str, str] | None = None
            if self._dirty:
                sig = sign_head(self._key, self._seq, self._hash)
                conn.execute(
                    "INSERT INTO audit_head (id, seq, hash, sig) VALUES (1, ?, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE"
                    " SET seq = excluded.seq, hash = excluded.hash, sig = excluded.sig",
                    (self._seq, self._hash, sig),
                )
                sealed = (self._seq, self._hash, sig)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = StoreUnavailable(f"database write failed: {exc}")
            for _, fut in batch:
                if fut.running():
                    fut.set_exception(error)
            return
        if sealed is not None and self._sink:
            self._export_head(*sealed)
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _chain_state(self) -> tuple[int, str, bool]:
        return self._seq, self._hash, self._dirty

    def _restore_chain(self, state: tuple[int, str, bool]) -> None:
        self._seq, self._hash, self._dirty = state

    def _append_event(
        self, conn: sqlite3.Connection, event_type: str, subject: str, data: Mapping[str, Any], at: datetime
    ) -> dict[str, Any]:
        seq = self._seq + 1
        event = build_event(
            authority_id=self.authority_id,
            event_id=new_id("ev_"),
            event_type=event_type,
            subject=subject,
            data=data,
            at=at,
            seq=seq,
            prevhash=self._hash,
        )
        # the canonical bytes are hashed and stored: one serialisation per event
        body = canonical(event)
        digest = hashlib.sha256(body).hexdigest()
        conn.execute(
            "INSERT INTO events (seq, id, type, time, subject, hash, event) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, event["id"], event_type, event["time"], subject, digest, body.decode("utf-8")),
        )
        self._seq, self._hash, self._dirty = seq, digest, True
        return event

    def _export_head(self, seq: int, head_hash: str, sig: str) -> None:
        """Heads also go to an append-only sink outside the database (see audit verify --against)."""
        assert self._sink is not None
        try:
            with open(self._sink, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"seq": seq, "hash": head_hash, "sig": sig}) + "\n")
        except OSError:
            # the database already committed; a missing sink line weakens, but does not break, verification
            pass

    # ------------------------------------------------------------ reads

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def read(self, op: Callable[[Any], T]) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            try:
                return op(_SqliteTx(self, conn, self._clock(), writable=False))
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"database read failed: {exc}") from exc

    def events(
        self, after_seq: int = 0, limit: int | None = None, chain: str | None = None
    ) -> Iterator[dict[str, Any]]:
        if chain not in (None, MAIN_CHAIN):
            return  # one chain here
        conn = _connect(self.path)
        try:
            sql = "SELECT event FROM events WHERE seq > ? ORDER BY seq"
            params: tuple[Any, ...] = (after_seq,)
            if limit is not None:
                sql += " LIMIT ?"
                params = (after_seq, limit)
            for (text,) in conn.execute(sql, params):
                yield json.loads(text)
        finally:
            conn.close()

    def chain_heads(self) -> list[Head]:
        row = self.read(lambda tx: tx.one("SELECT seq, hash, sig FROM audit_head WHERE id = 1"))
        return [] if row is None else [Head(int(row["seq"]), str(row["hash"]), str(row["sig"]), MAIN_CHAIN)]

    def unsealed_events(self) -> dict[str, int]:
        row = self.read(
            lambda tx: tx.one(
                "SELECT MIN(seq) AS s FROM events"
                " WHERE seq > COALESCE((SELECT seq FROM audit_head WHERE id = 1), 0)"
            )
        )
        return {} if row is None or row["s"] is None else {MAIN_CHAIN: int(row["s"])}

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)
        with self._batch_lock:  # a batch running in a caller's thread finishes first
            self._writer.close()
        if self._process_lock is not None:
            self._process_lock.close()
        with self._readers_lock:
            for conn in self._readers:
                with suppress(sqlite3.Error):
                    conn.close()
            self._readers.clear()


class _ProcessLock:
    """An exclusive ``flock`` on a file beside the database, held around each write batch."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


def _translate(exc: Exception) -> Exception:
    """Driver errors never leak past the store."""
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"database error: {exc}")
    return exc


def _split_sql(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def sqlite_path(db_url: str) -> str:
    if db_url.startswith("sqlite:///"):
        return db_url.removeprefix("sqlite:///")
    if db_url == "sqlite://:memory:":
        return ":memory:"
    raise ValueError(f"not an sqlite URL: {db_url}")
