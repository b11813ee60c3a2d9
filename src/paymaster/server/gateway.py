"""The gateway's routes: ``ANY /proxy/{host}/{path}`` (PROTOCOL.md, Gateway).

The request path itself lives in :mod:`paymaster.gateway`; this module only mounts it.
:func:`shutdown` closes the upstream pool of every gateway an app mounts (the app's
lifespan calls it).
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from paymaster.authority import Authority
from paymaster.gateway.proxy import Gateway

__all__ = ["GatewayRoute", "routes", "shutdown"]


class _Proxy:
    """The gateway as a plain ASGI app (a class, so Starlette does not wrap it as a
    request/response function limited to GET)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.gateway.handle(Request(scope, receive))
        await response(scope, receive, send)


class GatewayRoute(Route):
    """A route served by a :class:`Gateway` (kept on the route, for the lifespan to close).

    It takes every method, including ones Starlette has no name for: every request to a
    governed host goes through the gate."""

    def __init__(self, path: str, gateway: Gateway) -> None:
        super().__init__(path, _Proxy(gateway), methods=None, name="proxy")
        self.gateway = gateway


def routes(authority: Authority) -> list[BaseRoute]:
    """The gateway's routes, mounted by the app factory."""
    gateway = Gateway(authority)
    return [GatewayRoute("/proxy/{host}/{path:path}", gateway), GatewayRoute("/proxy/{host}", gateway)]


def gateways(app: Starlette) -> list[Gateway]:
    found: list[Gateway] = []
    for route in app.routes:
        if isinstance(route, GatewayRoute) and route.gateway not in found:
            found.append(route.gateway)
    return found


async def shutdown(app: Starlette) -> None:
    """Let streams that are still settling finish, then close the upstream pools."""
    for gateway in gateways(app):
        await gateway.aclose()
