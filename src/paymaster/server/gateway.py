"""The gateway (/proxy/{host}/{path}): being built; see the gateway issue."""

from __future__ import annotations

from starlette.routing import BaseRoute

from paymaster.authority import Authority


def routes(authority: Authority) -> list[BaseRoute]:
    """The gateway's routes, mounted by the app factory."""
    return []
