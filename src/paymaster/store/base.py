"""The store protocol: one small surface that every backend implements.

The ledger's verbs are written once, in :mod:`paymaster.store.ops`, as functions of a
:class:`Tx` — a transaction that runs portable SQL (``?`` placeholders, ``RETURNING``,
``ON CONFLICT``) and appends audit events to the chain in the same transaction. A backend
supplies the transaction (SQLite: one writer thread, group commit; PostgreSQL: a pool,
row locks in a fixed order) and translates its driver's exceptions at this boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol, TypeVar

from paymaster.core.audit import Head

T = TypeVar("T")

Row = Mapping[str, Any]
Params = Sequence[Any]


class StoreUnavailable(Exception):
    """The database cannot be reached or written: the authority fails closed."""


class Tx(Protocol):
    """One database transaction, as the ledger's verbs see it."""

    @property
    def now(self) -> datetime:
        """The transaction's clock (UTC, aware)."""
        ...

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        ...

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    def one(self, sql: str, params: Params = ()) -> Row | None: ...

    def all(self, sql: str, params: Params = ()) -> list[Row]: ...

    def savepoint(self) -> AbstractContextManager[None]:
        """A nested unit that rolls back alone when its block raises."""
        ...

    def emit(self, event_type: str, subject: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Append an audit event to the chain, in this transaction."""
        ...

    def lock_budgets(self, budget_ids: Sequence[str]) -> None:
        """Lock the rows of these budgets in a fixed (sorted) order; a no-op where the
        backend already serialises writers."""
        ...


class Store(Protocol):
    """What the authority needs of a backend."""

    dialect: str

    def write(self, op: Callable[[Tx], T]) -> Future[T]:
        """Run ``op`` in a write transaction; its result or exception arrives on the future
        once the transaction (and the audit seal) committed."""
        ...

    def read(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` on a read-only snapshot, synchronously."""
        ...

    def close(self) -> None: ...

    def events(
        self, after_seq: int = 0, limit: int | None = None, chain: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The audit events in order: with ``chain``, that chain's events after seq ``after_seq``;
        without, every event, ordered by time (then as written), the first ``after_seq`` skipped
        (on a single chain both read the same)."""
        ...

    def chain_heads(self) -> list[Head]:
        """The signed head of each audit chain (SQLite keeps one, ``main``; PostgreSQL one per
        writer)."""
        ...

    def unsealed_events(self) -> dict[str, int]:
        """For each chain holding events that its signed head does not cover, the first such
        seq, read in one snapshot (so empty while the database is intact, writers or not)."""
        ...
