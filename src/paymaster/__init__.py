"""Paymaster: the spend authority for AI agents.

The public Python SDK::

    import paymaster

    key = paymaster.AgentKey.generate()
    admin = paymaster.Client("http://127.0.0.1:8787", admin_key="pm_admin_…")
    agent = admin.agents.create("crew-writer", public_key=key.public_key)
    with admin.reserve(agent.id, key, connector="local-ocr", amount="0.02") as hold:
        ...

Importing ``paymaster`` loads the SDK only (httpx, the error tree, the token signer),
never the server, the store or the command line. See docs/sdk.md.

The error tree and ``Money`` load with the package; the SDK classes load on first use, so
the server, the store and the command line, which import ``paymaster.*`` modules, do not
pay for httpx and the SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from paymaster.errors import (
    AdminKeyRequired,
    AgentFrozen,
    AgentRevoked,
    AgentUnknown,
    AuthorityUnavailable,
    BalanceInsufficient,
    ConnectorBlocked,
    FxRateUnknown,
    IdempotencyConflict,
    InvalidAmount,
    InvalidRequest,
    LoopDetected,
    NoBudgetConfigured,
    NotFound,
    PaymasterError,
    PerCallLimitExceeded,
    PolicyCapExceeded,
    PolicyDomainBlocked,
    PriceStale,
    PriceUnknown,
    ReservationExpired,
    ReservationSettled,
    SpendDenied,
    SpendTokenAmountExceeded,
    SpendTokenExpired,
    SpendTokenInvalid,
    SpendTokenMissing,
    SpendTokenReplayed,
    TaskForbidden,
    UpstreamFailed,
    UpstreamUnavailable,
)
from paymaster.money import Money

if TYPE_CHECKING:
    from paymaster.sdk.aclient import AsyncClient
    from paymaster.sdk.client import Client
    from paymaster.sdk.governed import async_governed_httpx_client, governed_httpx_client
    from paymaster.sdk.keys import AgentKey

__version__ = "0.1.0"

__all__ = [
    "AdminKeyRequired",
    "AgentFrozen",
    "AgentKey",
    "AgentRevoked",
    "AgentUnknown",
    "AsyncClient",
    "AuthorityUnavailable",
    "BalanceInsufficient",
    "Client",
    "ConnectorBlocked",
    "FxRateUnknown",
    "IdempotencyConflict",
    "InvalidAmount",
    "InvalidRequest",
    "LoopDetected",
    "Money",
    "NoBudgetConfigured",
    "NotFound",
    "PaymasterError",
    "PerCallLimitExceeded",
    "PolicyCapExceeded",
    "PolicyDomainBlocked",
    "PriceStale",
    "PriceUnknown",
    "ReservationExpired",
    "ReservationSettled",
    "SpendDenied",
    "SpendTokenAmountExceeded",
    "SpendTokenExpired",
    "SpendTokenInvalid",
    "SpendTokenMissing",
    "SpendTokenReplayed",
    "TaskForbidden",
    "UpstreamFailed",
    "UpstreamUnavailable",
    "__version__",
    "async_governed_httpx_client",
    "governed_httpx_client",
]

# Where each lazily loaded name lives.
_SDK_NAMES = {
    "AgentKey": "paymaster.sdk.keys",
    "AsyncClient": "paymaster.sdk.aclient",
    "Client": "paymaster.sdk.client",
    "async_governed_httpx_client": "paymaster.sdk.governed",
    "governed_httpx_client": "paymaster.sdk.governed",
}

if not TYPE_CHECKING:  # hidden from type checkers, so a misspelt name is still an error

    def __getattr__(name: str) -> Any:
        module = _SDK_NAMES.get(name)
        if module is None:
            raise AttributeError(f"module 'paymaster' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
