"""The Python SDK: the agent's key, the authority API clients and the governed httpx client.

Depends only on httpx, the error tree and the token signer (``paymaster.core.tokens``):
importing it never imports the server, the store or the command line.
"""

from __future__ import annotations

from paymaster.sdk.aclient import AsyncClient, AsyncHold
from paymaster.sdk.client import Client, Hold
from paymaster.sdk.governed import (
    AsyncGovernedTransport,
    GovernedTransport,
    async_governed_httpx_client,
    governed_httpx_client,
)
from paymaster.sdk.keys import AgentKey
from paymaster.sdk.models import (
    Agent,
    AmountLike,
    AuditVerification,
    Budget,
    BudgetRemaining,
    Commit,
    LedgerEntry,
    Principal,
    ProtocolError,
    Refund,
    Release,
    Reservation,
    Task,
)

__all__ = [
    "Agent",
    "AgentKey",
    "AmountLike",
    "AsyncClient",
    "AsyncGovernedTransport",
    "AsyncHold",
    "AuditVerification",
    "Budget",
    "BudgetRemaining",
    "Client",
    "Commit",
    "GovernedTransport",
    "Hold",
    "LedgerEntry",
    "Principal",
    "ProtocolError",
    "Refund",
    "Release",
    "Reservation",
    "Task",
    "async_governed_httpx_client",
    "governed_httpx_client",
]
